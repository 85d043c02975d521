"""Every choice of the distributed layer, as pure functions that return data with reasons,
priced on one cost model (:mod:`~sta_dist.parallel.cost`, which reads the schedules):

- of a plan: the mode for ``mode="auto"`` (:func:`auto_mode`), the hybrid mesh
  (:func:`choose_mesh`), the tile split when none is given (:func:`best_tile_split`);
- of a call: the parts it runs in (:func:`call_parts`) and so its mode (:func:`call_mode`),
  whether it falls back to head mode (its halo would be the whole canvas) and in how many
  head chunks it runs (:func:`call_schedule`, :func:`head_chunks`).

The same on every rank; nothing here touches torch.distributed.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

from .. import geometry
from ..geometry import Box, Triple
from .cost import H100_NVLINK, CallCost, parts_cost as _priced_parts, selected_rank_cost, selection_probability
from .layout import MeshLayout, whole_canvas_halo
from .schedule import CallSchedule, build_schedule

logger = logging.getLogger("sta_dist")


# ---------------------------------------------------------------------------------------
# The plan: mode, mesh, tile split
# ---------------------------------------------------------------------------------------


def best_tile_split(grid: Triple, parts: int, windows: Sequence[Triple] = ((3, 3, 3),)) -> Optional[Triple]:
    """The split of the grid into ``parts`` boxes that balances tiles best, then moves the
    fewest halo tiles for ``windows``; ``None`` if the grid has fewer tiles than parts
    along every split."""
    best, best_key = None, None
    for split in geometry.factorizations(parts):
        if any(p > n for p, n in zip(split, grid)):
            continue
        boxes = geometry.rank_boxes(grid, split)
        largest = max(b.num_tiles for b in boxes)
        halo = max(len(geometry.key_tiles(b, windows, grid)) - b.num_tiles for b in boxes)
        key = (largest, halo, split)
        if best_key is None or key < best_key:
            best, best_key = split, key
    return best


def mesh_cost(grid: Triple, mesh: tuple[int, int], windows: Sequence[Triple],
              num_heads: Optional[int]) -> Optional[tuple[tuple[float, float], Triple]]:
    """``((work, traffic), split)`` of one rank of the busiest box on ``mesh``, or ``None``
    if the tile axis cannot split the grid. Work is in tile-heads (the box's tiles times the
    heads a rank computes: idle heads show up as a larger share elsewhere); traffic is in
    tile-heads moved: the head all-to-all sends 3/4 of q, k, v out and o back for the
    ``(P_head - 1) / P_head`` not kept, the halo exchange k and v of its halo tiles."""
    p_head, p_tile = mesh
    split = best_tile_split(grid, p_tile, windows)
    if split is None:
        return None
    boxes = geometry.rank_boxes(grid, split)
    box = max(b.num_tiles for b in boxes)
    halo = max(len(geometry.key_tiles(b, windows, grid)) - b.num_tiles for b in boxes) if p_tile > 1 else 0
    heads = num_heads or p_head  # unknown: assume enough heads to go round
    work = box * geometry.ceil_div(heads, p_head)
    traffic = 4 * (box / p_head) * heads * (p_head - 1) / p_head + 2 * halo * heads / p_head
    return (work, traffic), split


def choose_mesh(grid: Triple, world_size: int, windows: Sequence[Triple], num_heads: Optional[int] = None,
                two_d: bool = False) -> tuple[tuple[int, int], str]:
    """The ``(P_head, P_tile)`` mesh of ``world_size`` ranks that gives the busiest rank
    the least work, then moves the fewest bytes; with the reason, as data. ``two_d``:
    only meshes with both axes above one, where ``world_size`` has such a split."""
    best = None
    genuine = [p for p in range(2, world_size) if world_size % p == 0]
    for p_head in (genuine if two_d and genuine else range(1, world_size + 1)):
        if world_size % p_head:
            continue
        mesh = (p_head, world_size // p_head)
        cost = mesh_cost(grid, mesh, windows, num_heads)
        if cost is not None and (best is None or cost[0] < best[1]):
            best = (mesh, cost[0])
    if best is None:  # (P, 1) always splits: a box is the whole grid
        raise AssertionError("head mode always has a mesh")
    (work, traffic) = best[1]
    return best[0], f"mesh {best[0]} by cost: {work:g} tile-heads of work and {traffic:.0f} moved per rank"


def expected_selected_halo(box: Box, windows: Sequence[Triple], grid: Triple, selected: float) -> float:
    """Tiles outside ``box``'s window halo that its queries are expected to fetch when each
    query tile selects ``selected`` tiles more, chosen with no regard to where they lie
    (a model: real selections favour nearby tiles, so this is an upper estimate)."""
    if not selected:
        return 0.0
    n = geometry.num_tiles(grid)
    outside = n - len(geometry.key_tiles(box, windows, grid))
    return outside * (1.0 - (1.0 - min(1.0, selected / n)) ** box.num_tiles)


def modelled_modes(canvas: Triple, tile: Triple, text_len: int, world_size: int, windows: Sequence[Triple], *,
                   tile_split: Triple, num_heads: Optional[int] = None, order: str = "tiled",
                   head_chunks: int = 1) -> dict:
    """The cost model's time (ms, H100 rates) of one call in head mode and in tile mode
    (boxes ``tile_split``) with ``windows`` over the heads (``num_heads``, else one head per
    window, round robin), one sample, head dim 128, bf16, ``text_len`` text keys."""
    heads = num_heads or len(windows)
    call = tuple(tuple(windows[h % len(windows)]) for h in range(heads))
    layouts = {"head": ((world_size, 1), (1, 1, 1)), "tile": ((1, world_size), tile_split)}
    times = {}
    for mode, (mesh, split) in layouts.items():
        layout = MeshLayout(canvas=canvas, tile=tile, text_len=text_len, world_size=world_size, mesh=mesh,
                            tile_split=split, order=order, head_chunks=head_chunks)
        times[mode] = call_cost(layout, call, heads, 1, 128, 2, text_len).time_ms(H100_NVLINK)
    return times


class ModeChoice(NamedTuple):
    mode: str
    """``"head"``, ``"tile"`` or ``"hybrid"``."""
    mesh: Optional[tuple[int, int]]
    """The mesh, where the choice made one (else the mode's own)."""
    reason: str


def auto_mode(canvas: Triple, tile: Triple, text_len: int, world_size: int, windows: Sequence[Triple], *,
              num_heads: Optional[int] = None, selected_tiles: Optional[float] = None,
              tile_split: Optional[Triple] = None, order: str = "tiled", head_chunks: int = 1) -> ModeChoice:
    """The mode of ``ShardPlan(mode="auto")`` for calls of the hinted ``windows``: a mesh by
    :func:`choose_mesh` when head mode would leave ranks without a head; else head or tile
    mode, whichever the cost model prices lower (:func:`modelled_modes`, tile mode on
    ``tile_split`` if given); with selected tiles (which the model of a plain call does not
    see), tile mode when its halo traffic is below head mode's all-to-all traffic."""
    P = world_size
    grid = geometry.grid_shape(canvas, tile)
    if P == 1:
        return ModeChoice("head", None, "auto: one rank, nothing to shard")
    if num_heads is not None and P > num_heads:
        mesh, why = choose_mesh(grid, P, windows, num_heads)
        mode = "tile" if mesh[0] == 1 else "head" if mesh[1] == 1 else "hybrid"
        return ModeChoice(mode, mesh, f"auto: head mode would leave {P - num_heads} of {P} ranks without a head; {why}")
    split = best_tile_split(grid, P, windows)
    if split is None:
        return ModeChoice("head", None, f"auto: {P} ranks exceed the tiles along any split of grid {grid}")
    if not selected_tiles:
        times = modelled_modes(canvas, tile, text_len, P, windows, tile_split=tile_split or split,
                               num_heads=num_heads, order=order, head_chunks=head_chunks)
        mode = min(times, key=lambda m: (times[m], m))
        return ModeChoice(mode, None, (f"auto: {mode} mode by the cost model, a call of the hinted windows "
                                       + ", ".join(f"{m} {t:.2f} ms" for m, t in times.items())))
    boxes = geometry.rank_boxes(grid, split)
    halo = max(len(geometry.key_tiles(b, windows, grid)) - b.num_tiles
               + expected_selected_halo(b, windows, grid, selected_tiles) for b in boxes)
    held = max(b.num_tiles for b in boxes)
    # per rank, in tiles x heads: tile mode moves the k/v halo; head mode moves q, k, v
    # in and o out, (P - 1) / P of what it holds.
    tile_cost, head_cost = 2 * halo, 4 * held * (P - 1) / P
    if tile_cost < head_cost:
        return ModeChoice("tile", None, f"auto: tile mode, halo {halo:g} tiles/rank vs {held} held (split {split})")
    return ModeChoice("head", None, f"auto: head mode, halo {halo:g} tiles/rank would cost more than the all-to-all")


# ---------------------------------------------------------------------------------------
# A call: its schedule (fallback, head chunks), its parts, its mode, its cost
# ---------------------------------------------------------------------------------------


def head_chunks(plan: MeshLayout, sched: CallSchedule) -> int:
    """In how many chunks of heads a call of ``sched`` runs: the plan's ``head_chunks`` in
    head mode only (no halo), and at most as many as the member with the most kv heads has
    (a member with fewer sits some chunks out)."""
    if len(sched.tile_group) > 1 or len(sched.kv_heads) == 1:
        return 1
    return max(1, min(plan.head_chunks, max(len(kv) for kv in sched.kv_heads)))


@functools.lru_cache(maxsize=1024)
def call_schedule(plan: MeshLayout, windows: tuple[Triple, ...], num_kv_heads: int, rank: int,
                  wide_tile: bool = False) -> CallSchedule:
    """The schedule of ``rank`` for a call with one window per query head, as it runs. A
    call whose windows reach the whole canvas from some box falls back to head mode, unless
    ``wide_tile`` (the cost model's choice, :func:`call_parts`): then its halo is the rest
    of the canvas, as many bytes as the head all-to-all moves on two ranks, but exchanged
    beside the attention of the box's own keys."""
    eff = tuple(sorted({geometry.effective_window(w, plan.grid) for w in windows}))
    fallback = not wide_tile and whole_canvas_halo(plan, eff)
    sched = build_schedule(plan, windows, num_kv_heads, rank, fallback)
    chunks = head_chunks(plan, sched)
    return sched if chunks == sched.head_chunks else dataclasses.replace(sched, head_chunks=chunks)


def warn_if_fallback(sched: CallSchedule, plan: MeshLayout) -> None:
    """Say once per job (rank 0, once per plan and windows) that a call fell back to head
    mode; called when a call runs, not when a schedule is only modelled."""
    if sched.mode == "head (fallback)" and sched.rank == 0:
        _warn_fallback(plan, tuple(sorted(set(sched.heads.windows))))


@functools.lru_cache(maxsize=64)
def _warn_fallback(plan: MeshLayout, windows: tuple[Triple, ...]) -> None:
    logger.warning(
        "tile mode falls back to head mode for windows %s: some rank's windows reach the whole "
        "canvas (grid %s), so its halo would be the whole canvas",
        sorted(set(windows)), plan.grid,
    )


@dataclass(frozen=True, slots=True)
class CallPart:
    """Some of a call's heads, run as a call of their own (with the plan's schedule for
    their windows): whole kv groups, so the part's heads keep the call's GQA grouping."""

    q_heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    windows: tuple[Triple, ...]
    """The windows of ``q_heads``, in order."""
    wide_tile: bool = False
    """Windows that reach the whole canvas stay in tile mode (their halo: the rest of the
    canvas) instead of falling back to head mode."""

    def schedule(self, plan: MeshLayout, rank: int) -> CallSchedule:
        return call_schedule(plan, self.windows, len(self.kv_heads), rank, self.wide_tile)


MIXED = "mixed (head + tile)"
"""The mode of a call run in two parts (:func:`call_mode`)."""


@functools.lru_cache(maxsize=1024)
def call_parts(plan: MeshLayout, windows: tuple[Triple, ...], num_kv_heads: int, batch: int, head_dim: int,
               itemsize: int, text_length: int) -> tuple[CallPart, ...]:
    """How a call runs, the cheapest by the model of: one part (every head, the plan's
    schedule); on a plan with a tile axis where some kv groups have a head whose window
    reaches the whole canvas from some rank's box ("wide"), one part in tile mode all the
    same (the halo is the rest of the canvas, exchanged beside the box's own keys), or, when
    others are local, two parts: the wide groups over the head all-to-all, then the local
    ones in tile mode. The same on every rank."""
    windows = tuple(tuple(w) for w in windows)
    whole = (CallPart(tuple(range(len(windows))), tuple(range(num_kv_heads)), windows),)
    if plan.mesh[1] == 1:
        return whole
    group = len(windows) // num_kv_heads
    grid = plan.grid

    def wide(g: int) -> bool:
        return whole_canvas_halo(plan, tuple(sorted({geometry.effective_window(windows[h], grid)
                                                     for h in range(g * group, (g + 1) * group)})))

    sides = [[g for g in range(num_kv_heads) if wide(g) == is_wide] for is_wide in (True, False)]
    if not sides[0]:
        return whole
    candidates = [whole, (dataclasses.replace(whole[0], wide_tile=True),)]
    if sides[1]:
        candidates.append(tuple(CallPart(tuple(h for g in kv for h in range(g * group, (g + 1) * group)), tuple(kv),
                                         tuple(windows[h] for g in kv for h in range(g * group, (g + 1) * group)))
                                for kv in sides))
    return min(candidates, key=lambda parts: parts_cost(plan, parts, batch, head_dim, itemsize,
                                                        text_length).time_ms(H100_NVLINK))


def call_mode(plan: MeshLayout, windows: Sequence[Triple], num_kv_heads: int, rank: int, batch: int, head_dim: int,
              itemsize: int, text_length: int) -> str:
    """What a call does on ``rank``: its schedule's mode, or :data:`MIXED`."""
    parts = call_parts(plan, tuple(tuple(w) for w in windows), num_kv_heads, batch, head_dim, itemsize, text_length)
    return MIXED if len(parts) > 1 else parts[0].schedule(plan, rank).mode


def parts_cost(plan: MeshLayout, parts: Sequence[CallPart], batch: int, head_dim: int, itemsize: int,
               text_length: int) -> CallCost:
    """Every rank's cost of a call run in ``parts``, one after the other."""
    schedules = [[p.schedule(plan, r) for p in parts] for r in range(plan.world_size)]
    return _priced_parts(plan, schedules, batch, head_dim, itemsize, text_length)


def call_cost(plan: MeshLayout, windows: Sequence[Triple], num_kv_heads: int, batch: int, head_dim: int,
              itemsize: int, text_length: int) -> CallCost:
    """Every rank's cost of a call with one window per query head (of its parts, as it runs)."""
    windows = tuple(tuple(w) for w in windows)
    parts = call_parts(plan, windows, num_kv_heads, batch, head_dim, itemsize, text_length)
    return parts_cost(plan, parts, batch, head_dim, itemsize, text_length)


def selected_call_cost(plan: MeshLayout, windows, window_rule: str, select, num_heads: int, num_kv_heads: int,
                       batch: int, head_dim: int, itemsize: int, text_length, selected=None) -> CallCost:
    """Every rank's cost of a call with selected tiles (``windows``: one per query head, or
    ``None``) as it runs: exact with ``selected`` (or a mask), expected for a ``TopK`` /
    ``Mass`` without it (:func:`~sta_dist.parallel.cost.selection_probability`)."""
    from ..selection.attention import table_heads

    n = geometry.num_tiles(plan.grid)
    windows = None if windows is None else tuple(tuple(w) for w in windows)
    heads = table_heads(windows, window_rule, num_heads, plan.grid, num_kv_heads)
    sel_p = selection_probability(select, selected, num_heads, n)
    return CallCost(tuple(
        selected_rank_cost(plan, call_schedule(plan, heads.windows, num_kv_heads, r), windows, window_rule, select,
                           sel_p, batch, head_dim, itemsize, text_length)
        for r in range(plan.world_size)))
