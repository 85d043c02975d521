"""Window plus selected tiles inside diffusers (tiny random weights, float32, one process):
HunyuanVideo-1.5 in SSTA mode against its own processor with the reference as its attention;
Kandinsky 6 SR's NABLA without FlexAttention against its own processor and block mask through
masked SDPA (and NABLA's blocks equal to the reference's Mass + clipped window); whole-grid
windows equal the stock model; refusals name what is wrong."""

import pytest
import torch

pytest.importorskip("diffusers")

import sta_dist  # noqa: E402
import sta_dist.diffusers as sta_diffusers  # noqa: E402
from sta_dist.diffusers.handle import CallContext, _with_text_from_mask  # noqa: E402
from sta_dist.testing import max_error  # noqa: E402
from tests import diffusers_models as dm  # noqa: E402
from tests import diffusers_selection_models as sm  # noqa: E402
from tests.world_spawns import shares  # noqa: E402


def test_hunyuan15_whole_grid_window_equals_stock():
    """Joint text of three parts, different valid counts per sample, read from the blocks'
    mask: with a window over the whole grid sta_dist is the stock model."""
    model = sm.hunyuan15()
    kw = sm.hunyuan15_inputs()
    stock, ref = sm.run(model, kw), sm.run(sm.reference_model(model), kw, torch.float64)
    handle = sta_diffusers.enable(model, tile=sm.HV15_TILE, window=(2, 3, 3))
    dm.check(sm.run(model, kw), ref, stock, "hunyuan-1.5 whole grid")
    assert handle.context is None
    sta_diffusers.disable(model)
    assert torch.equal(sm.run(model, kw), stock)


@pytest.mark.parametrize("select, window, image", [
    (sta_dist.TopK(2), (1, 1, 1), True),
    (sta_dist.TopK(3, share_heads=False), (2, 1, 2), False),
    (sta_dist.Mass(0.5), None, True),
], ids=["topk-shared", "topk-per-head-t2v", "mass-alone"])
def test_hunyuan15_ssta_equals_its_processor_with_the_reference(select, window, image):
    model = sm.hunyuan15()
    kw = sm.hunyuan15_inputs(image=image)
    with sm.hunyuan15_reference_attention(sm.HV15_TILE, window, select, "fastvideo"):
        ref = sm.run(sm.reference_model(model), kw, torch.float64)
        base = sm.run(sm.reference_model(model, torch.float32), kw)
    dense = sm.run(sm.reference_model(model), kw, torch.float64)
    sta_diffusers.enable(model, tile=sm.HV15_TILE, window=window, select=select, window_rule="fastvideo")
    err = dm.check(sm.run(model, kw), ref, base, f"hunyuan-1.5 {select} {window}")
    assert max_error(dense, ref) > 100 * max(err, 1e-6)  # the selection matters


def test_kandinsky_nabla_without_flex_equals_its_processor():
    """enable(model) with nothing else runs the model's NABLA: the same blocks as its own
    nabla_block_mask, the same output as its processor over that mask."""
    model = sm.kandinsky_sr(threshold=0.7, window=(3, 3, 1))
    kw = sm.kandinsky_inputs()
    checks: list = []
    with sm.nabla_as_masked_sdpa(0.7, (3, 3, 1), checks):
        ref = sm.run(sm.reference_model(model), kw, torch.float64)
        base = sm.run(sm.reference_model(model, torch.float32), kw)
    assert checks == [True] * 4  # both runs, both layers: NABLA's blocks = Mass(0.7, per head) + the clipped window
    dense = sm.run(sm.reference_model(model), kw, torch.float64)  # eager Flex: the block mask is not applied
    handle = sta_diffusers.enable(model)
    assert (handle.tile, handle.window_rule, handle.select) == ((1, 8, 8), "clipped", sta_dist.Mass(0.7))
    err = dm.check(sm.run(model, kw), ref, base, "kandinsky nabla")
    assert max_error(dense, ref) > 100 * max(err, 1e-6)


def test_kandinsky_refusals():
    model = sm.kandinsky_sr()
    with pytest.raises(ValueError, match=r"orders its tokens in tiles of \(1, 8, 8\): tile must be \(1, 8, 8\) "
                                         r"\(or None\), got tile=\(1, 4, 4\)"):
        sta_diffusers.enable(model, tile=(1, 4, 4))
    with pytest.raises(ValueError, match=r"parallel must be None, got parallel='tile'"):
        sta_diffusers.enable(model, parallel="tile")
    with pytest.raises(TypeError, match=r"select must be sta_dist.TopK, sta_dist.Mass or None here"):
        sta_diffusers.enable(model, select=torch.ones(1, 1, 18, 18, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"tile=\(tt, th, tw\) must be given for HunyuanVideo15Transformer3DModel"):
        sta_diffusers.enable(sm.hunyuan15(), window=(1, 1, 1))


def test_text_mask_must_hold_valid_tokens_first():
    ctx = CallContext((1, 2, 2), 4, None, None)
    assert _with_text_from_mask(ctx, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])).text_length == (2, 4)
    with pytest.raises(ValueError, match=r"the text mask must hold its valid tokens first"):
        _with_text_from_mask(ctx, torch.tensor([[1, 0, 1, 0]]))
    with pytest.raises(ValueError, match=r"the text mask must be \[B, L\] with L = 4 text tokens, got shape \(1, 3\)"):
        _with_text_from_mask(ctx, torch.tensor([[1, 0, 1]]))


SHARDED = ((3, 8, 9), sta_dist.TopK(2))  # grid (2, 4, 3): boxes with real halos


@shares("diffusers", 2)
def test_hunyuan15_ssta_sharded_on_gloo_equals_the_reference(world_spawn):
    """The whole transformer over 2 ranks (tile and head mode), SSTA with TopK(2): every
    rank's output within the float32 bound of the float64 reference, identical across ranks
    (the ranks: the diffusers family's shared spawn, tests/world_spawns.py)."""
    canvas, select = SHARDED
    model, kw = sm.hunyuan15(), sm.hunyuan15_inputs(canvas=canvas)
    with sm.hunyuan15_reference_attention(sm.HV15_TILE, (1, 1, 1), select, "fastvideo", canvas=canvas):
        ref = sm.run(sm.reference_model(model), kw, torch.float64)
        base = sm.run(sm.reference_model(model, torch.float32), kw)
    results = world_spawn("diffusers", 2, "test_diffusers_selection:hunyuan15 parallel")
    for i, mode in enumerate(("tile", "head")):
        outs = [results[r][i][0] for r in range(2)]
        for rank, out in enumerate(outs):
            dm.check(out, ref, base, f"hunyuan-1.5 {mode} rank {rank}")
        assert torch.equal(outs[0], outs[1])
        exchange = "halo exchange" if mode == "tile" else "head all-to-all"
        assert sum(results[r][i][1].get(exchange, 0) for r in range(2)) > 0


def spawn_parts(family: str, world: int, workdir) -> list:
    """This module's call in the diffusers family's shared spawn (tests/world_spawns.py)."""
    if (family, world) != ("diffusers", 2):
        return []
    return [("hunyuan15 parallel", sm.hunyuan15_parallel, (("tile", "head"), *SHARDED))]
