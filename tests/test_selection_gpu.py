"""GPU-only: window plus selected tiles in bf16 at real video shapes, small cases in every
dtype, the tile sums against the torch path bit for bit, and no host sync in a call.
Skipped without CUDA; ``bash tools/gpu.sh selection`` runs them on the GPU machine."""

import pytest
import torch

import sta_dist
from sta_dist.local import LocalLayout
from sta_dist.selection.means import tile_sums
from sta_dist.testing import error_bound, max_error, reference_attention, sampled_check
from tests.cases import Case
from tests.conftest import requires_cuda

pytestmark = [requires_cuda, pytest.mark.gpu]

HUNYUAN, TILE = (30, 48, 80), (6, 8, 8)


def randn(shape, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(shape, generator=g, device="cuda", dtype=dtype)


@pytest.mark.parametrize("canvas, window, select, rule, text_len, text_valid", [
    (HUNYUAN, (3, 3, 3), sta_dist.TopK(8), "sta", 256, 200),
    (HUNYUAN, (3, 3, 3), sta_dist.TopK(8, share_heads=False), "fastvideo", 256, 200),
    ((29, 45, 77), (3, 3, 3), sta_dist.TopK(8), "clipped", 256, 200),  # partial tiles: the pointer path
    ((18, 48, 80), None, sta_dist.Mass(0.5), "sta", 0, 0),
])
def test_bf16_real_shapes(canvas, window, select, rule, text_len, text_valid):
    S = canvas[0] * canvas[1] * canvas[2] + text_len
    q, k, v = (randn((1, S, 24, 128), seed=i) for i in range(3))
    kw = dict(canvas=canvas, tile=TILE, window=window, text_length=text_valid)
    out, tiles = sta_dist.sliding_tile_attention(q, k, v, **kw, select=select, window_rule=rule, backend="triton",
                                                 return_selection=True)
    check = sampled_check(q, k, v, out, **kw, select=select, window_rule=rule, selection=tiles, n_rows=256)
    assert check["ok"], check


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_small_cases_every_dtype(dtype):
    case = Case((5, 7, 9), (2, 3, 4), [(1, 1, 1), (2, 1, 3), (3, 3, 1), (1, 2, 2)], 5, 3, 2, 4, 2, 64)
    q, k, v = case.tensors(dtype, device="cuda", seed=1)
    for select, rule in ((sta_dist.TopK(3), "sta"), (sta_dist.Mass(0.7), "clipped")):
        kw = dict(case.kwargs(), select=select, window_rule=rule)
        ref = reference_attention(q, k, v, **kw)
        base = reference_attention(q, k, v, **kw, compute_dtype=dtype)
        out = sta_dist.sliding_tile_attention(q, k, v, **kw, backend="triton")
        assert max_error(out, ref) <= error_bound(max_error(base, ref), dtype, ref), (dtype, select)


def test_tile_sums_equal_the_torch_path_bit_for_bit():
    q = randn((1, 29 * 45 * 77 + 7, 4, 128), seed=3)
    layout = LocalLayout.natural((29, 45, 77), TILE, 7)
    args = (layout.q_rows, layout.q_tiles, layout.canvas, layout.tile)
    assert torch.equal(tile_sums(q, *args, use_triton=True), tile_sums(q, *args, use_triton=False))


def test_a_call_does_not_wait_for_the_gpu():
    """After a first call (caches filled), a call with a selection makes no host sync."""
    q, k, v = (randn((1, 12 * 32 * 64 + 20, 8, 128), seed=i) for i in range(3))
    kw = dict(canvas=(12, 32, 64), tile=TILE, window=(3, 3, 3), text_length=15, backend="triton")
    for select in (sta_dist.TopK(4), sta_dist.Mass(0.9)):
        sta_dist.sliding_tile_attention(q, k, v, **kw, select=select)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            sta_dist.sliding_tile_attention(q, k, v, **kw, select=select)
        finally:
            torch.cuda.set_sync_debug_mode("default")
