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

import torch

from ..local import head_index
from .comm import Comm, Exchange
from .runtime import attend, row_starts, start_head_exchange
from .schedule import CallSchedule, head_chunk


def head_pipelined(q_bshd, k_bshd, v_bshd, sched: CallSchedule, comm: Comm, text_length, scale: float,
                   backend: str, num_heads: int) -> torch.Tensor:
    """This rank's tokens, all heads: the call of ``sched`` (head mode, ``sched.head_chunks``
    chunks) on this rank's local ``q, k, v``."""
    chunks = [head_chunk(sched, c) for c in range(sched.head_chunks)]
    inbound = [start_head_exchange(q_bshd, k_bshd, v_bshd, ch, comm, overlap=True) for ch in chunks]
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


def _start_out(out_bshd: torch.Tensor, ch: CallSchedule, comm: Comm) -> tuple[Exchange, Exchange]:
    """Chunk ``ch``'s output back to the members that hold its tokens: the video rows each
    member holds, then the text rows to every member (two exchanges: with one sample the
    video rows leave from the output as they lie)."""
    B, D = out_bshd.shape[0], out_bshd.shape[3]
    n_total = sum(ch.held_counts)
    me = ch.me_in_head_group
    n_held = ch.held_counts[me]
    starts = row_starts(ch.held_counts)
    L = out_bshd.shape[1] - n_total
    video = comm.all_to_all_start("output all-to-all", ch.head_group,
                                  [[out_bshd[:, lo:hi]] for lo, hi in zip(starts, starts[1:])],
                                  [B * n_held * len(qh) * D for qh in ch.q_heads], overlap=True)
    text = out_bshd[:, n_total:].contiguous()
    txt = comm.all_to_all_start("output all-to-all", ch.head_group, [[text]] * len(ch.head_group),
                                [B * L * len(qh) * D for qh in ch.q_heads], overlap=True)
    return video, txt
