"""sta-dist: run (the main job: a workload, distributed and verified), plan, doctor, bench,
generate (a video with a diffusers pipeline).

Every argument is checked before any process starts. A misuse (a bad argument or config,
or a launcher environment that cannot form the job) ends with one line naming the
argument, the rule and the value, and exit code 2; a job that fails, with one line and exit
code 1. --debug, before or after the subcommand, shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .parallel.env import LaunchError
from .resources import packaged
from .route import BACKENDS

USAGE_ERROR, JOB_FAILED = 2, 1
"""Exit codes: a misuse (:data:`MISUSE` errors), a job that failed (any other error)."""
MISUSE = (ValueError, TypeError, IndexError, FileNotFoundError, LaunchError)
"""Errors that mean the arguments, the config or the launcher's environment are wrong."""


class CLIError(Exception):
    """A misuse of the command line, reported as one line."""


def _bound(kind, minimum, inclusive=True):
    """An argparse type: ``kind`` (int or float) at least (or above) ``minimum``."""
    rule = f"{'an int' if kind is int else 'a number'} {'>=' if inclusive else '>'} {minimum:g}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}") from None
        if value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return value

    return parse


positive_int, nonnegative_int, positive_float = _bound(int, 1), _bound(int, 0), _bound(float, 0, inclusive=False)


def _run(args) -> int:
    from . import run

    cfg, job = run.prepare(args.config, steps=args.steps, layers=args.layers, start_step=args.start_step,
                           mode=args.mode, mesh=args.mesh, canvas=args.canvas, heads=args.heads,
                           head_chunks=args.head_chunks, timeout_s=args.timeout)
    if args.check:
        print(f"sta-dist run --check: config {cfg.name}, {job.steps} step(s) from step {job.start_step}, "
              f"{job.layers} layer(s): the arguments check out; nothing started")
        return 0
    return run.main(cfg, job, timeout_s=args.timeout, summary_path=args.summary,
                    rendezvous_timeout_s=args.rendezvous_timeout)


def _plan(args) -> int:
    from .plan_report import plan_report
    from .run import RunConfig

    cfg = RunConfig.load(args.config, mode=args.mode, mesh=args.mesh)
    print(plan_report(cfg, args.world_size, step=args.step, layer=args.layer, per_rank=args.ranks))
    return 0


def _doctor(args) -> int:
    from .doctor import doctor_report
    from .run import RunConfig

    cfg = RunConfig.load(args.config, mode=args.mode, mesh=args.mesh)
    print(doctor_report(cfg, args.world_size, step=args.step, layer=args.layer, backend=args.backend,
                        assume_gpu=args.assume_gpu))
    return 0


def _bench(args) -> int:
    import torch

    if not torch.cuda.is_available():
        raise CLIError("sta-dist bench kernel needs a CUDA GPU, and none is visible (torch.cuda.is_available() "
                       "is False)")
    if args.backward:
        from .bench import backward

        return backward.run(skip_check=args.skip_check, reps_ms=args.reps_ms, step_timeout=args.step_timeout)
    from .bench import kernel as bench

    replay = None
    if args.replay:
        replay = packaged("mask_strategy_hunyuan.json.gz") if args.replay == "hunyuan" else args.replay
    from .bench.selection import SELECTION_CASES

    cases = [c for c in args.cases.split(",") if c] if args.cases else ([] if replay else list(bench.STANDARD_CASES))
    known = {**bench.STANDARD_CASES, **SELECTION_CASES}
    unknown = [c for c in cases if c not in known or (args.sweep and c in SELECTION_CASES)]
    if unknown:
        names = sorted(bench.STANDARD_CASES) if args.sweep else sorted(known)
        raise CLIError(f"--cases must name cases of {names}, got {unknown}")
    if args.sweep:
        if args.config is not None and not 0 <= args.config < len(bench.SWEEP_CONFIGS):
            raise CLIError(f"--config must be in [0, {len(bench.SWEEP_CONFIGS)}), got --config {args.config}")
        configs = bench.SWEEP_CONFIGS if args.config is None else [bench.SWEEP_CONFIGS[args.config]]
        for name in cases:
            bench.sweep(bench.STANDARD_CASES[name], configs)
        return 0
    bench.run_kernel_bench(cases, args.out, replay=replay, with_anchors=not args.no_anchors)
    return 0


def _bench_dist(args) -> int:
    from .parallel.env import detect_env

    if detect_env().source == "single":
        raise CLIError("sta-dist bench dist must run under torchrun (or srun), e.g. "
                       "torchrun --standalone --nproc-per-node 2 --no-python sta-dist bench dist")
    modes = tuple(m for m in args.modes.split(",") if m)
    bad = [m for m in modes if m not in ("head", "tile", "hybrid", "auto")]
    if bad or not modes:
        raise CLIError(f"--modes must be a comma-separated list of head, tile, hybrid, auto, got {args.modes!r}")
    if args.text_valid > args.text_len:
        raise CLIError(f"--text-valid must be in [0, --text-len={args.text_len}], got {args.text_valid}")
    select = parse_select(args.select)
    from .bench.dist import run_dist_bench

    run_dist_bench(args.out, canvas=tuple(args.canvas), tile=tuple(args.tile), window=tuple(args.window),
                   heads=args.heads, head_dim=args.head_dim, text_len=args.text_len, text_valid=args.text_valid,
                   reps=args.reps, modes=modes, select=select, head_chunks=args.head_chunks or 1)
    return 0


def parse_select(text: str):
    """``--select``: "" (none), "topk:K" (shared heads) or "mass:P" (per head)."""
    from .selection import Mass, TopK

    if not text:
        return None
    kind, _, value = text.partition(":")
    try:
        if kind == "topk":
            return TopK(int(value))
        if kind == "mass":
            return Mass(float(value))
    except (TypeError, ValueError) as err:
        raise CLIError(f"--select must be topk:K or mass:P, got --select {text!r} ({err})") from None
    raise CLIError(f"--select must be topk:K or mass:P, got --select {text!r}")


class _Parser(argparse.ArgumentParser):
    """argparse, but a misuse is one line (no usage block) and exit code 2."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    from . import __version__

    return f"sta-dist {__version__}"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sta-dist", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    triple = dict(type=positive_int, nargs=3)
    chunks_help = "head-mode calls in N chunks of heads, each exchange beside the attention (default 1: off)"

    r = sub.add_parser("run", help="the main job: a multi-step, multi-layer workload, distributed and verified")
    r.add_argument("--config", default="tiny_cpu", help="a name in configs/ (tiny_cpu, hunyuan_720p, wan21_480p, "
                   "wan21_720p, stepvideo) or a JSON path")
    r.add_argument("--steps", type=positive_int, default=None, help="run N steps (default: to the last)")
    r.add_argument("--layers", type=positive_int, default=None, help="run only the first N layers of each step")
    r.add_argument("--start-step", type=nonnegative_int, default=0, help="first denoising step to run")
    r.add_argument("--mode", default=None, choices=["head", "tile", "hybrid", "auto"], help="override the config's mode")
    r.add_argument("--mesh", metavar=("P_HEAD", "P_TILE"), default=None, help="hybrid mesh (default: by cost)",
                   **dict(triple, nargs=2))
    r.add_argument("--canvas", metavar=("T", "H", "W"), default=None, help="shrink the canvas (e.g. to run a "
                   "GPU-sized config on a CPU)", **triple)
    r.add_argument("--heads", type=positive_int, default=None, help="shrink the heads (one kv head per head)")
    r.add_argument("--head-chunks", type=positive_int, default=None, help=chunks_help)
    r.add_argument("--timeout", type=positive_float, default=600.0,
                   help="seconds before a spawned (no torchrun) job is stopped")
    r.add_argument("--summary", default=None, metavar="PATH", help="also write the summary as JSON to PATH")
    r.add_argument("--rendezvous-timeout", type=positive_float, default=None, metavar="S",
                   help="seconds ranks wait for each other to form the job (default 15)")
    r.add_argument("--check", action="store_true", help="check the arguments and the config, then exit: start "
                   "nothing (the launchers do this before torchrun or srun)")
    r.set_defaults(func=_run)

    def one_call(parser_: argparse.ArgumentParser, world_size: int) -> None:
        """The arguments naming one call of a config on some ranks (plan, doctor)."""
        parser_.add_argument("--config", default="hunyuan_720p")
        parser_.add_argument("--world-size", type=positive_int, default=world_size)
        parser_.add_argument("--mode", default=None, choices=["head", "tile", "hybrid", "auto"])
        parser_.add_argument("--mesh", metavar=("P_HEAD", "P_TILE"), default=None,
                             help="hybrid mesh (default: by cost)", **dict(triple, nargs=2))
        parser_.add_argument("--step", type=nonnegative_int, default=None, help="strategy step (default: the last)")
        parser_.add_argument("--layer", type=nonnegative_int, default=0)

    p = sub.add_parser("plan", help="print the shard plan of a config: mode, mesh, each rank's tokens and halo")
    one_call(p, world_size=2)
    p.add_argument("--ranks", action="store_true", help="one line per rank (default: only up to 8 ranks)")
    p.set_defaults(func=_plan)

    dr = sub.add_parser("doctor", help="which kernel each rank's call of a config takes, and why not the faster ones")
    one_call(dr, world_size=1)
    dr.add_argument("--backend", default="auto", choices=list(BACKENDS))
    dr.add_argument("--assume-gpu", default=None, choices=["h100"],
                    help="route as on this GPU (with triton and nvcc) instead of this machine")
    dr.set_defaults(func=_doctor)

    b = sub.add_parser("bench", help="benchmarks (GPU)")
    bsub = b.add_subparsers(dest="what", required=True, parser_class=_Parser)
    k = bsub.add_parser("kernel", help="our kernel vs FlexAttention-STA and SDPA, checked and timed")
    k.add_argument("--cases", default="", help="comma-separated case names (default: all standard cases; "
                                               "window plus selected tiles: hunyuan_topk8, hunyuan_mass09)")
    k.add_argument("--replay", default="", help="'hunyuan' or a mask strategy JSON to replay")
    k.add_argument("--backward", action="store_true", help="forward+backward beside FlexAttention-STA's (training)")
    k.add_argument("--skip-check", action="store_true", help="with --backward: time only")
    k.add_argument("--reps-ms", type=positive_float, default=200.0, help="with --backward: ms per measurement")
    k.add_argument("--step-timeout", type=positive_int, default=300, help="with --backward: seconds per step")
    k.add_argument("--out", default="out/bench", help="folder for kernel_bench.json and .png")
    k.add_argument("--sweep", action="store_true", help="time launch configs instead")
    k.add_argument("--config", type=nonnegative_int, help="with --sweep: only the config of this index")
    k.add_argument("--no-anchors", action="store_true", help="time our kernel only")
    k.set_defaults(func=_bench)
    d = bsub.add_parser("dist", help="(under torchrun) one layer per mode vs one GPU and the Ulysses+Flex anchor")
    d.add_argument("--canvas", default=[30, 48, 80], **triple)
    d.add_argument("--tile", default=[6, 8, 8], **triple)
    d.add_argument("--window", default=[3, 3, 3], **triple)
    d.add_argument("--heads", type=positive_int, default=24)
    d.add_argument("--head-dim", type=positive_int, default=128)
    d.add_argument("--text-len", type=nonnegative_int, default=0)
    d.add_argument("--text-valid", type=nonnegative_int, default=0)
    d.add_argument("--reps", type=positive_int, default=10)
    d.add_argument("--modes", default="head,tile,hybrid")
    d.add_argument("--head-chunks", type=positive_int, default=None, help=chunks_help)
    d.add_argument("--select", default="", help="window plus selected tiles: topk:K (heads share it) or mass:P")
    d.add_argument("--out", default="out/bench")
    d.set_defaults(func=_bench_dist)

    from .generate import register as register_generate
    register_generate(sub)
    for leaf in (r, p, dr, k, d, sub.choices["generate"]):
        # --debug after the subcommand too; SUPPRESS keeps a --debug given before it
        leaf.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the traceback of an error")
        leaf.set_defaults(parser=leaf)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # reported by the subcommand's parser, which names its own --help
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("sta-dist: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every failure reaches the user as one line
        if args.debug:
            raise
        misuse = isinstance(err, (CLIError, *MISUSE))
        message = " ".join(str(err).split()) if misuse else _failure_line(err)
        hint = "" if misuse else f" (run again with --debug for the traceback: {args.parser.prog} --debug ...)"
        print(f"{args.parser.prog}: error: {message}{hint}", file=sys.stderr)
        return USAGE_ERROR if misuse else JOB_FAILED


def _failure_line(err: Exception) -> str:
    """A job failure as one line: each failed rank's own error, not the spawn machinery's."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: " + "; ".join(lines) if lines else type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
