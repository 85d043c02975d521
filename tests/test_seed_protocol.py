"""The seed classes speaking FastVideo's protocol, driven by hand the way FastVideo's
layers drive them (no FastVideo needed here: tests/test_fastvideo.py drives FastVideo's
own layers). Everything is compared with the single reference."""

import pytest
import torch

from sta_dist import SlidingTileAttentionImpl, SlidingTileAttentionMetadataBuilder
from sta_dist.backend import canvas_from_latent, layer_index_from_prefix
from sta_dist.geometry import fastvideo_window, grid_shape
from sta_dist.testing import error_bound, max_error, reference_attention

CANVAS, TILE, H, D = (9, 10, 14), (6, 8, 8), 3, 32  # 2 x 2 x 2 tiles, every one partial but the first
GRID = grid_shape(CANVAS, TILE)


def fastvideo_impl(layer: int, **extra):
    return SlidingTileAttentionImpl(num_heads=H, head_size=D, causal=False, softmax_scale=D**-0.5,
                                    num_kv_heads=H, prefix=f"transformer.blocks.{layer}.attn.impl", **extra)


def build(step_windows, step=0, **kw):
    """FastVideo's denoising stage's call: the latent is (T, 2H, 2W) with patch (1, 2, 2)."""
    raw = (1, 16, CANVAS[0], 2 * CANVAS[1], 2 * CANVAS[2])
    return SlidingTileAttentionMetadataBuilder().build(
        current_timestep=step, raw_latent_shape=raw[2:5], patch_size=(1, 2, 2), STA_param=[step_windows] * (step + 1),
        VSA_sparsity=0.0, device=torch.device("cpu"), **kw)


def check(out, q, k, v, windows, text_length=None):
    ref = reference_attention(q, k, v, canvas=CANVAS, tile=TILE, window=windows, text_length=text_length)
    base = reference_attention(q, k, v, canvas=CANVAS, tile=TILE, window=windows, text_length=text_length,
                               compute_dtype=torch.float32)
    assert max_error(out, ref) <= error_bound(max_error(base, ref), torch.float32, ref)


def test_protocol_helpers():
    assert canvas_from_latent((30, 96, 160), (1, 2, 2)) == (30, 48, 80)
    assert canvas_from_latent((1, 16, 30, 96, 160), 2) == (30, 48, 80)  # HunyuanVideo's int patch_size
    assert layer_index_from_prefix("model.double_blocks.12.attn.impl") == 12
    assert layer_index_from_prefix("") is None
    with pytest.raises(ValueError, match=r"raw_latent_shape .* is smaller than patch_size"):
        canvas_from_latent((1, 1, 8), (1, 2, 2))


def test_distributed_attention_protocol_with_text_and_per_head_even_windows():
    """Stacked [3B, S, H, D] natural video -> preprocess (tiled) -> text appended ->
    forward -> text split off -> postprocess (natural): FastVideo's even rule per head."""
    torch.manual_seed(0)
    L, B = 5, 2
    layer_windows = [[1, 1, 1], [2, 1, 2], [2, 2, 2]]  # even: k + 1 tiles in FastVideo's rule
    meta = build([[[3, 3, 3]] * H, layer_windows])
    assert meta.canvas == CANVAS and meta.tile == TILE and meta.protocol == "fastvideo"
    impl = fastvideo_impl(1, dropout_p=0.0)
    n = CANVAS[0] * CANVAS[1] * CANVAS[2]
    q, k, v = (torch.randn(B, n + L, H, D) for _ in range(3))
    qkv = impl.preprocess_qkv(torch.cat([q[:, :n], k[:, :n], v[:, :n]]), meta)
    assert torch.equal(qkv, impl.tile(torch.cat([q[:, :n], k[:, :n], v[:, :n]]), meta))
    qkv = torch.cat([qkv, torch.cat([q[:, n:], k[:, n:], v[:, n:]])], 1)
    out = impl.forward(*qkv.chunk(3), meta)
    video = impl.postprocess_output(out[:, :n], meta)
    full = torch.cat([video, out[:, n:]], 1)
    check(full, q, k, v, [fastvideo_window(w, GRID) for w in layer_windows])
    assert fastvideo_window((2, 1, 2), GRID) == (2, 1, 2) and fastvideo_window((1, 2, 1), (3, 3, 3)) == (1, 3, 1)


def test_local_attention_protocol_calls_forward_alone_in_natural_order():
    torch.manual_seed(1)
    meta = build([[[1, 2, 1]] * H])
    impl = SlidingTileAttentionImpl(num_heads=H, head_size=D, causal=False, softmax_scale=D**-0.5)
    n = CANVAS[0] * CANVAS[1] * CANVAS[2]
    q, k, v = (torch.randn(1, n, H, D) for _ in range(3))
    check(impl.forward(q, k, v, meta), q, k, v, fastvideo_window((1, 2, 1), GRID))


def test_search_records_per_head_losses_against_the_full_window():
    """A layer with fewer windows than heads is FastVideo's mask search."""
    torch.manual_seed(2)
    heads, candidates = 4, [[1, 1, 1], [1, 2, 2]]
    meta = build([candidates + [list(GRID)]])
    impl = SlidingTileAttentionImpl(num_heads=heads, head_size=D, causal=False, softmax_scale=None,
                                    prefix="blocks.0.attn.impl")
    n = CANVAS[0] * CANVAS[1] * CANVAS[2]
    q, k, v = (torch.randn(1, n, heads, D) for _ in range(3))
    out = impl.forward(q, k, v, meta)
    check(out, q, k, v, GRID)
    (losses,) = meta.search_losses
    full = reference_attention(q, k, v, canvas=CANVAS, tile=TILE, window=GRID)
    for c, window in enumerate(candidates):
        cand = reference_attention(q, k, v, canvas=CANVAS, tile=TILE, window=fastvideo_window(window, GRID))
        assert torch.allclose(torch.tensor(losses["L2_loss"][c], dtype=torch.float64),
                              (cand - full).square().mean(dim=(0, 1, 3)), atol=2e-6)
        assert torch.allclose(torch.tensor(losses["L1_loss"][c], dtype=torch.float64),
                              (cand - full).abs().mean(dim=(0, 1, 3)), atol=2e-6)
    assert len(losses["L2_loss"]) == 2 and len(losses["L2_loss"][0]) == heads


def test_protocol_errors_name_the_setting():
    n = CANVAS[0] * CANVAS[1] * CANVAS[2]
    q = torch.randn(1, n, H, D)
    with pytest.raises(IndexError, match=r"STA_param has no layer 4 \(this Impl's layer_idx, prefix='transformer.blocks.4"):
        fastvideo_impl(4).forward(q, q, q, build([[[1, 1, 1]] * H, [[1, 1, 1]] * H]))
    with pytest.raises(ValueError, match=r"STA_param\[0\]\[1\] is missing \(None\)"):
        fastvideo_impl(0).forward(q, q, q, build([[[1, 1, 1], None, [1, 1, 1]]]))
    with pytest.raises(ValueError, match=r"the sequence must hold the canvas \(9, 10, 14\) = 1260 video tokens"):
        fastvideo_impl(0).forward(q[:, :100], q[:, :100], q[:, :100], build([[[1, 1, 1]] * H]))
    with pytest.raises(ValueError, match=r"head dim must be one of .* got head_dim=48"):
        SlidingTileAttentionImpl(num_heads=H, head_size=48, causal=False, softmax_scale=None)
    with pytest.raises(TypeError, match=r"build\(\) with raw_latent_shape needs patch_size"):
        SlidingTileAttentionMetadataBuilder().build(STA_param=None, current_timestep=0, raw_latent_shape=(2, 2, 2))


def test_fastvideo_kernel_fallback_is_fastvideos_call():
    """``fastvideo_kernel.sliding_tile_attention`` as served where FastVideo's kernel package
    is missing: [B, H, S, D] in tiled order (tile 6x8x8), FastVideo's windows, valid text."""
    from sta_dist import to_natural, to_tiled
    from sta_dist.integrations.fastvideo import kernel

    torch.manual_seed(3)
    canvas, tile, L = (6, 8, 32), (6, 8, 8), 4  # grid 1x1x4: an even window 2 takes 3 tiles
    n = 6 * 8 * 32
    q, k, v = (torch.randn(1, n + L, 2, D) for _ in range(3))
    windows = [[1, 1, 2], [2, 1, 1]]
    out = kernel.sliding_tile_attention(*(to_tiled(x, canvas, tile).transpose(1, 2) for x in (q, k, v)),
                                        windows, 3, True, "6x8x32")
    out = to_natural(out.transpose(1, 2), canvas, tile)
    grid = grid_shape(canvas, tile)
    ref = reference_attention(q, k, v, canvas=canvas, tile=tile, window=[fastvideo_window(w, grid) for w in windows],
                              text_length=3)
    base = reference_attention(q, k, v, canvas=canvas, tile=tile, window=[fastvideo_window(w, grid) for w in windows],
                               text_length=3, compute_dtype=torch.float32)
    assert max_error(out, ref) <= error_bound(max_error(base, ref), torch.float32, ref)


def test_fastvideo_settings_name_the_setting(monkeypatch):
    from sta_dist.integrations.fastvideo import parallel

    monkeypatch.setattr(parallel, "_settings", None)
    monkeypatch.setenv("STA_DIST_FASTVIDEO_PARALLEL", "ring")
    with pytest.raises(ValueError, match=r"STA_DIST_FASTVIDEO_PARALLEL \(parallel=\) must be one of .* got 'ring'"):
        parallel.settings()
    monkeypatch.setenv("STA_DIST_FASTVIDEO_PARALLEL", "tile")
    monkeypatch.setenv("STA_DIST_FASTVIDEO_TILE", "6,8")
    with pytest.raises(ValueError, match=r"STA_DIST_FASTVIDEO_TILE \(tile=\) must be 3 ints"):
        parallel.settings()
    monkeypatch.setenv("STA_DIST_FASTVIDEO_TILE", "4,8,8")
    assert parallel.settings() == parallel.Settings("tile", (4, 8, 8))


def test_search_candidates_scale_to_the_grid():
    """FastVideo's candidates on its own grid, and scaled (odd or whole axis, no full window)."""
    from sta_dist.integrations.fastvideo.search import FASTVIDEO_CANDIDATES, FASTVIDEO_GRID, search_candidates

    assert [tuple(c) for c in search_candidates(FASTVIDEO_GRID)] == list(FASTVIDEO_CANDIDATES)  # its own grid
    for grid in [(2, 2, 2), (5, 12, 20), (9, 3, 4)]:
        cands = search_candidates(grid)
        assert cands and list(grid) not in cands and len({tuple(c) for c in cands}) == len(cands)
        assert all(1 <= k <= n and (k % 2 or k == n) for c in cands for k, n in zip(c, grid))
