"""GPU-only: the kernel in bf16 at real video shapes, and the small cases in every dtype.
Skipped without CUDA; run on the GPU machine."""

import pytest
import torch

import sta_dist
from sta_dist.testing import error_bound, max_error, reference_attention, sampled_check
from tests.cases import random_case
from tests.conftest import requires_cuda

pytestmark = [requires_cuda, pytest.mark.gpu]

HUNYUAN, WAN, TILE = (30, 48, 80), (18, 48, 80), (6, 8, 8)


def randn(shape, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(shape, generator=g, device="cuda", dtype=dtype)


@pytest.mark.parametrize(
    "canvas, window, text_len, text_valid",
    [
        (HUNYUAN, (3, 3, 3), 256, 200),
        (HUNYUAN, [(3, 3, 3)] * 8 + [(5, 6, 10)] * 8 + [(1, 6, 10)] * 4 + [(5, 1, 10)] * 4, 256, 200),
        (WAN, (3, 3, 5), 0, 0),
        (WAN, (3, 1, 10), 0, 0),
        (WAN, (3, 6, 10), 256, 256),  # every head dense, no padding rows: SDPA's output as is
        (WAN, (3, 6, 10), 256, 200),  # every head dense, padding text rows zeroed
    ],
)
def test_bf16_real_shapes(canvas, window, text_len, text_valid):
    S = canvas[0] * canvas[1] * canvas[2] + text_len
    q, k, v = (randn((1, S, 24, 128), seed=i) for i in range(3))
    out = sta_dist.sliding_tile_attention(q, k, v, canvas=canvas, tile=TILE, window=window, text_length=text_valid)
    check = sampled_check(q, k, v, out, canvas=canvas, tile=TILE, window=window, text_length=text_valid)
    assert check["ok"], check


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_small_cases_on_gpu(seed, dtype):
    case = random_case(seed, head_dims=(32, 64, 96, 128, 256))
    q, k, v = case.tensors(dtype, device="cuda", seed=seed)
    ref = reference_attention(q, k, v, **case.kwargs())
    base = reference_attention(q, k, v, **case.kwargs(), compute_dtype=dtype)
    out = sta_dist.sliding_tile_attention(q, k, v, **case.kwargs(), backend="triton")
    assert max_error(out, ref) <= error_bound(max_error(base, ref), dtype, ref)


@pytest.mark.parametrize("layout", ["natural", "tiled"])
def test_bulk_copy_paths_batch_text_gqa(layout):
    """Whole 6x8x8 tiles take the bulk-copy (TMA) path: natural order (5-D boxes, batch
    stride past the text rows) and tiled order (consecutive rows); B=2, text, GQA."""
    canvas, windows = (12, 16, 24), [(1, 1, 1), (2, 2, 3), (3, 1, 2), (9, 9, 9)]
    S = 12 * 16 * 24 + 40
    q = randn((2, S, 4, 128), seed=1)
    k, v = randn((2, S, 2, 128), seed=2), randn((2, S, 2, 128), seed=3)
    args = [q, k, v] if layout == "natural" else [sta_dist.to_tiled(x, canvas, TILE) for x in (q, k, v)]
    out = sta_dist.sliding_tile_attention(*args, canvas=canvas, tile=TILE, window=windows, text_length=33,
                                          backend="triton", layout=layout)
    if layout == "tiled":
        out = sta_dist.to_natural(out, canvas, TILE)
    check = sampled_check(q, k, v, out, canvas=canvas, tile=TILE, window=windows, text_length=33)
    assert check["ok"], check


def lse_error(lse, ref):
    """Largest LSE difference; rows that attend nothing (padding text) must be -inf in both."""
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref))
    return max_error(lse.nan_to_num(neginf=0.0), ref.nan_to_num(neginf=0.0))


hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                            reason="the Hopper kernels need capability 9")


@hopper
@pytest.mark.timeout(120, method="thread")
def test_hopper_route():
    """On Hopper the CUDA kernel takes the whole canvas in natural order and in tiled order
    (as "packed" tiles), whole-grid heads included (it is faster than cuDNN there too), with
    and without the log-sum-exp; text queries, whose keys are one range here, go to SDPA
    (with a log-sum-exp, FlashAttention's); asked for by name, it takes the same call. The
    route is the one :func:`sta_dist.dispatch.call_route` names, it passes the sampled check,
    and it agrees with the Triton kernel."""
    from sta_dist.dispatch import call_route, run_local
    from sta_dist.kernels import sta_fwd_cuda
    from sta_dist.local import LocalHeads, LocalLayout, LocalText

    assert sta_fwd_cuda.available(), sta_fwd_cuda.build_error()
    windows = [(3, 3, 5), (3, 1, 10), (1, 6, 10), (3, 6, 10), (2, 2, 2), (3, 6, 10)]
    heads = LocalHeads.build(windows, LocalLayout.natural(WAN, TILE, 0).grid, 6)
    for order, text_len, text_valid, backend in (("natural", 0, 0, "auto"), ("natural", 256, 200, "auto"),
                                                 ("natural", 256, 200, "cuda"), ("tiled", 256, 200, "auto")):
        q, k, v = (randn((1, 18 * 48 * 80 + text_len, 6, 128), seed=i) for i in range(3))
        layout = getattr(LocalLayout, order)(WAN, TILE, text_len)
        tensors = (q, k, v) if order == "natural" else tuple(sta_dist.to_tiled(x, WAN, TILE) for x in (q, k, v))
        args = (*tensors, layout, heads, LocalText.single(text_valid))
        route = call_route(*args, backend=backend)
        assert route.video == "cuda" and route.dense == (), route
        assert route.text == ("sdpa" if text_len else None), route
        out = run_local(*args, 128**-0.5, backend=backend)
        natural_out = out if order == "natural" else sta_dist.to_natural(out, WAN, TILE)
        check = sampled_check(q, k, v, natural_out, canvas=WAN, tile=TILE, window=windows, text_length=text_valid)
        assert check["ok"], check
        assert max_error(out, run_local(*args, 128**-0.5, backend="triton")) <= 1e-2
        # With a log-sum-exp too every head goes to the CUDA kernel and the text queries to
        # SDPA; both parts agree with the Triton kernel's.
        route = call_route(*args, backend="auto", return_lse=True)
        assert (route.video, route.dense, route.text) == ("cuda", (), "sdpa" if text_len else None), route
        out, lse = run_local(*args, 128**-0.5, return_lse=True)
        ref_out, ref_lse = run_local(*args, 128**-0.5, backend="triton", return_lse=True)
        assert max_error(out, ref_out) <= 1e-2 and lse_error(lse, ref_lse) <= 1e-3


@hopper
@pytest.mark.timeout(120, method="thread")
def test_cuda_route_tile_rank():
    """A tile-mode rank's local call (own box, box + halo keys, packed) goes to the CUDA
    kernel as "packed" and agrees with the Triton kernel: without text (no log-sum-exp),
    and with text merged across ranks (text keys counted here or not; a log-sum-exp,
    the text queries through the Triton kernel alone)."""
    from tests.hopper_support import box_and_halo

    from sta_dist.dispatch import call_route, run_local
    from sta_dist.local import LocalHeads, LocalText

    canvas, tile, windows = (12, 16, 40), (6, 8, 8), [(1, 1, 1), (2, 1, 3), (1, 2, 3), (2, 2, 2)]
    _, local, layout, _ = box_and_halo(canvas, tile, text=0, seed=41)
    args = (*local, layout, LocalHeads.build(windows, layout.grid, 4), LocalText.single(0))
    route = call_route(*args)
    assert route.video == "cuda" and not route.declined, route
    assert max_error(run_local(*args, 128**-0.5), run_local(*args, 128**-0.5, backend="triton")) <= 1e-2
    _, local, layout, _ = box_and_halo(canvas, tile, text=96, seed=43)
    for text in (LocalText(80, 80, 80), LocalText(80, 80, 0)):
        args = (*local, layout, LocalHeads.build(windows, layout.grid, 4), text)
        assert call_route(*args, return_lse=True).video == "cuda"
        out, lse = run_local(*args, 128**-0.5, return_lse=True)
        ref_out, ref_lse = run_local(*args, 128**-0.5, backend="triton", return_lse=True)
        assert max_error(out, ref_out) <= 1e-2 and lse_error(lse, ref_lse) <= 1e-3
