"""``fastvideo_kernel`` where it is not installed: FastVideo's CUDA platform imports
``fastvideo_kernel.sliding_tile_attention`` before it selects STA, so without this a GPU
machine lacking FastVideo's kernel package could not select the backend at all. Served
only when the real package is absent (the hook's fallback finder); video sparse attention
and the other kernels stay unavailable, as they were.
"""

from __future__ import annotations

from ...api import sliding_tile_attention as _sta
from ...geometry import fastvideo_window, grid_shape

__version__ = "sta_dist"
TILE = (6, 8, 8)


def sliding_tile_attention(q, k, v, window_size, text_length: int, has_text: bool = True,
                           seq_shape: str = "30x48x80"):
    """FastVideo's kernel call: ``q, k, v [B, H, S, D]`` in tiled order (tile 6x8x8) of the
    canvas ``seq_shape`` (``"TxHxW"``), then text; one window per head in FastVideo's
    rule; ``text_length`` valid text tokens (``has_text=False``: none)."""
    canvas = tuple(int(x) for x in seq_shape.split("x"))
    grid = grid_shape(canvas, TILE)
    windows = [fastvideo_window(tuple(int(x) for x in w), grid) for w in window_size]
    out = _sta(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), canvas=canvas, tile=TILE, window=windows,
               text_length=text_length if has_text else 0, layout="tiled")
    return out.transpose(1, 2)
