"""A cost model of one distributed call: the work and the bytes of every rank, from its
schedule, and a time from two measured rates (attention TFLOP/s and link GB/s).

The bytes are exact (what :class:`~sta_dist.parallel.comm.Comm` will count); the time is a
model: the busiest rank's kernel time plus the busiest rank's transfer time, not overlapped
(the runtime does not overlap them yet), plus a fixed latency per collective.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

from .. import geometry
from ..geometry import Triple
from .plan import ShardPlan
from .schedule import CallSchedule, call_schedule

COLLECTIVE_LATENCY_MS = 0.05
"""Per collective with peers: launch and synchronisation, measured ~30-80 us with NCCL."""


@dataclass(frozen=True, slots=True)
class Rates:
    """What the model needs of the machine."""

    attention_tflops: float
    """Attended score entries' FLOP/s of the local kernel, ``4 * B * H * Sq * Skv * D``."""
    link_gbps: float
    """Bytes each rank sends per second to its peers (all-to-all algorithm bandwidth)."""


H100_NVLINK = Rates(attention_tflops=640.0, link_gbps=270.0)
"""Measured on 2x H100 (NVLink NV18): the CUDA kernel at HunyuanVideo (3,3,3) ran
639-656 TFLOP/s; all_to_all_single of 354 MB per rank 270 GB/s (shared/ANCHORS.md)."""


@dataclass(frozen=True, slots=True)
class RankCost:
    """One rank's share of one call."""

    rank: int
    flops: float
    """Attended FLOPs of this rank's kernel (video and text queries)."""
    bytes_sent: dict
    """Per step name (as :class:`Comm` names them): bytes this rank sends to other ranks."""
    collectives: int

    def time_ms(self, rates: Rates) -> tuple[float, float]:
        """(kernel ms, communication ms) under ``rates``."""
        return (self.flops / (rates.attention_tflops * 1e12) * 1e3,
                sum(self.bytes_sent.values()) / (rates.link_gbps * 1e9) * 1e3 + self.collectives * COLLECTIVE_LATENCY_MS)


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
def _window_keys(canvas: Triple, tile: Triple, q_tile: int, window: Triple) -> int:
    """Video key tokens one query tile attends under ``window``."""
    grid = geometry.grid_shape(canvas, tile)
    ids = geometry.window_tiles(geometry.tile_coords(q_tile, grid), window, grid)
    return geometry.packed_token_count(canvas, tile, ids)


def _tile_tokens(canvas: Triple, tile: Triple, tile_id: int) -> int:
    grid = geometry.grid_shape(canvas, tile)
    return geometry.volume(geometry.tile_extent(geometry.tile_coords(tile_id, grid), canvas, tile))


def rank_cost(plan: ShardPlan, sched: CallSchedule, batch: int, head_dim: int, itemsize: int,
              text_length: int) -> RankCost:
    """The work and bytes of one rank's call (its schedule), for ``batch`` samples."""
    canvas, tile, L = plan.canvas, plan.tile, plan.text_len
    layout, me = sched.layout, sched.me_in_head_group
    my_q, my_kv = sched.q_heads[me], sched.kv_heads[me]
    pairs = 0.0
    for window in sched.heads.windows:
        for qt in layout.q_tiles:
            pairs += _tile_tokens(canvas, tile, qt) * (_window_keys(canvas, tile, qt, window) + text_length)
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
    return RankCost(sched.rank, flops, sent, collectives)


def call_cost(plan: ShardPlan, windows: Sequence[Triple], num_kv_heads: int, batch: int, head_dim: int,
              itemsize: int, text_length: int) -> CallCost:
    """Every rank's cost of a call with one window per query head."""
    windows = tuple(tuple(w) for w in windows)
    return CallCost(tuple(
        rank_cost(plan, call_schedule(plan, windows, num_kv_heads, r), batch, head_dim, itemsize, text_length)
        for r in range(plan.world_size)))
