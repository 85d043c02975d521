"""Where a window-plus-selected-tiles call's time goes on one GPU: a few calls of a
selection case (``sta_dist/bench/selection.py``) under torch.profiler, then the GPU
kernels by total time, and the wall time of the selection alone and of the whole call.

    python3 tools/profile_selection.py --case hunyuan_topk8
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from sta_dist.bench.common import time_ms
from sta_dist.bench.selection import SELECTION_CASES, case_functions, case_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="hunyuan_topk8", choices=sorted(SELECTION_CASES))
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args()
    case = SELECTION_CASES[args.case]
    q, k, v = case_inputs(case, "cuda", torch.bfloat16)
    fns = case_functions(case, q, k, v, compile_flex=False)
    call, selection = fns["ours (selection included)"], fns["selection alone"]
    for name in ("selection alone", "ours (selection included)", "window alone (as routed)"):
        print(f"{name}: {time_ms(fns[name]):.3f} ms")
    call(), torch.cuda.synchronize()
    for label, fn in (("selection alone", selection), ("the whole call", call)):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.calls):
                fn()
            torch.cuda.synchronize()
        print(f"--- {label}: GPU time per call by kernel ({args.calls} calls)")
        events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
        for e in events[:args.rows]:
            print(f"{e.device_time_total / 1e3 / args.calls:9.3f} ms  x{e.count // args.calls:<3} {e.key[:110]}")


if __name__ == "__main__":
    main()
