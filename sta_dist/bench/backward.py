"""The backward on one GPU (issue 30): (a) the gradients against the reference's autograd
at a small shape in bf16 (bound: twice the bf16 reference's own error vs float64, plus one
ulp), through the public call on ``backend="auto"`` (on Hopper the CUDA forward and the
route's backward: the CUDA one where STA_DIST_CUDA_BACKWARD=1, else Triton) in tiled and
natural order, and on ``"triton"``; (b) forward and forward+backward time
at HunyuanVideo 30x48x80, tile 6x8x8, 24 heads, D=128, bf16, window (3,3,3), without and
with 256 text tokens, beside FlexAttention-STA's with the same block mask
(:class:`sta_dist.bench.anchors.FlexSTA`), in the same process. Tokens in tiled order for
both (Flex's best case). TFLOP/s count the forward's attended FLOPs ``4*B*H*pairs*D`` and
2.5 times that for the backward (dense rows: their own FLOPs; their times scaled by the
attended fraction). With ``TopK(8)`` selected tiles beside the window, our
forward+backward alone (FlexAttention's STA block mask has no selection).

    sta-dist bench kernel --backward [--skip-check] [--reps-ms 200] [--step-timeout 300]
"""

from __future__ import annotations

import signal
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


def check(backend: str, layout: str = "natural") -> bool:
    """Small bf16 problem with GQA, per-head windows, partial-free whole tiles and text,
    the tokens in ``layout`` order (the reference's in natural order, the same tokens)."""
    canvas, tile, L, valid = (12, 16, 24), (6, 8, 8), 40, 33
    kw = dict(canvas=canvas, tile=tile, window=[(1, 1, 3), (2, 2, 1), (2, 1, 2), (1, 2, 3)], text_length=valid)
    order = (lambda x: sta_dist.to_tiled(x, canvas, tile)) if layout == "tiled" else (lambda x: x)
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
    def ours(*xs):
        out, lse = sta_dist.sliding_tile_attention(*map(order, xs), **kw, backend=backend, layout=layout,
                                                   return_lse=True)
        if layout == "tiled":
            out, lse = sta_dist.to_natural(out, canvas, tile), sta_dist.to_natural(lse.transpose(1, 2), canvas,
                                                                                  tile).transpose(1, 2)
        return out, lse

    got = grads_of(ours, q, k, v, dout, dlse)
    ok = True
    for name, x, b, r in zip(("dq", "dk", "dv"), got, base, exact):
        err, bound = max_error(x, r), error_bound(max_error(b, r), torch.bfloat16, r)
        ok &= err <= bound
        print(f"  check backend={backend} layout={layout} {name}: error {err:.3g}, bound {bound:.3g} "
              f"({'ok' if err <= bound else 'FAILED'})")
    return ok


def bench_selected(reps_ms: float) -> list[tuple]:
    """Window (3,3,3) plus ``TopK(8)`` at the HunyuanVideo shape: our forward and
    forward+backward (the FLOPs of the tiles each query tile attended)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    S = HUNYUAN[0] * HUNYUAN[1] * HUNYUAN[2]
    q, k, v, dout = (torch.randn(1, S, HEADS, HEAD_DIM, generator=g, device="cuda", dtype=torch.bfloat16)
                     for _ in range(4))
    kw = dict(canvas=HUNYUAN, tile=TILE, window=(3, 3, 3), select=sta_dist.TopK(8), layout="tiled")
    with torch.no_grad():
        _, attended = sta_dist.sliding_tile_attention(q, k, v, **kw, return_selection=True)
    tile_tokens = TILE[0] * TILE[1] * TILE[2]  # whole tiles at this shape
    fwd_flops = 4 * int(attended.sum()) * (HEADS if attended.shape[1] == 1 else 1) * tile_tokens ** 2 * HEAD_DIM
    ours_in = [x.detach().clone().requires_grad_() for x in (q, k, v)]

    def fwd():
        with torch.no_grad():
            sta_dist.sliding_tile_attention(*ours_in, **kw)

    def fwd_bwd():
        torch.autograd.grad(sta_dist.sliding_tile_attention(*ours_in, **kw), ours_in, dout)

    f_ms, fb_ms = time_ms(fwd, min_rep_ms=reps_ms), time_ms(fwd_bwd, min_rep_ms=reps_ms)
    return [("hunyuan_333_topk8", "sta_dist", f_ms, fb_ms, fb_ms - f_ms, fwd_flops / (f_ms * 1e9),
             3.5 * fwd_flops / (fb_ms * 1e9), 2.5 * fwd_flops / ((fb_ms - f_ms) * 1e9), float("nan"))]


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


def bench_dense(reps_ms: float) -> list[tuple]:
    """Dense attention forward and forward+backward at the HunyuanVideo shape (no text)
    through SDPA's cuDNN and flash backends; the rows' "scaled" columns are their times
    times the fraction of the score matrix that window (3,3,3) attends (the issue's bar:
    our forward+backward at least 0.9x of that)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    case = uniform("hunyuan_333", HUNYUAN, (3, 3, 3), heads=HEADS)
    fraction = attended_pairs(case) / (HEADS * case.seq ** 2)
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, HEADS, case.seq, HEAD_DIM)
    q, k, v, dout = (torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    xs = [x.requires_grad_() for x in (q, k, v)]
    dense_flops = 4 * HEADS * case.seq ** 2 * HEAD_DIM
    rows = []
    for name, backend in (("dense_cudnn", SDPBackend.CUDNN_ATTENTION), ("dense_flash", SDPBackend.FLASH_ATTENTION)):
        def fwd():
            with torch.no_grad(), sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(*xs)

        def fwd_bwd():
            with sdpa_kernel(backend):
                out = torch.nn.functional.scaled_dot_product_attention(*xs)
            torch.autograd.grad(out, xs, dout)

        f_ms, fb_ms = time_ms(fwd, min_reps=3, min_rep_ms=reps_ms), time_ms(fwd_bwd, min_reps=3, min_rep_ms=reps_ms)
        rows.append((f"{name} (x{fraction:.4f} attended)", name, f_ms * fraction, fb_ms * fraction,
                     (fb_ms - f_ms) * fraction, dense_flops / (f_ms * 1e9), 3.5 * dense_flops / (fb_ms * 1e9),
                     2.5 * dense_flops / ((fb_ms - f_ms) * 1e9), float("nan")))
    return rows


def run(skip_check: bool = False, reps_ms: float = 200.0, step_timeout: int = 300) -> int:
    """The check, then the timings; prints a table. 0 when every check passed and every step ran."""
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    ok = True
    if not skip_check:
        print("(a) gradients against the reference's autograd, bf16:")
        for backend, layout in (("auto", "tiled"), ("auto", "natural"), ("triton", "tiled")):
            try:
                with time_guard(step_timeout, f"check {backend}"):
                    ok &= check(backend, layout)
            except Exception as err:  # report and go on to the timings
                print(f"  check backend={backend}: {type(err).__name__}: {err}")
                ok = False
    print("(b) HunyuanVideo 30x48x80, tile 6x8x8, 24 heads, D=128, bf16, window (3,3,3):")
    rows = []
    for name, step in (("text=0", lambda: bench(0, reps_ms)), ("text=256", lambda: bench(256, reps_ms)),
                       ("TopK(8)", lambda: bench_selected(reps_ms)), ("dense", lambda: bench_dense(reps_ms))):
        start = time.perf_counter()
        try:
            with time_guard(step_timeout, f"bench {name}"):
                rows += step()
        except Exception as err:
            print(f"  {name}: {type(err).__name__}: {err}")
            ok = False
        print(f"  ({name}: step took {time.perf_counter() - start:.0f} s)")
    header = ("case", "impl", "fwd ms", "fwd+bwd ms", "bwd ms", "fwd TF/s", "fwd+bwd TF/s", "bwd TF/s",
              "flex/ours fwd+bwd")
    print("| " + " | ".join(header) + " |")
    for r in rows:
        ratio = "" if r[8] != r[8] else f"{r[8]:.2f}x"
        print("| " + " | ".join([r[0], r[1]] + [f"{x:.2f}" for x in r[2:5]] + [f"{x:.0f}" for x in r[5:8]] + [ratio])
              + " |")
    ours = {r[0]: r[3] for r in rows if r[1] == "sta_dist"}
    for r in rows:
        if r[1].startswith("dense") and "hunyuan_333" in ours:
            print(f"  {r[1]} fwd+bwd scaled by the attended fraction: {r[3]:.2f} ms; "
                  f"that / ours (hunyuan_333) = {r[3] / ours['hunyuan_333']:.2f}x (the bar: 0.9x)")
    return 0 if ok else 1
