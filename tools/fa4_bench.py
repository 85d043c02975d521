"""FlashAttention-4 as an anchor beside our kernel (issue 15 item 5), on one GPU.

HunyuanVideo 30x48x80, 24 heads, head dim 128, bf16, tile (6,8,8): window (3,3,3) and the
whole canvas (5,6,10), the cases ``hunyuan_333`` and ``hunyuan_full`` of ``sta-dist bench
kernel``. Every row is timed (median ms, device events, ``bench.common.time_ms``) and its
output checked against the reference on sampled rows (``sta_dist.testing.sampled_check``):

- ``ours``: ``sta_dist.sliding_tile_attention`` (natural token order);
- ``flex_triton``: FlexAttention-STA, its Triton kernel (the existing anchor, tiled order);
- ``flex_flash``: the same block mask through FlexAttention's FLASH backend (FA4's CuTe-DSL
  forward kernel, the ``mask_mod`` compiled to CuTe-DSL);
- ``fa4_sparse``: FA4 called directly, block-sparse over the same block mask (tiled order);
- ``fa4_dense``, ``cudnn``: dense attention, FA4 and SDPA cuDNN (whole-canvas cases only).

Each row runs in its own try: one that fails (FA4 not installed, a compile error) records
its error and the rest still run. Beside each time: the first call's seconds (compiles)
and the kernels one call launched (the profiler's top names, proof of which kernel ran).
A table on stdout; ``fa4_bench.json`` in ``--out``, rewritten after every row.

    python3 tools/fa4_bench.py [--out out] [--cases hunyuan_333,hunyuan_full] [--rows ours,fa4_sparse]
    ncu --nvtx --nvtx-include "profile/" ... python3 tools/fa4_bench.py --rows ours,fa4_sparse --once
        # --once: per row a warm-up call, then one call inside the NVTX range "profile", no timing
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from importlib import metadata

import torch

from sta_dist import geometry, sliding_tile_attention, to_natural
from sta_dist.bench import anchors
from sta_dist.bench.common import time_ms
from sta_dist.bench.kernel import STANDARD_CASES, flex_anchor, attended_pairs, environment
from sta_dist.testing import sampled_check

CASES = ("hunyuan_333", "hunyuan_full")
PACKAGES = ("flash-attn-4", "nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-base", "nvidia-cutlass-dsl-libs-cu13",
            "quack-kernels", "apache-tvm-ffi", "cuda-bindings")


@functools.lru_cache(maxsize=4)
def flex_flash(canvas, tile, text_len, text_valid, heads) -> anchors.FlexSTA:
    """One FLASH-backend FlexAttention anchor per problem shape (as ``bench.kernel.flex_anchor``)."""
    return anchors.FlexSTA(canvas, tile, text_len, text_valid, heads, "cuda", backend="FLASH")


def whole_canvas(case) -> bool:
    grid = geometry.grid_shape(case.canvas, case.tile)
    return case.text_len == 0 and all(geometry.effective_window(w, grid) == grid for w in case.windows)


def kernel_names(fn, top: int = 3) -> list:
    """The CUDA kernels one call of ``fn`` launches, most device time first."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        times: dict = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                times[e.name] = times.get(e.name, 0) + e.time_range.elapsed_us()
        return [name[:100] for name, _ in sorted(times.items(), key=lambda x: -x[1])[:top]]
    except Exception as err:  # the profiler is a nicety, never a failure of the row
        return [f"(profiler: {type(err).__name__})"]


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return dict(out, cuda=torch.version.cuda, fa4=anchors.fa4_missing() or "imports")


def run_case(case, result: dict, save, dtype=torch.bfloat16, seed: int = 0, device: str = "cuda", rows=None,
             once: bool = False) -> None:
    """Every row of one case (or those named in ``rows``) into ``result["rows"]``; ``save()``
    after each. ``once``: each row's output checked, then one call in the NVTX range
    "profile" (for a profiler), no timing."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (1, case.seq, case.heads, case.head_dim)
    q, k, v = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3))
    kw = dict(canvas=case.canvas, tile=case.tile, window=list(case.windows), text_length=case.text_valid)
    n_video = geometry.volume(case.canvas)
    order = torch.cat([geometry.tiled_permutation(case.canvas, case.tile).to(device),
                       torch.arange(n_video, case.seq, device=device)])
    pairs = result["pairs"] = attended_pairs(case)

    def tiled_bhsd():
        return [x[:, order].transpose(1, 2).contiguous() for x in (q, k, v)]

    def from_tiled_bhsd(o):
        return to_natural(o.transpose(1, 2), case.canvas, case.tile)

    def ours():
        return (lambda: sliding_tile_attention(q, k, v, **kw)), (lambda o: o)

    def flex_with(factory):
        def make():
            flex = factory(case.canvas, case.tile, case.text_len, case.text_valid, case.heads).set_windows(case.windows)
            qt, kt, vt = tiled_bhsd()
            return (lambda: flex(qt, kt, vt)), from_tiled_bhsd
        return make

    def fa4_sparse():
        fa4 = anchors.FA4(flex_anchor(case.canvas, case.tile, case.text_len, case.text_valid,
                                case.heads).set_windows(case.windows).block_mask)
        qt, kt, vt = (x[:, order].contiguous() for x in (q, k, v))
        return (lambda: fa4(qt, kt, vt)), (lambda o: to_natural(o, case.canvas, case.tile))

    def fa4_dense():
        fa4 = anchors.FA4()
        return (lambda: fa4(q, k, v)), (lambda o: o)

    def cudnn():
        dense = anchors.sdpa("cudnn")
        qd, kd, vd = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        return (lambda: dense(qd, kd, vd)), (lambda o: o.transpose(1, 2))

    makers = dict(ours=ours, flex_triton=flex_with(flex_anchor), flex_flash=flex_with(flex_flash),
                  fa4_sparse=fa4_sparse)
    if whole_canvas(case):
        makers.update(fa4_dense=fa4_dense, cudnn=cudnn)
    if rows:
        makers = {name: make for name, make in makers.items() if name in rows}

    def measure(make) -> dict:
        fn, natural = make()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        first_s = time.perf_counter() - start
        check = sampled_check(q, k, v, natural(out), **kw, seed=seed)
        del out
        if once:
            torch.cuda.synchronize()
            with torch.cuda.nvtx.range("profile"):
                fn()
            torch.cuda.synchronize()
            return dict(ms=float("nan"), tflops=float("nan"), first_call_s=first_s, check=check, kernels=[])
        ms = time_ms(fn)
        return dict(ms=ms, tflops=4 * pairs * case.head_dim / (ms * 1e-3) / 1e12, first_call_s=first_s,
                    check=check, kernels=kernel_names(fn))

    for name, make in makers.items():
        try:
            row = measure(make)
        except Exception as err:  # one anchor's failure is its row's result
            row = dict(error=f"{type(err).__name__}: {err}"[:600])
        torch.cuda.empty_cache()
        result["rows"][name] = row
        print(f"{case.name} {name}: " + (f"{row['ms']:.2f} ms ok={row['check']['ok']} first call "
                                         f"{row['first_call_s']:.1f} s {row['kernels'][:1]}"
                                         if "ms" in row else row["error"]), flush=True)
        save()


def format_table(results) -> str:
    lines = ["| case | row | ms | TFLOP/s | / ours | err / bound | ok | first call s | top kernel |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ours = r["rows"].get("ours", {}).get("ms")
        for name, row in r["rows"].items():
            if "ms" not in row:
                lines.append(f"| {r['name']} | {name} | error: {row['error'][:120]} | | | | | | |")
                continue
            c = row["check"]
            ratio = f"{row['ms'] / ours:.2f}x" if ours else ""
            lines.append(f"| {r['name']} | {name} | {row['ms']:.2f} | {row['tflops']:.0f} | {ratio} | "
                         f"{c['error']:.2e} / {c['bound']:.2e} | {'yes' if c['ok'] else 'NO'} | "
                         f"{row['first_call_s']:.1f} | {row['kernels'][0][:60] if row['kernels'] else ''} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {sorted(STANDARD_CASES)}")
    parser.add_argument("--rows", default="", help="comma-separated rows to run (default: all)")
    parser.add_argument("--once", action="store_true", help="one profiled call per row (NVTX range 'profile')")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tools/fa4_bench.py needs a CUDA device")
    os.makedirs(args.out, exist_ok=True)
    payload: dict = dict(env=dict(environment(), **versions()), results=[])
    print("env:", json.dumps(payload["env"]), flush=True)
    path = os.path.join(args.out, "fa4_bench.json")

    def save():
        with open(path, "w") as f:
            json.dump(payload, f, indent=1)

    for name in args.cases.split(","):
        payload["results"].append(dict(name=name, rows={}))  # filled in place as rows come
        run_case(STANDARD_CASES[name], payload["results"][-1], save, rows=[r for r in args.rows.split(",") if r],
                 once=args.once)
    print(format_table(payload["results"]))


if __name__ == "__main__":
    main()
