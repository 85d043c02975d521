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
    ],
)
def test_bf16_real_shapes(canvas, window, text_len, text_valid):
    S = canvas[0] * canvas[1] * canvas[2] + text_len
    q, k, v = (randn((1, S, 24, 128), seed=i) for i in range(3))
    out = sta_dist.sliding_tile_attention(q, k, v, canvas=canvas, tile=TILE, window=window,
                                          text_length=text_valid, backend="triton")
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
