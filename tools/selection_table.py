"""The short table of ``bash tools/gpu.sh selection``: window plus selected tiles against the
window alone and FlexAttention, from kernel_bench.json (and dist_bench_2_selected.json).

    python3 tools/selection_table.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(out: str) -> None:
    out_dir = Path(out)
    kernel = out_dir / "kernel_bench.json"
    if kernel.exists():
        payload = json.loads(kernel.read_text())
        print(f"card: {payload['env'].get('card')}, torch {payload['env'].get('torch')}, "
              f"triton {payload['env'].get('triton')}")
        print("| case | ours ms (selection incl.) | window alone ms | ours / window (issue: <= 1.3) | "
              "Flex ms (mask build incl.) | Flex / ours (issue: >= 1.5) | tiles per query tile | all checks ok |")
        print("|---|---|---|---|---|---|---|---|")
        for r in payload.get("selection", []):
            rows = r["rows"]
            ours = rows["ours (selection included)"]["ms"]
            window = rows["window alone (as routed)"]["ms"]
            flex = rows.get("FlexAttention (selection + mask build + attention)", {}).get("ms")
            ok = all(row["check"]["ok"] for row in rows.values() if row.get("check"))
            flex_cells = f"{flex:.2f} | {flex / ours:.2f}x" if flex else " | "
            print(f"| {r['name']} | {ours:.2f} | {window:.2f} | {ours / window:.2f}x | {flex_cells} | "
                  f"{r['attended_tiles_per_query_tile']:.1f} | {'yes' if ok else 'NO'} |")
    dist = out_dir / "dist_bench_2_selected.json"
    if dist.exists():
        payload = json.loads(dist.read_text())
        rows = payload["rows"]
        one = rows["one GPU (ours, all heads)"]["ms"]
        print(f"2 GPUs ({payload['env'].get('card')}), {payload['select']}:")
        print("| row | ms | vs one GPU (issue: tile >= 1.7x) | max diff vs one GPU | ms, a new selection each call "
              "| vs one GPU |")
        print("|---|---|---|---|---|---|")
        for name, row in rows.items():
            diff = row.get("max_diff_vs_one_gpu")
            new = row.get("ms_new_selection_each_call")
            new_cells = f"{new:.2f} | {one / new:.2f}x" if new else " | "
            print(f"| {name} | {row['ms']:.2f} | {one / row['ms']:.2f}x | {'' if diff is None else f'{diff:.1e}'} | "
                  f"{new_cells} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out")
