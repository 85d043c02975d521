"""``DistributedSlidingTileAttention``: the drop-in module over the seed API's Impl with
a shard plan. Parallelism is applied from outside the model: the model keeps calling one
attention module on its local tokens.

Legend: ``_bshd`` = ``[batch, seq, heads, head_dim]``; local tensors hold the rank's
video tokens (see :class:`ShardPlan`), then all text tokens.
"""

from __future__ import annotations

from typing import Optional

import torch

from .backend import SlidingTileAttentionImpl, SlidingTileAttentionMetadata
from .config import WindowArg
from .parallel.plan import ShardPlan


class DistributedSlidingTileAttention(torch.nn.Module):
    """STA over a process group, sharded as ``plan`` says.

    ``attn(q_local, k_local, v_local, window=..., text_length=None) -> o_local``, each
    ``[B, n_local + L, H(kv), D]``, the output in the same token order as the input;
    ``text_length`` is one int or one per batch sample (list, tuple or 1-D tensor).
    """

    def __init__(self, num_heads: int, head_size: int, plan: ShardPlan, num_kv_heads: Optional[int] = None,
                 group=None, scale: Optional[float] = None, backend: str = "auto"):
        super().__init__()
        self.impl = SlidingTileAttentionImpl(num_heads, head_size, False, scale, num_kv_heads,
                                             plan=plan, group=group, backend=backend)

    @property
    def comm(self):
        return self.impl.comm

    @property
    def plan(self) -> ShardPlan:
        return self.impl.plan

    def forward(self, q_local: torch.Tensor, k_local: torch.Tensor, v_local: torch.Tensor,
                window: WindowArg, text_length=None) -> torch.Tensor:
        # Checked by the Impl on every rank together: one rank's bad input fails them all.
        meta = SlidingTileAttentionMetadata(current_timestep=0, STA_param=[window], text_length=text_length)
        box = self.impl.preprocess_qkv((q_local, k_local, v_local), meta)
        partial = self.impl.forward(*box, meta)
        return self.impl.postprocess_output(partial, meta)
