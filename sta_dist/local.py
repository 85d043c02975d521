"""One local attention call, described for the backends: which query tiles to compute,
where every tile's tokens sit in ``q`` and in ``k``/``v``, the heads, and the text.

A single-device call, a head-parallel rank (all tokens, some heads) and a tile-parallel
rank (own box of tiles plus a halo) are all the same problem to a backend; only this
description changes. The Triton kernel and the torch backend both consume it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from typing import NamedTuple, Optional, Sequence

import torch

from . import geometry
from .geometry import Box, TileRows, Triple


def head_index(heads: Sequence[int], device: Optional[torch.device] = None):
    """An index for the head dim of ``[B, S, H, D]``: a slice for a contiguous block (views,
    plain copies), else a gather's index: on a GPU ``device`` a tensor there (cached: a
    Python list would be copied to the GPU on every use, and that copy waits for the GPU,
    so the host could no longer run ahead of it), else the list."""
    heads = tuple(heads)
    if heads and heads == tuple(range(heads[0], heads[-1] + 1)):
        return slice(heads[0], heads[-1] + 1)
    if device is not None and device.type != "cpu":
        return _index_on(heads, device)
    return list(heads)


def index_on(ids: Sequence[int], device: torch.device) -> torch.Tensor:
    """``ids`` as a long index tensor kept on ``device`` (cached): a Python list as an index
    is copied to the GPU on every use, and that copy makes the host wait for the GPU."""
    return _index_on(tuple(ids), torch.device(device))


@functools.lru_cache(maxsize=4096)
def _index_on(ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long, device=device)


@dataclass(frozen=True, slots=True)
class LocalLayout:
    """Token placement of one local call (no heads, no text validity: those vary per call).

    ``q`` holds ``q_video`` video rows then ``q_text`` text rows; ``k``/``v`` hold
    ``kv_video`` video rows then the text rows.
    """

    canvas: Triple
    tile: Triple
    q_tiles: tuple[int, ...]
    """Global ids of the video query tiles this call computes, in storage order."""
    q_rows: tuple[TileRows, ...]
    """Where each of ``q_tiles`` sits in ``q``."""
    kv_rows: tuple[Optional[TileRows], ...]
    """Per global tile id: where it sits in ``k``/``v``, ``None`` if it is not there."""
    q_video: int
    kv_video: int
    q_text: int
    text_q_video_keys: int
    """Text queries attend the video key rows ``[0, text_q_video_keys)``."""
    key_box: Optional[Box] = None
    """Video queries attend only the key tiles of their window inside this box (``None``:
    the whole window): one query's keys computed in parts, e.g. a tile-mode rank's own box
    while its halo is on the way, then each neighbour's box."""
    _hash: int = field(init=False, repr=False, compare=False, default=0)
    """Computed once: the backends' caches look layouts up on every call, and hashing
    hundreds of tile rows costs ~45 us each time."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash(tuple(getattr(self, f.name) for f in fields(self) if f.compare)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def grid(self) -> Triple:
        return geometry.grid_shape(self.canvas, self.tile)

    @staticmethod
    def natural(canvas: Triple, tile: Triple, text_len: int) -> "LocalLayout":
        """The whole canvas in natural order, then the text."""
        rows = tuple(geometry.natural_tile_rows(canvas, tile))
        n = geometry.volume(canvas)
        return LocalLayout(canvas, tile, tuple(range(len(rows))), rows, rows, n, n, text_len, n)

    @staticmethod
    def packed(
        canvas: Triple,
        tile: Triple,
        text_len: int,
        q_tiles: Sequence[int],
        kv_tiles: Optional[Sequence[int]] = None,
        text_q_video_keys: Optional[int] = None,
    ) -> "LocalLayout":
        """Query tiles packed in ``q``; key tiles (default: the query tiles) packed in
        ``k``/``v``. With every tile in id order this is the tiled order. (Cached: a
        distributed call builds one per new set of windows.)"""
        kv_tiles = q_tiles if kv_tiles is None else kv_tiles
        return _packed(tuple(canvas), tuple(tile), text_len, tuple(q_tiles), tuple(kv_tiles), text_q_video_keys)

    @staticmethod
    def tiled(canvas: Triple, tile: Triple, text_len: int) -> "LocalLayout":
        all_tiles = range(geometry.num_tiles(geometry.grid_shape(canvas, tile)))
        return LocalLayout.packed(canvas, tile, text_len, all_tiles)


@functools.lru_cache(maxsize=256)
def _packed(canvas: Triple, tile: Triple, text_len: int, q_tiles: tuple[int, ...], kv_tiles: tuple[int, ...],
            text_q_video_keys: Optional[int]) -> LocalLayout:
    grid = geometry.grid_shape(canvas, tile)
    kv_rows: list[Optional[TileRows]] = [None] * geometry.num_tiles(grid)
    for tid, rows in zip(kv_tiles, geometry.packed_tile_rows(canvas, tile, kv_tiles)):
        kv_rows[tid] = rows
    n_q = geometry.packed_token_count(canvas, tile, q_tiles)
    n_kv = geometry.packed_token_count(canvas, tile, kv_tiles)
    return LocalLayout(canvas, tile, q_tiles, tuple(geometry.packed_tile_rows(canvas, tile, q_tiles)), tuple(kv_rows),
                       n_q, n_kv, text_len, n_kv if text_q_video_keys is None else text_q_video_keys)


@functools.lru_cache(maxsize=64)
def call_layout(canvas: Triple, tile: Triple, text_len: int, order: str) -> LocalLayout:
    """The layout of a one-device call whose video tokens come in ``order``: ``"natural"``
    or ``"tiled"`` (checked by the caller)."""
    return (LocalLayout.natural if order == "natural" else LocalLayout.tiled)(canvas, tile, text_len)


@dataclass(frozen=True, slots=True)
class LocalHeads:
    """Per query head of the local call: its effective window and its kv head."""

    windows: tuple[Triple, ...]
    """Already clamped to the grid: ``min(k_a, n_a)``."""
    kv_heads: tuple[int, ...]

    @staticmethod
    def build(
        windows: Sequence[Triple], grid: Triple, num_kv_heads: int, kv_heads=None
    ) -> "LocalHeads":
        """GQA default: query head ``h`` uses kv head ``h // (H // Hkv)``."""
        group = len(windows) // num_kv_heads
        kv = tuple(h // group for h in range(len(windows))) if kv_heads is None else tuple(kv_heads)
        return LocalHeads(tuple(geometry.effective_window(w, grid) for w in windows), kv)


@dataclass(frozen=True, slots=True)
class LocalText:
    """How many text rows are valid, per role, in one local call."""

    q_valid: int
    """Text query rows ``< q_valid`` attend; the rest get zero output."""
    kv_for_video_q: int
    """Text key rows that video queries attend."""
    kv_for_text_q: int
    """Text key rows that text queries attend (0 on ranks whose partials must not count
    the text keys twice)."""

    @staticmethod
    def single(text_length: int) -> "LocalText":
        return LocalText(text_length, text_length, text_length)

    @staticmethod
    def per_sample(text_length, kv_for_text_q: bool = True):
        """One ``LocalText`` for an int (every sample), a tuple of them for a tuple of
        per-sample counts. ``kv_for_text_q=False``: text queries attend no text keys."""
        def one(n: int) -> "LocalText":
            return LocalText(n, n, n if kv_for_text_q else 0)

        return tuple(one(n) for n in text_length) if isinstance(text_length, tuple) else one(text_length)


class Halo(NamedTuple):
    """K/v rows of a local call held apart from ``k``/``v``: the layout's video key rows
    from ``first_row`` on (a tile-mode rank's halo, as received), ``[B, n, Hkv, D]`` each.
    ``k``/``v`` then hold the rows before ``first_row``, then the text."""

    k: torch.Tensor
    v: torch.Tensor
    first_row: int

    def joined(self, k_bshd: torch.Tensor, v_bshd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``k``/``v`` with the halo in its place: box rows, halo rows, text rows (one copy)."""
        n = self.first_row
        return tuple(torch.cat([x[:, :n], h, x[:, n:]], 1) for x, h in ((k_bshd, self.k), (v_bshd, self.v)))


def longest_text(text_length) -> int:
    """The longest of a call's text lengths: one int, or one per batch sample."""
    return max(text_length) if isinstance(text_length, (list, tuple)) else text_length


def sample_groups(per_sample: Sequence) -> list[tuple[object, object]]:
    """Batch samples grouped by equal value, in order of first appearance: ``(value,
    index)``, the index a slice for a contiguous run of samples (a view), else a list."""
    groups: dict = {}
    for b, value in enumerate(per_sample):
        groups.setdefault(value, []).append(b)
    return [(value, head_index(samples)) for value, samples in groups.items()]


@functools.lru_cache(maxsize=64)
def tiled_order(canvas: Triple, tile: Triple, device: torch.device) -> torch.Tensor:
    """The video rows of the natural canvas in tiled order, on ``device``:
    ``x_tiled = x_natural[:, order]`` (cached)."""
    return geometry.tiled_permutation(canvas, tile).to(device)


@functools.lru_cache(maxsize=64)
def natural_order(canvas: Triple, tile: Triple, device: torch.device) -> torch.Tensor:
    """The inverse of :func:`tiled_order` (cached)."""
    return torch.argsort(tiled_order(canvas, tile, device))


def tile_row_index(
    layout_rows: Sequence[TileRows], tile_ids: Sequence[int], canvas: Triple, tile: Triple
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of every token slot of the given tiles, ``[n, vol]`` long, and whether each
    slot is a real token (partial tiles have fewer), ``[n, vol]`` bool."""
    grid = geometry.grid_shape(canvas, tile)
    local = torch.stack(torch.meshgrid(*[torch.arange(t) for t in tile], indexing="ij"), -1)
    local = local.reshape(-1, 3)
    ext = torch.tensor([geometry.tile_extent(geometry.tile_coords(t, grid), canvas, tile) for t in tile_ids])
    ext = ext.reshape(-1, 3)
    base = torch.tensor([[r.base, r.stride_t, r.stride_h] for r in layout_rows]).reshape(-1, 3)
    rows = base[:, :1] + local[None, :, 0] * base[:, 1:2] + local[None, :, 1] * base[:, 2:3] + local[None, :, 2]
    valid = (local[None, :, :] < ext[:, None, :]).all(-1)
    return torch.where(valid, rows, 0), valid
