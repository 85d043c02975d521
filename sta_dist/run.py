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
from .parallel.cost import H100_NVLINK
from .parallel.decide import call_cost, call_mode
from .parallel.env import detect_env, init_distributed
from .parallel.plan import MODES, ShardPlan
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
    head_chunks: int = 1
    """Head-mode calls pipelined in this many chunks of heads (``ShardPlan.head_chunks``;
    ``1``: not pipelined)."""
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
        for name in ("heads", "kv_heads", "head_dim", "layers", "steps", "batch", "cpu_ranks", "head_chunks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {name}={value!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads must be a multiple of kv_heads, got heads={self.heads}, kv_heads={self.kv_heads}")
        if not 0 <= self.dense_steps <= self.steps:
            raise ValueError(f"dense_steps must be in [0, steps={self.steps}], got dense_steps={self.dense_steps}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got mode={self.mode!r}")
        if self.mesh is not None:
            mesh = tuple(self.mesh)
            if len(mesh) != 2 or not all(isinstance(m, int) and m >= 1 for m in mesh):
                raise ValueError(f"mesh must be two ints (P_head, P_tile) >= 1, got mesh={self.mesh!r}")
            object.__setattr__(self, "mesh", mesh)
        if not isinstance(self.mask_strategy, str):
            raise ValueError(f"mask_strategy must be a JSON path or 'uniform:kt,kh,kw', got {self.mask_strategy!r}")
        if self.mask_strategy.startswith("uniform:"):
            self._uniform_window()

    @staticmethod
    def load(name_or_path: str, **overrides) -> "RunConfig":
        """A packaged config by name (``tiny_cpu``, ``hunyuan_720p`` ...) or a JSON path;
        ``overrides`` that are not ``None`` replace fields."""
        path = name_or_path
        if not os.path.exists(path):
            packaged = importlib.resources.files("sta_dist.configs") / f"{name_or_path}.json"
            if not packaged.is_file():
                raise ValueError(f"config must be a JSON path or one of {packaged_configs()}, "
                                 f"got config={name_or_path!r}")
            path = str(packaged)
        try:
            with open(path) as f:
                fields = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"config {name_or_path!r} is not valid JSON: {err}") from None
        if not isinstance(fields, dict):
            raise ValueError(f"config {name_or_path!r} must be a JSON object of fields, got {type(fields).__name__}")
        fields.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name: f for f in dataclasses.fields(RunConfig)}
        unknown = set(fields) - set(known)
        if unknown:
            raise ValueError(f"config {name_or_path!r} has unknown fields {sorted(unknown)}; known: {sorted(known)}")
        required = {n for n, f in known.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = required - set(fields)
        if missing:
            raise ValueError(f"config {name_or_path!r} is missing required fields {sorted(missing)}")
        return RunConfig(**fields)

    def _uniform_window(self) -> Triple:
        text = self.mask_strategy[len("uniform:"):]
        try:
            window = tuple(int(x) for x in text.split(","))
        except ValueError:
            window = ()
        if len(window) != 3 or min(window) < 1:
            raise ValueError(f"mask_strategy 'uniform:kt,kh,kw' needs 3 ints >= 1, got mask_strategy={self.mask_strategy!r}")
        return window  # type: ignore[return-value]

    def strategy(self) -> MaskStrategy:
        if self.mask_strategy.startswith("uniform:"):
            window = self._uniform_window()
            whole = tuple(max(w, 1 << 10) for w in window)
            steps = [
                (((whole if s < self.dense_steps else window),) * self.heads,) * self.layers
                for s in range(self.steps)
            ]
            return MaskStrategy(tuple(steps))
        path = self.mask_strategy
        if not os.path.exists(path):
            path = str(importlib.resources.files("sta_dist.configs") / path)
            if not os.path.exists(path):
                raise ValueError(f"mask_strategy must be a packaged strategy, a JSON path or 'uniform:kt,kh,kw', "
                                 f"got mask_strategy={self.mask_strategy!r} (no such file)")
        strategy = MaskStrategy.load(path)
        if strategy.num_steps < self.steps:
            raise ValueError(f"mask_strategy {self.mask_strategy!r} has {strategy.num_steps} steps, "
                             f"fewer than the config's steps={self.steps}")
        return strategy


def packaged_configs() -> list[str]:
    return sorted(p.name[:-5] for p in importlib.resources.files("sta_dist.configs").iterdir()
                  if p.name.endswith(".json") and not p.name.startswith("mask_strategy"))


@dataclass(frozen=True, kw_only=True, slots=True)
class JobRange:
    """Which steps and layers of a config one ``sta-dist run`` goes through."""

    start_step: int
    steps: int
    layers: int

    @staticmethod
    def of(cfg: RunConfig, steps: Optional[int] = None, layers: Optional[int] = None,
           start_step: int = 0) -> "JobRange":
        """Defaults: from ``start_step`` to the last step, every layer. Checked against the
        config, so nothing wraps around."""
        if not 0 <= start_step < cfg.steps:
            raise ValueError(f"--start-step must be in [0, {cfg.steps}) for config {cfg.name!r} "
                             f"({cfg.steps} steps), got --start-step {start_step}")
        left = cfg.steps - start_step
        steps = left if steps is None else steps
        if not 1 <= steps <= left:
            raise ValueError(f"--steps must be in [1, {left}] (config {cfg.name!r} has {cfg.steps} steps, "
                             f"starting at step {start_step}), got --steps {steps}")
        layers = cfg.layers if layers is None else layers
        if not 1 <= layers <= cfg.layers:
            raise ValueError(f"--layers must be in [1, {cfg.layers}] for config {cfg.name!r}, got --layers {layers}")
        return JobRange(start_step=start_step, steps=steps, layers=layers)


def cpu_seconds_estimate(cfg: RunConfig, job: JobRange, ranks: int) -> float:
    """A rough time for the job on this CPU: attended score entries of the real windows at
    an assumed 2 GFLOP/s per rank (the torch backend and the reference, measured here at
    1-5), so that a GPU-sized job is refused before it starts rather than killed at the
    deadline."""
    cfg_shape = STAConfig(canvas=cfg.canvas, tile=cfg.tile, text_len=cfg.text_len)
    grid, tile_tokens = cfg_shape.grid, geometry.volume(cfg.tile)
    strategy = cfg.strategy()
    flops = 0.0
    for step in range(job.start_step, job.start_step + job.steps):
        for layer in range(job.layers):
            windows = strategy.layer_windows(step % strategy.num_steps, layer % strategy.num_layers)
            for h in range(cfg.heads):
                eff = geometry.effective_window(windows[h % len(windows)], grid)
                keys = geometry.volume(eff) * tile_tokens + cfg.text_len
                flops += 4 * cfg.batch * cfg_shape.seq_len * keys * cfg.head_dim
    return flops / (2e9 * ranks)


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
    """Progress on rank 0 that suits a terminal and a log file alike: on a terminal one
    bar redrawn in place, in a log one short line per step."""

    def __init__(self, total: int, per_step: int, enabled: bool, stream=None, width: int = 30):
        self.total, self.per_step, self.enabled, self.width, self.done = total, per_step, enabled, width, 0
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()

    def update(self, note: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.done * (self.total - self.done)
        if self.tty:
            filled = self.width * self.done // self.total
            self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {note} "
                              f"{elapsed:.1f}s (~{left:.0f}s left)\033[K")
            if self.done == self.total:
                self.stream.write("\n")
        elif self.done % self.per_step == 0 or self.done == self.total:
            self.stream.write(f"progress {self.done}/{self.total} layer calls: {note}, {elapsed:.1f}s, ~{left:.0f}s left\n")
        self.stream.flush()


def run_job(cfg: RunConfig, rank: int, world_size: int, job: JobRange) -> dict:
    """Run the workload's ``job`` range on this rank; every rank returns the same summary."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    strategy = cfg.strategy()
    plan = ShardPlan.from_config(cfg, world_size, strategy=strategy)
    attn = DistributedSlidingTileAttention(cfg.heads, cfg.head_dim, plan, cfg.kv_heads)
    progress = Progress(job.steps * job.layers, job.layers, enabled=rank == 0)
    step_ms, predicted_ms, modes, worst = [], [], collections.Counter(), (0.0, 1.0)
    verified = True
    for step in range(job.start_step, job.start_step + job.steps):
        total_ms = predicted = 0.0
        for layer in range(job.layers):
            windows = strategy.layer_windows(step, layer % strategy.num_layers)
            windows = tuple(windows[h % len(windows)] for h in range(cfg.heads))
            q, k, v = layer_inputs(cfg, step, layer, device)
            local = [plan.shard(x, rank) for x in (q, k, v)]
            _sync(device, world_size)  # every rank starts the timed call together
            start = time.perf_counter()
            out = attn(*local, window=windows, text_length=cfg.text_valid)
            _sync(device)
            total_ms += (time.perf_counter() - start) * 1e3
            modes[call_mode(plan, windows, cfg.kv_heads, rank, cfg.batch, cfg.head_dim, q.element_size(),
                            cfg.text_valid)] += 1
            predicted += call_cost(plan, windows, cfg.kv_heads, cfg.batch, cfg.head_dim, q.element_size(),
                                   cfg.text_valid).time_ms(H100_NVLINK)
            if cfg.verify != "none" and (cfg.verify == "all" or layer == 0):
                err, bound = verify_local(cfg, plan, rank, q, k, v, windows, out, seed=step * 7919 + layer)
                verified &= err <= bound
                if err / bound > worst[0] / worst[1]:
                    worst = (err, bound)
            progress.update(f"step {step + 1}/{job.start_step + job.steps} layer {layer + 1}/{job.layers} "
                            f"[{modes.most_common(1)[0][0]}]")
        step_ms.append(total_ms)
        predicted_ms.append(predicted)
    ok = _all_ranks_true(verified, device)
    sent = dict(attn.comm.bytes_sent)
    calls = job.steps * job.layers
    return dict(config=cfg.name, world_size=world_size, backend=attn.comm.backend, device=str(device),
                plan=plan.describe(), modes=dict(modes), step_ms=step_ms, predicted_step_ms=predicted_ms,
                bytes_per_layer={k: v / calls for k, v in sent.items() if not k.startswith("check")},
                verify=cfg.verify, worst_error=worst[0], worst_bound=worst[1], verified=ok, rank=rank)


def _sync(device: torch.device, world_size: int = 1) -> None:
    """Wait for the GPU; with ``world_size > 1`` also for every rank to get here (so a rank
    that made its inputs later does not count as the call's time on the others)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if world_size > 1 and dist.is_initialized():
        dist.barrier()
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
        "predicted per step (ms, the cost model at H100 rates): "
        + ", ".join(f"{t:.1f}" for t in s.get("predicted_step_ms", [])),
        "bytes sent per layer per rank: " + (", ".join(f"{k} {v / 1e6:.3f} MB" for k, v in s["bytes_per_layer"].items()) or "none"),
    ]
    if s["verify"] == "none":
        lines.append("verification: skipped")
    else:
        lines.append(f"verification ({s['verify']} rows vs reference): worst error {s['worst_error']:.3g} "
                     f"(bound {s['worst_bound']:.3g}) -> {'VERIFIED' if s['verified'] else 'FAILED'}")
    return "\n".join(lines)


def _spawned_job(rank: int, world_size: int, cfg: RunConfig, job: JobRange) -> dict:
    return run_job(cfg, rank, world_size, job)


def main(cfg: RunConfig, job: JobRange, timeout_s: float = 600.0, summary_path: Optional[str] = None,
         rendezvous_timeout_s: Optional[float] = None) -> int:
    """Entry of ``sta-dist run`` (arguments already checked by :func:`prepare`); returns
    the exit code (1 if verification failed). ``summary_path``: rank 0 also writes the
    summary there as JSON."""
    env = detect_env()
    if env.source != "single":
        init_distributed(**({} if rendezvous_timeout_s is None else dict(rendezvous_timeout_s=rendezvous_timeout_s)))
        summary = run_job(cfg, env.rank, env.world_size, job)
        if env.rank == 0:
            print(format_summary(summary), flush=True)
            _write_summary(summary, summary_path)
        dist.barrier()
        dist.destroy_process_group()
    else:
        from .parallel.spawn import SpawnError, spawn_local

        ranks = local_ranks(cfg)
        print(f"no torchrun environment: spawning {ranks} local rank(s) "
              f"({'gloo on CPU' if not torch.cuda.is_available() else 'one GPU'})", flush=True)
        try:
            summary = spawn_local(_spawned_job, ranks, (cfg, job), timeout_s=timeout_s)[0]
        except SpawnError as err:
            if "did not finish within" in str(err):
                raise SpawnError(f"{err} (--timeout {timeout_s:g}): give it more time with --timeout, or shrink the "
                                 f"job with --steps/--layers/--canvas/--heads", err.details) from None
            raise
        print(format_summary(summary), flush=True)
        _write_summary(summary, summary_path)
    return 0 if summary["verified"] else 1


def _write_summary(summary: dict, path: Optional[str]) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(summary, f, indent=1)


def local_ranks(cfg: RunConfig) -> int:
    """Ranks ``sta-dist run`` spawns without a launcher: ``cpu_ranks`` on CPU, one GPU."""
    return cfg.cpu_ranks if not torch.cuda.is_available() else 1


def prepare(config: str, *, steps: Optional[int] = None, layers: Optional[int] = None, start_step: int = 0,
            mode: Optional[str] = None, mesh=None, canvas=None, heads: Optional[int] = None,
            head_chunks: Optional[int] = None, timeout_s: float = 600.0) -> tuple[RunConfig, JobRange]:
    """Every check of a ``sta-dist run`` before any process starts: the config with its
    overrides, the step and layer range, the plan for this launch, and (without a GPU) that
    the job fits the deadline."""
    overrides = dict(mode=mode, mesh=mesh, canvas=canvas, heads=heads, head_chunks=head_chunks)
    if heads is not None:
        overrides["kv_heads"] = heads  # a shrunk job keeps one kv head per head
    cfg = RunConfig.load(config, **overrides)
    job = JobRange.of(cfg, steps, layers, start_step)
    if not timeout_s > 0:
        raise ValueError(f"--timeout must be > 0 seconds, got --timeout {timeout_s:g}")
    env = detect_env()
    ranks = env.world_size if env.source != "single" else local_ranks(cfg)
    ShardPlan.from_config(cfg, ranks)
    if not torch.cuda.is_available() and env.source == "single":
        estimate = cpu_seconds_estimate(cfg, job, ranks)
        if estimate > timeout_s:
            raise ValueError(
                f"config {cfg.name!r} is GPU-sized for this CPU: about {estimate:.0f} s for {job.steps} step(s) x "
                f"{job.layers} layer(s) of canvas {cfg.canvas} x {cfg.heads} heads, over --timeout {timeout_s:g}; "
                f"shrink it (e.g. --steps 1 --layers 1 --canvas 6 16 16 --heads 4), raise --timeout, or run it on GPUs"
            )
    return cfg, job
