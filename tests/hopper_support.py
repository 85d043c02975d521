"""Shared by the GPU tests of the Hopper kernels and of the route: random CUDA tensors,
the kernels' head table, and a tile-mode rank's local problem (own box, box + halo)."""

from __future__ import annotations

import math

import torch

from sta_dist import geometry
from sta_dist.local import LocalHeads, LocalLayout


def randn(shape, dtype=torch.bfloat16, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=g, device=device, dtype=dtype)


def head_table(windows, canvas, tile, n_heads, n_kv):
    """The kernels' ``heads [n, 5]`` table, built as the dispatch builds it."""
    from sta_dist.kernel_calls import head_table as _head_table

    heads = LocalHeads.build(windows, geometry.grid_shape(canvas, tile), n_kv)
    return _head_table(heads, tuple(range(n_heads)), torch.device("cuda"))


def box_and_halo(canvas, tile, text, seed, heads=4, dtype=torch.bfloat16, device="cuda"):
    """A tile-mode rank's local problem from natural-order tensors: its own box (the tiles
    with w index < 2) as query tiles, then as key tiles the box and its halo (w index 2),
    packed in that order as the halo exchange lays them, text rows after each. Returns the
    natural q, k, v, the local ones, the layout and the natural rows of the box."""
    grid = geometry.grid_shape(canvas, tile)
    ids = range(geometry.num_tiles(grid))
    box = [t for t in ids if geometry.tile_coords(t, grid)[2] < 2]
    halo = [t for t in ids if geometry.tile_coords(t, grid)[2] == 2]
    n = math.prod(canvas)
    q, k, v = (randn((1, n + text, heads, 128), dtype, seed + i, device) for i in range(3))
    box_rows, kv_rows = (geometry.packed_natural_index(canvas, tile, t).to(device) for t in (box, box + halo))
    text_rows = torch.arange(n, n + text, device=device)
    local = (q[:, torch.cat([box_rows, text_rows])], *(x[:, torch.cat([kv_rows, text_rows])] for x in (k, v)))
    layout = LocalLayout.packed(canvas, tile, text, box, box + halo, text_q_video_keys=len(box_rows))
    return (q, k, v), local, layout, box_rows
