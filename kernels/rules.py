"""What the hand-written Hopper kernel (``sta_fwd_cuda.cu``) can take, as reasons: pure
functions of plain numbers and strings (NATTEN's ``can_run_*``), a string that says why
not, or ``None``. The launcher (``sta_fwd_cuda.py``) refuses a call by them, and
``sta_dist.route`` asks them when it chooses a kernel, so both give the same reason.
Nothing here imports the runtime above the kernels."""

from __future__ import annotations

import math
from typing import Optional

HEAD_DIM = 128
"""The one head dim the CUDA kernel is built for."""
BLOCK = 128
"""Rows of one query or key block of the CUDA kernel."""
MAX_TILES = 1 << 22
"""The CUDA kernel decodes listed tile ids in float arithmetic, exact below this many tiles."""

Triple = tuple[int, int, int]


def cuda_device_reason(device_type: str, capability: Optional[tuple[int, int]]) -> Optional[str]:
    """Why the CUDA kernel cannot run on a device of ``device_type`` (``"cuda"``,
    ``"cpu"``, ...) and compute ``capability`` (``None`` off a GPU); ``None``: it can."""
    if device_type != "cuda":
        return f"needs a CUDA GPU, the tensors are on {device_type}"
    if capability is None or capability[0] != 9:
        return f"needs Hopper (sm_90), this GPU is sm_{''.join(map(str, capability or ()))}"
    return None


def cuda_call_reason(*, dtype: str, head_dim: int, canvas: Triple, tile: Triple, order: str, kv_rows: int,
                     kv_video: int, text_keys: int, bulk_copy: bool) -> Optional[str]:
    """Why the CUDA kernel cannot take a call's video queries; ``None``: it can.

    ``dtype``: ``"bfloat16"``, ``"float16"``, ...; ``order``: ``"natural"`` (the whole
    canvas, then the text), ``"packed"`` (whole tiles of consecutive rows placed by tables)
    or anything else; ``kv_rows``: rows of k and v (the fewer); ``kv_video``: the first
    text row of k/v; ``text_keys``: text key rows the video queries attend; ``bulk_copy``:
    the copy engine can read q, k and v (``descriptors.bulk_copy_layout_ok``)."""
    return (_common(head_dim, canvas, tile, bulk_copy)
            or _blocks(dtype, canvas, tile, order, kv_rows, kv_video, text_keys))


def _common(head_dim: int, canvas: Triple, tile: Triple, bulk_copy: bool) -> Optional[str]:
    """What the CUDA kernel's program reads: head dim 128, whole tiles, rows the copy
    engine can read."""
    if head_dim != HEAD_DIM:
        return f"is built for head dim {HEAD_DIM}, got head_dim={head_dim}"
    if not all(c % t == 0 for c, t in zip(canvas, tile)):
        return f"needs whole tiles: canvas={canvas} does not divide by tile={tile}"
    if not bulk_copy:
        return "reads rows through the copy engine: heads must be adjacent and row strides 16-byte multiples"
    return None


def _blocks(dtype: str, canvas: Triple, tile: Triple, order: str, kv_rows: int, kv_video: int,
            text_keys: int) -> Optional[str]:
    """What the CUDA kernel's copies can read: the natural canvas or packed whole tiles, in
    blocks of 128 rows, bf16 or fp16, and the text keys after the video keys."""
    tt, th, tw = tile
    plane = th * tw
    if order == "natural":
        blocks = (BLOCK // 2) % plane == 0 and tt % (BLOCK // plane) == 0
    else:
        blocks = (tt * plane) % BLOCK == 0
    tiles = math.prod(-(-c // t) for c, t in zip(canvas, tile))
    return ((f"reads the natural canvas or whole tiles of consecutive rows, the tokens here are {order}"
             if order not in ("natural", "packed") else None)
            or (f"is built for bfloat16 and float16, got dtype={dtype}"
                if dtype not in ("bfloat16", "float16") else None)
            or (f"reads blocks of {BLOCK} rows: tile={tile} does not split into them in {order} order"
                if not blocks else None)
            or (f"needs {text_keys} text keys after k/v row {kv_video}, k/v hold {kv_rows} rows"
                if kv_rows < kv_video + text_keys else None)
            or (f"numbers tiles below {MAX_TILES} (its float decode of tile ids), the grid has {tiles}"
                if tiles >= MAX_TILES else None))


def cuda_backward_reason(*, dtype: str, head_dim: int, canvas: Triple, tile: Triple, packed: bool, even: bool,
                         rows_aligned: bool, bulk_copy: bool) -> Optional[str]:
    """Why the CUDA backward (``sta_bwd_cuda.cu``) cannot take a call; ``None``: it can.

    ``packed``: every query and k/v tile's rows are consecutive (tiled storage), or the
    whole canvas in natural order, which the caller carries to tiled order and back;
    ``even``: the canvas holds whole tiles; ``rows_aligned``: each query tile's first row
    and the first text row are multiples of 4 (the rows' statistics come by 16-byte bulk
    copies); ``bulk_copy``: the copy engine can read q, k, v and dout."""
    if not packed:
        return "reads whole tiles of consecutive rows (tiled order), the tokens here are in another order"
    volume = math.prod(tile)
    return (_common(head_dim, canvas, tile, bulk_copy)
            or (f"is built for bfloat16 and float16, got dtype={dtype}"
                if dtype not in ("bfloat16", "float16") else None)
            or (f"holds blocks of {BLOCK} rows of one tile: tile={tile} has {volume} tokens"
                if volume % BLOCK else None)
            or ("needs whole tiles" if not even else None)
            or ("needs each query tile's first row a multiple of 4" if not rows_aligned else None))
