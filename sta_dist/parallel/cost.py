"""A cost model of one distributed call: the work and the bytes of every rank, from its
schedule, and a time from two measured rates (attention TFLOP/s and link GB/s); and the
one decision it makes, :func:`call_parts`: how a call on a tile plan with heads whose windows
reach the whole canvas from some box runs: all in head mode, all in tile mode (their halo
the rest of the canvas), or in two parts (those heads over the head all-to-all, the local
ones in tile mode with their halo). :meth:`ShardPlan.modelled_modes` asks it for ``auto``.

The bytes are exact (what :class:`~sta_dist.parallel.comm.Comm` will count); the time is a
model: the busiest rank's kernel time, plus the busiest rank's transfer time where the call
waits for it (a head all-to-all before and after the attention; a halo exchange only for what
the attention of the box's own keys does not cover), plus a fixed latency per
collective, plus the copies around the exchanges (send buffers packed, heads split, outputs
scattered back) at the card's copy rate.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Sequence

from .. import geometry
from ..geometry import Triple
from .plan import ShardPlan
from .schedule import CallSchedule, call_schedule, key_split, whole_canvas_halo

COLLECTIVE_LATENCY_MS = 0.05
"""Per collective with peers: launch and synchronisation, measured ~30-80 us with NCCL."""


@dataclass(frozen=True, slots=True)
class Rates:
    """What the model needs of the machine."""

    attention_tflops: float
    """Attended score entries' FLOP/s of the local kernel, ``4 * B * H * Sq * Skv * D``."""
    link_gbps: float
    """Bytes each rank sends per second to its peers (all-to-all algorithm bandwidth)."""
    copy_gbps: float = 2500.0
    """Bytes per second the copies around the exchanges read and write together."""


H100_NVLINK = Rates(attention_tflops=640.0, link_gbps=270.0, copy_gbps=2500.0)
"""Measured on 2x H100 (NVLink NV18): the CUDA kernel at HunyuanVideo (3,3,3) ran
639-656 TFLOP/s; all_to_all_single of 354 MB per rank 270 GB/s (shared/ANCHORS.md); the
copies of a head-mode call ~2.5 TB/s (2026-11-28 profiles: the 354 MB send buffer of q
packed in ~220 us)."""


@dataclass(frozen=True, slots=True)
class RankCost:
    """One rank's share of one call."""

    rank: int
    flops: float
    """Attended FLOPs of this rank's kernel (video and text queries)."""
    bytes_sent: dict
    """Per step name (as :class:`Comm` names them): bytes this rank sends to other ranks."""
    collectives: int
    copied: float = 0.0
    """Bytes read and written by the copies on the call's path."""
    beside: float = 0.0
    """FLOPs of the attention that runs beside the halo exchange (every query over the
    box's own keys): the exchange costs time only beyond it."""

    def time_ms(self, rates: Rates) -> tuple[float, float]:
        """(kernel ms, communication and copy ms) under ``rates``."""
        kernel = self.flops / (rates.attention_tflops * 1e12) * 1e3
        halo = self.bytes_sent.get("halo exchange", 0) / (rates.link_gbps * 1e9) * 1e3
        other = sum(n for step, n in self.bytes_sent.items() if step != "halo exchange")
        hidden = min(halo, self.beside / (rates.attention_tflops * 1e12) * 1e3)
        comm = (other / (rates.link_gbps * 1e9) * 1e3 + halo - hidden + self.collectives * COLLECTIVE_LATENCY_MS
                + self.copied / (rates.copy_gbps * 1e9) * 1e3)
        return kernel, comm


@dataclass(frozen=True, slots=True)
class CallCost:
    """Every rank's cost of one call, and the model's time."""

    ranks: tuple[RankCost, ...]

    def time_ms(self, rates: Rates) -> float:
        kernel = max(r.time_ms(rates)[0] for r in self.ranks)
        comm = max(r.time_ms(rates)[1] for r in self.ranks)
        return kernel + comm

    def max_bytes(self) -> int:
        return max(sum(r.bytes_sent.values()) for r in self.ranks)


@functools.lru_cache(maxsize=4096)
def _window_keys(canvas: Triple, tile: Triple, q_tile: int, window: Triple, clip=None) -> int:
    """Video key tokens one query tile attends under ``window`` (cut to the box ``clip``)."""
    grid = geometry.grid_shape(canvas, tile)
    box = geometry.window_box(geometry.tile_coords(q_tile, grid), window, grid)
    return geometry.packed_token_count(canvas, tile, (box if clip is None else box.intersect(clip)).tile_ids(grid))


@functools.lru_cache(maxsize=4096)
def _box_pairs(canvas: Triple, tile: Triple, q_tiles: tuple[int, ...], window: Triple, text_length: int,
               clip=None) -> int:
    """Score entries of one head's video queries in ``q_tiles`` under ``window`` (its video
    keys, cut to the box ``clip``, and ``text_length`` text keys)."""
    return sum(_tile_tokens(canvas, tile, qt) * (_window_keys(canvas, tile, qt, window, clip) + text_length)
               for qt in q_tiles)


def _tile_tokens(canvas: Triple, tile: Triple, tile_id: int) -> int:
    grid = geometry.grid_shape(canvas, tile)
    return geometry.volume(geometry.tile_extent(geometry.tile_coords(tile_id, grid), canvas, tile))


def rank_cost(plan: ShardPlan, sched: CallSchedule, batch: int, head_dim: int, itemsize: int,
              text_length: int) -> RankCost:
    """The work and bytes of one rank's call (its schedule), for ``batch`` samples."""
    canvas, tile, L = plan.canvas, plan.tile, plan.text_len
    layout, me = sched.layout, sched.me_in_head_group
    my_q, my_kv = sched.q_heads[me], sched.kv_heads[me]
    pairs = float(sum(_box_pairs(canvas, tile, layout.q_tiles, window, text_length) for window in sched.heads.windows))
    text_keys = layout.text_q_video_keys + (text_length if sched.counts_text_keys else 0)
    pairs += len(sched.heads.windows) * text_length * text_keys
    flops = 4.0 * batch * pairs * head_dim

    sent: dict = {}
    if len(sched.head_group) > 1:
        n_held = sched.held_counts[me]
        into = sum(batch * n_held * (len(qh) + 2 * len(kvh)) * head_dim
                   for r, qh, kvh in zip(sched.head_group, sched.q_heads, sched.kv_heads) if r != sched.rank)
        sent["head all-to-all"] = into * itemsize
        back = sum(batch * (n + L) * len(my_q) * head_dim
                   for r, n in zip(sched.head_group, sched.held_counts) if r != sched.rank)
        sent["output all-to-all"] = back * itemsize
    if len(sched.tile_group) > 1:
        halo = sum(geometry.packed_token_count(canvas, tile, tiles) for tiles in sched.halo_send)
        sent["halo exchange"] = 2 * batch * halo * len(my_kv) * head_dim * itemsize
        if text_length > 0:
            sent["text merge"] = batch * L * len(my_q) * (head_dim + 1) * 4 * (len(sched.tile_group) - 1)
    collectives = len(sent) + (1 if plan.world_size > 1 else 0)  # + the per-call agreement check
    beside = 0.0
    if len(sched.tile_group) > 1:  # the box's own keys are attended beside the halo exchange
        own = key_split(sched).own
        beside = 4.0 * batch * head_dim * sum(_box_pairs(canvas, tile, own.q_tiles, window, text_length, own.key_box)
                                              for window in sched.heads.windows)
    return RankCost(sched.rank, flops, sent, collectives, _copied(sched, batch, head_dim, itemsize, L), beside)


def _copied(sched: CallSchedule, batch: int, head_dim: int, itemsize: int, text_len: int) -> float:
    """Bytes read and written by the copies on one rank's call path (the default path:
    :mod:`~sta_dist.parallel.pipeline` in head mode, the staged head exchange then the halo
    beside the box's own keys in hybrid mode; the halo's gather runs on a side stream)."""
    if len(sched.head_group) == 1:
        return 0.0
    me = sched.me_in_head_group
    n_held, n_box, L = sched.held_counts[me], sched.box_tokens, text_len
    q_all = sum(len(qh) for qh in sched.q_heads)
    hq, hkv = len(sched.q_heads[me]), len(sched.kv_heads[me])
    row = batch * head_dim * itemsize
    packed = n_held * sum(len(qh) + 2 * len(kvh) for qh, kvh in zip(sched.q_heads, sched.kv_heads))
    scattered = (n_held + L) * q_all
    if len(sched.tile_group) == 1:  # received in place (one sample), text copied in
        received = L * (hq + 2 * hkv) + (n_box * (hq + 2 * hkv) if batch > 1 else 0)
        return 2.0 * row * (packed + received + scattered)
    joined = (n_box + L) * (hq + 2 * hkv)  # the staged head exchange's concatenation
    sent_back = (n_box + L * len(sched.head_group)) * hq
    return 2.0 * row * (packed + joined + sent_back + scattered)


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

    def schedule(self, plan: ShardPlan, rank: int) -> CallSchedule:
        return call_schedule(plan, self.windows, len(self.kv_heads), rank, self.wide_tile)


MIXED = "mixed (head + tile)"
"""The mode of a call run in two parts (:func:`call_mode`)."""


@functools.lru_cache(maxsize=1024)
def call_parts(plan: ShardPlan, windows: tuple[Triple, ...], num_kv_heads: int, batch: int, head_dim: int,
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
    return min(candidates, key=lambda parts: _parts_cost(plan, parts, batch, head_dim, itemsize,
                                                         text_length).time_ms(H100_NVLINK))


def call_mode(plan: ShardPlan, windows: Sequence[Triple], num_kv_heads: int, rank: int, batch: int, head_dim: int,
              itemsize: int, text_length: int) -> str:
    """What a call does on ``rank``: its schedule's mode, or :data:`MIXED`."""
    parts = call_parts(plan, tuple(tuple(w) for w in windows), num_kv_heads, batch, head_dim, itemsize, text_length)
    return MIXED if len(parts) > 1 else parts[0].schedule(plan, rank).mode


def _parts_cost(plan: ShardPlan, parts: tuple[CallPart, ...], batch: int, head_dim: int, itemsize: int,
                text_length: int) -> CallCost:
    """The parts run one after the other: per rank, their work and bytes add up (one
    agreement check for the call)."""
    ranks = []
    extra_checks = (len(parts) - 1) * (1 if plan.world_size > 1 else 0)  # each part's cost counts the call's one
    heads = sum(len(p.q_heads) for p in parts)
    kv_heads = sum(len(p.kv_heads) for p in parts)
    for r in range(plan.world_size):
        costs = [rank_cost(plan, p.schedule(plan, r), batch, head_dim, itemsize, text_length) for p in parts]
        sent: dict = {}
        for c in costs:
            for step, n in c.bytes_sent.items():
                sent[step] = sent.get(step, 0) + n
        # in parts: each part's heads split out of q, k, v, and its output scattered back
        rows = plan.held_count(r) + plan.text_len
        split = 2.0 * batch * rows * (2 * heads + 2 * kv_heads) * head_dim * itemsize if len(parts) > 1 else 0.0
        ranks.append(RankCost(r, sum(c.flops for c in costs), sent, sum(c.collectives for c in costs) - extra_checks,
                              sum(c.copied for c in costs) + split, sum(c.beside for c in costs)))
    return CallCost(tuple(ranks))


def call_cost(plan: ShardPlan, windows: Sequence[Triple], num_kv_heads: int, batch: int, head_dim: int,
              itemsize: int, text_length: int) -> CallCost:
    """Every rank's cost of a call with one window per query head (of its parts, as it runs)."""
    windows = tuple(tuple(w) for w in windows)
    parts = call_parts(plan, windows, num_kv_heads, batch, head_dim, itemsize, text_length)
    return _parts_cost(plan, parts, batch, head_dim, itemsize, text_length)


# ---------------------------------------------------------------------------------------
# Calls with selected tiles (sta_dist.parallel.selected)
# ---------------------------------------------------------------------------------------


def selection_probability(select, selected, heads: int, n_tiles: int):
    """``[Bs, Hs, n, n]`` float64: the chance that query tile ``i`` selects key tile ``j``.
    Exact (0 or 1) for a mask or for ``selected``, the selection a call made (``[B, 1 or
    H, n, n]`` bool, e.g. ``sta_dist.testing.reference_selection``); else a model that
    knows nothing of the data: ``TopK(k)`` picks any tile with chance ``k / n``, ``Mass(p)``
    keeps a share ``p`` of the tiles (near-uniform scores, the most it keeps)."""
    import torch

    if selected is not None or isinstance(select, torch.Tensor):
        return (select if selected is None else selected).double().cpu()
    if select is None:
        return torch.zeros(1, 1, n_tiles, n_tiles, dtype=torch.float64)
    chance = min(1.0, select.k / n_tiles) if hasattr(select, "k") else select.p
    return torch.full((1, 1 if select.share_heads else heads, n_tiles, n_tiles), chance, dtype=torch.float64)


def selected_rank_cost(plan: ShardPlan, sched: CallSchedule, windows, window_rule: str, select, sel_p, batch: int,
                       head_dim: int, itemsize: int, text_length) -> RankCost:
    """One rank's work and bytes in a call with selected tiles (``sel_p`` from
    :func:`selection_probability`; ``text_length`` one int or one per sample): exact when
    the selection is known, else expected. A query tile attends its window united with its
    selection; a remote tile is fetched when some query tile of the rank (any sample, any
    of its heads) attends it."""
    import torch

    from ..selection.rules import window_mask
    from .selected import box_tiles

    grid, n = plan.grid, geometry.num_tiles(plan.grid)
    me = sched.me_in_head_group
    my_q, my_kv = sched.q_heads[me], sched.kv_heads[me]
    box = list(sched.layout.q_tiles)
    tok = torch.tensor([_tile_tokens(plan.canvas, plan.tile, t) for t in range(n)], dtype=torch.float64)
    zeros = torch.zeros(n, n, dtype=torch.bool)
    win = {h: zeros if windows is None else window_mask(range(n), windows[h], grid, window_rule) for h in my_q}
    per_sample = batch / sel_p.shape[0]  # a model's one row stands for every sample

    def sel(h):
        return sel_p[:, 0 if sel_p.shape[1] == 1 else h]

    lengths = tuple(text_length) if isinstance(text_length, (list, tuple)) else (text_length,) * batch
    mean_text = sum(lengths) / max(batch, 1)
    pairs = 0.0
    for h in my_q:
        attended = 1 - (1 - win[h][box].double()) * (1 - sel(h)[:, box])  # [Bs, n_box, n]
        pairs += per_sample * float((tok[box] * (attended @ tok + mean_text)).sum())
    video_keys = sched.layout.text_q_video_keys
    pairs += len(my_q) * sum(t * (video_keys + (t if sched.counts_text_keys else 0)) for t in lengths)
    flops = 4.0 * pairs * head_dim

    sent: dict = {}
    L = plan.text_len
    if len(sched.head_group) > 1:
        n_held = sched.held_counts[me]
        into = sum(batch * n_held * (len(qh) + 2 * len(kvh)) * head_dim
                   for r, qh, kvh in zip(sched.head_group, sched.q_heads, sched.kv_heads) if r != sched.rank)
        sent["head all-to-all"] = into * itemsize
        if select is not None and not isinstance(select, torch.Tensor) and select.share_heads:
            sent["selection sums"] = batch * 2 * len(box) * head_dim * 8 * (len(sched.head_group) - 1)
        back = sum(batch * (n + L) * len(my_q) * head_dim
                   for r, n in zip(sched.head_group, sched.held_counts) if r != sched.rank)
        sent["output all-to-all"] = back * itemsize
    if len(sched.tile_group) > 1:
        peers = len(sched.tile_group) - 1
        boxes = {r: list(box_tiles(plan, plan.head_group(r))) for r in sched.tile_group}
        if select is not None and not isinstance(select, torch.Tensor):
            heads_k = 1 if select.share_heads else len(my_kv)
            sent["tile means"] = batch * heads_k * max(map(len, boxes.values())) * head_dim * 4 * peers
        sent["tile requests"] = n * peers
        mine = torch.zeros(n, dtype=torch.bool)
        mine[box] = True
        halo = 0.0
        for r in sched.tile_group:
            if r == sched.rank:
                continue
            theirs = boxes[r]
            in_window = torch.stack([win[h][theirs].any(0) for h in my_q]).any(0) if my_q else zeros[0]
            sel_heads = [0] if sel_p.shape[1] == 1 else list(my_q)
            missed = (1 - sel_p[:, sel_heads][:, :, theirs]).prod(2).prod(1).prod(0) ** per_sample  # [n]
            wanted = torch.where(in_window, 1.0, 1 - missed) if my_q else torch.zeros(n, dtype=torch.float64)
            halo += float((wanted * tok)[mine].sum())
        sent["halo exchange"] = 2 * batch * halo * len(my_kv) * head_dim * itemsize
        if max(lengths, default=0) > 0:
            sent["text merge"] = batch * L * len(my_q) * (head_dim + 1) * 4 * peers
    collectives = len(sent) + (1 if plan.world_size > 1 else 0)
    return RankCost(sched.rank, flops, sent, collectives)


def selected_call_cost(plan: ShardPlan, windows, window_rule: str, select, num_heads: int, num_kv_heads: int,
                       batch: int, head_dim: int, itemsize: int, text_length, selected=None) -> CallCost:
    """Every rank's cost of a call with selected tiles (``windows``: one per query head, or
    ``None``): exact with ``selected`` (or a mask), expected for a ``TopK`` / ``Mass``
    without it (:func:`selection_probability`)."""
    from ..selection.attention import table_heads

    n = geometry.num_tiles(plan.grid)
    windows = None if windows is None else tuple(tuple(w) for w in windows)
    heads = table_heads(windows, window_rule, num_heads, plan.grid, num_kv_heads)
    sel_p = selection_probability(select, selected, num_heads, n)
    return CallCost(tuple(
        selected_rank_cost(plan, call_schedule(plan, heads.windows, num_kv_heads, r), windows, window_rule, select,
                           sel_p, batch, head_dim, itemsize, text_length)
        for r in range(plan.world_size)))
