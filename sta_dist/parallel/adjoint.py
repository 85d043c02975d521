"""The adjoints of a distributed call's exchanges, for its backward
(:mod:`sta_dist.parallel.call`).

The gradient contract is the forward's layout: a rank's ``dq, dk, dv`` hold the gradient
of its own video rows, and of every text row (text is replicated: the gradient of a
replicated input is the whole gradient, the same on every rank, as its value is). The
forward's ``dout`` text rows are taken as replicated too (every rank's copy the same).

- the head all-to-all (tokens for heads) has as adjoint :func:`heads_back`: each member's
  gradients of its heads go back to the members that hold the tokens; a kv head that
  several members read (GQA split across them) is summed there;
- the halo exchange (a box's rows to the neighbours whose windows reach them) has as
  adjoint :func:`halo_back`: the gradients of the halo rows go back to their owner and are
  added to its box rows;
- a value used by every member of a group (the text keys, the text queries' partial sums)
  gets the sum of their gradients: :func:`sum_over` (in rank order, so every member gets
  the same bits).

Legend: ``_bshd`` = ``[batch, seq, heads, head_dim]``.
"""

from __future__ import annotations

import torch

from .. import geometry
from ..local import head_index
from .comm import Comm
from .schedule import CallSchedule, tile_rows


def sum_over(x: torch.Tensor, ranks: tuple[int, ...], comm: Comm, step: str) -> torch.Tensor:
    """The sum of every member's ``x`` (same shape everywhere), added in ``ranks`` order."""
    if len(ranks) == 1:
        return x
    return torch.stack(comm.all_gather(step, ranks, x.contiguous())).sum(0)


def heads_back(x_box: torch.Tensor, heads_of: tuple[tuple[int, ...], ...], sched: CallSchedule, comm: Comm,
               num_heads: int) -> torch.Tensor:
    """``x_box [B, n_box + L, len(heads_of[me]), D]`` (this member's heads of the whole box,
    then the text rows) -> ``[B, n_held + L, num_heads, D]``: the rows this rank holds,
    every head; the text rows of every head. Where several members send the same head,
    their rows are summed (in member order)."""
    B, _, _, D = x_box.shape
    n_box = sum(sched.held_counts)
    L = x_box.shape[1] - n_box
    me = sched.me_in_head_group
    n_held = sched.held_counts[me]
    result = x_box.new_zeros(B, n_held + L, num_heads, D)
    if len(sched.head_group) == 1:
        result[:, :, head_index(heads_of[me], x_box.device)] = x_box
        return result
    text = x_box[:, n_box:]
    send, start = [], 0
    for n in sched.held_counts:
        send.append([x_box[:, start:start + n], text])
        start += n
    sizes = [B * (n_held + L) * len(h) * D for h in heads_of]
    chunks = comm.all_to_all("head all-to-all adjoint", sched.head_group, send, sizes)
    for heads, chunk in zip(heads_of, chunks):
        if heads:
            video, txt = chunk.split([B * n_held * len(heads) * D, B * L * len(heads) * D])
            idx = head_index(heads, result.device)
            result[:, :n_held, idx] += video.view(B, n_held, len(heads), D)
            result[:, n_held:, idx] += txt.view(B, L, len(heads), D)
    return result


def halo_back(dkv_joined: torch.Tensor, sched: CallSchedule, comm: Comm) -> torch.Tensor:
    """``[B, n_box + n_halo + L, h, D]`` (the gradient of the box's keys, then of the halo's as
    it was received, then of the text) -> ``[B, n_box + L, h, D]``: the halo rows' gradients
    sent back to the members they came from and added to the box rows they left."""
    if len(sched.tile_group) == 1:
        return dkv_joined
    B, _, h, D = dkv_joined.shape
    layout = sched.layout
    canvas, tile = layout.canvas, layout.tile
    n_box = sched.box_tokens
    counts = [geometry.packed_token_count(canvas, tile, tiles) for tiles in sched.halo_recv]
    n_halo = sum(counts)
    halo = dkv_joined[:, n_box:n_box + n_halo]
    send, start = [], 0
    for n in counts:
        send.append([halo[:, start:start + n]])
        start += n
    n_back = [geometry.packed_token_count(canvas, tile, tiles) for tiles in sched.halo_send]
    chunks = comm.all_to_all("halo adjoint", sched.tile_group, send, [B * n * h * D for n in n_back])
    out = torch.cat([dkv_joined[:, :n_box], dkv_joined[:, n_box + n_halo:]], 1)
    for tiles, chunk, n in zip(sched.halo_send, chunks, n_back):
        if n:
            rows = tile_rows(canvas, tile, layout.q_tiles, tuple(tiles), out.device)
            out.index_add_(1, rows, chunk.view(B, n, h, D))
    return out
