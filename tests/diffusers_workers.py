"""Functions that run on every rank of a spawned gloo group, driving tiny diffusers
transformers: sta_dist's own ``parallel=`` and diffusers' ``enable_parallelism``."""

from __future__ import annotations

import torch

from tests import diffusers_models as dm

# grid (2, 4, 3) of tiles (2, 2, 3): tile mode's boxes have real halos for these windows
CANVAS = (3, 8, 9)
WINDOWS = [(1, 2, 1), (2, 1, 2)]
TEXT_VALID = (dm.TEXT, 2)


def build(name: str):
    model = dm.wan() if name == "wan" else dm.hunyuan()
    return model, dm.inputs(model, batch=2, text_valid=TEXT_VALID, canvas=CANVAS)


def sta_parallel(rank, world, runs):
    """Each ``(model name, parallel mode)``: this rank's full output and the plan's mode."""
    import sta_dist.diffusers as sta_diffusers

    results = []
    for name, mode in runs:
        model, kw = build(name)
        handle = sta_diffusers.enable(model, tile=dm.TILE, window=WINDOWS, parallel=mode)
        plans = []
        model.proj_out.register_forward_hook(lambda *_: plans.append(handle.context.plan))
        out = dm.run(model, kw)
        results.append((out, plans[0].mode, dict(handle.bytes_sent())))
    return results


def _diffusers_context_parallel(model, degree: int, ring: bool = False, cp_plan=None):
    """diffusers' own ``enable_parallelism`` on CPU: diffusers 0.42.1 takes ``rank %
    torch.accelerator.device_count()`` for the device, which divides by zero without an
    accelerator; one "device" is the CPU here (a test-side workaround, not the library's)."""
    from diffusers import ContextParallelConfig

    torch.accelerator.device_count = lambda: 1
    config = ContextParallelConfig(ring_degree=degree) if ring else ContextParallelConfig(ulysses_degree=degree)
    model.enable_parallelism(config=config, cp_plan=cp_plan)


def diffusers_ulysses(rank, world, name, sta_first):
    """sta_dist's processors under diffusers' Ulysses (sta_dist enabled before or after it)."""
    import sta_dist.diffusers as sta_diffusers

    model, kw = build(name)
    plan = sta_diffusers.HUNYUAN_VIDEO_CP_PLAN if name == "hunyuan" else None
    if sta_first:
        handle = sta_diffusers.enable(model, tile=dm.TILE, window=WINDOWS)
        _diffusers_context_parallel(model, world, cp_plan=plan)
    else:
        _diffusers_context_parallel(model, world, cp_plan=plan)
        handle = sta_diffusers.enable(model, tile=dm.TILE, window=WINDOWS)
    out = dm.run(model, kw)
    return out, dict(handle.bytes_sent())


def diffusers_ring_refused(rank, world):
    import sta_dist.diffusers as sta_diffusers

    model, _ = build("wan")
    _diffusers_context_parallel(model, world, ring=True)
    try:
        sta_diffusers.enable(model, tile=dm.TILE, window=WINDOWS)
    except ValueError as err:
        return str(err)
    return "no error"
