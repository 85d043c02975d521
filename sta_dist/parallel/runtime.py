"""The three stages of a distributed STA call, driven by a :class:`CallSchedule`:

1. :func:`exchange_in`: the head all-to-all (tokens for heads) over the head group
   (:func:`start_head_exchange` started beside compute), then the k/v halo exchange over
   the tile group (:func:`start_halo` received into tensors of its own);
2. :func:`attend`: the local kernel on one layout, with the log-sum-exp of the text rows
   when they must be merged;
3. :func:`exchange_out`: the exact log-sum-exp merge of the text rows over the tile group,
   then the inverse all-to-all back to the caller's tokens (:func:`start_out` started
   beside compute, per chunk of heads).

The executor (:mod:`sta_dist.parallel.call`) puts them in order; this module holds no
order of its own.

Legend: ``_bshd`` = ``[batch, seq, heads, head_dim]``; a rank's local tensors hold its
video tokens, then all ``L`` text tokens.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from typing import NamedTuple, Optional

import torch

from .. import geometry
from ..dispatch import local_attention, merge_partials
from ..local import LocalText, head_index, longest_text
from .comm import Comm, Exchange
from .schedule import CallSchedule, row_range, tile_rows


class BoxInputs(NamedTuple):
    """What the local kernel reads: own box (all its tokens) for this rank's heads; k/v
    with the halo tiles appended after the box, then the text."""

    q_bshd: torch.Tensor
    k_bshd: torch.Tensor
    v_bshd: torch.Tensor


class PartialOutput(NamedTuple):
    """The local kernel's output for the box (and text rows), with the text rows'
    log-sum-exp ``[B, H_local, L]`` when they still have to be merged."""

    out_bshd: torch.Tensor
    text_lse: Optional[torch.Tensor]


def _heads(x: torch.Tensor, heads: tuple[int, ...]) -> torch.Tensor:
    """The given heads of ``x [B, S, H, D]``: a view for a contiguous block, else a copy."""
    return x[:, :, head_index(heads, x.device)]


def exchange_in(q_bshd, k_bshd, v_bshd, sched: CallSchedule, comm: Comm) -> BoxInputs:
    """Steps 1 and 2: local shards -> box inputs of this rank's heads (plus halo)."""
    return halo_exchange(head_exchange(q_bshd, k_bshd, v_bshd, sched, comm), sched, comm)


def head_exchange(q_bshd, k_bshd, v_bshd, sched: CallSchedule, comm: Comm) -> BoxInputs:
    """Step 1: local shards -> this rank's heads of its box (all the box's tokens), then
    the text; no halo yet."""
    if len(sched.head_group) == 1:
        me = sched.me_in_head_group
        my_q, my_kv = sched.q_heads[me], sched.kv_heads[me]
        return BoxInputs(_heads(q_bshd, my_q), _heads(k_bshd, my_kv), _heads(v_bshd, my_kv))
    box, exchanges = start_head_exchange(q_bshd, k_bshd, v_bshd, sched, comm)
    for x in exchanges:
        x.wait()
    return box


def start_head_exchange(q_bshd, k_bshd, v_bshd, sched: CallSchedule, comm: Comm,
                        overlap: bool = False) -> tuple[BoxInputs, list]:
    """:func:`head_exchange` started: the box inputs (allocated, the text copied in) and
    the exchanges (one per tensor) filling them, each to ``wait()`` for (:func:`start_heads_in`)."""
    started = [start_heads_in(x, heads_of, sched, comm, overlap)
               for x, heads_of in ((q_bshd, sched.q_heads), (k_bshd, sched.kv_heads), (v_bshd, sched.kv_heads))]
    return BoxInputs(*(box for box, _ in started)), [exchange for _, exchange in started]


def start_heads_in(x_bshd: torch.Tensor, heads_of: tuple[tuple[int, ...], ...], sched: CallSchedule, comm: Comm,
                   overlap: bool = False):
    """The head all-to-all of one tensor started: ``(box, exchange)``, ``box [B, n_box + L,
    len(heads_of[me]), D]`` this member's heads of the whole box (to ``wait()`` for), then
    of the text (copied in: text is replicated). With one sample the members' token ranges
    are consecutive rows of the box, received in place; else received into a buffer and
    copied. ``overlap``: beside compute (the high-priority group)."""
    n_held = x_bshd.shape[1] - sched.layout.q_text
    B, D, L = x_bshd.shape[0], x_bshd.shape[3], sched.layout.q_text
    me = sched.me_in_head_group
    n_total = sum(sched.held_counts)
    mine = heads_of[me]
    dst = x_bshd.new_empty(B, n_total + L, len(mine), D)
    dst[:, n_total:] = x_bshd[:, n_held:, head_index(mine, x_bshd.device)]  # this rank's heads are here
    send = [[x_bshd[:, :n_held, head_index(heads, x_bshd.device)]] for heads in heads_of]
    recv = [B * n * len(mine) * D for n in sched.held_counts]
    in_place = B == 1
    exchange = comm.all_to_all_start("head all-to-all", sched.head_group, send, recv,
                                     out=dst[0, :n_total].view(-1) if in_place else None, overlap=overlap)
    if not in_place:
        exchange = _CopiedInto(exchange, dst, row_starts(sched.held_counts), len(mine))
    return dst, exchange


def row_starts(counts) -> list[int]:
    """``[0, c0, c0 + c1, ...]``: where each member's rows start."""
    return [0, *itertools.accumulate(counts)]


class _CopiedInto:
    """An inbound exchange received into a buffer, then copied to the box rows of each
    member (several samples: a member's rows are not one range of the box's memory)."""

    def __init__(self, exchange: Exchange, dst: torch.Tensor, starts: list[int], heads: int):
        self.exchange, self.dst, self.starts, self.heads = exchange, dst, starts, heads

    def wait(self) -> None:
        B, D = self.dst.shape[0], self.dst.shape[3]
        for lo, hi, chunk in zip(self.starts, self.starts[1:], self.exchange.wait()):
            self.dst[:, lo:hi] = chunk.view(B, hi - lo, self.heads, D)


def halo_exchange(box: BoxInputs, sched: CallSchedule, comm: Comm, sends=None, recvs=None) -> BoxInputs:
    """Step 2: the k/v rows of the halo tiles over the tile group, appended after the box
    (before the text). ``sends`` / ``recvs`` (per tile-group member, tile ids) default to
    the schedule's window halo; a call with selected tiles passes the tiles it chose."""
    if len(sched.tile_group) == 1:
        return box
    sends = sched.halo_send if sends is None else sends
    recvs = sched.halo_recv if recvs is None else recvs
    q_box, k_box, v_box = box
    B, D = k_box.shape[0], k_box.shape[3]
    n_box = sched.box_tokens
    box_tiles = sched.layout.q_tiles
    h_kv = k_box.shape[2]
    canvas, tile = sched.layout.canvas, sched.layout.tile
    n_in = [geometry.packed_token_count(canvas, tile, tiles) for tiles in recvs]
    send = []
    for tiles_out in sends:
        rows = tile_rows(canvas, tile, box_tiles, tuple(tiles_out), k_box.device)
        send.append([k_box.index_select(1, rows), v_box.index_select(1, rows)])  # k then v
    chunks = comm.all_to_all("halo exchange", sched.tile_group, send, [2 * B * n * h_kv * D for n in n_in])
    halos = [c.view(2, B, n, h_kv, D) for i, (c, n) in enumerate(zip(chunks, n_in)) if i != sched.me_in_tile_group]
    k_kv = torch.cat([k_box[:, :n_box]] + [h[0] for h in halos] + [k_box[:, n_box:]], 1)
    v_kv = torch.cat([v_box[:, :n_box]] + [h[1] for h in halos] + [v_box[:, n_box:]], 1)
    return BoxInputs(q_box, k_kv, v_kv)


def start_halo(x_bshd: torch.Tensor, sched: CallSchedule, comm: Comm, side: Optional[torch.cuda.Stream]):
    """The halo exchange of one of k, v started beside the attention (its rows gathered on
    ``side``, a stream from :func:`fork`, when on a GPU), received into one tensor of its
    own; returns the wait, which gives it as ``[B, n_halo, H, D]`` (stored row-major by
    halo row, so each member's rows arrive as one range): the schedule's ``halo_send`` /
    ``halo_recv``."""
    B, _, h, D = x_bshd.shape
    layout = sched.layout
    n_in = [geometry.packed_token_count(layout.canvas, layout.tile, tiles) for tiles in sched.halo_recv]
    buf = x_bshd.new_empty(sum(n_in), B, h, D)
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        send = [[_rows(x_bshd, layout, tuple(tiles)).transpose(0, 1)] for tiles in sched.halo_send]
        exchange: Exchange = comm.all_to_all_start("halo exchange", sched.tile_group, send,
                                                   [n * B * h * D for n in n_in], out=buf.view(-1), overlap=True)

    def wait() -> torch.Tensor:
        exchange.wait()
        return buf.transpose(0, 1)

    return wait


def _rows(x_bshd: torch.Tensor, layout, tiles: tuple[int, ...]) -> torch.Tensor:
    """The rows of ``tiles`` of a box's ``x_bshd``: a view when they are one range (e.g. the
    whole box, for a window that reaches every tile), else gathered."""
    span = row_range(layout.canvas, layout.tile, layout.q_tiles, tiles)
    if span is not None:
        return x_bshd[:, span[0]:span[1]]
    return x_bshd.index_select(1, tile_rows(layout.canvas, layout.tile, layout.q_tiles, tiles, x_bshd.device))


def fork(device: torch.device) -> Optional[torch.cuda.Stream]:
    """On a GPU: a side stream that runs after what the current stream enqueued so far,
    and beside what it enqueues next; elsewhere ``None``."""
    if device.type != "cuda":
        return None
    side = _side_stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    return side


@functools.lru_cache(maxsize=16)
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=device, priority=-1)


def attend(inputs: BoxInputs, sched: CallSchedule, text_length, scale: float, backend: str,
           keys=None) -> PartialOutput:
    """Step 3: the local kernel. ``text_length`` is one int or a tuple of one per batch
    sample. Text keys count on one rank of the tile group only, so the merged text rows
    see each of them once. Only text rows are merged, so a call without text asks for no
    log-sum-exp (which lets the fastest kernel take it). ``keys``: the table path
    (selected tiles)."""
    merge = len(sched.tile_group) > 1 and longest_text(text_length) > 0
    text = LocalText.per_sample(text_length, kv_for_text_q=sched.counts_text_keys)
    result = local_attention(*inputs, sched.layout, sched.heads, text, scale, backend, return_lse=merge, keys=keys)
    if merge:
        out, lse = result
        return PartialOutput(out, lse[:, :, sched.box_tokens:])
    return PartialOutput(result, None)


def merge_text(out_bshd: torch.Tensor, text_lse: torch.Tensor, sched: CallSchedule, comm: Comm,
               lse_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exact softmax merge of the text rows' partial results over the tile group, in place.
    ``lse_out [B, H_local, L]``: also gets the merged rows' log-sum-exp."""
    n_box = sched.box_tokens
    part = out_bshd[:, n_box:].float()  # [B, L, Hl, D]
    packed = torch.cat([part, text_lse.transpose(1, 2)[..., None]], -1)  # [B, L, Hl, D + 1]
    gathered = torch.stack(comm.all_gather("text merge", sched.tile_group, packed))
    outs, lses = gathered[..., :-1], gathered[..., -1]  # [R, B, L, Hl, D], [R, B, L, Hl]
    merged, lse = merge_partials(outs, lses)
    out_bshd[:, n_box:] = merged  # in place: the box's rows stay where they are
    if lse_out is not None:
        lse_out.copy_(lse.transpose(1, 2))
    return out_bshd


def start_out(out_bshd: torch.Tensor, ch: CallSchedule, comm: Comm, overlap: bool = True) -> tuple[Exchange, Exchange]:
    """Chunk ``ch``'s output (head mode, no text merge) back to the members that hold its
    tokens: the video rows each member holds, then the text rows to every member (two
    exchanges: with one sample the video rows leave from the output as they lie).
    ``overlap``: beside compute (the high-priority group)."""
    B, D = out_bshd.shape[0], out_bshd.shape[3]
    n_total = sum(ch.held_counts)
    me = ch.me_in_head_group
    n_held = ch.held_counts[me]
    starts = row_starts(ch.held_counts)
    L = out_bshd.shape[1] - n_total
    video = comm.all_to_all_start("output all-to-all", ch.head_group,
                                  [[out_bshd[:, lo:hi]] for lo, hi in zip(starts, starts[1:])],
                                  [B * n_held * len(qh) * D for qh in ch.q_heads], overlap=overlap)
    text = out_bshd[:, n_total:].contiguous()
    txt = comm.all_to_all_start("output all-to-all", ch.head_group, [[text]] * len(ch.head_group),
                                [B * L * len(qh) * D for qh in ch.q_heads], overlap=overlap)
    return video, txt


def exchange_out(partial: PartialOutput, sched: CallSchedule, comm: Comm, num_heads: int) -> torch.Tensor:
    """Steps 4 and 5: merged box output -> the caller's tokens, all heads."""
    out = partial.out_bshd
    if partial.text_lse is not None:
        out = merge_text(out, partial.text_lse, sched, comm)
    if len(sched.head_group) == 1:
        return out
    B, _, h_me, D = out.shape
    n_box, L = sched.box_tokens, out.shape[1] - sched.box_tokens
    text = out[:, n_box:]
    send, start = [], 0
    for n in sched.held_counts:
        send.append([out[:, start:start + n], text])
        start += n
    me = sched.me_in_head_group
    n_held = sched.held_counts[me]
    sizes = [B * (n_held + L) * len(qh) * D for qh in sched.q_heads]
    chunks = comm.all_to_all("output all-to-all", sched.head_group, send, sizes)
    result = out.new_empty(B, n_held + L, num_heads, D)
    for qh, chunk in zip(sched.q_heads, chunks):
        if qh:
            video, txt = chunk.split([B * n_held * len(qh) * D, B * L * len(qh) * D])
            idx = head_index(qh, result.device)
            result[:, :n_held, idx] = video.view(B, n_held, len(qh), D)
            result[:, n_held:, idx] = txt.view(B, L, len(qh), D)
    return result
