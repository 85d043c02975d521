"""The sta_dist attention processor for HunyuanVideo-1.5's joint video + text attention:
its SSTA (the sliding-tile window united with the key tiles of highest tile-mean score,
``select=sta_dist.TopK(k)``, ``window_rule="fastvideo"``), which diffusers runs as dense
attention. The blocks are HunyuanVideo's dual-stream blocks (the same projections, QK norms
and RoPE), so the processor is :class:`~sta_dist.diffusers.hunyuan.HunyuanVideoSTAProcessor`;
what differs is the text: image, ByT5 and MLLM tokens joined, valid ones first, their mask
handed to every block, from which the valid counts are read (once per forward).
"""

from __future__ import annotations

from .hunyuan import HunyuanVideoSTAProcessor


class HunyuanVideo15STAProcessor(HunyuanVideoSTAProcessor):
    """For ``HunyuanVideo15Transformer3DModel``'s ``transformer_blocks[i].attn``."""

    def _attend(self, q_bshd, k_bshd, v_bshd, attention_mask):
        return self.handle.attend(q_bshd, k_bshd, v_bshd, self.layer, self._parallel_config, text_mask=attention_mask)
