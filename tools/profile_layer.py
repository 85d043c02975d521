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
    args = parser.parse_args()
    env = init_distributed()
    rank, world = env.rank, env.world_size
    device = torch.device("cuda", torch.cuda.current_device())
    cfg = RunConfig.load(args.config)
    strategy = cfg.strategy()
    plan = ShardPlan.from_config(cfg, world, mode=args.mode, strategy=strategy)
    attn = DistributedSlidingTileAttention(cfg.heads, cfg.head_dim, plan, cfg.kv_heads)
    calls = []
    a, _, b = args.layers.partition("-")
    layers = range(int(a), int(b) + 1) if b else map(int, args.layers.split(","))
    for layer in layers:
        windows = strategy.layer_windows(args.step, layer)
        windows = tuple(windows[h % len(windows)] for h in range(cfg.heads))
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

    first = [timed(*c) for c in calls]  # each window set met for the first time (caches, compiles)
    again = [timed(*c) for c in calls]
    if rank == 0:
        print(f"mean wall ms per call: first time {sum(first) / len(first):.2f}, again {sum(again) / len(again):.2f} "
              f"({len(calls)} calls)")
    walls = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for local, windows in calls[:3]:
            torch.distributed.barrier()
            torch.cuda.synchronize()
            start = time.perf_counter()
            run(local, windows)
            torch.cuda.synchronize()
            walls.append((time.perf_counter() - start) * 1e3)
    if rank == 0:
        print(f"{world} rank(s), {plan.describe()}")
        print("wall ms per call:", ", ".join(f"{w:.2f}" for w in walls))
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
        if args.trace:
            prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
