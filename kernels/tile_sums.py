"""Per-tile sums of a ``[B, S, H, D]`` tensor in float64: the first step of the tile means
that choose selected tiles (sta_dist.selection). One program per (tile, batch sample,
block of ``BLOCK_C`` columns of the heads-by-head-dim row) walks its tile's tokens through
the same table format as the attention kernel (``sta_fwd.py``), so natural order, tiled
order and a rank's packed box all read in place; a program reads whole stretches of each
token's row (several heads at once), not one head's 256 bytes at a time.

The sum is accumulated in float64: for bf16/fp16 inputs (and fp32 of realistic range)
every partial sum is exact, so the result does not depend on the order of the tokens:
the same on every layout, backend and rank (the torch path in
``sta_dist.selection.means`` gets the same bits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sta_fwd import _token_rows


@triton.jit
def _tile_sums_kernel(X, OUT, TILES, n_cols, sxb, sxs, sxh, sob, soh, son,
                      grid_h, grid_w, canvas_t, canvas_h, canvas_w,
                      TT: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, EVEN: tl.constexpr):
    VOL: tl.constexpr = TT * TH * TW
    i = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)  # column = head * HEAD_DIM + d
    c_valid = offs_c < n_cols
    h = (offs_c // HEAD_DIM).to(tl.int64)
    d = offs_c % HEAD_DIM
    gid = tl.load(TILES + i * 4)
    ct = gid // (grid_h * grid_w)
    ch = (gid // grid_w) % grid_h
    cw = gid % grid_w
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float64)  # summed over its rows once, at the end
    for start in range(0, VOL, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        rows, lt, lh, lw = _token_rows(TILES + i * 4 + 1, offs, TH, TW)
        valid = offs < VOL
        if not EVEN:  # partial tiles: only the tokens inside the canvas
            valid = valid & (lt < canvas_t - ct * TT) & (lh < canvas_h - ch * TH) & (lw < canvas_w - cw * TW)
        x = tl.load(X + b * sxb + rows[:, None] * sxs + (h * sxh + d)[None, :],
                    mask=valid[:, None] & c_valid[None, :], other=0.0)
        acc += x.to(tl.float64)
    tl.store(OUT + b * sob + h * soh + i * son + d, tl.sum(acc, 0), mask=c_valid)


def tile_sums(x_bshd: torch.Tensor, tiles: torch.Tensor, *, canvas, tile) -> torch.Tensor:
    """``x_bshd [B, S, H, D]`` (last dim contiguous), ``tiles [n, 4]`` int32 (per tile:
    global id, base, stride_t, stride_h; ``sta_fwd``'s ``q_tiles`` format) -> float64
    ``[B, H, n, D]``: each tile's sum over its tokens."""
    B, _, H, D = x_bshd.shape
    if x_bshd.stride(-1) != 1:
        raise ValueError(f"x must have a contiguous last dim, got stride {x_bshd.stride()}")
    n = tiles.shape[0]
    out = torch.empty(B, H, n, D, dtype=torch.float64, device=x_bshd.device)
    grid = tuple(-(-c // t) for c, t in zip(canvas, tile))
    block_c = min(512, triton.next_power_of_2(H * D))
    if n and B * H:
        _tile_sums_kernel[(n, B, triton.cdiv(H * D, block_c))](
            x_bshd, out, tiles, H * D, x_bshd.stride(0), x_bshd.stride(1), x_bshd.stride(2),
            out.stride(0), out.stride(1), out.stride(2), grid[1], grid[2], *canvas,
            TT=tile[0], TH=tile[1], TW=tile[2], HEAD_DIM=D, BLOCK_C=block_c, BLOCK_T=16,
            EVEN=all(c % t == 0 for c, t in zip(canvas, tile)), num_warps=8,
        )
    return out
