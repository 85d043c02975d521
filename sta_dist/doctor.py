"""What ``sta-dist doctor`` prints: this machine's kernels, then for one call of a config
(a step and a layer of its mask strategy) the route of every rank's local call: which
kernel takes it and why each faster one does not, and why a call falls back to head mode.
Nothing runs; the schedules are those the call runs (the cost model's parts, as ``sta-dist
plan`` shows them) and the routes come from :func:`sta_dist.route.route` on their local
layouts."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .dispatch import cuda_backward_gate, device_facts, layout_call
from .local import LocalText
from .parallel.decide import call_parts
from .parallel.plan import ShardPlan
from .plan_report import FALLBACK, call_windows, fallback_reason, ranks_text
from .route import Device, route
from .run import DTYPES, RunConfig
from .validation import kernel_head_dim

ASSUMED = {"h100": Device.hopper()}
"""Devices ``--assume-gpu`` routes for: an H100/H200 with triton and nvcc (and the CUDA
backward's gate as this environment sets it)."""


def machine_lines(device: torch.device, facts: Device) -> list[str]:
    """This machine, as the route sees it."""
    if facts.type != "cuda":
        return [f"this machine: {device} (no CUDA GPU); triton: {facts.triton or 'usable (interpreter)'}"]
    name = torch.cuda.get_device_name(device)
    return [f"this machine: {name} (sm_{facts.capability[0]}{facts.capability[1]})",
            f"  triton: {facts.triton or 'usable'}",
            f"  cuda kernel: {facts.cuda_library or 'library built, buildable (nvcc found) or built ahead of time'}"
            if facts.capability[0] == 9 else "  cuda kernel: Hopper only"]


def doctor_report(cfg: RunConfig, world_size: int, step: Optional[int] = None, layer: int = 0,
                  backend: str = "auto", assume_gpu: Optional[str] = None) -> str:
    strategy = cfg.strategy()
    step, windows = call_windows(cfg, strategy, step, layer)
    here = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    facts = device_facts(here)
    lines = machine_lines(here, facts)
    if assume_gpu:
        facts = dataclasses.replace(ASSUMED[assume_gpu], cuda_backward_library=cuda_backward_gate())
        lines.append(f"routes as on an {assume_gpu.upper()} with triton and nvcc (--assume-gpu {assume_gpu}):")
    plan = ShardPlan.from_config(cfg, world_size, strategy=strategy)
    lines.append(f"config {cfg.name}, step {step}, layer {layer}, {cfg.dtype}, head dim {cfg.head_dim}, "
                 f"backend={backend!r}; plan: {plan.describe()}")
    parts = call_parts(plan, windows, cfg.kv_heads, cfg.batch, cfg.head_dim, DTYPES[cfg.dtype].itemsize,
                       cfg.text_valid)
    lines += [f"  {fallback_reason(plan, p.windows)}" for p in parts if p.schedule(plan, 0).mode == FALLBACK]
    routes: dict[str, list[int]] = {}
    for rank in range(world_size):
        for part in parts:
            sched = part.schedule(plan, rank)
            merge = len(sched.tile_group) > 1 and cfg.text_valid > 0  # as parallel.runtime.attend asks
            text = LocalText.per_sample(cfg.text_valid, kv_for_text_q=sched.counts_text_keys)
            call = layout_call(sched.layout, sched.heads, text, cfg.dtype, kernel_head_dim(cfg.head_dim), merge)
            heads = f"heads {list(part.q_heads)} in " if len(parts) > 1 else ""
            try:
                line = f"{heads}{sched.mode}: {(r := route(call, facts, backend)).describe()}\n      {r.describe_backward()}"
            except ValueError as refusal:
                line = f"{heads}{sched.mode}: refused: {refusal}"
            routes.setdefault(line, []).append(rank)
    for line, ranks in routes.items():
        lines.append(f"  {ranks_text(ranks, world_size)}: {line}")
    return "\n".join(lines)
