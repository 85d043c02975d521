"""One optimizer step of a tiny diffusers transformer, on every rank of a spawned gloo
group (sta_dist's ``parallel=``) or in one process (sta_dist on one device, or diffusers'
own attention under the STA mask: the reference). The parent test compares the
gradients and parameters after the step."""

from __future__ import annotations

import torch

from tests import diffusers_models as dm
from tests import diffusers_workers as dw

LR = 0.5


def build(name: str, dtype=torch.float32):
    model, kw = dw.build(name)
    model = model.to(dtype).train()
    kw = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()}
    g = torch.Generator().manual_seed(7)
    target = torch.randn(kw["hidden_states"].shape, generator=g).to(dtype)
    return model, kw, target


def step(model, kw: dict, target: torch.Tensor, after_backward=None) -> dict:
    """One SGD step on the loss ``mean((out - target)^2)`` (the same on every rank):
    ``{"grads": ..., "params": ...}`` by parameter name."""
    out = model(**kw)[0]
    loss = (out - target).square().mean()
    loss.backward()
    if after_backward is not None:
        after_backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.optim.SGD(model.parameters(), lr=LR).step()
    return dict(grads=grads, params={n: p.detach().clone() for n, p in model.named_parameters()})


def reference_step(name: str, dtype) -> dict:
    """diffusers' own attention with the STA mask of every layer (no sta_dist code)."""
    model, kw, target = build(name, dtype)
    windows = [dw.WINDOWS] * len(dm.attention_modules(model))
    for layer, module in enumerate(dm.attention_modules(model)):
        module.set_processor(dm.MaskedStock(module.processor, windows[layer], dw.TEXT_VALID, dw.CANVAS))
    return step(model, kw, target)


def sta_step(name: str, parallel=None, checkpoint: bool = False) -> dict:
    """sta_dist enabled (``parallel=`` under torch.distributed); with ``checkpoint``, every
    block under diffusers' gradient checkpointing. ``attention_calls``: how often the
    processors ran (a checkpointed block's run twice: forward and recompute)."""
    import sta_dist.diffusers as sta_diffusers

    model, kw, target = build(name)
    handle = sta_diffusers.enable(model, tile=dm.TILE, window=dw.WINDOWS, parallel=parallel)
    if checkpoint:
        model.enable_gradient_checkpointing()
    calls = [0]
    attend = handle.attend

    def counted(*args, **kwargs):
        calls[0] += 1
        return attend(*args, **kwargs)

    handle.attend = counted
    result = step(model, kw, target, lambda: sta_diffusers.reduce_gradients(model))
    result["attention_calls"] = calls[0]
    return result


def _planted(error: str):
    """A wrong adjoint at one of the points sta_dist adds to the model."""
    import torch.distributed as dist

    from sta_dist.integrations import training

    if error == "gather sums":  # the gather's backward summing the ranks' (replicated) gradients
        def own_rows_grad(grad, own_index, dim):
            grad = grad.clone()
            dist.all_reduce(grad)
            return grad.index_select(dim, own_index)

        return training, "own_rows_grad", own_rows_grad
    if error == "text whole":  # the core's whole text gradient kept on every rank
        return training, "text_inputs", lambda xs, n_text, comm: tuple(xs)
    raise ValueError(error)


def parallel_steps(rank, world, runs):
    """Each ``(model name, parallel mode, checkpoint, planted error or None)``: the step."""
    results = []
    for name, mode, checkpoint, planted in runs:
        if planted is None:
            results.append(sta_step(name, mode, checkpoint))
            continue
        module, attr, wrong = _planted(planted)
        right = getattr(module, attr)
        setattr(module, attr, wrong)
        try:
            results.append(sta_step(name, mode, checkpoint))
        finally:
            setattr(module, attr, right)
    return results
