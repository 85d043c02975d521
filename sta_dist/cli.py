"""``sta-dist``: run (the main job), bench, plan."""

from __future__ import annotations

import argparse
import importlib.resources
import sys
from typing import Optional, Sequence


def packaged(name: str) -> str:
    """Path of a file shipped in ``sta_dist.configs``."""
    return str(importlib.resources.files("sta_dist.configs") / name)


def _bench(args) -> int:
    from . import bench

    replay = None
    if args.replay:
        replay = packaged("mask_strategy_hunyuan.json.gz") if args.replay == "hunyuan" else args.replay
    cases = [c for c in args.cases.split(",") if c] if args.cases else ([] if replay else list(bench.STANDARD_CASES))
    if args.sweep:
        configs = bench.SWEEP_CONFIGS if args.config is None else [bench.SWEEP_CONFIGS[args.config]]
        for name in cases:
            bench.sweep(bench.STANDARD_CASES[name], configs)
        return 0
    bench.run_kernel_bench(cases, args.out, replay=replay, with_anchors=not args.no_anchors)
    return 0


def _bench_dist(args) -> int:
    from .bench_dist import run_dist_bench

    run_dist_bench(args.out, canvas=tuple(args.canvas), tile=tuple(args.tile), window=tuple(args.window),
                   heads=args.heads, head_dim=args.head_dim, text_len=args.text_len, text_valid=args.text_valid,
                   reps=args.reps, modes=tuple(args.modes.split(",")))
    return 0


def _run(args) -> int:
    from . import run

    return run.main(args.config, steps=args.steps, layers=args.layers, mode=args.mode, timeout_s=args.timeout,
                    start_step=args.start_step)


def _plan(args) -> int:
    from . import geometry
    from .parallel.plan import ShardPlan
    from .parallel.schedule import call_schedule
    from .run import RunConfig

    cfg = RunConfig.load(args.config, mode=args.mode)
    strategy = cfg.strategy()
    windows = tuple(tuple(w) for w in strategy.layer_windows(args.step, args.layer))
    plan = ShardPlan(canvas=cfg.canvas, tile=cfg.tile, text_len=cfg.text_len, mode=cfg.mode,
                     world_size=args.world_size, mesh=cfg.mesh, windows=tuple(sorted(set(windows))))
    print(f"config {cfg.name}: canvas {cfg.canvas}, tile {cfg.tile}, grid {plan.grid}, {cfg.heads} heads")
    print(f"plan: {plan.describe()}")
    print(f"windows at step {args.step}, layer {args.layer}: {sorted(set(windows))}")
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[cfg.dtype]
    for rank in range(args.world_size):
        s = call_schedule(plan, windows, cfg.kv_heads, rank)
        halo = sum(geometry.packed_token_count(cfg.canvas, cfg.tile, t) for t in s.halo_recv)
        print(f"rank {rank}: {plan.held_count(rank)} tokens held, box {plan.box(rank)}, mode {s.mode}, "
              f"heads {s.q_heads[s.me_in_head_group]}, halo in {halo} tokens "
              f"({halo * 2 * len(s.kv_heads[s.me_in_head_group]) * cfg.head_dim * cfg.batch * itemsize / 1e6:.1f} MB k+v)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sta-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="the main job: a multi-step, multi-layer workload, distributed and verified")
    r.add_argument("--config", default="tiny_cpu", help="a name in configs/ (tiny_cpu, hunyuan_720p, wan21_480p, "
                   "wan21_720p, stepvideo) or a JSON path")
    r.add_argument("--steps", type=int, default=None, help="run only the first N steps")
    r.add_argument("--layers", type=int, default=None, help="run only the first N layers of each step")
    r.add_argument("--start-step", type=int, default=0, help="first denoising step to run")
    r.add_argument("--mode", default=None, choices=["head", "tile", "hybrid", "auto"], help="override the config's mode")
    r.add_argument("--timeout", type=float, default=600.0, help="seconds before a spawned CPU job is stopped")
    r.set_defaults(func=_run)

    p = sub.add_parser("plan", help="print the shard plan and each rank's halo for a config")
    p.add_argument("--config", default="hunyuan_720p")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--mode", default=None, choices=["head", "tile", "hybrid", "auto"])
    p.add_argument("--step", type=int, default=20)
    p.add_argument("--layer", type=int, default=0)
    p.set_defaults(func=_plan)

    b = sub.add_parser("bench", help="benchmarks (GPU)")
    bsub = b.add_subparsers(dest="what", required=True)
    k = bsub.add_parser("kernel", help="our kernel vs FlexAttention-STA and SDPA, checked and timed")
    k.add_argument("--cases", default="", help="comma-separated case names (default: all standard cases)")
    k.add_argument("--replay", default="", help="'hunyuan' or a mask strategy JSON to replay")
    k.add_argument("--out", default="out/bench", help="folder for kernel_bench.json and .png")
    k.add_argument("--sweep", action="store_true", help="time launch configs instead")
    k.add_argument("--config", type=int, help="with --sweep: only the config of this index")
    k.add_argument("--no-anchors", action="store_true", help="time our kernel only")
    k.set_defaults(func=_bench)
    d = bsub.add_parser("dist", help="(under torchrun) one layer per mode vs one GPU and the Ulysses+Flex anchor")
    d.add_argument("--canvas", type=int, nargs=3, default=[30, 48, 80])
    d.add_argument("--tile", type=int, nargs=3, default=[6, 8, 8])
    d.add_argument("--window", type=int, nargs=3, default=[3, 3, 3])
    d.add_argument("--heads", type=int, default=24)
    d.add_argument("--head-dim", type=int, default=128)
    d.add_argument("--text-len", type=int, default=0)
    d.add_argument("--text-valid", type=int, default=0)
    d.add_argument("--reps", type=int, default=10)
    d.add_argument("--modes", default="head,tile,hybrid")
    d.add_argument("--out", default="out/bench")
    d.set_defaults(func=_bench_dist)

    from .generate import register as register_generate
    register_generate(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
