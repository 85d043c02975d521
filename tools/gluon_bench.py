"""Time one STA forward implementation at the HunyuanVideo shape (canvas 30x48x80, tile
6x8x8, window 3x3x3 for all 24 heads, head dim 128, bf16, B=1, no text) and print one
line ``impl config ms TFLOP/s max_err_vs_triton``. One implementation per process, so
the caller can put a time limit on each (``bash tools/gpu.sh gluon``).

    python3 tools/gluon_bench.py --impl triton
    python3 tools/gluon_bench.py --impl gluon --k-stages 2 --v-stages 3
    python3 tools/gluon_bench.py --impl gluon --set V_STAGES=3,PINGPONG=0
"""

from __future__ import annotations

import argparse
import json

import torch

from sta_dist import geometry, to_tiled
from sta_dist.bench import STANDARD_CASES, attended_pairs, time_ms
from sta_dist.local import LocalHeads, LocalLayout, LocalText
from sta_dist.dispatch import run_local
from sta_dist.kernel_calls import gluon_tables, head_table as _head_table

CASE = STANDARD_CASES["hunyuan_333"]
CANVAS, TILE, HEADS, D = CASE.canvas, CASE.tile, CASE.heads, CASE.head_dim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=["gluon", "triton"], required=True)
    parser.add_argument("--k-stages", type=int, default=None, help="default: the kernel's DEFAULT_CONFIG")
    parser.add_argument("--v-stages", type=int, default=None, help="default: the kernel's DEFAULT_CONFIG")
    parser.add_argument("--no-pingpong", action="store_true", help="warpgroups issue their products without taking turns")
    parser.add_argument("--set", default="", metavar="K=V,K=V",
                        help="other kernel config keys (integers), e.g. V_STAGES=3,PINGPONG=0")
    parser.add_argument("--no-time", action="store_true", help="one call, no timing (for a profiler)")
    parser.add_argument("--order", choices=["natural", "tiled"], default="natural",
                        help="token order of q, k, v (tiled: head mode's local layout, the packed path)")
    parser.add_argument("--check", action="store_true", help="also compare with the Triton kernel's output")
    args = parser.parse_args()

    S = geometry.volume(CANVAS)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn((1, S, HEADS, D), generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    scale = D**-0.5
    if args.order == "tiled":
        q, k, v = (to_tiled(x, CANVAS, TILE) for x in (q, k, v))
    layout = getattr(LocalLayout, args.order)(CANVAS, TILE, 0)
    heads = LocalHeads.build(CASE.windows, layout.grid, HEADS)
    # The Triton kernel alone: the router would send this call to the Gluon kernel on Hopper.
    triton_kernel = lambda: run_local(q, k, v, layout, heads, LocalText.single(0), scale, backend="triton")  # noqa: E731
    if args.impl == "gluon":
        from sta_dist.kernels.sta_fwd_gluon import DEFAULT_CONFIG, sta_fwd_gluon

        table = _head_table(heads, tuple(range(HEADS)), torch.device("cuda"))
        out = torch.empty_like(q)
        config = dict(K_STAGES=args.k_stages or DEFAULT_CONFIG["K_STAGES"],
                      V_STAGES=args.v_stages or DEFAULT_CONFIG["V_STAGES"], PINGPONG=not args.no_pingpong)
        extra = {k: int(v) for k, v in (item.split("=") for item in args.set.split(",") if item)}
        unknown = set(extra) - set(DEFAULT_CONFIG)
        if unknown:
            raise SystemExit(f"--set: unknown switches {sorted(unknown)}; the kernel has {sorted(DEFAULT_CONFIG)}")
        config.update(extra)
        tiled = args.order == "tiled"
        tables = gluon_tables(layout, q.device) if tiled else None
        fn = lambda: sta_fwd_gluon(q, k, v, table, out, canvas=CANVAS, tile=TILE, scale=scale, config=config,  # noqa: E731
                                   order="packed" if tiled else "natural", tables=tables)
        stages = f"{config['K_STAGES']}+{config['V_STAGES']}"
        name = f"gluon {args.order} stages={stages} pingpong={config['PINGPONG']} {args.set}".strip()
    else:
        fn = triton_kernel
        name = f"triton {args.order} (sta_dist/kernels/sta_fwd.py)"
    res = fn()
    torch.cuda.synchronize()
    err = None
    if args.check and args.impl == "gluon":
        err = (res.float() - triton_kernel().float()).abs().max().item()
    if args.no_time:
        return
    ms = time_ms(fn)
    flops = 4 * attended_pairs(CASE) * D  # pairs are summed over heads
    print(json.dumps(dict(impl=name, ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1), max_diff_vs_triton=err)))


if __name__ == "__main__":
    main()
