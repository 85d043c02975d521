"""Training a whole sequence-parallel model through a client (diffusers' ``parallel=``,
FastVideo's tile mode): the gradients of the points sta_dist adds to the model.

The model-level convention is *additive*: every rank computes the same loss from the
gathered output, and after ``backward`` a rank's gradient of any replicated tensor (every
parameter, the text, the timestep embedding, the inputs) is its share, the sum over the
ranks' shares being the whole gradient. Rows a rank owns (its video tokens) hold their
whole gradient. So one all-reduce (SUM) of the parameter gradients after ``backward``
(:func:`reduce_gradients`) gives every rank the one-process gradient: no parameter needs
a rule of its own, whichever path (video, text, modulation) it serves.

Three points keep the convention:

- the output gather (:func:`gather_rows`): every rank holds the whole gradient of the
  gathered output (the loss is replicated), and its rows' share is that gradient's rows;
  nothing is summed;
- the shard after the patch embedding is an ``index_select``: its backward puts the
  rank's rows' gradient into the replicated input and zeros elsewhere, a share;
- the joint text rows of a distributed attention call, whose core contract is the other
  one (text is *replicated*: ``dout``'s text rows must be the whole gradient, and
  ``dq/dk/dv`` of the text rows are the whole gradient on every rank): the output's text
  rows' shares are summed before the core's backward (:func:`text_output`), and the whole
  text gradient it returns is kept as the first rank's share, zero on the others
  (:func:`text_inputs`), so a sum over the ranks counts it once, exactly.

Legend: ``_bshd`` = ``[batch, seq, heads, head_dim]``; text rows are the last ``n_text``.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist

from ..parallel.adjoint import sum_over
from ..parallel.comm import Comm


def own_rows_grad(grad: torch.Tensor, own_index: torch.Tensor, dim: int) -> torch.Tensor:
    """The gather's adjoint: this rank's rows of the whole (replicated) gradient."""
    return grad.index_select(dim, own_index)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gather: Callable, own_index: torch.Tensor, dim: int):
        ctx.own_index, ctx.dim = own_index, dim
        return gather(x.detach())

    @staticmethod
    def backward(ctx, grad):
        return own_rows_grad(grad, ctx.own_index, ctx.dim), None, None, None


def gather_rows(x: torch.Tensor, gather: Callable[[torch.Tensor], torch.Tensor], own_index: torch.Tensor,
                dim: int) -> torch.Tensor:
    """``gather(x)`` (every rank's rows into the whole tensor, the same on every rank),
    differentiable: the backward takes the rows ``own_index`` (this rank's, along ``dim``
    of the gathered tensor) of the incoming gradient."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return gather(x)
    return _Gather.apply(x, gather, own_index, dim)


class _TextOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out_bshd, n_text: int, comm: Comm):
        ctx.n_text, ctx.comm = n_text, comm
        return out_bshd.view_as(out_bshd)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        ranks = tuple(range(ctx.comm.world_size))
        grad[:, -ctx.n_text:] = sum_over(grad[:, -ctx.n_text:], ranks, ctx.comm, "text grad sum")
        return grad, None, None


class _TextInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_bshd, n_text: int, rank: int):
        ctx.n_text, ctx.rank = n_text, rank
        return x_bshd.view_as(x_bshd)

    @staticmethod
    def backward(ctx, grad):
        if ctx.rank == 0:
            return grad, None, None
        grad = grad.clone()
        grad[:, -ctx.n_text:] = 0
        return grad, None, None


def text_inputs(xs_bshd, n_text: int, comm: Comm) -> tuple:
    """The q, k, v of a distributed call, unchanged; their text rows' whole gradient (the
    core's) becomes the first rank's share."""
    if not n_text or comm.world_size == 1 or not torch.is_grad_enabled():
        return tuple(xs_bshd)
    return tuple(_TextInput.apply(x, n_text, comm.rank) if x.requires_grad else x for x in xs_bshd)


def text_output(out_bshd: torch.Tensor, n_text: int, comm: Comm) -> torch.Tensor:
    """A distributed call's output, unchanged; its text rows' gradient shares are summed
    over the ranks (the whole gradient, which the core's backward reads)."""
    if not n_text or comm.world_size == 1 or not (torch.is_grad_enabled() and out_bshd.requires_grad):
        return out_bshd
    return _TextOutput.apply(out_bshd, n_text, comm)


def reduce_gradients(parameters: Iterable[torch.nn.Parameter], group: Optional[dist.ProcessGroup] = None) -> None:
    """Sum every parameter's gradient over ``group`` (its ranks' shares -> the whole
    gradient, the same on every rank). Parameters without a gradient are skipped on every
    rank alike (the ranks run the same model)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    for dtype in sorted({g.dtype for g in grads}, key=str):
        same = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, group=group)
        for g, part in zip(same, flat.split([g.numel() for g in same])):
            g.copy_(part.view_as(g))
