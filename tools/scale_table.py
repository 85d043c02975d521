"""The table of ``bash tools/gpu.sh scale``: from its JSON files, the layer and the real strategy on
1..P GPUs, measured beside predicted (parallel/cost.py with H100 rates), and the 50-step
total extrapolated from the four steps run, 13-16: step 13 is the process's first (whole
canvas, with the job's one-time costs: compiles, NCCL setup), 14 a warm whole-canvas step,
15 the first sparse step (its compiles), 16 a warm sparse one. So the total counts each
first-call cost once: step 13 + 14 x step 14 + step 15 + 34 x step 16.

    python3 tools/scale_table.py OUT_DIR 1 2 4
    python3 tools/scale_table.py OUT_DIR run_1.json run_2_chunks_1.json ...   (runs named)
"""

from __future__ import annotations

import json
import os
import sys

from sta_dist.parallel.cost import H100_NVLINK
from sta_dist.parallel.decide import call_cost
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


def main(out: str, sizes: list[int], runs: list[str]) -> None:
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
    print("| run | GPUs | step 13 (first) s | step 14 (whole) s | step 15 (first sparse) s | step 16 (sparse) s "
          "| 50 steps s (extrapolated) | vs one GPU: whole / sparse / all | predicted step 14 / 16 s | verified |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    cfg = RunConfig.load("hunyuan_720p")
    base = None
    for name in runs:
        run = load(os.path.join(out, name))
        if run is None:
            continue
        n = run["world_size"]
        first_whole, whole, first, sparse = (ms / 1e3 for ms in run["step_ms"][:4])
        total = first_whole + (WHOLE_STEPS - 1) * whole + first + (SPARSE_STEPS - 1) * sparse
        base = base or (whole, sparse, total)
        pred = f"{predicted_step_ms(cfg, n, 14) / 1e3:.2f} / {predicted_step_ms(cfg, n, 16) / 1e3:.2f}"
        print(f"| {name} | {n} | {first_whole:.2f} | {whole:.2f} | {first:.2f} | {sparse:.2f} | {total:.1f} "
              f"| {base[0] / whole:.2f}x / {base[1] / sparse:.2f}x / {base[2] / total:.2f}x | {pred} "
              f"| {run['verified']} (worst {run['worst_error']:.2e} <= {run['worst_bound']:.2e}) |")


if __name__ == "__main__":
    args = sys.argv[2:]
    sizes = [int(a) for a in args if a.isdigit()]
    main(sys.argv[1], sizes, [a for a in args if not a.isdigit()] or [f"run_{n}.json" for n in sizes])
