"""Where one distributed layer call's time goes: a few calls of a config's layer (the real
HunyuanVideo strategy by default) under torch.profiler on every rank, then rank 0 prints the
wall time per call and the GPU kernels and copies by total time. Run under torchrun (one
process is one GPU):

    torchrun --standalone --nproc-per-node 2 tools/profile_layer.py --step 16 --layers 0,1,2

``--timeline``: every rank's last profiled call as the GPU ran it (each kernel's start, length,
stream and when the host launched it; the moments no kernel ran), e.g. window plus selected
tiles in tile mode: ``--window 3 3 3 --select topk:8 --mode tile --layers 0 --timeline``.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import math
import os
import tempfile
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from sta_dist import DistributedSlidingTileAttention, ShardPlan
from sta_dist.bench.dist import rolled_video
from sta_dist.cli import parse_select
from sta_dist.parallel.env import init_distributed
from sta_dist.run import RunConfig, layer_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="hunyuan_720p")
    parser.add_argument("--step", type=int, default=16)
    parser.add_argument("--layers", default="0,1,2", help="comma-separated, or a range such as 0-59")
    parser.add_argument("--rows", type=int, default=18)
    parser.add_argument("--mode", default=None, help="the plan's mode (auto, head, tile, hybrid; default: the config's)")
    parser.add_argument("--trace", default=None, help="write rank 0's Chrome trace of the profiled calls here")
    parser.add_argument("--window", type=int, nargs=3, default=None,
                        help="one window for every head (e.g. 3 3 3) instead of the strategy's")
    parser.add_argument("--no-text", action="store_true", help="the config without its text tokens")
    parser.add_argument("--host", action="store_true",
                        help="also cProfile the host's enqueueing of 20 calls (rank 0 prints its top functions)")
    parser.add_argument("--select", default="", help="window plus selected tiles: topk:K or mass:P")
    parser.add_argument("--timeline", action="store_true", help="print every rank's last profiled call, kernel by kernel")
    parser.add_argument("--fresh", action="store_true",
                        help="with --select: every call selects anew (k's tiles rolled; the roll is timed too)")
    parser.add_argument("--syncs", action="store_true",
                        help="rank 0 lists the lines of one call that made the host wait for the GPU")
    args = parser.parse_args()
    select = parse_select(args.select)
    env = init_distributed()
    rank, world = env.rank, env.world_size
    device = torch.device("cuda", torch.cuda.current_device())
    cfg = RunConfig.load(args.config, **(dict(text_len=0, text_valid=0) if args.no_text else {}))
    strategy = cfg.strategy()
    plan = ShardPlan.from_config(cfg, world, mode=args.mode, strategy=strategy)
    if args.window:
        plan = ShardPlan(canvas=cfg.canvas, tile=cfg.tile, text_len=cfg.text_len, mode=args.mode or "auto",
                         world_size=world, windows=(tuple(args.window),), num_heads=cfg.heads,
                         selected_tiles=getattr(select, "k", None))
    attn = DistributedSlidingTileAttention(cfg.heads, cfg.head_dim, plan, cfg.kv_heads)
    calls = []
    a, _, b = args.layers.partition("-")
    layers = range(int(a), int(b) + 1) if b else map(int, args.layers.split(","))
    for layer in layers:
        windows = strategy.layer_windows(args.step, layer)
        windows = tuple(tuple(args.window) if args.window else windows[h % len(windows)] for h in range(cfg.heads))
        q, k, v = layer_inputs(cfg, args.step, layer, device)
        calls.append(([plan.shard(x, rank) for x in (q, k, v)], windows))
    extra = {} if select is None else dict(select=select)
    rolls = itertools.count(1)

    def run(local, windows):
        if args.fresh:  # k's tiles rolled: another selection, as a denoising run's next step makes
            local = (local[0], rolled_video(local[1], cfg.text_len, math.prod(cfg.tile) * next(rolls)), local[2])
        return attn(*local, window=windows, text_length=cfg.text_valid, **extra)

    def timed(local, windows) -> float:
        torch.distributed.barrier()
        torch.cuda.synchronize()
        start = time.perf_counter()
        run(local, windows)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3

    def enqueued(local, windows) -> float:  # the host's time to hand the call to the GPU
        torch.distributed.barrier()
        torch.cuda.synchronize()
        start = time.perf_counter()
        run(local, windows)
        host = (time.perf_counter() - start) * 1e3
        torch.cuda.synchronize()
        return host

    first = [timed(*c) for c in calls]  # each window set met for the first time (caches, compiles)
    again = [timed(*c) for c in calls]
    host = [enqueued(*c) for c in calls]
    if rank == 0:
        print(f"mean wall ms per call: first time {sum(first) / len(first):.2f}, again {sum(again) / len(again):.2f} "
              f"({len(calls)} calls); the host's ms to enqueue a call: {sum(host) / len(host):.2f}")
    if args.syncs:
        torch.distributed.barrier()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            run(*calls[0])
            torch.cuda.set_sync_debug_mode("default")
        where = collections.Counter(f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
        if rank == 0:
            print(f"host waits for the GPU in one call: {sum(where.values())}")
            for line, n in where.most_common():
                print(f"  {n} x {line}")
    if args.host:
        import cProfile
        import pstats

        prof_host = cProfile.Profile()
        for i in range(20):
            torch.distributed.barrier()
            torch.cuda.synchronize()
            prof_host.enable()
            run(*calls[i % len(calls)])
            prof_host.disable()
        torch.cuda.synchronize()
        if rank == 0:
            pstats.Stats(prof_host).sort_stats("tottime").print_stats(25)
            pstats.Stats(prof_host).sort_stats("cumulative").print_stats(35)
    walls = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for local, windows in calls[:3]:
            torch.distributed.barrier()
            torch.cuda.synchronize()
            start = time.perf_counter()
            with record_function("sta_call"):
                run(local, windows)
            torch.cuda.synchronize()
            walls.append((time.perf_counter() - start) * 1e3)
    kernel_us = sum(e.device_time_total for e in prof.key_averages() if "sta_fwd" in e.key)
    per_rank = [None] * world
    torch.distributed.all_gather_object(per_rank, kernel_us / max(1, len(walls)) / 1e3)
    if rank == 0:
        print(f"{world} rank(s), {plan.describe()}")
        print("attention kernel ms per call, by rank:", ", ".join(f"{ms:.2f}" for ms in per_rank))
        print("wall ms per call:", ", ".join(f"{w:.2f}" for w in walls))
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
        if args.trace:
            prof.export_chrome_trace(args.trace)
    if args.timeline:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(path)
            with open(path) as f:
                mine = timeline(json.load(f)["traceEvents"])
        everyone = [None] * world
        torch.distributed.all_gather_object(everyone, mine)
        if rank == 0:
            for r, text in enumerate(everyone):
                print(f"--- rank {r}: the last call on the GPU (ms from the host's call start)\n{text}")


def timeline(events: list, shortest_ms: float = 0.02) -> str:
    """The last ``sta_call`` of a Chrome trace: every GPU kernel, copy and fill it launched
    (those under ``shortest_ms`` counted per stream), in start order, the host's waits
    longer than 0.2 ms, then the gaps in which no stream ran anything."""
    call = [e for e in events if e.get("name") == "sta_call" and e.get("cat") == "user_annotation"][-1]
    t0, t1 = call["ts"], call["ts"] + call["dur"]
    launched = {e["args"]["correlation"]: e["ts"] for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
                and t0 <= e["ts"] <= t1}
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
                  and e.get("args", {}).get("correlation") in launched), key=lambda e: e["ts"])
    lines, short = [f"host call {(t1 - t0) / 1e3:.3f} ms"], {}
    for e in gpu:
        stream, ms = e["args"].get("stream"), e["dur"] / 1e3
        if ms < shortest_ms:
            n, total = short.get(stream, (0, 0.0))
            short[stream] = (n + 1, total + ms)
            continue
        lines.append(f"{(e['ts'] - t0) / 1e3:8.3f} +{ms:7.3f}  stream {stream:<3} launched {(launched[e['args']['correlation']] - t0) / 1e3:7.3f}  {e['name'][:70]}")
    for stream, (n, total) in sorted(short.items()):
        lines.append(f"stream {stream}: {n} shorter ones, {total:.3f} ms in all")
    waits = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver", "cpu_op") and t0 <= e["ts"] <= t1
             and e.get("dur", 0) > 200 and any(w in e["name"] for w in ("Synchronize", "Memcpy", "wait", "allgather"))]
    for e in waits:  # where the host waited
        lines.append(f"host {(e['ts'] - t0) / 1e3:8.3f} +{e['dur'] / 1e3:7.3f}  {e['name'][:70]}")
    end, gaps = t0, []
    for e in gpu:
        if e["ts"] - end > shortest_ms * 1e3:
            gaps.append(f"{(end - t0) / 1e3:.3f}-{(e['ts'] - t0) / 1e3:.3f}")
        end = max(end, e["ts"] + e["dur"])
    lines.append(f"GPU idle (no stream busy): {', '.join(gaps) or 'never'}; last GPU work ends {(end - t0) / 1e3:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
