"""Per-tile sums of a ``[B, S, H, D]`` tensor in float64: the first step of the tile means
that choose selected tiles (sta_dist.selection). One program per (tile, batch x head)
walks its tile's tokens through the same table format as the attention kernel
(``sta_fwd.py``), so natural order, tiled order and a rank's packed box all read in place.

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
def _tile_sums_kernel(X, OUT, TILES, n_heads, sxb, sxs, sxh, sob, soh, son,
                      grid_h, grid_w, canvas_t, canvas_h, canvas_w,
                      TT: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, EVEN: tl.constexpr):
    VOL: tl.constexpr = TT * TH * TW
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    gid = tl.load(TILES + i * 4)
    ct = gid // (grid_h * grid_w)
    ch = (gid // grid_w) % grid_h
    cw = gid % grid_w
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    acc = tl.zeros([BLOCK_D], dtype=tl.float64)
    for start in range(0, VOL, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        rows, lt, lh, lw = _token_rows(TILES + i * 4 + 1, offs, TH, TW)
        valid = offs < VOL
        if not EVEN:  # partial tiles: only the tokens inside the canvas
            valid = valid & (lt < canvas_t - ct * TT) & (lh < canvas_h - ch * TH) & (lw < canvas_w - cw * TW)
        x = tl.load(X + b * sxb + h * sxh + rows[:, None] * sxs + offs_d[None, :],
                    mask=valid[:, None] & d_valid[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float64), 0)
    tl.store(OUT + b * sob + h * soh + i * son + offs_d, acc, mask=d_valid)


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
    if n and B * H:
        _tile_sums_kernel[(n, B * H)](
            x_bshd, out, tiles, H, x_bshd.stride(0), x_bshd.stride(1), x_bshd.stride(2),
            out.stride(0), out.stride(1), out.stride(2), grid[1], grid[2], *canvas,
            TT=tile[0], TH=tile[1], TW=tile[2], HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_T=32,
            EVEN=all(c % t == 0 for c, t in zip(canvas, tile)), num_warps=4,
        )
    return out
