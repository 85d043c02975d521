"""Tile means on the device, without a host sync: per batch sample, head and tile, the
mean of ``q`` (or ``k``) over the tile's tokens (partial tiles: their tokens only).

Sums are taken in float64, which is exact for bf16/fp16 inputs (and fp32 inputs of
realistic range), so they do not depend on the order of the tokens: natural order, tiled
order, a rank's box, the Triton path and the torch path all give the same bits, and so
does a sum over heads split across ranks. Means are rounded once to float32.

Legend: ``_bshd`` = ``[batch, seq, heads, head_dim]``; ``_bhnd`` = ``[batch, heads, tiles, head_dim]``.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from .. import geometry
from ..geometry import TileRows, Triple
from ..local import tile_row_index

_CHUNK_ELEMENTS = 1 << 23
"""Bound on one gathered float64 chunk of the torch path (64 MiB)."""


@functools.lru_cache(maxsize=256)
def _table(rows: tuple[TileRows, ...], tile_ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    table = torch.tensor([[t, r.base, r.stride_t, r.stride_h] for t, r in zip(tile_ids, rows)], dtype=torch.int32)
    return table.reshape(-1, 4).to(device)


@functools.lru_cache(maxsize=256)
def _gather_index(rows: tuple[TileRows, ...], tile_ids: tuple[int, ...], canvas: Triple, tile: Triple,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    idx, ok = tile_row_index(rows, tile_ids, canvas, tile)
    return idx.to(device), ok.to(device)


@functools.lru_cache(maxsize=256)
def _counts(tile_ids: tuple[int, ...], canvas: Triple, tile: Triple, device: torch.device) -> torch.Tensor:
    grid = geometry.grid_shape(canvas, tile)
    counts = [geometry.volume(geometry.tile_extent(geometry.tile_coords(t, grid), canvas, tile)) for t in tile_ids]
    return torch.tensor(counts, dtype=torch.float64).to(device)


def tile_counts(tile_ids: Sequence[int], canvas: Triple, tile: Triple, device) -> torch.Tensor:
    """``[n]`` float64: tokens in each tile."""
    return _counts(tuple(tile_ids), tuple(canvas), tuple(tile), torch.device(device))


def tile_sums(x_bshd: torch.Tensor, rows: Sequence[TileRows], tile_ids: Sequence[int], canvas: Triple,
              tile: Triple, use_triton: bool) -> torch.Tensor:
    """``[B, H, n, D]`` float64: each listed tile's sum over its tokens, the tokens found at
    ``rows`` (one :class:`TileRows` per tile) in ``x_bshd``. ``use_triton``: one launch of
    ``kernels/tile_sums.py``; else torch, gathering float64 chunks of tiles."""
    rows, tile_ids = tuple(rows), tuple(tile_ids)
    canvas, tile = tuple(canvas), tuple(tile)
    B, _, H, D = x_bshd.shape
    if use_triton:
        from ..kernels.tile_sums import tile_sums as triton_tile_sums

        return triton_tile_sums(x_bshd, _table(rows, tile_ids, x_bshd.device), canvas=canvas, tile=tile)
    idx, ok = _gather_index(rows, tile_ids, canvas, tile, x_bshd.device)
    out = torch.empty(B, len(tile_ids), H, D, dtype=torch.float64, device=x_bshd.device)
    vol = idx.shape[1] if idx.dim() == 2 else 0
    chunk = max(1, _CHUNK_ELEMENTS // max(1, B * vol * H * D))
    for lo in range(0, len(tile_ids), chunk):
        part = x_bshd[:, idx[lo:lo + chunk]].double()  # [B, c, vol, H, D]
        out[:, lo:lo + chunk] = torch.where(ok[lo:lo + chunk, :, None, None], part, 0.0).sum(2)
    return out.transpose(1, 2)


def means(sums_bhnd: torch.Tensor, counts: torch.Tensor, heads: int = 1) -> torch.Tensor:
    """Float32 means from float64 sums over ``counts`` tokens and ``heads`` heads each."""
    return (sums_bhnd / (counts[:, None] * heads)).float()
