"""A call in head mode, pipelined in chunks of heads (:func:`head_chunk`): every chunk's
all-to-all starts at once, each chunk is attended as soon as its tokens are in, and its
output goes back while the next chunk is attended. On the GPU the exchanges run on the
backend's stream beside the attention on the current one; the results equal the staged
call's (:mod:`sta_dist.parallel.runtime`) and the bytes moved are the same.

With one sample the exchanges receive straight into the box tensors the kernel reads, and
the outputs leave straight from the kernel's output: no concatenation on either side.

Legend: ``_bshd`` = ``[batch, seq, heads, head_dim]``; a rank's local tensors hold its
video tokens, then all ``L`` text tokens.
"""

from __future__ import annotations

import itertools

import torch

from ..local import head_index
from .comm import Comm, Exchange
from .runtime import BoxInputs, attend
from .schedule import CallSchedule, head_chunk


def head_pipelined(q_bshd, k_bshd, v_bshd, sched: CallSchedule, comm: Comm, text_length, scale: float,
                   backend: str, num_heads: int) -> torch.Tensor:
    """This rank's tokens, all heads: the call of ``sched`` (head mode, ``sched.head_chunks``
    chunks) on this rank's local ``q, k, v``."""
    chunks = [head_chunk(sched, c) for c in range(sched.head_chunks)]
    inbound = [_start_in(q_bshd, k_bshd, v_bshd, ch, comm) for ch in chunks]
    outbound = []
    for ch, (box, exchanges) in zip(chunks, inbound):
        for x in exchanges:
            x.wait()
        if ch.heads.windows:
            out = attend(box, ch, text_length, scale, backend).out_bshd
        else:  # this rank has no head in this chunk
            out = box.q_bshd
        outbound.append(_start_out(out, ch, comm))
    B, D = q_bshd.shape[0], q_bshd.shape[3]
    n_held = q_bshd.shape[1] - sched.layout.q_text
    result = q_bshd.new_empty(B, q_bshd.shape[1], num_heads, D)
    for ch, (video, text) in zip(chunks, outbound):
        for qh, part, txt in zip(ch.q_heads, video.wait(), text.wait()):
            if qh:
                idx = head_index(qh, result.device)
                result[:, :n_held, idx] = part.view(B, n_held, len(qh), D)
                result[:, n_held:, idx] = txt.view(B, -1, len(qh), D)
    return result


def _starts(counts) -> list[int]:
    return [0, *itertools.accumulate(counts)]


def _start_in(q_bshd, k_bshd, v_bshd, ch: CallSchedule, comm: Comm) -> tuple[BoxInputs, list[Exchange]]:
    """Chunk ``ch``'s box inputs (allocated, text copied in) and the exchanges filling them."""
    n_held = q_bshd.shape[1] - ch.layout.q_text
    B, D, L = q_bshd.shape[0], q_bshd.shape[3], ch.layout.q_text
    me = ch.me_in_head_group
    n_total = sum(ch.held_counts)
    starts = _starts(ch.held_counts)
    box, exchanges = [], []
    for x, heads_of in ((q_bshd, ch.q_heads), (k_bshd, ch.kv_heads), (v_bshd, ch.kv_heads)):
        mine = heads_of[me]
        dst = x.new_empty(B, n_total + L, len(mine), D)
        dst[:, n_total:] = x[:, n_held:, head_index(mine, x.device)]  # text is replicated: this rank's heads are here
        send = [[x[:, :n_held, head_index(heads, x.device)]] for heads in heads_of]
        recv = [B * n * len(mine) * D for n in ch.held_counts]
        in_place = B == 1  # the members' token ranges are consecutive rows of the box
        exchange = comm.all_to_all_start("head all-to-all", ch.head_group, send, recv,
                                         out=dst[0, :n_total].view(-1) if in_place else None, overlap=True)
        if not in_place:
            exchange = _CopiedInto(exchange, dst, starts, len(mine))
        box.append(dst)
        exchanges.append(exchange)
    return BoxInputs(*box), exchanges


class _CopiedInto:
    """An inbound exchange received into a buffer, then copied to the box rows of each
    member (several samples: a member's rows are not one range of the box's memory)."""

    def __init__(self, exchange: Exchange, dst: torch.Tensor, starts: list[int], heads: int):
        self.exchange, self.dst, self.starts, self.heads = exchange, dst, starts, heads

    def wait(self) -> None:
        B, D = self.dst.shape[0], self.dst.shape[3]
        for lo, hi, chunk in zip(self.starts, self.starts[1:], self.exchange.wait()):
            self.dst[:, lo:hi] = chunk.view(B, hi - lo, self.heads, D)


def _start_out(out_bshd: torch.Tensor, ch: CallSchedule, comm: Comm) -> tuple[Exchange, Exchange]:
    """Chunk ``ch``'s output back to the members that hold its tokens: the video rows each
    member holds, then the text rows to every member (two exchanges: with one sample the
    video rows leave from the output as they lie)."""
    B, D = out_bshd.shape[0], out_bshd.shape[3]
    n_total = sum(ch.held_counts)
    me = ch.me_in_head_group
    n_held = ch.held_counts[me]
    starts = _starts(ch.held_counts)
    L = out_bshd.shape[1] - n_total
    video = comm.all_to_all_start("output all-to-all", ch.head_group,
                                  [[out_bshd[:, lo:hi]] for lo, hi in zip(starts, starts[1:])],
                                  [B * n_held * len(qh) * D for qh in ch.q_heads], overlap=True)
    text = out_bshd[:, n_total:].contiguous()
    txt = comm.all_to_all_start("output all-to-all", ch.head_group, [[text]] * len(ch.head_group),
                                [B * L * len(qh) * D for qh in ch.q_heads], overlap=True)
    return video, txt
