"""The seed API (FastVideo's names) on one device, driven by a real mask strategy."""

import importlib.resources

import pytest
import torch

import sta_dist
from sta_dist import (
    MaskStrategy,
    RangeDict,
    SlidingTileAttentionBackend,
    SlidingTileAttentionImpl,
    SlidingTileAttentionMetadata,
    SlidingTileAttentionMetadataBuilder,
)
from sta_dist.testing import max_error, reference_attention


def hunyuan_strategy() -> MaskStrategy:
    path = importlib.resources.files("sta_dist.configs") / "mask_strategy_hunyuan.json.gz"
    return MaskStrategy.load(path)


def test_backend_class_surface():
    b = SlidingTileAttentionBackend
    assert b.accept_output_buffer is True
    assert b.get_name() == "SLIDING_TILE_ATTN"
    assert b.get_supported_head_sizes() == [32, 64, 96, 128, 160, 192, 224, 256]
    assert b.get_impl_cls() is SlidingTileAttentionImpl
    assert b.get_metadata_cls() is SlidingTileAttentionMetadata
    assert b.get_builder_cls() is SlidingTileAttentionMetadataBuilder
    assert sta_dist.logger.name == "sta_dist.backend"  # the module's own, as FastVideo's


def test_range_dict():
    """FastVideo's semantics: str(value), and the first match in insertion order wins."""
    d = RangeDict({(0, 9): "small", (10, 99): "big", 5: "five", 100: 7})
    assert d[3] == "small" and d[10] == "big" and d[99] == "big" and d[100] == "7"
    assert d[5] == "small"  # the range was inserted first
    assert RangeDict({5: "five", (0, 9): "small"})[5] == "five"
    assert 50 in d and 101 not in d and d.get(101, "none") == "none"
    with pytest.raises(KeyError, match="seq_len 101 not supported for STA"):
        d[101]


def test_real_mask_strategy_loads():
    s = hunyuan_strategy()
    assert (s.num_steps, s.num_layers, s.num_heads) == (50, 60, 24)
    assert set(s.layer_windows(0, 0)) == {(5, 6, 10)}  # first 12 steps are dense
    assert set(s.layer_windows(11, 59)) == {(5, 6, 10)}
    later = {w for step in s.windows[12:] for layer in step for w in layer}
    assert {(5, 3, 3), (3, 3, 5), (1, 6, 10)} <= later
    assert sum(s.layer_window_counts().values()) == 50 * 60


def test_mask_strategy_round_trip(tmp_path):
    s = MaskStrategy.from_dict({f"{t}_{l}_{h}": [1 + t, 2, 1 + h] for t in range(2) for l in range(3) for h in range(2)})
    for name in ("s.json", "s.json.gz"):
        s.save(tmp_path / name)
        assert MaskStrategy.load(tmp_path / name) == s


def test_mask_strategy_errors():
    with pytest.raises(ValueError, match=r"missing keys \['0_0_1'\]"):
        MaskStrategy.from_dict({"0_0_0": [1, 1, 1], "0_1_1": [1, 1, 1], "0_1_0": [1, 1, 1]})
    with pytest.raises(ValueError, match=r"keys must be 'step_layer_head' ints, got key='a_0_0'"):
        MaskStrategy.from_dict({"a_0_0": [1, 1, 1]})
    with pytest.raises(ValueError, match=r"entries must all be >= 1"):
        MaskStrategy.from_dict({"0_0_0": [0, 1, 1]})


def test_builder_selects_timestep():
    s = hunyuan_strategy()
    builder = SlidingTileAttentionMetadataBuilder()
    builder.prepare()
    for source in (s, s.sta_param()):
        meta = builder.build(source, 30, canvas=(30, 48, 80), tile=(6, 8, 8))
        assert meta.current_timestep == 30
        assert [tuple(w) for w in meta.STA_param[7]] == list(s.layer_windows(30, 7))
    with pytest.raises(IndexError, match=r"current_timestep must be in \[0, 50\)"):
        builder.build(s, 50)


def test_impl_runs_its_own_layer_windows():
    """A small model with the real strategy's windows (scaled to a small canvas)."""
    s = hunyuan_strategy()
    canvas, tile, heads = (4, 6, 10), (2, 2, 2), 24
    builder = SlidingTileAttentionMetadataBuilder()
    meta = builder.build(s, 20, canvas=canvas, tile=tile, text_length=3)
    torch.manual_seed(0)
    S = 4 * 6 * 10 + 5
    q, k, v = (torch.randn(1, S, heads, 32) for _ in range(3))
    for layer in (0, 17):
        impl = SlidingTileAttentionImpl(heads, 32, False, None, prefix=f"blocks.{layer}.attn", layer_idx=layer)
        qkv = impl.preprocess_qkv(torch.cat([q, k, v]), meta)
        out = impl.postprocess_output(impl.forward(*qkv.chunk(3), meta), meta)
        ref = reference_attention(q, k, v, canvas=canvas, tile=tile, window=s.layer_windows(20, layer), text_length=3)
        assert max_error(out, ref) <= 1e-5
    assert s.layer_windows(20, 0) != s.layer_windows(20, 17)  # the layers really differ


def test_impl_tile_untile_round_trip():
    impl = SlidingTileAttentionImpl(2, 32, False, None, canvas=(3, 5, 7), tile=(2, 2, 3))
    x = torch.randn(2, 3 * 5 * 7 + 4, 2, 32)
    assert torch.equal(impl.untile(impl.tile(x)), x)
    assert not torch.equal(impl.tile(x), x)


def test_impl_needs_layer_idx_with_many_layers():
    meta = SlidingTileAttentionMetadata(current_timestep=0, STA_param=[[(1, 1, 1)]] * 2, canvas=(2, 2, 2), tile=(1, 1, 1))
    impl = SlidingTileAttentionImpl(1, 32, False, None)
    q = torch.randn(1, 8, 1, 32)
    with pytest.raises(ValueError, match=r"layer_idx must be given .* got layer_idx=None with 2 layers"):
        impl.forward(q, q, q, meta)
    with pytest.raises(ValueError, match=r"canvas and tile must be given"):
        impl.forward(q, q, q, SlidingTileAttentionMetadata(current_timestep=0, STA_param=[[(1, 1, 1)]]))


def test_impl_with_a_plan_on_one_process_and_metadata_checks():
    """A plan of world size 1 needs no process group; the hooks run and match the reference."""
    canvas, tile = (3, 4, 6), (1, 2, 3)
    plan = sta_dist.ShardPlan(canvas=canvas, tile=tile, text_len=2, mode="tile", world_size=1)
    impl = SlidingTileAttentionImpl(2, 32, False, None, plan=plan)
    q, k, v = (torch.randn(1, 3 * 4 * 6 + 2, 2, 32) for _ in range(3))
    meta = SlidingTileAttentionMetadata(current_timestep=0, STA_param=[[(1, 1, 1), (2, 2, 2)]], text_length=1)
    local = [plan.shard(x, 0) for x in (q, k, v)]
    out = impl.postprocess_output(impl.forward(*impl.preprocess_qkv(tuple(local), meta), meta), meta)
    ref = reference_attention(q, k, v, canvas=canvas, tile=tile, window=[(1, 1, 1), (2, 2, 2)], text_length=1)
    assert max_error(plan.unshard([out]), ref) <= 1e-5
    bad = SlidingTileAttentionMetadata(current_timestep=0, STA_param=meta.STA_param, canvas=(3, 4, 7))
    with pytest.raises(ValueError, match=r"attn_metadata.canvas must match the plan's canvas=\(3, 4, 6\)"):
        impl.preprocess_qkv(tuple(local), bad)
    with pytest.raises(ValueError, match=r"rank 0's q/k/v must be \[B, 74, H, D\]: its 72 video tokens plus 2 text"):
        impl.preprocess_qkv((q[:, :-1], k[:, :-1], v[:, :-1]), meta)
