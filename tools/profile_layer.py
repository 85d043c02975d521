"""Where one distributed layer call's time goes: a few calls of a config's layer (the real
HunyuanVideo strategy by default) under torch.profiler on every rank, then rank 0 prints the
wall time per call and the GPU kernels and copies by total time. Run under torchrun (one
process is one GPU):

    torchrun --standalone --nproc-per-node 2 tools/profile_layer.py --step 16 --layers 0,1,2
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from sta_dist import DistributedSlidingTileAttention, ShardPlan
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
    args = parser.parse_args()
    env = init_distributed()
    rank, world = env.rank, env.world_size
    device = torch.device("cuda", torch.cuda.current_device())
    cfg = RunConfig.load(args.config, **(dict(text_len=0, text_valid=0) if args.no_text else {}))
    strategy = cfg.strategy()
    plan = ShardPlan.from_config(cfg, world, mode=args.mode, strategy=strategy)
    if args.window:
        plan = ShardPlan(canvas=cfg.canvas, tile=cfg.tile, text_len=cfg.text_len, mode=args.mode or "auto",
                         world_size=world, windows=(tuple(args.window),), num_heads=cfg.heads)
    attn = DistributedSlidingTileAttention(cfg.heads, cfg.head_dim, plan, cfg.kv_heads)
    calls = []
    a, _, b = args.layers.partition("-")
    layers = range(int(a), int(b) + 1) if b else map(int, args.layers.split(","))
    for layer in layers:
        windows = strategy.layer_windows(args.step, layer)
        windows = tuple(tuple(args.window) if args.window else windows[h % len(windows)] for h in range(cfg.heads))
        q, k, v = layer_inputs(cfg, args.step, layer, device)
        calls.append(([plan.shard(x, rank) for x in (q, k, v)], windows))
    run = lambda local, windows: attn(*local, window=windows, text_length=cfg.text_valid)  # noqa: E731

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


if __name__ == "__main__":
    main()
