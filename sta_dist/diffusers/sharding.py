"""Sequence parallelism for a whole diffusers transformer, applied from outside the model.

Every rank calls ``transformer(...)`` with the full inputs and gets the full output.
Inside, the video hidden states are sharded by the call's :class:`ShardPlan` at the input
of the first block (right after the patch embedding), the RoPE rows are cut to the rank's
tokens (the rows of ``plan.held_index(rank)``, i.e. of ``plan.positions(rank)``), so norms,
MLPs, cross-attention and RoPE all run on local tokens; the attention processors exchange
what their windows need; the output projection's result is gathered once, back into
natural order (it has ``C * prod(patch)`` channels per token, far fewer than the model
width, so this moves the fewest bytes of any point after the last block).

Training (:mod:`sta_dist.integrations.training`): the shard is an ``index_select``, whose
backward gives the replicated input this rank's share of its gradient; the gather's
backward takes this rank's rows of the (replicated) output's gradient.

Legend: ``_bnc`` = ``[batch, tokens, channels]``.
"""

from __future__ import annotations

import functools

import torch

from ..integrations.training import gather_rows
from ..parallel.comm import Comm
from ..parallel.plan import ShardPlan


@functools.lru_cache(maxsize=64)
def _held_index(plan: ShardPlan, rank: int, device: torch.device) -> torch.Tensor:
    return plan.held_index(rank).to(device)


def shard_tokens(x: torch.Tensor, plan: ShardPlan, rank: int, dim: int) -> torch.Tensor:
    """The rank's video tokens of ``x`` (natural order along ``dim``), in its storage order."""
    return x.index_select(dim, _held_index(plan, rank, x.device))


def gather_tokens(x_bnc: torch.Tensor, plan: ShardPlan, comm: Comm) -> torch.Tensor:
    """Every rank's ``[B, n_rank, C]`` -> ``[B, N, C]`` in natural order, on every rank.
    Shards differ in size by up to a tile, so each is padded to the largest first."""
    counts = [plan.held_count(r) for r in range(plan.world_size)]
    B, n, C = x_bnc.shape
    padded = x_bnc.new_zeros(B, max(counts), C)
    padded[:, :n] = x_bnc
    parts = comm.all_gather("output gather", tuple(range(plan.world_size)), padded)
    full = x_bnc.new_empty(B, plan.config.num_video, C)
    for rank, (part, count) in enumerate(zip(parts, counts)):
        full[:, _held_index(plan, rank, x_bnc.device)] = part[:, :count]
    return full


class TransformerSharding:
    """The hooks that shard and gather a transformer's tokens for ``handle``'s plans."""

    def __init__(self, handle, spec, comm: Comm):
        self.handle, self.spec, self.comm = handle, spec, comm

    def install(self) -> list:
        """Register the hooks; returns their removable handles."""
        return [
            self.spec.first_block.register_forward_pre_hook(self._shard_hidden, with_kwargs=True),
            self.spec.rope.register_forward_hook(self._shard_rope),
            self.spec.proj_out.register_forward_hook(self._gather_output),
        ]

    def _plan(self) -> ShardPlan:
        return self.handle.context.plan

    def _shard_hidden(self, module, args, kwargs):
        plan = self._plan()
        if "hidden_states" in kwargs:
            kwargs = dict(kwargs, hidden_states=shard_tokens(kwargs["hidden_states"], plan, self.comm.rank, 1))
        else:
            args = (shard_tokens(args[0], plan, self.comm.rank, 1), *args[1:])
        return args, kwargs

    def _shard_rope(self, module, args, output):
        plan, dim = self._plan(), self.spec.rope_seq_dim
        return tuple(shard_tokens(x, plan, self.comm.rank, dim) for x in output)

    def _gather_output(self, module, args, output):
        plan = self._plan()
        return gather_rows(output, lambda x: gather_tokens(x, plan, self.comm),
                           _held_index(plan, self.comm.rank, output.device), 1)
