"""The main job, ``sta-dist run``: a multi-step, multi-layer DiT attention workload (windows
per step and layer from a mask strategy) through the distributed layer, verified against
the single-device reference, with a progress bar and a summary.

Without torchrun and without a GPU it spawns ``cpu_ranks`` gloo ranks on this machine;
under torchrun on GPUs it uses NCCL and the config's real shapes.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.resources
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from . import geometry
from .config import STAConfig, check_triple
from .distributed import DistributedSlidingTileAttention
from .geometry import Triple
from .mask_strategy import MaskStrategy
from .parallel.env import detect_env, init_distributed
from .parallel.plan import ShardPlan
from .parallel.schedule import call_schedule
from .testing import error_bound, max_error, reference_attention

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    """A named workload (``configs/<name>.json``)."""

    name: str
    description: str = ""
    canvas: Triple
    """Video latent (T, H, W) in tokens."""
    tile: Triple
    text_len: int = 0
    """Text tokens in the sequence (after the video)."""
    text_valid: int = 0
    """How many of them are valid."""
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    steps: int
    mask_strategy: str
    """A packaged or local FastVideo-format JSON, or ``uniform:kt,kh,kw``."""
    dense_steps: int = 0
    """With a uniform strategy: the first steps use the whole canvas (as real strategies do)."""
    mode: str = "auto"
    mesh: Optional[tuple[int, int]] = None
    dtype: str = "bfloat16"
    batch: int = 1
    cpu_ranks: int = 2
    """Ranks to spawn on CPU when not launched by torchrun."""
    verify: str = "sampled"
    """"all": every row against the brute-force reference; "sampled": sampled rows."""
    seed: int = 0

    def __post_init__(self) -> None:
        STAConfig(canvas=self.canvas, tile=self.tile, text_len=self.text_len)
        object.__setattr__(self, "canvas", check_triple("canvas", self.canvas))
        object.__setattr__(self, "tile", check_triple("tile", self.tile))
        if not 0 <= self.text_valid <= self.text_len:
            raise ValueError(f"text_valid must be in [0, text_len={self.text_len}], got text_valid={self.text_valid}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got dtype={self.dtype!r}")
        if self.verify not in ("all", "sampled", "none"):
            raise ValueError(f"verify must be 'all', 'sampled' or 'none', got verify={self.verify!r}")
        for name in ("heads", "kv_heads", "head_dim", "layers", "steps", "batch", "cpu_ranks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {name}={getattr(self, name)}")

    @staticmethod
    def load(name_or_path: str, **overrides) -> "RunConfig":
        """A packaged config by name (``tiny_cpu``, ``hunyuan_720p`` ...) or a JSON path."""
        path = name_or_path
        if not os.path.exists(path):
            packaged = importlib.resources.files("sta_dist.configs") / f"{name_or_path}.json"
            if not packaged.is_file():
                names = sorted(p.name[:-5] for p in importlib.resources.files("sta_dist.configs").iterdir()
                               if p.name.endswith(".json") and not p.name.startswith("mask_strategy"))
                raise ValueError(f"config must be a JSON path or one of {names}, got config={name_or_path!r}")
            path = str(packaged)
        with open(path) as f:
            fields = json.load(f)
        fields.update({k: v for k, v in overrides.items() if v is not None})
        if fields.get("mesh") is not None:
            fields["mesh"] = tuple(fields["mesh"])
        known = {f.name for f in dataclasses.fields(RunConfig)}
        unknown = set(fields) - known
        if unknown:
            raise ValueError(f"config {name_or_path!r} has unknown fields {sorted(unknown)}")
        return RunConfig(**fields)

    def strategy(self) -> MaskStrategy:
        if self.mask_strategy.startswith("uniform:"):
            window = check_triple("mask_strategy", self.mask_strategy[len("uniform:"):].split(","))
            whole = tuple(max(w, 1 << 10) for w in window)
            steps = [
                (((whole if s < self.dense_steps else window),) * self.heads,) * self.layers
                for s in range(self.steps)
            ]
            return MaskStrategy(tuple(steps))
        path = self.mask_strategy
        if not os.path.exists(path):
            path = str(importlib.resources.files("sta_dist.configs") / path)
        return MaskStrategy.load(path)


def layer_inputs(cfg: RunConfig, step: int, layer: int, device) -> tuple[torch.Tensor, ...]:
    """The full q, k, v of one layer call: the same on every rank (seeded)."""
    g = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step * 1009 + layer)
    S = STAConfig(canvas=cfg.canvas, tile=cfg.tile, text_len=cfg.text_len).seq_len
    dtype = DTYPES[cfg.dtype]
    shapes = [(cfg.batch, S, cfg.heads, cfg.head_dim)] + [(cfg.batch, S, cfg.kv_heads, cfg.head_dim)] * 2
    return tuple(torch.randn(s, generator=g, device=device, dtype=dtype) for s in shapes)


def verify_local(cfg: RunConfig, plan: ShardPlan, rank: int, q, k, v, windows, out_local, seed: int) -> tuple[float, float]:
    """This rank's output rows against the reference: every row ("all") or sampled rows.
    Returns (error, bound)."""
    n_held = plan.held_count(rank)
    held = plan.held_index(rank)
    kw = dict(canvas=cfg.canvas, tile=cfg.tile, window=list(windows), text_length=cfg.text_valid)
    if cfg.verify == "all":
        rows = torch.cat([held, torch.arange(plan.config.num_video, plan.config.seq_len)])
        ref = reference_attention(q, k, v, **kw, rows=rows)
        base = reference_attention(q, k, v, **kw, rows=rows, compute_dtype=q.dtype)
        return max_error(out_local, ref), error_bound(max_error(base, ref), q.dtype, ref)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, max(n_held, 1), (min(256, n_held),), generator=g)
    rows_local = torch.cat([pick, n_held + torch.arange(min(cfg.text_len, 32))])
    rows = torch.cat([held[pick], plan.config.num_video + torch.arange(min(cfg.text_len, 32))])
    ref = reference_attention(q, k, v, **kw, rows=rows, compute_dtype=torch.float32)
    base = reference_attention(q, k, v, **kw, rows=rows, compute_dtype=q.dtype)
    return max_error(out_local[:, rows_local.to(out_local.device)], ref), error_bound(max_error(base, ref), q.dtype, ref)


class Progress:
    """A one-line progress bar on rank 0 (no dependency)."""

    def __init__(self, total: int, enabled: bool, width: int = 30):
        self.total, self.enabled, self.width, self.done = total, enabled, width, 0
        self.start = time.perf_counter()

    def update(self, note: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        filled = self.width * self.done // self.total
        elapsed = time.perf_counter() - self.start
        sys.stdout.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {note} {elapsed:.1f}s")
        if self.done == self.total:
            sys.stdout.write("\n")
        sys.stdout.flush()


def run_job(cfg: RunConfig, rank: int, world_size: int, steps: Optional[int] = None,
            layers: Optional[int] = None, start_step: int = 0) -> dict:
    """Run the workload on this rank (steps ``start_step ..``); every rank returns the
    same summary."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    strategy = cfg.strategy()
    steps, layers = steps or cfg.steps, layers or cfg.layers
    # The plan's hint: the local windows of the last step (whole-canvas heads fall back per call).
    grid = STAConfig(canvas=cfg.canvas, tile=cfg.tile).grid
    local_windows = {w for layer in strategy.windows[-1] for w in layer if not geometry.covers_grid(w, grid)}
    hint = tuple(sorted(local_windows)) or None
    plan = ShardPlan(canvas=cfg.canvas, tile=cfg.tile, text_len=cfg.text_len, mode=cfg.mode, world_size=world_size,
                     mesh=cfg.mesh, windows=hint)
    attn = DistributedSlidingTileAttention(cfg.heads, cfg.head_dim, plan, cfg.kv_heads)
    progress = Progress(steps * layers, enabled=rank == 0)
    step_ms, modes, worst = [], collections.Counter(), (0.0, 1.0)
    verified = True
    for step in range(start_step, start_step + steps):
        total_ms = 0.0
        for layer in range(layers):
            windows = tuple(tuple(w) for w in strategy.layer_windows(step % strategy.num_steps, layer % strategy.num_layers))
            windows = tuple(windows[h % len(windows)] for h in range(cfg.heads))
            attn.comm.check_agreement("this call's windows", f"step {step} layer {layer} windows {windows}")
            q, k, v = layer_inputs(cfg, step, layer, device)
            local = [plan.shard(x, rank) for x in (q, k, v)]
            _sync(device)
            start = time.perf_counter()
            out = attn(*local, window=windows, text_length=cfg.text_valid)
            _sync(device)
            total_ms += (time.perf_counter() - start) * 1e3
            modes[call_schedule(plan, windows, cfg.kv_heads, rank).mode] += 1
            if cfg.verify != "none" and (cfg.verify == "all" or layer == 0):
                err, bound = verify_local(cfg, plan, rank, q, k, v, windows, out, seed=step * 7919 + layer)
                verified &= err <= bound
                if err / bound > worst[0] / worst[1]:
                    worst = (err, bound)
            progress.update(f"step {step + 1}/{start_step + steps} layer {layer + 1}/{layers} "
                            f"[{modes.most_common(1)[0][0]}]")
        step_ms.append(total_ms)
    ok = _all_ranks_true(verified, device)
    sent = dict(attn.comm.bytes_sent)
    return dict(config=cfg.name, world_size=world_size, backend=attn.comm.backend, device=str(device),
                plan=plan.describe(), modes=dict(modes), step_ms=step_ms,
                bytes_per_layer={k: v / (steps * layers) for k, v in sent.items() if not k.startswith("check")},
                verify=cfg.verify, worst_error=worst[0], worst_bound=worst[1], verified=ok, rank=rank)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _all_ranks_true(flag: bool, device) -> bool:
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def format_summary(s: dict) -> str:
    steps = s["step_ms"]
    lines = [
        f"sta-dist run: config={s['config']} ranks={s['world_size']} backend={s['backend']} device={s['device']}",
        f"plan: {s['plan']}",
        f"modes per call: {s['modes']}",
        "time per step (ms): " + ", ".join(f"{t:.1f}" for t in steps) + f"  (mean {sum(steps) / len(steps):.1f})",
        "bytes sent per layer per rank: " + (", ".join(f"{k} {v / 1e6:.3f} MB" for k, v in s["bytes_per_layer"].items()) or "none"),
    ]
    if s["verify"] == "none":
        lines.append("verification: skipped")
    else:
        lines.append(f"verification ({s['verify']} rows vs reference): worst error {s['worst_error']:.3g} "
                     f"(bound {s['worst_bound']:.3g}) -> {'VERIFIED' if s['verified'] else 'FAILED'}")
    return "\n".join(lines)


def _spawned_job(rank: int, world_size: int, cfg: RunConfig, steps, layers, start_step) -> dict:
    return run_job(cfg, rank, world_size, steps, layers, start_step)


def main(config: str, steps: Optional[int] = None, layers: Optional[int] = None, mode: Optional[str] = None,
         timeout_s: float = 600.0, start_step: int = 0) -> int:
    """Entry of ``sta-dist run``; returns the exit code (1 if verification failed)."""
    cfg = RunConfig.load(config, mode=mode)
    env = detect_env()
    if env.source != "single":
        init_distributed()
        summary = run_job(cfg, env.rank, env.world_size, steps, layers, start_step)
        if env.rank == 0:
            print(format_summary(summary), flush=True)
        dist.barrier()
        dist.destroy_process_group()
    else:
        from .parallel.spawn import spawn_local

        ranks = cfg.cpu_ranks if not torch.cuda.is_available() else 1
        print(f"no torchrun environment: spawning {ranks} local rank(s) "
              f"({'gloo on CPU' if not torch.cuda.is_available() else 'one GPU'})", flush=True)
        summary = spawn_local(_spawned_job, ranks, (cfg, steps, layers, start_step), timeout_s=timeout_s)[0]
        print(format_summary(summary), flush=True)
    return 0 if summary["verified"] else 1
