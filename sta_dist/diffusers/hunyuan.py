"""The sta_dist attention processor for HunyuanVideo's joint video + text attention (its
dual-stream and single-stream blocks), and a context-parallel plan for diffusers'
``enable_parallelism`` (diffusers ships none for this model).

Legend: ``_bshd`` = ``[batch, seq, heads, head_dim]``; sequences are the video tokens
(this rank's, when sharded), then every text token.
"""

from __future__ import annotations

import torch
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.embeddings import apply_rotary_emb

from .processor import LayerProcessor

# Video tokens split after the patch embedding (with their RoPE rows), text kept whole on
# every rank, the output gathered after the projection. Pass it as
# ``transformer.enable_parallelism(config=..., cp_plan=HUNYUAN_VIDEO_CP_PLAN)``.
HUNYUAN_VIDEO_CP_PLAN = {
    "rope": {
        0: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
        1: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
    },
    "transformer_blocks.0": {
        "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False),
    },
    "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
}


class HunyuanVideoSTAProcessor(LayerProcessor):
    """Projections, QK norms and RoPE (on the video rows) as diffusers'
    ``HunyuanVideoAttnProcessor2_0`` computes them, then sliding tile attention: video
    queries see their window and the valid text, text queries see everything valid. The
    valid text count of each sample comes from the transformer's ``encoder_attention_mask``
    (read once per forward), so the ``attention_mask`` argument is not needed."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        if encoder_hidden_states is None:
            raise ValueError("HunyuanVideoSTAProcessor needs the text stream (encoder_hidden_states), got None")
        n_text = encoder_hidden_states.shape[1]
        single_stream = attn.add_q_proj is None
        if single_stream:  # text rides along in the same projections
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        q_bshd, k_bshd, v_bshd = (proj(hidden_states).unflatten(2, (attn.heads, -1))
                                  for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q_bshd = attn.norm_q(q_bshd)
        if attn.norm_k is not None:
            k_bshd = attn.norm_k(k_bshd)
        if image_rotary_emb is not None:
            q_bshd, k_bshd = (self._rope(x, image_rotary_emb, n_text if single_stream else 0) for x in (q_bshd, k_bshd))
        if not single_stream:
            text = [proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                    for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]
            if attn.norm_added_q is not None:
                text[0] = attn.norm_added_q(text[0])
            if attn.norm_added_k is not None:
                text[1] = attn.norm_added_k(text[1])
            q_bshd, k_bshd, v_bshd = (torch.cat([x, t], dim=1) for x, t in zip((q_bshd, k_bshd, v_bshd), text))

        o_bshd = self._attend(q_bshd, k_bshd, v_bshd, attention_mask)
        out = o_bshd.flatten(2, 3).to(q_bshd.dtype)
        video, text_out = out[:, :-n_text], out[:, -n_text:]
        if getattr(attn, "to_out", None) is not None:
            video = attn.to_out[1](attn.to_out[0](video))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return video, text_out

    def _attend(self, q_bshd, k_bshd, v_bshd, attention_mask):
        """The valid text comes from the transformer's ``encoder_attention_mask``."""
        return self.handle.attend(q_bshd, k_bshd, v_bshd, self.layer, self._parallel_config)

    @staticmethod
    def _rope(x_bshd: torch.Tensor, freqs, n_text: int) -> torch.Tensor:
        """RoPE on the video rows; the trailing ``n_text`` rows are left as they are."""
        if not n_text:
            return apply_rotary_emb(x_bshd, freqs, sequence_dim=1)
        return torch.cat([apply_rotary_emb(x_bshd[:, :-n_text], freqs, sequence_dim=1), x_bshd[:, -n_text:]], dim=1)
