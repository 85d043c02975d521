"""The Hopper backward (``kernels/sta_bwd_cuda.cu``) on the GPU: gradients against the
reference's float64 autograd (bound: twice the dtype reference's own error, plus one ulp)
through the public call in tiled order (per-head windows, GQA, text with valid rows, the
lse output), the table path (TopK), a tile-mode rank's packed problem, and the route
naming the kernel. Skipped without a Hopper GPU."""

import pytest
import torch

import sta_dist
from sta_dist.backward import backward_kernel, local_backward
from sta_dist.local import LocalHeads, LocalText
from sta_dist.testing import error_bound, max_error, reference_attention
from tests.hopper_support import box_and_halo

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                       reason="needs a CUDA device of capability 9 (Hopper)"),
    pytest.mark.gpu, pytest.mark.timeout(180, method="thread"),
]

CANVAS, TILE = (6, 16, 24), (2, 8, 8)  # grid (3, 2, 3) of 128-token tiles
WINDOWS = [(1, 1, 3), (2, 2, 1), (3, 1, 2), (1, 2, 3)]


def inputs(B, H, Hkv, L, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    S = CANVAS[0] * CANVAS[1] * CANVAS[2] + L
    q = torch.randn(B, S, H, 128, generator=g, device="cuda")
    k, v = (torch.randn(B, S, Hkv, 128, generator=g, device="cuda") for _ in range(2))
    dout = torch.randn(q.shape, generator=g, device="cuda", dtype=torch.float64)
    dlse = torch.randn(B, H, S, generator=g, device="cuda", dtype=torch.float64)
    return q, k, v, dout, dlse


def grads(fn, q, k, v, dout, dlse):
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = fn(*xs)
    loss = (out.double() * dout).sum() + (torch.where(torch.isfinite(lse), lse.double(), 0.0) * dlse).sum()
    return torch.autograd.grad(loss, xs)


def check_public(dtype, L=40, valid=33, B=1, H=4, Hkv=2, layout="tiled", **kw):
    """Natural-order inputs; our call on their tiled copies (the CUDA backward's order), its
    gradients put back in natural order, against the reference's; ``layout="natural"``: on
    the natural inputs (the backward carries them to tiled order and back)."""
    q, k, v, dout, dlse = (x if x.dtype == torch.float64 else x.to(dtype) for x in inputs(B, H, Hkv, L))
    kw = dict(canvas=CANVAS, tile=TILE, text_length=valid, **kw)

    def ref(compute):
        return lambda *xs: reference_attention(*(x.to(compute) for x in xs), **kw, compute_dtype=compute,
                                               return_lse=True)

    def ours(*xs):
        if layout == "natural":
            return sta_dist.sliding_tile_attention(*xs, **kw, return_lse=True)
        tiled = [sta_dist.to_tiled(x, CANVAS, TILE) for x in xs]
        out, lse = sta_dist.sliding_tile_attention(*tiled, **kw, layout="tiled", return_lse=True)
        return (sta_dist.to_natural(out, CANVAS, TILE),
                sta_dist.to_natural(lse.transpose(1, 2), CANVAS, TILE).transpose(1, 2))

    if "select" not in kw:  # route_of takes windows only
        order = (lambda x: x) if layout == "natural" else (lambda x: sta_dist.to_tiled(x, CANVAS, TILE))
        route = sta_dist.route_of(*map(order, (q, k, v)), **kw, layout=layout)
        assert route.backward == "cuda", route.describe_backward()
    exact, base = grads(ref(torch.float64), q, k, v, dout, dlse), grads(ref(dtype), q, k, v, dout, dlse)
    got = grads(ours, q, k, v, dout, dlse)
    for name, x, b, r in zip(("dq", "dk", "dv"), got, base, exact):
        assert x.dtype == dtype
        err, bound = max_error(x, r), error_bound(max_error(b, r), dtype, r)
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_windows_gqa_text_lse(dtype):
    check_public(dtype, window=WINDOWS)


def test_natural_order():
    check_public(torch.bfloat16, window=WINDOWS, layout="natural")


def test_no_text_two_samples():
    check_public(torch.bfloat16, L=0, valid=0, B=2, H=2, Hkv=2, window=(3, 1, 3))


def test_text_keys_past_a_block():
    """200 text rows (two key blocks of 128, the second partial; four query blocks of 64)."""
    check_public(torch.bfloat16, L=256, valid=200, window=WINDOWS)


def test_selected_tiles_table_path():
    check_public(torch.bfloat16, window=(1, 1, 1), select=sta_dist.TopK(2))


def test_tile_mode_rank_against_the_triton_backward():
    """A tile-mode rank's packed problem (own box as query tiles, box and halo as key tiles,
    text attending the box): the CUDA backward against the Triton one on the same inputs,
    within the bf16 bound of the Triton's gradients."""
    canvas, tile, text = (6, 16, 24), (2, 8, 8), 24
    _, (q, k, v), layout, _ = box_and_halo(canvas, tile, text, seed=3)
    heads = LocalHeads.build([(3, 1, 3)] * 4, layout.grid, 4)
    t = LocalText(text, text, text)
    g = torch.Generator(device="cuda").manual_seed(5)
    out = torch.randn(q.shape, generator=g, device="cuda").bfloat16()
    dout = torch.randn(q.shape, generator=g, device="cuda").bfloat16()
    lse = torch.randn(1, 4, q.shape[1], generator=g, device="cuda") + 6
    assert backward_kernel(q, k, v, layout, heads, t) == "cuda"
    scale = 128 ** -0.5
    got = local_backward(q, k, v, out, lse, dout, layout, heads, t, scale)
    want = local_backward(q, k, v, out, lse, dout, layout, heads, t, scale, backend="triton")
    exact = local_backward(*(x.double() for x in (q, k, v, out)), lse.double(), dout.double(), layout, heads, t,
                           scale, backend="torch")
    for name, x, w, r in zip(("dq", "dk", "dv"), got, want, exact):
        err, bound = max_error(x, r), error_bound(max_error(w, r), torch.bfloat16, r)
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (triton's {max_error(w, r):.3g})"
