"""The sta_dist attention processor for Kandinsky 6 SR's video self-attention: its NABLA
(the clipped sliding-tile prior united with the key tiles that carry a share of the softmax
of tile-mean scores, per head: ``select=sta_dist.Mass(p, share_heads=False)``,
``window_rule="clipped"``) without FlexAttention, which diffusers needs compiled for it
(eager FlexAttention evaluates only the mask_mod, ``None`` here, so it runs dense).

The model orders its tokens in 8x8 spatial neighbourhoods of one frame (its "fractal"
flattening): sta_dist's tiled order with tiles of (1, 8, 8), so the sequence is read in
place (``layout="tiled"``). Projections, QK norms and RoPE are the model's, by import.

Legend: ``_bshd`` = ``[batch, seq, heads, head_dim]``.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_kandinsky6_sr import FRACTAL_BLOCK_SIZE, apply_rotary

from .processor import LayerProcessor

FRACTAL = (1, FRACTAL_BLOCK_SIZE, FRACTAL_BLOCK_SIZE)
"""The tile of the model's token order."""


class Kandinsky6SRSTAProcessor(LayerProcessor):
    """For ``Kandinsky6SRTransformer3DModel``'s ``visual_transformer_blocks[i].self_attention``.
    The window, threshold and tile are the handle's (by default the model's config:
    ``nabla_window``, ``nabla_threshold``); ``sparse_params`` is not read."""

    def __call__(self, attn, hidden_states: torch.Tensor, rotary_emb: torch.Tensor, sparse_params=None):
        q_bshd, k_bshd, v_bshd = (proj(hidden_states).unflatten(-1, (attn.num_heads, -1))
                                  for proj in (attn.to_query, attn.to_key, attn.to_value))
        q_bshd = attn.query_norm(q_bshd.float()).type_as(q_bshd)
        k_bshd = attn.key_norm(k_bshd.float()).type_as(k_bshd)
        q_bshd, k_bshd = apply_rotary(q_bshd, rotary_emb), apply_rotary(k_bshd, rotary_emb)
        o_bshd = self.handle.attend(q_bshd, k_bshd, v_bshd, self.layer, self._parallel_config)
        return attn.out_layer(o_bshd.flatten(2, 3).to(q_bshd.dtype))
