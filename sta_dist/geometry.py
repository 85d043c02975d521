"""Index math of sliding tile attention: tiles, windows, boxes, halos, token orders.

Everything here is a function of integers (the few index arrays come back as torch
LongTensors built by vectorised arithmetic). No torch.distributed, no Triton.

Vocabulary
- canvas ``(T, H, W)``: the video latent, in tokens; natural order is row-major ``(t, h, w)``.
- tile ``(tt, th, tw)``: tokens per tile; the grid has ``ceil(C_a / t_a)`` tiles per axis and
  the last tile on an axis may be partial.
- window ``(kt, kh, kw)``: key tiles per query tile, per axis (see :func:`window_start`).
- tile id: row-major index of a tile in the grid.
- packed order of a list of tiles: the tiles one after another, each tile's tokens
  row-major over its actual (possibly partial) extent. The packed order of all tiles in
  id order is the *tiled order*.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

Triple = tuple[int, int, int]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def grid_shape(canvas: Triple, tile: Triple) -> Triple:
    """Tiles per axis: ``ceil(C_a / t_a)``."""
    return tuple(ceil_div(c, t) for c, t in zip(canvas, tile))  # type: ignore[return-value]


def num_tiles(grid: Triple) -> int:
    return grid[0] * grid[1] * grid[2]


def volume(shape: Triple) -> int:
    return shape[0] * shape[1] * shape[2]


def tile_coords(tile_id: int, grid: Triple) -> Triple:
    return (tile_id // (grid[1] * grid[2]), (tile_id // grid[2]) % grid[1], tile_id % grid[2])


def tile_id(coords: Triple, grid: Triple) -> int:
    return (coords[0] * grid[1] + coords[1]) * grid[2] + coords[2]


def tile_extent(coords: Triple, canvas: Triple, tile: Triple) -> Triple:
    """Actual tokens per axis of the tile at ``coords`` (smaller than ``tile`` if partial)."""
    return tuple(min(t, c - x * t) for x, c, t in zip(coords, canvas, tile))  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------
# The window rule
# ---------------------------------------------------------------------------------------


def effective_window(window: Triple, grid: Triple) -> Triple:
    """A window is ``min(k_a, n_a)`` tiles wide; this is the width actually used."""
    return tuple(min(k, n) for k, n in zip(window, grid))  # type: ignore[return-value]


def window_start(q: int, k: int, n: int) -> int:
    """First key tile on one axis for query tile ``q``, window ``k``, ``n`` tiles.

    Centred where it can be, shifted inward at the border:
    ``clamp(q - (k - 1) // 2, 0, max(n - k, 0))``.
    """
    return min(max(q - (k - 1) // 2, 0), max(n - k, 0))


def window_span(q: int, k: int, n: int) -> tuple[int, int]:
    """Half-open key tile range ``[lo, hi)`` on one axis; always ``min(k, n)`` wide."""
    lo = window_start(q, k, n)
    return lo, lo + min(k, n)


def query_span(c: int, k: int, n: int) -> tuple[int, int]:
    """Half-open range ``[lo, hi)`` of the query tiles on one axis whose window (``k``,
    ``n`` tiles) holds key tile ``c``: the window's transpose, what a backward by key tile
    walks.

    The window start ``clamp(q - a, 0, n - k)`` (``a = (k - 1) // 2``, ``k <= n``) is
    non-decreasing in ``q``, so the queries with ``c - k < start(q) <= c`` are contiguous:
    every ``q`` reaches ``c`` from above when ``c >= n - k`` (the start never passes
    ``n - k``), else those with ``q <= c + a``; from below every ``q`` when ``c < k`` (the
    start is never below 0), else those with ``q >= c - k + 1 + a``.
    """
    k = min(k, n)
    a = (k - 1) // 2
    lo = 0 if c < k else c - k + 1 + a
    hi = n if c >= n - k else c + a + 1
    return lo, hi


def query_box(key_tile: Triple, window: Triple, grid: Triple) -> Box:
    """The query tiles whose window holds ``key_tile``, as a box (:func:`query_span` per axis)."""
    spans = [query_span(c, k, n) for c, k, n in zip(key_tile, window, grid)]
    return Box(tuple(s[0] for s in spans), tuple(s[1] for s in spans))  # type: ignore[arg-type]


def fastvideo_window(window: Triple, grid: Triple) -> Triple:
    """The window, in this module's rule, that covers what FastVideo's rule covers.

    FastVideo's kernels centre a half-width ``k // 2`` on the query tile, the centre
    clamped to ``[k // 2, n - 1 - k // 2]``: ``k`` tiles for odd ``k``, but ``k + 1`` for
    even ``k < n``, and the whole axis for ``k >= n``. With :func:`window_start`'s rule
    that is window ``k + 1`` for even ``k < n``, ``min(k, n)`` otherwise.
    """
    return tuple(k + 1 if k % 2 == 0 and k < n else min(k, n) for k, n in zip(window, grid))  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class Box:
    """A box of tiles ``[lo, hi)`` per axis, in tile coordinates."""

    lo: Triple
    hi: Triple

    @property
    def shape(self) -> Triple:
        return tuple(max(h - l, 0) for l, h in zip(self.lo, self.hi))  # type: ignore[return-value]

    @property
    def num_tiles(self) -> int:
        return volume(self.shape)

    @property
    def empty(self) -> bool:
        return self.num_tiles == 0

    def intersect(self, other: "Box") -> "Box":
        return Box(
            tuple(max(a, b) for a, b in zip(self.lo, other.lo)),  # type: ignore[arg-type]
            tuple(min(a, b) for a, b in zip(self.hi, other.hi)),  # type: ignore[arg-type]
        )

    def contains(self, coords: Triple) -> bool:
        return all(l <= c < h for c, l, h in zip(coords, self.lo, self.hi))

    def tile_ids(self, grid: Triple) -> list[int]:
        """Ids of the box's tiles in row-major order."""
        ranges = [range(l, h) for l, h in zip(self.lo, self.hi)]
        return [tile_id(c, grid) for c in itertools.product(*ranges)]  # type: ignore[arg-type]


def full_box(grid: Triple) -> Box:
    return Box((0, 0, 0), grid)


def window_box(q_tile: Triple, window: Triple, grid: Triple) -> Box:
    """The key tiles one query tile attends, as a box."""
    spans = [window_span(q, k, n) for q, k, n in zip(q_tile, window, grid)]
    return Box(tuple(s[0] for s in spans), tuple(s[1] for s in spans))  # type: ignore[arg-type]


def window_tiles(q_tile: Triple, window: Triple, grid: Triple) -> list[int]:
    return window_box(q_tile, window, grid).tile_ids(grid)


def key_box(box: Box, window: Triple, grid: Triple) -> Box:
    """Every key tile that some query tile of ``box`` attends under ``window``.

    The window start is non-decreasing in the query coordinate, so the union of the
    windows of a contiguous range of query tiles is the contiguous range from the first
    tile's window start to the last tile's window end: a box.
    """
    if box.empty:
        return box
    spans = [
        (window_span(box.lo[a], window[a], grid[a])[0], window_span(box.hi[a] - 1, window[a], grid[a])[1])
        for a in range(3)
    ]
    return Box(tuple(s[0] for s in spans), tuple(s[1] for s in spans))  # type: ignore[arg-type]


def key_tiles(box: Box, windows: Iterable[Triple], grid: Triple) -> list[int]:
    """Ids (sorted) of every key tile some query tile of ``box`` attends under any of
    ``windows``: the union of one box per distinct window, exactly (not its hull)."""
    return list(_key_tiles(box, frozenset(tuple(w) for w in windows), tuple(grid)))


@functools.lru_cache(maxsize=4096)
def _key_tiles(box: Box, windows: frozenset, grid: Triple) -> tuple[int, ...]:
    out: set[int] = set()
    for window in windows:
        out.update(key_box(box, window, grid).tile_ids(grid))
    return tuple(sorted(out))


def covers_grid(window: Triple, grid: Triple) -> bool:
    """True if the window reaches every tile of the grid (dense attention)."""
    return all(k >= n for k, n in zip(window, grid))


# ---------------------------------------------------------------------------------------
# Splitting the grid into rank boxes
# ---------------------------------------------------------------------------------------


def split_range(n: int, parts: int) -> list[tuple[int, int]]:
    """Split ``[0, n)`` into ``parts`` contiguous ranges, sizes differing by at most one
    (the larger ones first)."""
    base, extra = divmod(n, parts)
    bounds, lo = [], 0
    for p in range(parts):
        hi = lo + base + (1 if p < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def rank_boxes(grid: Triple, split: Triple) -> list[Box]:
    """Boxes of a ``split[0] x split[1] x split[2]`` partition of the grid, rank-major
    in row-major order of the split."""
    per_axis = [split_range(n, p) for n, p in zip(grid, split)]
    return [
        Box((rt[0], rh[0], rw[0]), (rt[1], rh[1], rw[1]))
        for rt, rh, rw in itertools.product(*per_axis)
    ]


def factorizations(parts: int) -> list[Triple]:
    """Every ``(pt, ph, pw)`` with ``pt * ph * pw == parts``."""
    out = []
    for pt in range(1, parts + 1):
        if parts % pt:
            continue
        for ph in range(1, parts // pt + 1):
            if (parts // pt) % ph:
                continue
            out.append((pt, ph, parts // pt // ph))
    return out


# ---------------------------------------------------------------------------------------
# Token orders
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TileRows:
    """Where one tile's tokens sit in a sequence: local token ``(lt, lh, lw)`` is at row
    ``base + lt * stride_t + lh * stride_h + lw``."""

    base: int
    stride_t: int
    stride_h: int


def natural_tile_rows(canvas: Triple, tile: Triple) -> list[TileRows]:
    """Rows of every tile (by id) in the natural order of the whole canvas."""
    grid = grid_shape(canvas, tile)
    hw = canvas[1] * canvas[2]
    out = []
    for tid in range(num_tiles(grid)):
        ct, ch, cw = tile_coords(tid, grid)
        base = ct * tile[0] * hw + ch * tile[1] * canvas[2] + cw * tile[2]
        out.append(TileRows(base, hw, canvas[2]))
    return out


def packed_tile_rows(canvas: Triple, tile: Triple, tile_ids: Sequence[int]) -> list[TileRows]:
    """Rows of the listed tiles in their packed order (one tile after another, each
    row-major over its actual extent)."""
    return list(_packed_tile_rows(tuple(canvas), tuple(tile), tuple(tile_ids)))


@functools.lru_cache(maxsize=512)
def _packed_tile_rows(canvas: Triple, tile: Triple, tile_ids: tuple[int, ...]) -> tuple[TileRows, ...]:
    extents = tile_extents(canvas, tile)
    out, base = [], 0
    for tid in tile_ids:
        et, eh, ew = extents[tid]
        out.append(TileRows(base, eh * ew, ew))
        base += et * eh * ew
    return tuple(out)


@functools.lru_cache(maxsize=64)
def tile_extents(canvas: Triple, tile: Triple) -> tuple[Triple, ...]:
    """:func:`tile_extent` of every tile, by id (a distributed call with selected tiles packs
    a new set of tiles per call: a lookup each)."""
    grid = grid_shape(canvas, tile)
    return tuple(tile_extent(tile_coords(t, grid), canvas, tile) for t in range(num_tiles(grid)))


def packed_token_count(canvas: Triple, tile: Triple, tile_ids: Sequence[int]) -> int:
    return _packed_token_count(tuple(canvas), tuple(tile), tuple(tile_ids))


@functools.lru_cache(maxsize=4096)
def _packed_token_count(canvas: Triple, tile: Triple, tile_ids: tuple[int, ...]) -> int:
    extents = tile_extents(canvas, tile)
    return sum(volume(extents[t]) for t in tile_ids)


def _tile_positions(canvas: Triple, tile: Triple, tile_ids: Sequence[int]) -> torch.Tensor:
    """``(t, h, w)`` of every token of the listed tiles in packed order, ``[N, 3]`` long."""
    grid = grid_shape(canvas, tile)
    ids = torch.as_tensor(list(tile_ids), dtype=torch.long)
    coords = torch.stack([ids // (grid[1] * grid[2]), (ids // grid[2]) % grid[1], ids % grid[2]], 1)
    local = torch.stack(
        torch.meshgrid(*[torch.arange(t) for t in tile], indexing="ij"), -1
    ).reshape(-1, 3)
    pos = coords[:, None, :] * torch.tensor(tile) + local[None, :, :]  # [tiles, vol, 3]
    inside = (pos < torch.tensor(canvas)).all(-1)
    return pos[inside]


def packed_positions(canvas: Triple, tile: Triple, tile_ids: Sequence[int]) -> torch.Tensor:
    """``(t, h, w)`` of the tokens of the listed tiles in packed order, ``[N, 3]`` long
    (what a rank needs for RoPE)."""
    return _tile_positions(canvas, tile, tile_ids)


def packed_natural_index(canvas: Triple, tile: Triple, tile_ids: Sequence[int]) -> torch.Tensor:
    """Natural-order index of each token of the listed tiles in packed order."""
    pos = _tile_positions(canvas, tile, tile_ids)
    return (pos[:, 0] * canvas[1] + pos[:, 1]) * canvas[2] + pos[:, 2]


def tiled_permutation(canvas: Triple, tile: Triple) -> torch.Tensor:
    """``perm`` with ``x_tiled = x_natural[perm]`` over the video tokens."""
    return packed_natural_index(canvas, tile, range(num_tiles(grid_shape(canvas, tile))))
