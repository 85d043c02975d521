"""What ``sta-dist plan`` prints: a workload's shard plan for one call, summarised over the
ranks (readable at 1024 ranks), with a warning when ranks would sit idle and the reason
when a call falls back to head mode (:func:`fallback_reason`, which ``sta-dist doctor``
prints too)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from . import geometry
from .parallel.cost import H100_NVLINK
from .parallel.decide import call_cost, call_mode, call_parts, choose_mesh
from .parallel.plan import ShardPlan
from .parallel.schedule import CallSchedule
from .run import DTYPES, RunConfig

DETAIL_RANKS = 8
"""Up to this many ranks the report has one line per rank without being asked."""
CANDIDATE_RANKS = 64
"""Up to this many ranks the report also models the other modes (a schedule per rank each)."""
FALLBACK = "head (fallback)"
"""The mode of a call whose tile plan runs it in head mode (:func:`fallback_reason`)."""


@dataclass(frozen=True, slots=True)
class RankLoad:
    """One rank's share of one call."""

    rank: int
    tokens: int
    heads: int
    halo_tokens: int
    halo_kv_tokens: int
    """Halo tokens times the kv heads they are fetched for."""
    mode: str

    @staticmethod
    def of(plan: ShardPlan, scheds: Sequence[CallSchedule]) -> "RankLoad":
        """One rank's share of a call run as the schedules ``scheds`` (its parts)."""
        halos = [sum(geometry.packed_token_count(plan.canvas, plan.tile, t) for t in s.halo_recv) for s in scheds]
        heads = [len(s.q_heads[s.me_in_head_group]) for s in scheds]
        kv = [len(s.kv_heads[s.me_in_head_group]) for s in scheds]
        return RankLoad(scheds[0].rank, plan.held_count(scheds[0].rank), sum(heads), sum(halos),
                        sum(h * k for h, k in zip(halos, kv)), " + ".join(s.mode for s in scheds))


def idle_advice(cfg: RunConfig, plan: ShardPlan, windows, modelled: dict) -> str:
    """Which mode or mesh would give more ranks work, with the model's time and MB sent per
    rank for it and for this plan (``modelled``: ``(mode, mesh)`` to those words, the
    figures of the model's lines), or why none can."""
    mesh, _ = choose_mesh(plan.grid, plan.world_size, sorted(set(windows)), cfg.heads)
    if mesh == plan.mesh:
        return (f"no mesh of {plan.world_size} ranks gives more ranks a head for {cfg.heads} heads and grid "
                f"{plan.grid}; a world size whose head axis divides {cfg.heads} would use every rank")
    mode = "hybrid" if 1 not in mesh else "tile" if mesh[0] == 1 else "head"
    flag = f"--mode hybrid --mesh {mesh[0]} {mesh[1]}" if mode == "hybrid" else f"--mode {mode}"
    if (mode, mesh) not in modelled:  # past CANDIDATE_RANKS only this plan is modelled
        return f"{flag} would use them"
    return f"{flag} would use them ({modelled[mode, mesh]}; this plan: {modelled[plan.mode, plan.mesh]})"


def _modelled(cost) -> str:
    return f"predicted {cost.time_ms(H100_NVLINK):.2f} ms, at most {cost.max_bytes() / 1e6:.1f} MB sent per rank"


def fallback_reason(plan: ShardPlan, windows) -> str:
    """Why a call with ``windows`` (one per query head) runs in head mode on a plan with a
    tile axis (schedule mode :data:`FALLBACK`): from some rank's box the windows reach
    every tile of the grid (the test of ``whole_canvas_halo``), so that rank's halo would
    be the whole canvas, and the cost model prices head mode lower than tile mode with such
    a halo. One line, naming the ranks, the windows and the grid."""
    grid = plan.grid
    eff = sorted({geometry.effective_window(tuple(w), grid) for w in windows})
    n = geometry.num_tiles(grid)
    wide = [r for r in range(plan.world_size) if len(geometry.key_tiles(plan.box(r), eff, grid)) == n]
    return (f"{FALLBACK}: from the box of {ranks_text(wide, plan.world_size)} the windows {eff} reach all {n} "
            f"tiles of grid {grid}, so the halo would be the whole canvas; the cost model prices head mode "
            f"lower than tile mode with that halo")


def ranks_text(ranks: Sequence[int], world_size: int) -> str:
    """``ranks`` as words: "every rank", "rank 3", "ranks 0, 1 ... (12 ranks)"."""
    if len(ranks) == world_size:
        return "every rank" if world_size > 1 else "rank 0"
    shown = ", ".join(map(str, ranks[:8])) + (f" ... ({len(ranks)} ranks)" if len(ranks) > 8 else "")
    return f"rank{'s' if len(ranks) > 1 else ''} {shown}"


def tile_head_mb(cfg: RunConfig) -> float:
    """MB of one tile-head (a full tile's rows of q, k, v or o for one head, every sample):
    the unit of the traffic figure of a mesh chosen by cost ("... moved per rank")."""
    return geometry.volume(tuple(cfg.tile)) * cfg.batch * cfg.head_dim * DTYPES[cfg.dtype].itemsize / 1e6


def call_windows(cfg: RunConfig, strategy, step: Optional[int], layer: int) -> tuple[int, tuple]:
    """The step (default: the last) and each head's window of one call of the strategy,
    ``--step`` and ``--layer`` checked against it."""
    step = strategy.num_steps - 1 if step is None else step
    if not 0 <= step < strategy.num_steps:
        raise ValueError(f"--step must be in [0, {strategy.num_steps}) for config {cfg.name!r}, got --step {step}")
    if not 0 <= layer < strategy.num_layers:
        raise ValueError(f"--layer must be in [0, {strategy.num_layers}) for config {cfg.name!r}, got --layer {layer}")
    layer_windows = strategy.layer_windows(step, layer)
    return step, tuple(layer_windows[h % len(layer_windows)] for h in range(cfg.heads))


def plan_report(cfg: RunConfig, world_size: int, step: Optional[int] = None, layer: int = 0,
                per_rank: bool = False) -> str:
    strategy = cfg.strategy()
    step, windows = call_windows(cfg, strategy, step, layer)
    plan = ShardPlan.from_config(cfg, world_size, strategy=strategy)
    itemsize = DTYPES[cfg.dtype].itemsize
    parts = call_parts(plan, windows, cfg.kv_heads, cfg.batch, cfg.head_dim, itemsize, cfg.text_valid)
    loads = [RankLoad.of(plan, [p.schedule(plan, r) for p in parts]) for r in range(world_size)]
    kv_bytes = 2 * cfg.batch * cfg.head_dim * itemsize  # per token and kv head, k + v

    lines = [f"config {cfg.name}: canvas {cfg.canvas}, tile {cfg.tile}, grid {plan.grid}, {cfg.heads} heads",
             f"plan: {plan.describe()}"]
    if "moved per rank" in plan.reason:  # the mesh rule counts tile-heads, not bytes
        lines.append(f"  (the mesh's figures are tile-heads, for the plan's hinted windows: one tile-head is "
                     f"{tile_head_mb(cfg):.3f} MB, a tile of q, k, v or o for one head; the model's MB sent per "
                     f"rank below are this call's)")
    lines.append(f"windows at step {step}, layer {layer}: {sorted(set(windows))}")
    modes = sorted({load.mode for load in loads})
    if len(parts) > 1:
        lines.append(f"this call in {len(parts)} parts (cheaper by the model than all heads in one mode): "
                     + "; ".join(f"heads {list(p.q_heads)} in mode {p.schedule(plan, 0).mode}" for p in parts))
    lines += [fallback_reason(plan, p.windows) for p in parts if p.schedule(plan, 0).mode == FALLBACK]
    lines.append(f"{world_size} ranks, this call in mode {', '.join(modes)}:")
    for name, values in (("video tokens held", [l.tokens for l in loads]),
                         ("query heads computed", [l.heads for l in loads]),
                         ("halo tokens received", [l.halo_tokens for l in loads])):
        lines.append(f"  {name:<22} min {min(values):>8}  max {max(values):>8}")
    halo_mb = max(l.halo_kv_tokens for l in loads) * kv_bytes / 1e6
    lines.append(f"  halo k+v per rank      max {halo_mb:.1f} MB")
    candidates = [plan] + (_candidates(cfg, world_size, plan, strategy) if world_size <= CANDIDATE_RANKS else [])
    costs = [call_cost(c, windows, cfg.kv_heads, cfg.batch, cfg.head_dim, itemsize, cfg.text_valid) for c in candidates]
    idle = [l.rank for l in loads if l.heads == 0]
    if idle:
        shown = ", ".join(map(str, idle[:8])) + (f" ... ({len(idle)} in all)" if len(idle) > 8 else "")
        modelled = {(c.mode, c.mesh): _modelled(cost) for c, cost in zip(candidates, costs)}
        lines.append(f"WARNING: {len(idle)} of {world_size} ranks compute no head in this call (ranks {shown}); "
                     f"{idle_advice(cfg, plan, windows, modelled)}")
    lines.append(f"model ({H100_NVLINK.attention_tflops:g} TFLOP/s kernel, {H100_NVLINK.link_gbps:g} GB/s link, "
                 f"{H100_NVLINK.copy_gbps:g} GB/s copies, "
                 f"one H100 = {_predict(cfg, _one(cfg), windows, itemsize):.2f} ms):")
    for candidate, cost in zip(candidates, costs):
        mark = "*" if candidate is plan else " "
        runs_as = call_mode(candidate, windows, cfg.kv_heads, 0, cfg.batch, cfg.head_dim, itemsize, cfg.text_valid)
        lines.append(f" {mark} mode {candidate.mode:<6} mesh {str(candidate.mesh):<9} predicted "
                     f"{cost.time_ms(H100_NVLINK):8.2f} ms, at most {cost.max_bytes() / 1e6:7.1f} MB sent per rank"
                     + (f" (this call: {runs_as})" if runs_as != candidate.mode else ""))
    if per_rank or world_size <= DETAIL_RANKS:
        for l in loads:
            r = l.rank
            lines.append(f"rank {r}: {l.tokens} tokens held, box {plan.box(r)}, mode {l.mode}, {l.heads} heads, "
                         f"halo in {l.halo_tokens} tokens ({l.halo_kv_tokens * kv_bytes / 1e6:.1f} MB k+v)")
    else:
        lines.append("(one line per rank: --ranks)")
    return "\n".join(lines)


def _one(cfg: RunConfig) -> ShardPlan:
    return ShardPlan(canvas=cfg.canvas, tile=cfg.tile, text_len=cfg.text_len, mode="head", world_size=1)


def _predict(cfg: RunConfig, plan: ShardPlan, windows, itemsize: int) -> float:
    return call_cost(plan, windows, cfg.kv_heads, cfg.batch, cfg.head_dim, itemsize, cfg.text_valid).time_ms(
        H100_NVLINK)


def _candidates(cfg: RunConfig, world_size: int, chosen: ShardPlan, strategy) -> list[ShardPlan]:
    """The other plans of this world size: head, tile, and each 2-D mesh."""
    out = []
    kinds = [("head", None), ("tile", None)] + [
        ("hybrid", (p, world_size // p)) for p in range(2, world_size) if world_size % p == 0]
    for mode, mesh in kinds:
        try:
            plan = ShardPlan.from_config(cfg, world_size, mode=mode, mesh=mesh, strategy=strategy)
        except ValueError:  # e.g. more tile ranks than tiles along any split
            continue
        if (plan.mode, plan.mesh, plan.tile_split) != (chosen.mode, chosen.mesh, chosen.tile_split):
            out.append(plan)
    return out
