"""Tiny random-weight diffusers transformers, their inputs, and the independent reference:
diffusers' own attention processors driven with an attention mask built by
:func:`sta_dist.testing.sta_mask` (so the comparison does not go through sta_dist's kernels)."""

from __future__ import annotations

import copy

import torch

from sta_dist.testing import error_bound, max_error, sta_mask

# latents [B, 4, 3, 10, 14] -> canvas (3, 5, 7) after 1x2x2 patches; tile (2, 2, 3): grid (2, 3, 3), partial tiles
CANVAS, TILE, TEXT = (3, 5, 7), (2, 2, 3), 6


def quiet() -> None:
    """diffusers warns on every ``.to(float64)`` of a model with float32-kept modules."""
    from diffusers.utils import logging

    logging.set_verbosity_error()


def wan(seed: int = 0, layers: int = 2):
    from diffusers import WanTransformer3DModel

    quiet()
    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4,
                                 out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=layers,
                                 rope_max_seq_len=32).eval()


def hunyuan(seed: int = 0):
    from diffusers import HunyuanVideoTransformer3DModel

    quiet()
    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32,
                                          num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
                                          patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
                                          rope_axes_dim=(8, 12, 12)).eval()


def inputs(model, batch: int = 1, text_valid=(TEXT,), seed: int = 1, canvas=CANVAS) -> dict:
    """Forward kwargs for ``model``; ``text_valid`` per sample (HunyuanVideo's mask)."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, canvas[0], 2 * canvas[1], 2 * canvas[2], generator=g)
    text = torch.randn(batch, TEXT, 16, generator=g)
    kw = dict(hidden_states=latents, timestep=torch.full((batch,), 500), encoder_hidden_states=text,
              return_dict=False)
    if type(model).__name__.startswith("Hunyuan"):
        mask = torch.zeros(batch, TEXT, dtype=torch.long)
        for b, n in enumerate(text_valid):
            mask[b, :n] = 1
        kw.update(encoder_attention_mask=mask, pooled_projections=torch.randn(batch, 8, generator=g),
                  guidance=torch.full((batch,), 3000.0))
    return kw


def run(model, kw: dict, dtype=torch.float32) -> torch.Tensor:
    kw = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()}
    with torch.no_grad():
        return model(**kw)[0]


def attention_modules(model) -> list:
    if type(model).__name__.startswith("Wan"):
        return [b.attn1 for b in model.blocks]
    return [b.attn for b in (*model.transformer_blocks, *model.single_transformer_blocks)]


class MaskedStock:
    """Diffusers' own processor with the STA mask of its layer as ``attention_mask``."""

    def __init__(self, stock, windows, text_valid, canvas):
        self.stock, self.windows, self.text_valid, self.canvas = stock, windows, text_valid, canvas

    def mask(self, n_video: int, n_text: int, batch: int, device) -> torch.Tensor:
        """``[B, H, S, S]`` bool. Padding text queries see every valid key (as the stock
        model's do) instead of nothing: SDPA would give NaN for them, and their rows never
        reach the video output."""
        masks = []
        for b in range(batch):
            valid = self.text_valid[b] if n_text else 0
            heads = [sta_mask(self.canvas, TILE, w, n_text, valid, device=device) for w in self.windows]
            m = torch.stack(heads)
            keys_ok = torch.arange(n_video + n_text, device=device) < n_video + valid
            m[:, n_video + valid:] = keys_ok
            masks.append(m)
        return torch.stack(masks)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 image_rotary_emb=None):
        n_video = hidden_states.shape[1]
        if image_rotary_emb is None:  # Wan's self-attention
            mask = self.mask(n_video, 0, hidden_states.shape[0], hidden_states.device)
            return self.stock(attn, hidden_states, None, mask, rotary_emb)
        mask = self.mask(n_video, encoder_hidden_states.shape[1], hidden_states.shape[0], hidden_states.device)
        return self.stock(attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=mask,
                          image_rotary_emb=image_rotary_emb)


def masked_reference(model, kw: dict, layer_windows, text_valid=(TEXT,), dtype=torch.float64,
                     canvas=CANVAS) -> torch.Tensor:
    """The model's output with each attention layer masked to ``layer_windows[layer]``
    (one window per head), in ``dtype``, through diffusers' own attention."""
    ref_model = copy.deepcopy(model).to(dtype)
    for layer, module in enumerate(attention_modules(ref_model)):
        module.set_processor(MaskedStock(module.processor, layer_windows[layer], text_valid, canvas))
    return run(ref_model, kw, dtype)


def stock_reference(model, kw: dict, dtype=torch.float64) -> torch.Tensor:
    return run(copy.deepcopy(model).to(dtype), kw, dtype)


def check(out: torch.Tensor, ref: torch.Tensor, base: torch.Tensor, what: str = "") -> float:
    """``out`` (float32) against the float64 ``ref``, within twice the float32 ``base``'s own error."""
    err, bound = max_error(out, ref), error_bound(max_error(base, ref), torch.float32, ref)
    assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g}"
    return err
