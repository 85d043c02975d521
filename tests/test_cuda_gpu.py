"""GPU-only (Hopper, capability 9): the hand-written CUDA kernel ``sta_dist/kernels/sta_fwd_cuda.cu``
against the dense float64 reference, on whole-tile canvases in natural order, bf16, with
text rows after the canvas that video queries may attend.

Every test has a 120 s limit (thread method: a hung kernel blocks the main thread inside
CUDA, where the signal method never fires), so a barrier-phase bug shows as a failure."""

import math

import pytest
import torch

from sta_dist.testing import error_bound, max_error, reference_attention
from tests.test_gluon_gpu import head_table, randn

cuda_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
    reason="needs a CUDA device of capability 9 (Hopper)",
)
pytestmark = [cuda_hopper, pytest.mark.gpu]

HUNYUAN, TILE = (30, 48, 80), (6, 8, 8)


def run(canvas, tile, windows, n_heads, n_kv, text=16, text_keys=0, batch=1, seed=0, fill=float("nan")):
    """Run the kernel; ``out`` starts as ``fill`` (NaN shows rows it did not write)."""
    from sta_dist.kernels.sta_fwd_cuda import sta_fwd_cuda

    S = math.prod(canvas) + text
    q = randn((batch, S, n_heads, 128), torch.bfloat16, seed)
    k = randn((batch, S, n_kv, 128), torch.bfloat16, seed + 1)
    v = randn((batch, S, n_kv, 128), torch.bfloat16, seed + 2)
    out = torch.full_like(q, fill)
    sta_fwd_cuda(q, k, v, head_table(windows, canvas, tile, n_heads, n_kv), out, canvas=canvas, tile=tile,
                 scale=128**-0.5, text_keys=text_keys)
    torch.cuda.synchronize()
    return q, k, v, out


def assert_matches_reference(q, k, v, out, canvas, tile, windows, text_keys):
    """Video rows against the float64 reference (within the bf16 bound); text rows unwritten."""
    n = math.prod(canvas)
    kw = dict(canvas=canvas, tile=tile, window=windows, text_length=text_keys, rows=torch.arange(n), scale=128**-0.5)
    ref = reference_attention(q, k, v, **kw)
    base = reference_attention(q, k, v, **kw, compute_dtype=torch.bfloat16)
    err = max_error(out[:, :n], ref)
    assert err <= error_bound(max_error(base, ref), torch.bfloat16, ref), (err, max_error(base, ref))
    assert torch.isnan(out[:, n:]).all()


CASES = [
    # canvas, tile, per-head windows (tiles), heads, kv heads; one key block per query
    # block up to whole-grid windows, tiles of one, two and three 128-row blocks
    ((2, 8, 8), (2, 8, 8), [(1, 1, 1)], 1, 1),
    ((4, 16, 24), (2, 8, 8), [(1, 1, 1), (2, 1, 3), (1, 2, 2), (9, 9, 9)], 4, 2),
    ((8, 24, 16), (4, 8, 8), [(3, 3, 3), (1, 3, 1), (2, 1, 2), (2, 2, 2)], 4, 1),
    ((12, 16, 24), (6, 8, 8), [(1, 1, 1), (2, 2, 3), (3, 1, 2), (9, 9, 9)], 4, 4),
]


@pytest.mark.timeout(120, method="thread")
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("batch", [1, 2])
def test_small_shapes(case, batch):
    canvas, tile, windows, n_heads, n_kv = CASES[case]
    q, k, v, out = run(canvas, tile, windows, n_heads, n_kv, batch=batch, seed=3 * case + batch)
    assert_matches_reference(q, k, v, out, canvas, tile, windows, text_keys=0)


@pytest.mark.timeout(120, method="thread")
@pytest.mark.parametrize("text_keys", [1, 77, 128, 200, 256])
def test_text_keys(text_keys):
    """Video queries also attend the first ``text_keys`` text rows: a partial text block is
    masked, 128 is one whole block; with 200 text rows the last block reaches past the
    tensor (the copy engine fills zeros, the mask drops them); 256 rows for 256 keys."""
    canvas, tile, windows = (12, 16, 24), (6, 8, 8), [(1, 1, 1), (2, 2, 3), (3, 1, 2), (9, 9, 9)]
    text = 256 if text_keys == 256 else 200
    q, k, v, out = run(canvas, tile, windows, 4, 2, text=text, text_keys=text_keys, seed=7)
    assert_matches_reference(q, k, v, out, canvas, tile, windows, text_keys=text_keys)


@pytest.mark.timeout(120, method="thread")
def test_strided_views():
    """q/k/v as head slices of wider tensors (row strides larger than heads * 128)."""
    from sta_dist.kernels.sta_fwd_cuda import sta_fwd_cuda

    canvas, tile, windows = (4, 16, 24), (2, 8, 8), [(2, 1, 3), (1, 2, 2)]
    S = math.prod(canvas) + 40
    wide = randn((1, S, 6, 128), torch.bfloat16, 13)
    q, k, v = wide[:, :, 0:2], wide[:, :, 2:4], wide[:, :, 4:6]
    out = torch.full_like(wide, float("nan"))[:, :, 0:2]  # the kernel writes with q's strides
    sta_fwd_cuda(q, k, v, head_table(windows, canvas, tile, 2, 2), out, canvas=canvas, tile=tile, scale=128**-0.5,
                 text_keys=33)
    torch.cuda.synchronize()
    assert_matches_reference(q, k, v, out, canvas, tile, windows, text_keys=33)


@pytest.mark.timeout(120, method="thread")
@pytest.mark.parametrize("windows", [[(3, 3, 3)] * 24,
                                     [(3, 3, 3)] * 8 + [(5, 6, 10)] * 4 + [(1, 6, 10)] * 4 + [(5, 1, 10)] * 4
                                     + [(1, 1, 1)] * 4])
def test_hunyuan_shape(windows):
    """384 sampled video rows and the last one (the text query rows are the router's)."""
    q, k, v, out = run(HUNYUAN, TILE, windows, 24, 24, text=256, text_keys=200, seed=5)
    n = math.prod(HUNYUAN)
    rows = torch.cat([torch.randint(0, n, (384,), generator=torch.Generator().manual_seed(0)), torch.tensor([n - 1])])
    kw = dict(canvas=HUNYUAN, tile=TILE, window=windows, text_length=200, rows=rows, scale=128**-0.5)
    ref = reference_attention(q, k, v, **kw, compute_dtype=torch.float32)
    base = reference_attention(q, k, v, **kw, compute_dtype=torch.bfloat16)
    err = max_error(out[:, rows.cuda()], ref)
    assert err <= error_bound(max_error(base, ref), torch.bfloat16, ref), (err, max_error(base, ref))
    assert torch.isnan(out[:, n:]).all()


@pytest.mark.timeout(120, method="thread")
def test_unsupported_calls_are_refused():
    """The launcher refuses what the route's rule refuses, with the rule's reason."""
    from sta_dist.kernels.sta_fwd_cuda import sta_fwd_cuda
    from sta_dist.route import Call, Device, cuda_rule

    canvas, tile = (4, 16, 24), (2, 8, 8)
    q = randn((1, math.prod(canvas), 2, 128), torch.bfloat16, 0)

    def reason(x=q, tile=tile, text_keys=0):
        return cuda_rule(Call.of(x, x, x, canvas, tile, "natural", text_keys=text_keys), Device.hopper())

    assert reason() is None
    assert "bfloat16" in reason(q.half())
    assert "tiles (even, 8, 8)" in reason(tile=(2, 4, 8)) and "tiles (even, 8, 8)" in reason(tile=(1, 8, 8))
    assert "text keys" in reason(text_keys=1)  # no text rows to attend
    with pytest.raises(ValueError, match="unsupported call: the kernel is built for bfloat16"):
        sta_fwd_cuda(q.half(), q.half(), q.half(), head_table([(1, 1, 1)] * 2, canvas, tile, 2, 2), q.half(),
                     canvas=canvas, tile=tile, scale=1.0)
