"""Tiny random-weight HunyuanVideo-1.5 and Kandinsky 6 SR transformers, their inputs, and
the independent references: each model's own processor with its attention function
replaced (by the one reference, ``sta_dist.testing.reference_attention``, for HunyuanVideo-1.5's
SSTA, which diffusers does not have; by masked SDPA over the block mask Kandinsky's own
``nabla_block_mask`` built, for NABLA, which eager FlexAttention would run dense)."""

from __future__ import annotations

import contextlib
import copy
from unittest import mock

import torch
import torch.nn.functional as F

import sta_dist
from sta_dist.testing import attended_tiles, reference_attention, reference_selection
from tests.diffusers_models import quiet

HV15_CANVAS, HV15_TILE = (3, 5, 7), (2, 2, 3)  # latents [B, 4, 3, 10, 14], 1x2x2 patches: partial tiles
TEXT_1, TEXT_2, IMAGE = 5, 3, 4


def hunyuan15(seed: int = 0):
    from diffusers import HunyuanVideo15Transformer3DModel

    quiet()
    torch.manual_seed(seed)
    return HunyuanVideo15Transformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32,
                                            num_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1,
                                            text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8,
                                            rope_axes_dim=(8, 12, 12)).eval()


def hunyuan15_inputs(batch: int = 2, seed: int = 1, image: bool = True, canvas=HV15_CANVAS) -> dict:
    """Two samples with different valid MLLM and ByT5 text; image tokens valid unless
    ``image=False`` (text to video: zero image embeddings)."""
    g = torch.Generator().manual_seed(seed)
    mask_1 = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])[:batch]
    mask_2 = torch.tensor([[1, 0, 0], [1, 1, 0]])[:batch]
    embeds = torch.randn(batch, IMAGE, 8, generator=g) if image else torch.zeros(batch, IMAGE, 8)
    latents = torch.randn(batch, 4, canvas[0], 2 * canvas[1], 2 * canvas[2], generator=g)
    return dict(hidden_states=latents, timestep=torch.full((batch,), 500.0),
                encoder_hidden_states=torch.randn(batch, TEXT_1, 16, generator=g), encoder_attention_mask=mask_1,
                encoder_hidden_states_2=torch.randn(batch, TEXT_2, 8, generator=g), encoder_attention_mask_2=mask_2,
                image_embeds=embeds, return_dict=False)


KANDINSKY_FRAMES, KANDINSKY_H, KANDINSKY_W = 3, 16, 24  # tiles of (1, 8, 8): grid (3, 2, 3)


def kandinsky_sr(seed: int = 0, threshold: float = 0.7, window=(3, 3, 1)):
    from diffusers import Kandinsky6SRTransformer3DModel

    quiet()
    torch.manual_seed(seed)
    return Kandinsky6SRTransformer3DModel(in_visual_dim=4, out_visual_dim=4, time_dim=16, patch_size=(1, 1, 1),
                                          model_dim=64, ff_dim=64, num_visual_blocks=2, axes_dims=(8, 12, 12),
                                          nabla_threshold=threshold, nabla_window=window).eval()


def kandinsky_inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, KANDINSKY_FRAMES, KANDINSKY_H, KANDINSKY_W, 9, generator=g),
                timestep=torch.full((1,), 500.0), return_dict=False)


def run(model, kw: dict, dtype=torch.float32) -> torch.Tensor:
    kw = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()}
    with torch.no_grad():
        return model(**kw)[0]


@contextlib.contextmanager
def hunyuan15_reference_attention(tile, window, select, window_rule, canvas=HV15_CANVAS):
    """HunyuanVideo-1.5's own processor, its attention the reference: SSTA as specified,
    the valid text of each sample read from the mask the processor built."""
    from diffusers.models.transformers import transformer_hunyuan_video15 as module

    n_video = canvas[0] * canvas[1] * canvas[2]

    def attention(query, key, value, attn_mask=None, **_):
        text_length = [int(attn_mask[b, 0, 0].sum()) - n_video for b in range(query.shape[0])]
        return reference_attention(query, key, value, canvas=canvas, tile=tile, window=window, text_length=text_length,
                                   select=select, window_rule=window_rule, compute_dtype=query.dtype)

    with mock.patch.object(module, "dispatch_attention_fn", attention):
        yield


@contextlib.contextmanager
def nabla_as_masked_sdpa(threshold: float, window, checks: list):
    """Kandinsky 6 SR's own processor and its own NABLA block mask, attended by masked SDPA
    (eager FlexAttention would ignore the block mask's sparsity: its mask_mod is None). Each
    layer also appends to ``checks`` whether NABLA's blocks equal the reference's
    ``Mass(threshold)`` selection united with the ``"clipped"`` window, for the same q and k."""
    from diffusers.models.transformers import transformer_kandinsky6_sr as module

    canvas, tile = (KANDINSKY_FRAMES, KANDINSKY_H, KANDINSKY_W), (1, 8, 8)

    def attention(query, key, value, attn_mask=None, **_):
        blocks = attn_mask.to_dense().bool()  # [B, H, n, n], blocks in the model's (tiled) order
        tokens = blocks.repeat_interleave(64, 2).repeat_interleave(64, 3)
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                             attn_mask=tokens)
        q, k = (sta_dist.to_natural(x, canvas, tile) for x in (query, key))
        ours = reference_selection(q, k, canvas, tile, sta_dist.Mass(threshold, share_heads=False))
        ours = attended_tiles(canvas, tile, [tuple(window)] * query.shape[2], "clipped", ours, query.shape[0])
        checks.append(torch.equal(ours, blocks))
        return out.transpose(1, 2)

    with mock.patch.object(module, "dispatch_attention_fn", attention):
        yield


def reference_model(model, dtype=torch.float64):
    return copy.deepcopy(model).to(dtype)


def hunyuan15_parallel(rank, world, modes, canvas, select):
    """On every rank of a gloo group: HunyuanVideo-1.5 in SSTA mode with sta_dist's own
    ``parallel=`` for each mode: the full output and the bytes of the halo exchange."""
    import sta_dist.diffusers as sta_diffusers

    results = []
    for mode in modes:
        model = hunyuan15()
        handle = sta_diffusers.enable(model, tile=HV15_TILE, window=(1, 1, 1), select=select, window_rule="fastvideo",
                                      parallel=mode)
        out = run(model, hunyuan15_inputs(canvas=canvas))
        results.append((out, dict(handle.bytes_sent())))
    return results
