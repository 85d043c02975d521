"""Where a kernel's hot loop spends its time, region by region, from Nsight Compute's source
page (``ncu -i REP --page source --print-source sass --csv``; ``bash tools/gpu.sh profile``
writes it as ``cuda_sass.csv``).

The hot loop is the instructions sharing the execution count that accounts for the most
executed instructions (count x instructions: a loop body, each of its instructions executed
equally often; a short spin loop runs more often but weighs less). It is cut at its
synchronisation points (named barriers, wgmma arrive, and each wgmma wait as a region of its
own), and each region is printed with its instructions, its share of the loop's stall
samples, its three largest stall reasons and its opcodes. Samples are per warp, so a
region's share is the share of time the loop's warps spend there.

    python3 tools/stall_regions.py out/cuda_sass.csv
    python3 tools/stall_regions.py out/fa4_sass.csv --kernel FlashAttentionForwardSm90
"""

from __future__ import annotations

import argparse
import collections
import csv

CUTS = ("BAR.SYNC", "WARPGROUP.ARRIVE", "WARPGROUP.DEPBAR")
WAITS = ("WARPGROUP.DEPBAR",)


def opcode(source: str) -> str:
    words = source.split()
    if not words:
        return ""
    return words[1] if words[0].startswith("@") and len(words) > 1 else words[0]


def read(path: str, kernel: str = "") -> list[dict]:
    """The instruction rows (``source``, ``executed``, ``samples``, ``stalls``) of the first
    kernel in the CSV whose name contains ``kernel``."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    starts = [i for i, r in enumerate(rows) if r and r[0] == "Kernel Name"] + [len(rows)]
    picked = [(a, b) for a, b in zip(starts, starts[1:]) if kernel in rows[a][1]]
    if not picked:
        names = [rows[a][1][:60] for a in starts[:-1]]
        raise SystemExit(f"stall_regions: no kernel whose name contains {kernel!r} in {path}: {names}")
    first, end = picked[0]
    header = next(i for i in range(first, end) if rows[i] and rows[i][0] == "Address")
    names = rows[header]
    col = {n: i for i, n in enumerate(names)}
    reasons = [n for n in names if n.startswith("stall_") and "Not Issued" not in n]
    out = []
    for r in rows[header + 1:end]:
        if len(r) < len(names):
            continue
        out.append(dict(source=r[col["Source"]].strip(), executed=int(r[col["Instructions Executed"]] or 0),
                        samples=int(r[col["Warp Stall Sampling (All Samples)"]] or 0),
                        stalls={n[6:]: int(r[col[n]] or 0) for n in reasons}))
    return out


def regions(rows: list[dict]) -> list[list[dict]]:
    """The hot loop's instructions (those sharing the execution count with the largest
    count x instructions), in address order, cut before each synchronisation point."""
    counts = collections.Counter(r["executed"] for r in rows if r["executed"] > 0)
    hot = max(counts, key=lambda c: (c * counts[c], c))
    out: list[list[dict]] = []
    alone = False  # the last instruction was a wait: it is a region of its own
    for r in rows:
        if r["executed"] != hot:
            continue
        op = opcode(r["source"])
        if not out or alone or op.startswith(CUTS):
            out.append([])
        out[-1].append(r)
        alone = op.startswith(WAITS)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", help="Nsight Compute's source page as CSV (SASS)")
    ap.add_argument("--kernel", default="", help="the first kernel whose name contains this (default: the first)")
    args = ap.parse_args()
    parts = regions(read(args.csv, args.kernel))
    total = sum(r["samples"] for part in parts for r in part) or 1
    print(f"hot loop: {sum(map(len, parts))} instructions, {total} samples, {len(parts)} regions")
    for part in parts:
        samples = sum(r["samples"] for r in part)
        stalls = collections.Counter()
        for r in part:
            stalls.update(r["stalls"])
        ops = collections.Counter(opcode(r["source"]).split(".")[0] for r in part)
        top = ", ".join(f"{k} {v / max(samples, 1):.0%}" for k, v in stalls.most_common(3) if v)
        print(f"{100 * samples / total:5.1f}%  {len(part):4d} instr  from {opcode(part[0]['source']):24s} {top}")
        print("        " + " ".join(f"{k}x{v}" for k, v in ops.most_common(8)))


if __name__ == "__main__":
    main()
