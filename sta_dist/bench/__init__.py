"""The benchmarks and their anchors, beside the runtime rather than in it (nothing in
``sta_dist`` outside this package imports it; ``sta-dist bench`` does, lazily):

- :mod:`.kernel`: ``sta-dist bench kernel``: one device, the named cases against the anchors
  (FlexAttention-STA, cuDNN, flash), a mask-strategy replay, launch-config sweeps;
- :mod:`.dist`: ``sta-dist bench dist``: the layer on every rank in each mode against one GPU
  and the Ulysses + FlexAttention-STA anchor, with the cost model's prediction;
- :mod:`.selection`: window plus selected tiles against the window alone and FlexAttention
  given the same block mask;
- :mod:`.anchors`: the anchors themselves (FlexAttention with the STA mask, SDPA).
- :mod:`.common`: what they share: the cases' canvases and tile, and the timer.
"""
