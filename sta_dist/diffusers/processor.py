"""The base of the models' attention processors (:mod:`.wan`, :mod:`.hunyuan`,
:mod:`.kandinsky`), kept apart from :mod:`.handle`: the handle reaches the processors
through its model table (:mod:`.models`), so they must not import it."""

from __future__ import annotations


class LayerProcessor:
    """What every sta_dist attention processor is: bound to its handle and its layer of
    the mask strategy. diffusers' ``enable_parallelism()`` writes its config into
    ``_parallel_config`` (Ulysses: head mode on its group)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, handle, layer: int):
        self.handle = handle
        self.layer = layer
