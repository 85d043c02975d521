"""A cost model of one distributed call: the work and the bytes of every rank, from its
schedules, and a time from two measured rates (attention TFLOP/s and link GB/s). It decides
nothing: :mod:`~sta_dist.parallel.decide` prices its choices (the plan's mode and mesh, a
call's parts) here.

The bytes are exact (what :class:`~sta_dist.parallel.comm.Comm` will count); the time is a
model: the busiest rank's kernel time, plus the busiest rank's transfer time where the call
waits for it (a head all-to-all before and after the attention; a halo exchange only for what
the attention of the box's own keys does not cover), plus a fixed latency per
collective, plus the copies around the exchanges (send buffers packed, heads split, outputs
scattered back) at the card's copy rate.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

from .. import geometry
from ..geometry import Triple
from .layout import MeshLayout
from .schedule import CallSchedule, key_split

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


def rank_cost(plan: MeshLayout, sched: CallSchedule, batch: int, head_dim: int, itemsize: int,
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


def parts_cost(plan: MeshLayout, schedules: Sequence[Sequence[CallSchedule]], batch: int, head_dim: int,
               itemsize: int, text_length: int) -> CallCost:
    """Every rank's cost of a call run in parts, one after the other (``schedules[r]``: rank
    ``r``'s schedule of each part): per rank, their work and bytes add up (one agreement
    check for the call)."""
    ranks = []
    for r, scheds in enumerate(schedules):
        costs = [rank_cost(plan, sched, batch, head_dim, itemsize, text_length) for sched in scheds]
        extra_checks = (len(scheds) - 1) * (1 if plan.world_size > 1 else 0)  # each part's cost counts the call's one
        sent: dict = {}
        for c in costs:
            for step, n in c.bytes_sent.items():
                sent[step] = sent.get(step, 0) + n
        # in parts: each part's heads split out of q, k, v, and its output scattered back
        heads = sum(len(qh) for sched in scheds for qh in sched.q_heads)
        kv_heads = sum(len(set().union(*sched.kv_heads)) for sched in scheds)
        rows = plan.held_count(r) + plan.text_len
        split = 2.0 * batch * rows * (2 * heads + 2 * kv_heads) * head_dim * itemsize if len(scheds) > 1 else 0.0
        ranks.append(RankCost(r, sum(c.flops for c in costs), sent, sum(c.collectives for c in costs) - extra_checks,
                              sum(c.copied for c in costs) + split, sum(c.beside for c in costs)))
    return CallCost(tuple(ranks))


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


def selected_rank_cost(plan: MeshLayout, sched: CallSchedule, windows, window_rule: str, select, sel_p, batch: int,
                       head_dim: int, itemsize: int, text_length) -> RankCost:
    """One rank's work and bytes in a call with selected tiles (``sel_p`` from
    :func:`selection_probability`; ``text_length`` one int or one per sample): exact when
    the selection is known, else expected. A query tile attends its window united with its
    selection; a remote tile is fetched when some query tile of the rank (any sample, any
    of its heads) attends it."""
    import torch

    from ..selection.rules import window_mask

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
        boxes = {r: list(plan.box_tiles(plan.head_group(r))) for r in sched.tile_group}
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
