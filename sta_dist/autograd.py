"""``torch.autograd`` for one local call: the forward runs as without gradients (asking the
log-sum-exp), saves ``q, k, v, out, lse`` and the call's description (the selected tiles'
tables too), and the backward is :func:`sta_dist.backward.local_backward`.

Only calls that need a gradient come here (:func:`needs_grad`); the others keep the plain
path. The selection is not differentiated: its tables are constants of the call.

Legend: ``_bshd`` = ``[batch, seq, heads, head_dim]``; ``_bhs`` = ``[batch, heads, seq]``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .local import LocalHeads, LocalLayout


class Problem(NamedTuple):
    """What the backward needs besides the saved tensors."""

    layout: LocalLayout
    heads: LocalHeads
    text: object
    """One :class:`~sta_dist.local.LocalText` or one per batch sample."""
    scale: float
    backend: str
    keys: Optional[object] = None
    """The table path's :class:`~sta_dist.selection.tables.KeyTiles`."""


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether a call on these tensors records a backward (grad mode on, an input needs a
    gradient). Refuses torch.func transforms with the reason."""
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError("sliding_tile_attention does not run under torch.func transforms (vmap, grad, jacrev, "
                           "...): its kernels read plain tensors; call it outside the transform and use "
                           "torch.autograd.grad or .backward() for gradients")
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_bshd, k_bshd, v_bshd, problem: Problem):
        from .dispatch import local_attention

        out, lse = local_attention(q_bshd, k_bshd, v_bshd, problem.layout, problem.heads, problem.text,
                                   problem.scale, problem.backend, True, keys=problem.keys)
        ctx.save_for_backward(q_bshd, k_bshd, v_bshd, out, lse)
        ctx.problem = problem
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout_bshd, dlse_bhs):
        from .backward import local_backward

        q, k, v, out, lse = ctx.saved_tensors
        p = ctx.problem
        if dout_bshd is None and dlse_bhs is None:
            return None, None, None, None
        dout = torch.zeros_like(out) if dout_bshd is None else dout_bshd
        dq, dk, dv = local_backward(q, k, v, out, lse, dout, p.layout, p.heads, p.text, p.scale, p.backend, p.keys,
                                    dlse_bhs)
        return dq, dk, dv, None


def attention(q_bshd, k_bshd, v_bshd, problem: Problem, return_lse: bool):
    """The call's output (and with ``return_lse`` its log-sum-exp ``[B, H, S]`` float32),
    both differentiable in ``q, k, v``. Under ``torch.compile`` it runs eagerly (a graph
    break): its kernels and tables are not traceable. (The graph break is asked for only
    while compiling: ``torch.compiler.disable`` imports dynamo, 1.8 s a process.)"""
    if torch.compiler.is_compiling():
        return torch.compiler.disable(_attention)(q_bshd, k_bshd, v_bshd, problem, return_lse)
    return _attention(q_bshd, k_bshd, v_bshd, problem, return_lse)


def _attention(q_bshd, k_bshd, v_bshd, problem: Problem, return_lse: bool):
    out, lse = _Attention.apply(q_bshd, k_bshd, v_bshd, problem)
    return (out, lse) if return_lse else out
