"""What the CUDA kernel's online redo costs (one GPU, Hopper): HunyuanVideo 30x48x80, tile
6x8x8, (3,3,3), 24 heads, bf16, timed three ways in one process: random inputs (no program
redoes), and inputs where every program of a chosen share redoes (its query rows point at a
key, in its window past block 0, whose score is 120 nats above the rest). Each output is
checked on sampled rows against the fp32 reference.

    python3 tools/redo_cost.py
"""

from __future__ import annotations

import math

import torch

import sta_dist
from sta_dist import geometry
from sta_dist.bench.common import time_ms
from sta_dist.testing import sampled_check

CANVAS, TILE, WINDOW, HEADS = (30, 48, 80), (6, 8, 8), (3, 3, 3), 24


def inputs(share: float, seed: int = 0):
    """q, k, v in natural order; every query row of ``share`` of the tiles aims at a hot key
    in its own tile's last t-slice: the tile's second 192-row block, so never a program's
    block 0 (the first block of its window's first tile)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    n = math.prod(CANVAS)
    q, k, v = (torch.randn((1, n, HEADS, 128), generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    if share == 0:
        return q, k, v
    u = torch.randn(128, generator=g, device="cuda")
    u = (u / u.norm()).to(torch.bfloat16)
    grid = geometry.grid_shape(CANVAS, TILE)
    tiles = torch.rand(geometry.num_tiles(grid), generator=g, device="cuda") < share
    q_grid, k_grid = (x.view(1, *CANVAS, HEADS, 128) for x in (q, k))
    for tile_id in tiles.nonzero().flatten().tolist():
        ts, hs, ws = (slice(c * s, (c + 1) * s) for c, s in zip(geometry.tile_coords(tile_id, grid), TILE))
        q_grid[:, ts, hs, ws] = u * 128**0.5
        k_grid[:, ts.stop - 1, hs.start, ws.start] = u * 120.0
    return q, k, v


def main():
    rows = []
    for share in (0.0, 0.1, 1.0):
        q, k, v = inputs(share)
        call = lambda: sta_dist.sliding_tile_attention(q, k, v, canvas=CANVAS, tile=TILE, window=WINDOW)  # noqa: E731
        out = call()
        check = sampled_check(q, k, v, out, canvas=CANVAS, tile=TILE, window=WINDOW, text_length=0)
        rows.append((share, time_ms(call), bool(torch.isfinite(out).all()) and check["ok"]))
    base = rows[0][1]
    print("| query tiles whose programs redo | ms | / random inputs | finite and checked |")
    print("|---|---|---|---|")
    for share, ms, ok in rows:
        print(f"| {share:.0%} | {ms:.2f} | {ms / base:.2f}x | {ok} |")


if __name__ == "__main__":
    main()
