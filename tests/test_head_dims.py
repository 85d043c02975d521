"""Head dims 32..256 in steps of 32 (FastVideo's list): 160, 192 and 224 run the kernel
zero-padded to 256 with the caller's scale, and equal the single reference."""

import pytest
import torch

import sta_dist
from sta_dist.testing import error_bound, max_error, reference_attention
from sta_dist.validation import SUPPORTED_HEAD_DIMS, kernel_head_dim


def test_supported_head_dims_are_fastvideos():
    assert list(SUPPORTED_HEAD_DIMS) == [32, 64, 96, 128, 160, 192, 224, 256]
    assert sta_dist.SlidingTileAttentionBackend.get_supported_head_sizes() == list(SUPPORTED_HEAD_DIMS)
    assert [kernel_head_dim(d) for d in SUPPORTED_HEAD_DIMS] == [32, 64, 96, 128, 256, 256, 256, 256]


@pytest.mark.parametrize("D", [160, 224])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_padded_head_dims_match_the_reference(D, backend, monkeypatch):
    if backend == "triton" and sta_dist.dispatch.device_facts(torch.device("cpu")).triton and not torch.cuda.is_available():
        pytest.skip("no Triton here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    canvas, tile, window = (2, 3, 5), (1, 2, 3), [(1, 1, 1), (2, 2, 1)]
    g = torch.Generator().manual_seed(D)
    q, k, v = (torch.randn(1, 30 + 3, 2, D, generator=g).to(device) for _ in range(3))
    seen = []
    real = sta_dist.dispatch.execute  # what the kernels are given
    monkeypatch.setattr(sta_dist.dispatch, "execute",
                        lambda r, q, *a, **kw: seen.append(q.shape[-1]) or real(r, q, *a, **kw))
    scale = 0.7 * D**-0.5  # not the default: the padded kernel must keep the caller's scale
    out, lse = sta_dist.sliding_tile_attention(q, k, v, canvas=canvas, tile=tile, window=window, text_length=2,
                                               scale=scale, backend=backend, return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, canvas=canvas, tile=tile, window=window, text_length=2,
                                       scale=scale, return_lse=True)
    base = reference_attention(q, k, v, canvas=canvas, tile=tile, window=window, text_length=2, scale=scale,
                               compute_dtype=torch.float32)
    assert out.shape == q.shape
    assert seen == ([256] if backend == "triton" else [])
    assert max_error(out, ref) <= error_bound(max_error(base, ref), torch.float32, ref)
    valid = torch.isfinite(ref_lse)
    assert torch.allclose(lse[valid].double(), ref_lse[valid], atol=1e-4)
