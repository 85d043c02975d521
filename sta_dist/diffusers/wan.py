"""The sta_dist attention processor for Wan 2.1's self-attention (``blocks[i].attn1``);
cross-attention keeps diffusers' own processor.

Legend: ``_bshd`` = ``[batch, seq, heads, head_dim]``.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_wan import _get_qkv_projections

from .processor import LayerProcessor


class WanSTAProcessor(LayerProcessor):
    """Projections, QK norms and RoPE as diffusers' ``WanAttnProcessor`` computes them (its
    own helpers), then sliding tile attention over the canvas of the current call."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("WanSTAProcessor serves self-attention only (attn1): its window is the mask, "
                             "got encoder_hidden_states or attention_mask")
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        q_bshd, k_bshd, v_bshd = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        if rotary_emb is not None:
            # Wan's RoPE tables are [1, S, 1, D], interleaved (cos, sin) pairs: diffusers'
            # generic rotation with the pairs along the last dim is the same arithmetic.
            freqs = tuple(f[0, :, 0] for f in rotary_emb)
            q_bshd = apply_rotary_emb(q_bshd, freqs, use_real=True, use_real_unbind_dim=-1, sequence_dim=1)
            k_bshd = apply_rotary_emb(k_bshd, freqs, use_real=True, use_real_unbind_dim=-1, sequence_dim=1)
        o_bshd = self.handle.attend(q_bshd, k_bshd, v_bshd, self.layer, self._parallel_config)
        out = o_bshd.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))
