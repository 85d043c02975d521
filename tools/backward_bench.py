"""The backward on one GPU (issue 30): (a) the Triton backward's gradients against the
reference's autograd at a small shape in bf16 (bound: twice the bf16 reference's own error
vs float64, plus one ulp), through the public call on ``backend="auto"`` (on Hopper: the
CUDA forward, the Triton backward) and ``"triton"``; (b) forward and forward+backward time
at HunyuanVideo 30x48x80, tile 6x8x8, 24 heads, D=128, bf16, window (3,3,3), without and
with 256 text tokens, beside FlexAttention-STA's with the same block mask
(:class:`sta_dist.bench.anchors.FlexSTA`), in the same process. Tokens in tiled order for
both (Flex's best case). TFLOP/s count the forward's attended FLOPs ``4*B*H*pairs*D`` and
2.5 times that for the backward.

    python3 tools/backward_bench.py [--skip-check] [--reps-ms 200] [--step-timeout 300]
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from contextlib import contextmanager

import torch

import sta_dist
from sta_dist.bench import anchors
from sta_dist.bench.common import HUNYUAN, TILE, time_ms
from sta_dist.bench.kernel import attended_pairs, uniform
from sta_dist.testing import error_bound, max_error, reference_attention

HEADS, HEAD_DIM = 24, 128


@contextmanager
def time_guard(seconds: int, what: str):
    """Abandon a step that runs past ``seconds`` (checked between Python calls)."""
    def expire(*_):
        raise TimeoutError(f"{what}: past its {seconds} s guard")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def grads_of(fn, q, k, v, dout, dlse):
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = fn(*xs)
    loss = (out.double() * dout).sum() + (torch.where(torch.isfinite(lse), lse.double(), 0.0) * dlse).sum()
    return torch.autograd.grad(loss, xs)


def check(backend: str) -> bool:
    """Small bf16 problem with GQA, per-head windows, partial-free whole tiles and text."""
    canvas, tile, L, valid = (12, 16, 24), (6, 8, 8), 40, 33
    kw = dict(canvas=canvas, tile=tile, window=[(1, 1, 3), (2, 2, 1), (2, 1, 2), (1, 2, 3)], text_length=valid)
    g = torch.Generator(device="cuda").manual_seed(0)
    S = canvas[0] * canvas[1] * canvas[2] + L
    q = torch.randn(1, S, 4, HEAD_DIM, generator=g, device="cuda").bfloat16()
    k, v = (torch.randn(1, S, 2, HEAD_DIM, generator=g, device="cuda").bfloat16() for _ in range(2))
    dout = torch.randn(q.shape, generator=g, device="cuda", dtype=torch.float64)
    dlse = torch.randn(1, 4, S, generator=g, device="cuda", dtype=torch.float64)

    def ref(dtype):
        return lambda *xs: reference_attention(*(x.to(dtype) for x in xs), **kw, compute_dtype=dtype,
                                               return_lse=True)

    exact = grads_of(ref(torch.float64), q, k, v, dout, dlse)
    base = grads_of(ref(torch.bfloat16), q, k, v, dout, dlse)
    got = grads_of(lambda *xs: sta_dist.sliding_tile_attention(*xs, **kw, backend=backend, return_lse=True),
                   q, k, v, dout, dlse)
    ok = True
    for name, x, b, r in zip(("dq", "dk", "dv"), got, base, exact):
        err, bound = max_error(x, r), error_bound(max_error(b, r), torch.bfloat16, r)
        ok &= err <= bound
        print(f"  check backend={backend} {name}: error {err:.3g}, bound {bound:.3g} "
              f"({'ok' if err <= bound else 'FAILED'})")
    return ok


def bench(text: int, reps_ms: float) -> list[tuple]:
    case = uniform("hunyuan_333" + ("_text" if text else ""), HUNYUAN, (3, 3, 3), heads=HEADS, text_len=text,
                   text_valid=text)
    fwd_flops = 4 * attended_pairs(case) * HEAD_DIM
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, case.seq, HEADS, HEAD_DIM)
    q, k, v, dout = (torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    kw = dict(canvas=HUNYUAN, tile=TILE, window=(3, 3, 3), text_length=text, layout="tiled")
    flex = anchors.FlexSTA(HUNYUAN, TILE, text, text, HEADS, "cuda").set_windows([(3, 3, 3)] * HEADS)
    ours_in = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    flex_in = [x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v)]
    flex_dout = dout.transpose(1, 2).contiguous()

    def ours_fwd():
        with torch.no_grad():
            sta_dist.sliding_tile_attention(*ours_in, **kw)

    def ours_fwd_bwd():
        out = sta_dist.sliding_tile_attention(*ours_in, **kw)
        torch.autograd.grad(out, ours_in, dout)

    def flex_fwd():
        with torch.no_grad():
            flex(*flex_in)

    def flex_fwd_bwd():
        torch.autograd.grad(flex(*flex_in), flex_in, flex_dout)

    route = sta_dist.route_of(q, k, v, **kw)
    print(f"  {case.name}: route {route.describe()}; {route.describe_backward()}")
    rows = []
    times = {}
    for name, fwd, both in (("sta_dist", ours_fwd, ours_fwd_bwd), ("flex", flex_fwd, flex_fwd_bwd)):
        times[name] = (time_ms(fwd, min_rep_ms=reps_ms), time_ms(both, min_rep_ms=reps_ms))
    for name, (f_ms, fb_ms) in times.items():
        bwd_ms = fb_ms - f_ms
        rows.append((case.name, name, f_ms, fb_ms, bwd_ms, fwd_flops / (f_ms * 1e9),
                     3.5 * fwd_flops / (fb_ms * 1e9), 2.5 * fwd_flops / (bwd_ms * 1e9),
                     times["flex"][1] / fb_ms))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--reps-ms", type=float, default=200.0, help="time per measurement (ms)")
    p.add_argument("--step-timeout", type=int, default=300, help="seconds each step may take")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    ok = True
    if not args.skip_check:
        print("(a) gradients against the reference's autograd, bf16:")
        for backend in ("auto", "triton"):
            try:
                with time_guard(args.step_timeout, f"check {backend}"):
                    ok &= check(backend)
            except Exception as err:  # report and go on to the timings
                print(f"  check backend={backend}: {type(err).__name__}: {err}")
                ok = False
    print("(b) HunyuanVideo 30x48x80, tile 6x8x8, 24 heads, D=128, bf16, window (3,3,3):")
    rows = []
    for text in (0, 256):
        start = time.perf_counter()
        try:
            with time_guard(args.step_timeout, f"bench text={text}"):
                rows += bench(text, args.reps_ms)
        except Exception as err:
            print(f"  text={text}: {type(err).__name__}: {err}")
            ok = False
        print(f"  (step took {time.perf_counter() - start:.0f} s)")
    header = ("case", "impl", "fwd ms", "fwd+bwd ms", "bwd ms", "fwd TF/s", "fwd+bwd TF/s", "bwd TF/s",
              "flex/ours fwd+bwd")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join([r[0], r[1]] + [f"{x:.2f}" for x in r[2:5]] + [f"{x:.0f}" for x in r[5:8]] + [f"{r[8]:.2f}x"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
