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


def sta_step(name: str, parallel=None, checkpoint: bool = False, group=None) -> dict:
    """sta_dist enabled (``parallel=`` over ``group`` under torch.distributed); with
    ``checkpoint``, every block under diffusers' gradient checkpointing.
    ``attention_calls``: how often the processors ran (a checkpointed block's run twice:
    forward and recompute)."""
    import sta_dist.diffusers as sta_diffusers

    model, kw, target = build(name)
    handle = sta_diffusers.enable(model, tile=dm.TILE, window=dw.WINDOWS, parallel=parallel, group=group)
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


def _planted(error: str, group):
    """A wrong adjoint at one of the points sta_dist adds to the model."""
    from sta_dist.integrations import training

    if error == "gather sums":  # the gather's backward summing the ranks' (replicated) gradients
        right = training.own_rows_grad
        return training, "own_rows_grad", lambda grad, own, dim: right(sum_over_ranks(grad, group), own, dim)
    if error == "text whole":  # the core's whole text gradient kept on every rank
        return training, "text_inputs", lambda xs, n_text, comm: tuple(xs)
    raise ValueError(error)


def parallel_steps(rank, world, jobs):
    """``jobs``: ranks -> runs, each ``(model name, parallel mode, checkpoint, planted
    error or None)``. The group of the first ``ranks`` processes takes each run's step
    (one spawn serves every group size: the interpreter start and the imports are most
    of a spawn's time). Returns ranks -> this rank's steps (none outside the group)."""
    import torch.distributed as dist

    torch.set_num_threads(1)  # tiny ops: threads only contend with the other ranks for the cores
    out = {}
    for ranks, runs in sorted(jobs.items()):
        group = dist.new_group(list(range(ranks)))  # collective: every process makes every group
        if rank >= ranks:
            continue
        out[ranks] = []
        for name, mode, checkpoint, planted in runs:
            if planted is None:
                out[ranks].append(sta_step(name, mode, checkpoint, group))
                continue
            module, attr, wrong = _planted(planted, group)
            right = getattr(module, attr)
            setattr(module, attr, wrong)
            try:
                out[ranks].append(sta_step(name, mode, checkpoint, group))
            finally:
                setattr(module, attr, right)
    return out


# -- FastVideo: one backward through its own DistributedAttention -------------------------

FV_LAYER1_STEP1 = [[1, 1, 1], [2, 1, 1], [1, 2, 1], [1, 1, 2], [2, 2, 2], [1, 2, 2]]  # per head


def fastvideo_strategy(path: str) -> None:
    """A mask strategy in FastVideo's JSON format: 2 steps x 2 layers x 6 heads."""
    import json

    from tests import fastvideo_workers as fw

    entries = {f"{t}_{l}_{h}": FV_LAYER1_STEP1[h] if (t, l) == (1, 1) else [3, 3, 3]
               for t in range(2) for l in range(2) for h in range(fw.H)}
    with open(path, "w") as f:
        json.dump(entries, f)


def _fv_weights():
    from tests import fastvideo_workers as fw

    g = torch.Generator().manual_seed(11)
    return torch.randn(fw.B, fw.N + fw.L, fw.H, fw.D, generator=g)


def _fv_inputs(text: bool, dtype=torch.float32):
    """Leaf q, k, v (text rows last, or none) and FastVideo's RoPE tables."""
    from tests import fastvideo_workers as fw

    q, k, v, freqs = fw.inputs(6)
    rows = fw.N + fw.L if text else fw.N
    return [x[:, :rows].to(dtype).requires_grad_() for x in (q, k, v)], freqs


def _fv_backward(mode: str, text: bool):
    """This rank's ``(dq, dk, dv)`` of the full leaf inputs (its share; the ranks' sum is
    the gradient) of ``sum(out * W)``, the text rows' term counted once (on the first rank)."""
    from fastvideo.distributed import communication_op as co
    from fastvideo.distributed.parallel_state import get_sp_group
    from fastvideo.forward_context import set_forward_context

    from tests import fastvideo_workers as fw

    rank, sp = get_sp_group().rank_in_group, get_sp_group().world_size
    (q, k, v), freqs = _fv_inputs(text)
    w = _fv_weights()
    N = fw.N
    rep = (q[:, N:], k[:, N:], v[:, N:]) if text else (None, None, None)
    meta = fw._meta(fw._strategy(_FV_CONFIG[0], steps=2, layers=2), 1)
    attn = fw._layer("SLIDING_TILE_ATTN", 1)
    with set_forward_context(current_timestep=1, attn_metadata=meta, forward_batch=None):
        if mode == "tile":  # the model's shard and gather points: boxes of tiles
            shards = [co.sequence_model_parallel_shard(x[:, :N], dim=1)[0] for x in (q, k, v)]
            out, text_out = attn(*shards, *rep, freqs_cis=freqs)
            loss = (co.sequence_model_parallel_all_gather(out, dim=1) * w[:, :N]).sum()
        else:  # FastVideo's contiguous chunks, its head all-to-all
            n = N // sp
            rows = slice(rank * n, (rank + 1) * n)
            out, text_out = attn(q[:, rows], k[:, rows], v[:, rows], *rep, freqs_cis=freqs)
            loss = (out * w[:, rows]).sum()
    if text and rank == 0:
        loss = loss + (text_out * w[:, N:]).sum()
    loss.backward()
    return [x.grad for x in (q, k, v)]


_FV_CONFIG: list = []


def sum_over_ranks(x: torch.Tensor, group=None) -> torch.Tensor:
    import torch.distributed as dist

    x = x.clone()
    dist.all_reduce(x, group=group)
    return x


def fastvideo_grads(rank, world, config_path):
    """FastVideo's DistributedAttention with sta_dist as SLIDING_TILE_ATTN, on the
    sequence-parallel group of all ``world`` ranks (head mode: FastVideo's all-to-all;
    tile mode: sta_dist's plan), then on groups of one rank. FastVideo's CPU all-gather
    (of the text output, in its head mode) cannot run under autograd, so head mode on
    several ranks runs without text. Returns ``{(mode, sp, text): [dq, dk, dv]}`` and, on
    rank 0, ``{("reference", tile, text): [float64 grads, float32 grads]}``."""
    from tests import fastvideo_workers as fw

    torch.set_num_threads(1)
    _FV_CONFIG[:] = [config_path]
    out = {}
    fw._setup(rank, world, config_path, parallel="tile", tile=fw.TILE_MODE_TILE)  # imports FastVideo (guarded)
    from fastvideo.distributed import parallel_state as ps

    import sta_dist.integrations.fastvideo as sfv
    from sta_dist.integrations import training

    out[("tile", world, True)] = _fv_backward("tile", True)
    right = training.own_rows_grad
    training.own_rows_grad = lambda grad, own, dim: right(sum_over_ranks(grad), own, dim)
    try:  # planted: the gather's backward summing the ranks' (replicated) gradients
        out[("tile planted", world, True)] = _fv_backward("tile", True)
    finally:
        training.own_rows_grad = right
    sfv.install(parallel="head", tile=(3, 4, 4))
    out[("head", world, False)] = _fv_backward("head", False)
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=1, sequence_model_parallel_size=1)
    out[("head", 1, True)] = _fv_backward("head", True)
    if rank == 0:
        for tile, text in ((fw.TILE_MODE_TILE, True), ((3, 4, 4), False), ((3, 4, 4), True)):
            out[("reference", tile, text)] = [fv_reference(tile, text, d) for d in (torch.float64, torch.float32)]
    return out


def fv_reference(tile, text: bool, dtype):
    """The reference's autograd (``sta_dist.testing.reference_attention`` after FastVideo's
    own RoPE on the video rows) of the same loss, in ``dtype``."""
    from fastvideo.layers.rotary_embedding import _apply_rotary_emb

    from sta_dist.geometry import fastvideo_window, grid_shape
    from sta_dist.testing import reference_attention
    from tests import fastvideo_workers as fw

    (q, k, v), (cos, sin) = _fv_inputs(text, dtype)
    N = fw.N
    rq, rk = (torch.cat([_apply_rotary_emb(x[:, :N], cos.to(dtype), sin.to(dtype), is_neox_style=False), x[:, N:]], 1)
              for x in (q, k))
    grid = grid_shape(fw.CANVAS, tile)
    windows = [fastvideo_window(tuple(w), grid) for w in FV_LAYER1_STEP1]
    out = reference_attention(rq, rk, v, canvas=fw.CANVAS, tile=tile, window=windows, compute_dtype=dtype)
    (out * _fv_weights()[:, :q.shape[1]].to(dtype)).sum().backward()
    return [x.grad for x in (q, k, v)]
