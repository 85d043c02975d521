"""``sta-dist bench dist`` (under torchrun): one STA layer on every rank, per mode, beside
one GPU running the whole layer and the Ulysses anchor (head all-to-all + FlexAttention
with an STA block mask), all in one run; each mode's output checked against one GPU's.
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
import time

import torch
import torch.distributed as dist

from .. import geometry
from ..api import sliding_tile_attention
from ..distributed import DistributedSlidingTileAttention
from ..parallel.cost import H100_NVLINK
from ..parallel.decide import call_cost, call_mode, call_schedule, selected_call_cost
from ..parallel.env import init_distributed
from ..parallel.plan import ShardPlan
from ..testing import max_error, sampled_check
from . import anchors
from .kernel import environment


def _time_ms(fn, reps: int, device) -> float:
    """Median over ``reps`` of the slowest rank's time: barrier, run, synchronize."""
    times = []
    for _ in range(reps):
        dist.barrier()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        t = torch.tensor([(time.perf_counter() - start) * 1e3], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times.append(t.item())
    return statistics.median(times)


def _time_variants(fns, reps: int, device) -> list[float]:
    """Median ms of each of ``fns``, interleaved rep by rep so that clock drift falls on
    all alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            ts.append(_time_ms(fn, 1, device))
    return [statistics.median(ts) for ts in times]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ulysses_flex(q, k, v, canvas, tile, windows, world: int, rank: int, device):
    """The anchor: tokens in tiled order split in equal contiguous chunks; all-to-all to
    all tokens x H/P heads; FlexAttention-STA; all-to-all back. Returns (run, local_run)."""
    H, P = q.shape[2], world
    n_video = geometry.volume(canvas)
    order = geometry.tiled_permutation(canvas, tile).to(device)
    chunk = n_video // P
    mine = order[rank * chunk:(rank + 1) * chunk]
    local = [x[:, mine].contiguous() for x in (q, k, v)]  # [B, n, H, D]
    flex = anchors.FlexSTA(canvas, tile, 0, 0, H // P, device).set_windows(windows[: H // P])

    def to_heads(x):
        B, n, _, D = x.shape
        send = x.reshape(B, n, P, H // P, D).permute(2, 0, 1, 3, 4).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send)
        return recv.permute(1, 3, 0, 2, 4).reshape(B, H // P, P * n, D)  # [B, H/P, S, D]

    def to_tokens(o):
        B, h, S, D = o.shape
        send = o.reshape(B, h, P, S // P, D).permute(2, 0, 3, 1, 4).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send)
        return recv.permute(1, 2, 0, 3, 4).reshape(B, S // P, H, D)

    heads_in = [to_heads(x) for x in local]

    def run():
        return to_tokens(flex(*[to_heads(x) for x in local]))

    def local_run():
        return flex(*heads_in)

    return run, local_run


def _measure_mode(mode, canvas, tile, window, text_len, text_valid, heads, head_dim, world, rank, qkv, one,
                  reps, device, select=None, head_chunks: int = 1) -> tuple[str, dict]:
    """One mode's layer: its output against one GPU's (max over ranks), then its time."""
    plan = ShardPlan(canvas=canvas, tile=tile, text_len=text_len, mode=mode, world_size=world,
                     windows=(tuple(window),), num_heads=heads, selected_tiles=getattr(select, "k", None),
                     head_chunks=head_chunks)
    attn = DistributedSlidingTileAttention(heads, head_dim, plan)
    windows = (tuple(window),) * heads
    local = [plan.shard(x, rank) for x in qkv]
    call = attn if select is None else functools.partial(attn, select=select)
    out = call(*local, window=windows, text_length=text_valid)
    diff = torch.tensor([max_error(out, plan.shard(one, rank))], device=device)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    attn.comm.bytes_sent.clear()

    def run(overlap: bool = True, checked: bool = True):
        attn.comm.check_calls = checked  # False: without the per-call agreement check
        try:
            return call(*local, window=windows, text_length=text_valid, overlap=overlap)
        finally:
            attn.comm.check_calls = True

    # the default; unchecked; the executor's staged order (each exchange waited for first)
    ms, ms_unchecked, ms_staged = _time_variants([run, lambda: run(checked=False), lambda: run(overlap=False)],
                                                 reps, device)
    sent = {step: n / (3 * reps) for step, n in attn.comm.bytes_sent.items()}  # three calls a rep
    extra = {}
    if select is not None:  # a new selection every call, as in a denoising run: nothing cached by tile set helps
        times = []
        for j in range(reps):
            k_j = rolled_video(local[1], text_len, math.prod(tile) * (j + 1))
            times.append(_time_ms(lambda: call(local[0], k_j, local[2], window=windows, text_length=text_valid), 1,
                                  device))
        extra["ms_new_selection_each_call"] = statistics.median(times)
    itemsize = qkv[0].element_size()
    if select is None:
        predicted = call_cost(plan, windows, heads, 1, head_dim, itemsize, text_valid).time_ms(H100_NVLINK)
    else:  # the expected selection: the model does not look at the data
        predicted = selected_call_cost(plan, windows, "sta", select, heads, heads, 1, head_dim, itemsize,
                                       text_valid).time_ms(H100_NVLINK)
    return f"sta_dist {mode} mesh={plan.mesh}", dict(ms=ms, ms_without_call_check=ms_unchecked, ms_staged=ms_staged,
                                                     predicted_ms=predicted,
                                                     max_diff_vs_one_gpu=diff.item(), bytes_sent_per_rank=sent,
                                                     call_mode=call_mode(plan, windows, heads, rank, 1, head_dim, itemsize,
                                                                         text_valid),
                                                     head_chunks=call_schedule(plan, windows, heads, rank).head_chunks,
                                                     **extra)


def rolled_video(x_bshd: torch.Tensor, text_len: int, shift: int) -> torch.Tensor:
    """``x`` with its video rows rolled by ``shift`` (a tile's tokens: other tile means, so
    another selection), the text rows kept."""
    n = x_bshd.shape[1] - text_len
    return torch.cat([x_bshd[:, :n].roll(shift, 1), x_bshd[:, n:]], 1)


def run_dist_bench(out_dir: str, canvas=(30, 48, 80), tile=(6, 8, 8), window=(3, 3, 3), heads: int = 24,
                   head_dim: int = 128, text_len: int = 0, text_valid: int = 0, reps: int = 10,
                   modes=("head", "tile", "hybrid"), with_anchor: bool = True, select=None,
                   head_chunks: int = 1) -> dict:
    """``select`` (``TopK`` / ``Mass``): every row, one GPU included, is window plus selected
    tiles (selection included); a row of the window alone on one GPU is added, and the
    Ulysses anchor left out."""
    env = init_distributed()
    rank, world = env.rank, env.world_size
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    S = geometry.volume(canvas) + text_len
    q, k, v = (torch.randn(1, S, heads, head_dim, generator=g, device=device, dtype=dtype) for _ in range(3))
    windows = (tuple(window),) * heads
    kw = dict(canvas=canvas, tile=tile, window=list(windows), text_length=text_valid)

    rows = {}
    if select is not None:
        rows["one GPU, window alone"] = dict(ms=_time_ms(lambda: sliding_tile_attention(q, k, v, **kw), reps, device))
        kw = dict(kw, select=select)
    one, tiles = (sliding_tile_attention(q, k, v, **kw), None) if select is None else \
        sliding_tile_attention(q, k, v, **kw, return_selection=True)
    check = sampled_check(q, k, v, one, **kw, selection=tiles) if rank == 0 else {}
    del tiles
    rows["one GPU (ours, all heads)"] = dict(ms=_time_ms(lambda: sliding_tile_attention(q, k, v, **kw), reps, device))
    for mode in modes:
        name, row = _measure_mode(mode, canvas, tile, window, text_len, text_valid, heads, head_dim, world, rank,
                                  (q, k, v), one, reps, device, select, head_chunks)
        rows[name] = row
    if with_anchor and select is None and device.type == "cuda" and heads % world == 0 and text_len == 0:
        run, local_run = ulysses_flex(q, k, v, canvas, tile, windows, world, rank, device)
        rows["Ulysses all-to-all + FlexAttention-STA (anchor)"] = dict(ms=_time_ms(run, reps, device))
        rows["  of which the local FlexAttention-STA"] = dict(ms=_time_ms(local_run, reps, device))
    result = dict(env=environment() if device.type == "cuda" else dict(card="cpu"), world_size=world,
                  canvas=canvas, tile=tile, window=window, heads=heads, text_len=text_len,
                  select=None if select is None else repr(select), one_gpu_check=check, rows=rows)
    if rank == 0:
        one_ms = rows["one GPU (ours, all heads)"]["ms"]
        print(f"| what ({world} ranks, {result['env'].get('card')}) | ms | speedup vs one GPU | max diff vs one GPU "
              f"| ms without the per-call check | ms staged (not overlapped) | predicted ms (H100 model) |")
        print("|---|---|---|---|---|---|---|")
        for name, r in rows.items():
            diff = f"{r['max_diff_vs_one_gpu']:.2e}" if "max_diff_vs_one_gpu" in r else ""
            unchecked, staged, predicted = (f"{r[key]:.2f}" if key in r else ""
                                            for key in ("ms_without_call_check", "ms_staged", "predicted_ms"))
            print(f"| {name} | {r['ms']:.2f} | {one_ms / r['ms']:.2f}x | {diff} | {unchecked} | {staged} | {predicted} |")
        print("one GPU output vs fp32 reference:", check)
        os.makedirs(out_dir, exist_ok=True)
        suffix = "" if select is None else "_selected"
        with open(os.path.join(out_dir, f"dist_bench_{world}{suffix}.json"), "w") as f:
            json.dump(result, f, indent=1)
    dist.barrier()
    return result
