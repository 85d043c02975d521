"""sta_dist inside diffusers' video transformers (Wan 2.1, HunyuanVideo; HunyuanVideo-1.5's
SSTA and Kandinsky 6 SR's NABLA with selected tiles).

    import sta_dist.diffusers as sta_diffusers
    handle = sta_diffusers.enable(pipe.transformer, tile=(6, 8, 8), window=(3, 3, 3))
    video = pipe(prompt, callback_on_step_end=handle.callback).frames[0]
    sta_diffusers.disable(pipe.transformer)

Training with ``parallel=``: ``loss.backward()``, then ``sta_diffusers.reduce_gradients(transformer)``
(each rank holds its share of every gradient), then the optimizer step (docs/diffusers.md).
"""

from .handle import CallContext, STAHandle, disable, enable, reduce_gradients
from .hunyuan import HUNYUAN_VIDEO_CP_PLAN, HunyuanVideoSTAProcessor
from .hunyuan15 import HunyuanVideo15STAProcessor
from .models import SUPPORTED
from .wan import WanSTAProcessor

__all__ = ["enable", "disable", "reduce_gradients", "STAHandle", "CallContext", "SUPPORTED", "WanSTAProcessor",
           "HunyuanVideoSTAProcessor", "HUNYUAN_VIDEO_CP_PLAN", "HunyuanVideo15STAProcessor"]
