"""Time the Triton backward's block configs on one GPU (HunyuanVideo 30x48x80, 24 heads,
D=128, bf16, window (3,3,3), tiled order): forward+backward per config of the dq and
dk/dv kernels (``kernels/sta_bwd.py`` ``backward_config``), each config's gradients
against the default's. Prints a table; the fastest config first.

    python tools/bwd_configs.py [--reps-ms 150] [--budget-s 240]
"""

from __future__ import annotations

import argparse
import time

import torch

import sta_dist
from sta_dist.bench.common import HUNYUAN, TILE, time_ms
from sta_dist.kernels import sta_bwd

HEADS, D = 24, 128


def configs():
    """dq: a query block of BLOCK_M rows over key blocks of BLOCK_N; dk/dv the other way."""
    dq = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
          for m, n, w, s in ((64, 64, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3))]
    kv = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
          for m, n, w, s in ((64, 64, 8, 2), (64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3))]
    return dq, kv


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps-ms", type=float, default=150.0)
    ap.add_argument("--budget-s", type=float, default=240.0)
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    S = HUNYUAN[0] * HUNYUAN[1] * HUNYUAN[2]
    q, k, v, dout = (torch.randn(1, S, HEADS, D, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    kw = dict(canvas=HUNYUAN, tile=TILE, window=(3, 3, 3), layout="tiled", backend="triton")
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    default = sta_bwd.backward_config

    def grads():
        return torch.autograd.grad(sta_dist.sliding_tile_attention(*xs, **kw), xs, dout)

    def fwd():
        with torch.no_grad():
            sta_dist.sliding_tile_attention(*xs, **kw)

    f_ms = time_ms(fwd, min_rep_ms=args.reps_ms)
    ref = grads()
    dq_cfgs, kv_cfgs = configs()
    # each kernel's configs beside the other's default, then the best pair
    trials = [(c, kv_cfgs[0]) for c in dq_cfgs] + [(dq_cfgs[0], c) for c in kv_cfgs[1:]]
    rows, start = [], time.perf_counter()
    for dq_cfg, kv_cfg in trials + [None]:
        if time.perf_counter() - start > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent; {len(rows)} configs timed")
            break
        if dq_cfg is None:  # the best of each kernel together
            best_dq = min((r for r in rows if r[1] == kv_cfgs[0]), key=lambda r: r[2])[0]
            best_kv = min((r for r in rows if r[0] == dq_cfgs[0]), key=lambda r: r[2])[1]
            dq_cfg, kv_cfg = best_dq, best_kv
        sta_bwd.backward_config = lambda *a, _p=(dq_cfg, kv_cfg): {"dq": dict(_p[0]), "dkdv": dict(_p[1])}
        try:
            got = grads()
            err = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, ref))
            fb = time_ms(lambda: grads(), min_rep_ms=args.reps_ms)
        except Exception as e:  # a config that does not compile or fit
            print(f"dq {dq_cfg} dkdv {kv_cfg}: {type(e).__name__}: {str(e)[:120]}")
            continue
        finally:
            sta_bwd.backward_config = default
        rows.append((dq_cfg, kv_cfg, fb, err))
        print(f"dq {dq_cfg} dkdv {kv_cfg}: fwd+bwd {fb:.2f} ms (bwd {fb - f_ms:.2f}), max |diff| vs default {err:.3g}",
              flush=True)
    print(f"forward alone {f_ms:.2f} ms")
    print("| dq (M,N,warps,stages) | dk/dv (M,N,warps,stages) | fwd+bwd ms | bwd ms |")
    print("|---|---|---|---|")
    for dq_cfg, kv_cfg, fb, _ in sorted(rows, key=lambda r: r[2]):
        name = lambda c: ",".join(str(c[x]) for x in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))  # noqa: E731
        print(f"| {name(dq_cfg)} | {name(kv_cfg)} | {fb:.2f} | {fb - f_ms:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
