"""One rank's communication schedule for one attention call: pure, cached, the same on
every rank for the same plan and windows.

For a call with per-head ``windows`` the schedule says which query/kv heads each member
of the head group computes (by cost), which halo tiles go to and come from each member
of the tile group, and the local problem (:mod:`sta_dist.local`) the kernel then solves.
It reads the mesh layout and is told what was decided (whether the call falls back to head
mode, in how many head chunks it runs: :func:`sta_dist.parallel.decide.call_schedule`).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Sequence

import torch

from .. import geometry
from ..geometry import Triple
from ..local import LocalHeads, LocalLayout
from .layout import MeshLayout


@dataclass(frozen=True)
class CallSchedule:
    rank: int
    mode: str
    """What this call does: "head", "tile", "hybrid", or "head (fallback)"."""
    head_group: tuple[int, ...]
    """Ranks of the head all-to-all, in exchange order (this rank included)."""
    tile_group: tuple[int, ...]
    """Ranks of the halo exchange, in exchange order (this rank included)."""
    q_heads: tuple[tuple[int, ...], ...]
    """Query heads each head-group member computes."""
    kv_heads: tuple[tuple[int, ...], ...]
    """Kv heads each head-group member needs."""
    held_counts: tuple[int, ...]
    """Video tokens each head-group member holds."""
    halo_send: tuple[tuple[int, ...], ...]
    """Per tile-group member: tile ids of this rank's box it needs (empty for self)."""
    halo_recv: tuple[tuple[int, ...], ...]
    """Per tile-group member: tile ids of its box this rank needs (empty for self)."""
    layout: LocalLayout
    heads: LocalHeads
    counts_text_keys: bool
    """Whether this rank's text queries attend the text keys (one rank per tile group,
    so the merged log-sum-exp counts them once)."""
    head_chunks: int = 1
    """In how many chunks of heads the call runs (:func:`head_chunk`): more than one only
    in head mode (no halo), the same on every rank."""

    @property
    def me_in_head_group(self) -> int:
        return self.head_group.index(self.rank)

    @property
    def me_in_tile_group(self) -> int:
        return self.tile_group.index(self.rank)

    @property
    def box_tokens(self) -> int:
        return self.layout.q_video


@functools.lru_cache(maxsize=1024)
def head_chunk(sched: CallSchedule, c: int) -> CallSchedule:
    """Chunk ``c`` of a call in ``sched.head_chunks`` chunks: each head-group member's
    ``c``-th share of its kv heads, with the query heads that read them. Its exchanges and
    attention are the call's restricted to those heads (the layout is the call's)."""
    H = sum(len(qh) for qh in sched.q_heads)
    group = H // len(set().union(*sched.kv_heads))
    lo_hi = [geometry.split_range(len(kvh), sched.head_chunks)[c] for kvh in sched.kv_heads]
    kv_heads = tuple(kvh[lo:hi] for kvh, (lo, hi) in zip(sched.kv_heads, lo_hi))
    q_heads = tuple(tuple(h for h in qh if h // group in kvh) for qh, kvh in zip(sched.q_heads, kv_heads))
    me = sched.me_in_head_group
    window_of = dict(zip(sched.q_heads[me], sched.heads.windows))
    heads = LocalHeads(tuple(window_of[h] for h in q_heads[me]), tuple(kv_heads[me].index(h // group) for h in q_heads[me]))
    return dataclasses.replace(sched, q_heads=q_heads, kv_heads=kv_heads, heads=heads, head_chunks=1)


def assign_heads(costs: Sequence[float], parts: int, kv_of: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Query heads to ``parts`` ranks by cost: longest first onto the least-loaded rank
    (ties: a rank already holding the head's kv head, then fewer heads, then the lower
    rank). Contiguous blocks when they balance just as well (uniform windows), since a
    block of heads is a view, not a copy. Returns each rank's heads, sorted."""
    load = [0.0] * parts
    heads: list[list[int]] = [[] for _ in range(parts)]
    for h in sorted(range(len(costs)), key=lambda h: (-costs[h], h)):
        r = min(range(parts), key=lambda r: (load[r], kv_of[h] not in {kv_of[x] for x in heads[r]}, len(heads[r]), r))
        load[r] += costs[h]
        heads[r].append(h)
    blocks = [tuple(range(lo, hi)) for lo, hi in geometry.split_range(len(costs), parts)]
    if max(sum(costs[h] for h in b) for b in blocks) <= max(load):
        return tuple(blocks)
    return tuple(tuple(sorted(h)) for h in heads)


@functools.lru_cache(maxsize=1024)
def build_schedule(plan: MeshLayout, windows: tuple[Triple, ...], num_kv_heads: int, rank: int,
                   fallback: bool = False) -> CallSchedule:
    """The schedule of ``rank`` for a call with one window per query head, in one chunk of
    heads, on the plan's mesh; with ``fallback``, on the head mesh of every rank instead
    (the call's halo would be the whole canvas: :func:`~sta_dist.parallel.decide.call_schedule`
    decides)."""
    grid = plan.grid
    H = len(windows)
    group = H // num_kv_heads
    kv_of = [h // group for h in range(H)]
    eff = [geometry.effective_window(w, grid) for w in windows]
    costs = [geometry.volume(w) for w in eff]
    if fallback:
        head_group, tile_group = tuple(range(plan.world_size)), (rank,)
    else:
        head_group, tile_group = plan.head_group(rank), plan.tile_group(rank)

    q_heads = assign_heads(costs, len(head_group), kv_of)
    kv_heads = tuple(tuple(sorted({kv_of[h] for h in hs})) for hs in q_heads)
    me = head_group.index(rank)
    my_q, my_kv = q_heads[me], kv_heads[me]
    heads = LocalHeads(tuple(eff[h] for h in my_q), tuple(my_kv.index(kv_of[h]) for h in my_q))
    held_counts = tuple(plan.held_count(r) for r in head_group)

    if plan.order == "natural":
        layout = LocalLayout.natural(plan.canvas, plan.tile, plan.text_len)
        empty = ((),) * len(tile_group)
        return CallSchedule(rank, "head", head_group, tile_group, q_heads, kv_heads, held_counts, empty, empty,
                            layout, heads, True)

    box_tiles = list(plan.box_tiles(head_group))
    my_windows = sorted({eff[h] for h in my_q})
    boxes = {r: plan.box_tiles(plan.head_group(r)) for r in tile_group}
    sends, recvs = [], []
    for r in tile_group:
        if r == rank or not my_windows:
            sends.append(())
            recvs.append(())
            continue
        theirs = boxes[r]
        their_box = plan.box(r)
        needs_from_me = set(geometry.key_tiles(their_box, my_windows, grid)) & set(box_tiles)
        i_need = set(geometry.key_tiles(plan.box(rank), my_windows, grid)) & set(theirs)
        sends.append(tuple(t for t in box_tiles if t in needs_from_me))
        recvs.append(tuple(t for t in theirs if t in i_need))
    kv_tiles = box_tiles + [t for tiles in recvs for t in tiles]
    n_box = geometry.packed_token_count(plan.canvas, plan.tile, box_tiles)
    layout = LocalLayout.packed(plan.canvas, plan.tile, plan.text_len, box_tiles, kv_tiles, text_q_video_keys=n_box)
    if fallback:
        mode = "head (fallback)"
    elif len(tile_group) == 1:
        mode = "head"
    else:
        mode = "tile" if len(head_group) == 1 else "hybrid"
    return CallSchedule(rank, mode, head_group, tile_group, q_heads, kv_heads, held_counts, tuple(sends),
                        tuple(recvs), layout, heads, tile_group.index(rank) == 0)


@dataclass(frozen=True)
class KeySplit:
    """A tile-group call in launches over parts of its keys, so its halo exchange runs
    beside the first: ``own``, every query of the box (and the text queries) over the
    box's keys and the text (each window cut to the box, :attr:`LocalLayout.key_box`);
    then per neighbour in ``halo``, the query tiles whose windows reach its box, over the
    halo tiles from it, folded into the first launch's output by the log-sum-exp."""

    own: LocalLayout
    halo: tuple[LocalLayout, ...]


@functools.lru_cache(maxsize=1024)
def key_split(sched: CallSchedule) -> "KeySplit | None":
    """The launches of ``sched`` (:class:`KeySplit`), or ``None`` without a tile group."""
    if len(sched.tile_group) == 1:
        return None
    return split_keys(sched.layout, tuple(sorted(set(sched.heads.windows))), sched.halo_recv)


@functools.lru_cache(maxsize=1024)
def split_keys(layout: LocalLayout, windows: tuple[Triple, ...], recvs: tuple[tuple[int, ...], ...]) -> KeySplit:
    """A box's layout (its query tiles, then key rows for box and halo; ``recvs``: the halo
    tiles from each neighbour, in row order) split for :class:`KeySplit`. A neighbour's
    part is cut to the bounding box of its tiles: a window meets that box only in tiles
    of the halo from it (the halo is every tile of the neighbour some window reaches)."""
    grid, n_box = layout.grid, layout.q_video
    box = set(layout.q_tiles)
    box_only = tuple(r if t in box else None for t, r in enumerate(layout.kv_rows))
    own = LocalLayout(layout.canvas, layout.tile, layout.q_tiles, layout.q_rows, box_only, n_box, n_box,
                      layout.q_text, n_box, bounding_box(layout.q_tiles, grid))
    halo = []
    for tiles in recvs:
        if not tiles:
            continue
        clip = bounding_box(tiles, grid)
        reach = [(t, r) for t, r in zip(layout.q_tiles, layout.q_rows)
                 if any(not geometry.window_box(geometry.tile_coords(t, grid), w, grid).intersect(clip).empty
                        for w in windows)]
        halo.append(LocalLayout(layout.canvas, layout.tile, tuple(t for t, _ in reach), tuple(r for _, r in reach),
                                layout.kv_rows, n_box, layout.kv_video, 0, layout.text_q_video_keys, clip))
    return KeySplit(own, tuple(halo))


def bounding_box(tiles, grid: Triple) -> geometry.Box:
    """The smallest box of tiles holding ``tiles`` (ids)."""
    coords = [geometry.tile_coords(t, grid) for t in tiles]
    return geometry.Box(tuple(min(c[a] for c in coords) for a in range(3)),  # type: ignore[arg-type]
                        tuple(max(c[a] for c in coords) + 1 for a in range(3)))  # type: ignore[arg-type]


@functools.lru_cache(maxsize=256)
def tile_rows(canvas: Triple, tile: Triple, storage: tuple[int, ...], wanted: tuple[int, ...],
              device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Row index, within a packed storage of the ``storage`` tiles, of the tokens of the
    ``wanted`` tiles (in wanted order), on ``device`` (cached there: a copy per call would
    make the host wait for the GPU)."""
    if device.type != "cpu":
        return tile_rows(canvas, tile, storage, wanted).to(device)
    if not wanted:
        return torch.zeros(0, dtype=torch.long)
    base = _bases(canvas, tile, storage)
    extents = geometry.tile_extents(canvas, tile)
    starts = torch.tensor([base[t] for t in wanted])
    sizes = torch.tensor([geometry.volume(extents[t]) for t in wanted])
    # row i of the result: its tile's first row, plus i less the rows of the wanted tiles before it
    return torch.repeat_interleave(starts - (sizes.cumsum(0) - sizes), sizes) + torch.arange(int(sizes.sum()))


@functools.lru_cache(maxsize=256)
def _bases(canvas: Triple, tile: Triple, storage: tuple[int, ...]) -> dict[int, int]:
    """Each stored tile's first row in the packed ``storage``."""
    return {t: r.base for t, r in zip(storage, geometry.packed_tile_rows(canvas, tile, storage))}


@functools.lru_cache(maxsize=256)
def row_range(canvas: Triple, tile: Triple, storage: tuple[int, ...], wanted: tuple[int, ...]):
    """``(first, end)`` when the ``wanted`` tiles are a run of consecutive tiles of the
    packed ``storage`` (their rows one range: a view, no gather), else ``None``."""
    at = storage.index(wanted[0]) if wanted else 0
    if not wanted or wanted != storage[at:at + len(wanted)]:
        return None
    first = geometry.packed_tile_rows(canvas, tile, storage)[at].base
    return first, first + geometry.packed_token_count(canvas, tile, wanted)
