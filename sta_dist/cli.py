"""``sta-dist``: run (the main job), bench, plan."""

from __future__ import annotations

import argparse
import importlib.resources
import itertools
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
    cases = [c for c in args.cases.split(",") if c] if args.cases else list(bench.STANDARD_CASES)
    if args.sweep:
        configs = [
            dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
            for bm, bn, w, s in itertools.product((128,), (64, 128), (4, 8), (2, 3, 4))
        ]
        for name in cases:
            bench.sweep(bench.STANDARD_CASES[name], configs)
        return 0
    bench.run_kernel_bench(cases, args.out, replay=replay, with_anchors=not args.no_anchors)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sta-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="benchmarks (GPU)")
    bsub = b.add_subparsers(dest="what", required=True)
    k = bsub.add_parser("kernel", help="our kernel vs FlexAttention-STA and SDPA, checked and timed")
    k.add_argument("--cases", default="", help="comma-separated case names (default: all standard cases)")
    k.add_argument("--replay", default="", help="'hunyuan' or a mask strategy JSON to replay")
    k.add_argument("--out", default="out/bench", help="folder for kernel_bench.json and .png")
    k.add_argument("--sweep", action="store_true", help="time launch configs instead")
    k.add_argument("--no-anchors", action="store_true", help="time our kernel only")
    k.set_defaults(func=_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
