"""sta_dist inside diffusers' Wan 2.1 and HunyuanVideo transformers (tiny random weights,
float32, one process): equal to the stock model with a whole-grid window, to diffusers'
own attention under the STA mask with small and per-head windows, per-sample text, steps
of a strategy, and the stock processors back exactly after ``disable``."""

import pytest
import torch

pytest.importorskip("diffusers")

import sta_dist.diffusers as sta_diffusers  # noqa: E402
from sta_dist import MaskStrategy  # noqa: E402
from sta_dist.testing import max_error  # noqa: E402
from tests import diffusers_models as dm  # noqa: E402

MODELS = {"wan": dm.wan, "hunyuan": dm.hunyuan}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_whole_grid_window_equals_stock(name):
    model = MODELS[name]()
    kw = dm.inputs(model)
    stock, ref = dm.run(model, kw), dm.stock_reference(model, kw)
    sta_diffusers.enable(model, tile=dm.TILE, window=(2, 3, 3))  # the whole grid (2, 3, 3)
    dm.check(dm.run(model, kw), ref, stock, f"{name} whole grid")
    sta_diffusers.disable(model)
    assert torch.equal(dm.run(model, kw), stock)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("window", [(1, 1, 1), [(1, 2, 1), (2, 1, 3)], "per layer"], ids=["small", "per-head", "per-layer"])
def test_windows_equal_masked_sdpa(name, window):
    model = MODELS[name]()
    layers = len(dm.attention_modules(model))
    if window == "per layer":
        window = [[(1, 1, 2), (2, 3, 1)], [(2, 1, 1), (1, 3, 3)]][:layers]
    layer_windows = window if isinstance(window[0], list) else [window if isinstance(window, list) else [window] * 2] * layers
    kw = dm.inputs(model)
    ref = dm.masked_reference(model, kw, layer_windows)
    base = dm.masked_reference(model, kw, layer_windows, dtype=torch.float32)
    whole = dm.stock_reference(model, kw)
    sta_diffusers.enable(model, tile=dm.TILE, window=window)
    err = dm.check(dm.run(model, kw), ref, base, f"{name} {window}")
    assert max_error(whole, ref) > 100 * max(err, 1e-6)  # the window matters


@pytest.mark.parametrize("name", sorted(MODELS))
def test_batch_of_two_with_different_text(name):
    model = MODELS[name]()
    text_valid = (dm.TEXT, 2)
    windows = [(1, 1, 1), (2, 1, 2)]
    kw = dm.inputs(model, batch=2, text_valid=text_valid)
    layer_windows = [windows] * len(dm.attention_modules(model))
    ref = dm.masked_reference(model, kw, layer_windows, text_valid)
    base = dm.masked_reference(model, kw, layer_windows, text_valid, dtype=torch.float32)
    sta_diffusers.enable(model, tile=dm.TILE, window=windows)
    dm.check(dm.run(model, kw), ref, base, f"{name} batch 2")


def test_set_step_switches_windows_from_a_strategy(tmp_path):
    model = dm.wan()
    whole, small = [(2, 3, 3)] * 2, [(1, 1, 1), (1, 2, 1)]
    table = [[whole, whole], [small, whole]]  # [step][layer][head]
    path = tmp_path / "strategy.json"
    MaskStrategy(tuple(tuple(tuple(layer) for layer in step) for step in table)).save(path)
    kw = dm.inputs(model)
    refs = [(dm.masked_reference(model, kw, windows), dm.masked_reference(model, kw, windows, dtype=torch.float32))
            for windows in table]
    handle = sta_diffusers.enable(model, tile=dm.TILE, mask_strategy=str(path))
    for step, (ref, base) in enumerate(refs):
        assert handle.step == step
        dm.check(dm.run(model, kw), ref, base, f"step {step}")
        kwargs = {"latents": kw["hidden_states"]}
        pipe = type("Pipe", (), {"num_timesteps": 2})()
        assert handle.callback(pipe, step, 999, kwargs) is kwargs  # what diffusers expects back
    assert handle.step == 0  # after the pipeline's last step: ready for its next run
    with pytest.raises(ValueError, match=r"step must be in \[0, 2\) for this mask strategy, got step=2"):
        handle.set_step(2)


def test_disable_restores_the_stock_processors_exactly():
    model = dm.hunyuan()
    stock_processors = [m.processor for m in dm.attention_modules(model)]
    kw = dm.inputs(model, batch=2, text_valid=(3, dm.TEXT))
    before = dm.run(model, kw)
    sta_diffusers.enable(model, tile=dm.TILE, window=(1, 1, 1))
    assert not torch.equal(dm.run(model, kw), before)
    sta_diffusers.disable(model)
    assert [m.processor for m in dm.attention_modules(model)] == stock_processors
    assert torch.equal(dm.run(model, kw), before)
    assert not model._forward_pre_hooks and not model._forward_hooks
    sta_diffusers.enable(model, tile=dm.TILE, window=(1, 1, 1))  # and again


def test_wan_cross_attention_untouched():
    model = dm.wan()
    cross = [b.attn2.processor for b in model.blocks]
    sta_diffusers.enable(model, tile=dm.TILE, window=(1, 1, 1))
    assert [b.attn2.processor for b in model.blocks] == cross
    assert all(isinstance(b.attn1.processor, sta_diffusers.WanSTAProcessor) for b in model.blocks)


def test_any_resolution():
    model = dm.hunyuan()
    sta_diffusers.enable(model, tile=(2, 4, 4), window=(1, 1, 1))
    for canvas in [(1, 3, 2), (5, 4, 9)]:
        kw = dm.inputs(model, canvas=canvas)
        assert dm.run(model, kw).shape == kw["hidden_states"].shape


def test_bad_input_is_refused_clearly(tmp_path):
    with pytest.raises(TypeError, match=r"supports WanTransformer3DModel, HunyuanVideoTransformer3DModel, got Linear"):
        sta_diffusers.enable(torch.nn.Linear(2, 2), tile=(2, 2, 2), window=(1, 1, 1))
    model = dm.wan()
    with pytest.raises(ValueError, match=r"tile entries must all be >= 1, got tile=\(0, 2, 2\)"):
        sta_diffusers.enable(model, tile=(0, 2, 2), window=(1, 1, 1))
    with pytest.raises(ValueError, match=r"tile must be 3 ints \(t, h, w\), got tile=\(2, 2\)"):
        sta_diffusers.enable(model, tile=(2, 2), window=(1, 1, 1))
    few_layers = MaskStrategy.uniform((1, 1, 1), num_steps=2, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match=r"the model has 2 layers x 2 heads, the strategy has 1 layers x 2 heads"):
        sta_diffusers.enable(model, tile=(2, 2, 2), mask_strategy=few_layers)
    path = tmp_path / "few_heads.json"
    MaskStrategy.uniform((1, 1, 1), num_steps=2, num_layers=2, num_heads=1).save(path)
    with pytest.raises(ValueError, match=r"the model has 2 layers x 2 heads, the strategy has 2 layers x 1 heads"):
        sta_diffusers.enable(model, tile=(2, 2, 2), mask_strategy=str(path))
    with pytest.raises(ValueError, match=r"window must be one \(kt, kh, kw\), one per head \(2\) or one per \(layer, head\) \(2 x 2\): got 3 triples"):
        sta_diffusers.enable(model, tile=(2, 2, 2), window=[(1, 1, 1)] * 3)
    with pytest.raises(ValueError, match=r"give exactly one of window"):
        sta_diffusers.enable(model, tile=(2, 2, 2))
    with pytest.raises(ValueError, match=r"parallel must be None or one of \('head', 'tile', 'hybrid', 'auto'\), got parallel='ring'"):
        sta_diffusers.enable(model, tile=(2, 2, 2), window=(1, 1, 1), parallel="ring")
    with pytest.raises(RuntimeError, match=r"parallel='tile' needs torch.distributed"):
        sta_diffusers.enable(model, tile=(2, 2, 2), window=(1, 1, 1), parallel="tile")
    with pytest.raises(ValueError, match=r"sta_dist is not enabled on this transformer"):
        sta_diffusers.disable(model)
    sta_diffusers.enable(model, tile=(2, 2, 2), window=(1, 1, 1))
    with pytest.raises(ValueError, match=r"already enabled"):
        sta_diffusers.enable(model, tile=(2, 2, 2), window=(1, 1, 1))
    with pytest.raises(RuntimeError, match=r"run inside the transformer's forward"):
        model.blocks[0].attn1(torch.randn(1, 105, 64), None, None, None)
