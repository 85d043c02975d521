"""The table of ``bash tools/gpu.sh scale``: from its JSON files, the layer and the real strategy on
1..P GPUs, measured beside predicted (parallel/cost.py with H100 rates), and the 50-step
total extrapolated from the three steps run (15 whole-canvas steps, the first sparse step
with its compiles, 34 warm sparse steps).

    python3 tools/scale_table.py OUT_DIR 1 2 4
"""

from __future__ import annotations

import json
import os
import sys

from sta_dist.parallel.cost import H100_NVLINK, call_cost
from sta_dist.parallel.plan import ShardPlan
from sta_dist.run import RunConfig

WHOLE_STEPS, SPARSE_STEPS = 15, 35


def load(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def predicted_step_ms(cfg: RunConfig, world: int, step: int) -> float:
    strategy = cfg.strategy()
    plan = ShardPlan.from_config(cfg, world, strategy=strategy)
    total = 0.0
    for layer in range(cfg.layers):
        windows = strategy.layer_windows(step, layer)
        cost = call_cost(plan, windows, cfg.kv_heads, cfg.batch, cfg.head_dim, 2, cfg.text_valid)
        total += cost.time_ms(H100_NVLINK)
    return total


def main(out: str, sizes: list[int]) -> None:
    print("## The (3,3,3) layer, HunyuanVideo 30x48x80, bf16")
    print("| GPUs | what | ms | vs one GPU | predicted ms | ms without the per-call check | max diff vs one GPU |")
    print("|---|---|---|---|---|---|---|")
    for n in sizes:
        bench = load(os.path.join(out, f"dist_bench_{n}.json"))
        if bench is None:
            continue
        one = bench["rows"]["one GPU (ours, all heads)"]["ms"]
        for name, row in bench["rows"].items():
            diff = row.get("max_diff_vs_one_gpu")
            print(f"| {n} | {name} | {row['ms']:.2f} | {one / row['ms']:.2f}x | {row.get('predicted_ms', 0):.2f} "
                  f"| {row.get('ms_without_call_check', float('nan')):.2f} | {'' if diff is None else f'{diff:.2e}'} |")
    print()
    print("## The real HunyuanVideo strategy through sta-dist run (60 layers a step)")
    print("| GPUs | step 14 (whole) s | step 15 (first sparse) s | step 16 (sparse) s | 50 steps s (extrapolated) "
          "| vs one GPU | predicted step 14 / 16 s | verified |")
    print("|---|---|---|---|---|---|---|---|")
    cfg = RunConfig.load("hunyuan_720p")
    base = None
    for n in sizes:
        run = load(os.path.join(out, f"run_{n}.json"))
        if run is None:
            continue
        whole, first, sparse = (ms / 1e3 for ms in run["step_ms"][:3])
        total = WHOLE_STEPS * whole + first + (SPARSE_STEPS - 1) * sparse
        base = base or total
        pred = f"{predicted_step_ms(cfg, n, 14) / 1e3:.2f} / {predicted_step_ms(cfg, n, 16) / 1e3:.2f}"
        print(f"| {n} | {whole:.2f} | {first:.2f} | {sparse:.2f} | {total:.1f} | {base / total:.2f}x | {pred} "
              f"| {run['verified']} (worst {run['worst_error']:.2e} <= {run['worst_bound']:.2e}) |")


if __name__ == "__main__":
    main(sys.argv[1], [int(n) for n in sys.argv[2:]])
