"""``DistributedSlidingTileAttention``: the drop-in module over the seed API's Impl with
a shard plan. Parallelism is applied from outside the model: the model keeps calling one
attention module on its local tokens.

Legend: ``_bshd`` = ``[batch, seq, heads, head_dim]``; local tensors hold the rank's
video tokens (see :class:`ShardPlan`), then all text tokens.
"""

from __future__ import annotations

from typing import Optional

import torch

from .backend import SlidingTileAttentionImpl
from .config import WindowArg
from .parallel import call
from .parallel.plan import ShardPlan


class DistributedSlidingTileAttention(torch.nn.Module):
    """STA over a process group, sharded as ``plan`` says.

    ``attn(q_local, k_local, v_local, window=..., text_length=None) -> o_local``, each
    ``[B, n_local + L, H(kv), D]``, the output in the same token order as the input;
    ``text_length`` is one int or one per batch sample (list, tuple or 1-D tensor).
    ``select=`` / ``window_rule=`` as in :func:`sta_dist.sliding_tile_attention` (a mask is
    the whole call's, the same on every rank): each rank selects for its own query tiles
    and fetches exactly the key tiles they attend; ``return_selection=True`` also returns
    a :class:`~sta_dist.parallel.selected.SelectionInfo` (what the rank attended and fetched).
    ``overlap=False``: the executor's staged order (each exchange waited for before the
    attention that reads it), the same output bit for bit (:mod:`sta_dist.parallel.call`).
    """

    def __init__(self, num_heads: int, head_size: int, plan: ShardPlan, num_kv_heads: Optional[int] = None,
                 group=None, scale: Optional[float] = None, backend: str = "auto", causal: bool = False):
        super().__init__()
        self.impl = SlidingTileAttentionImpl(num_heads, head_size, causal, scale, num_kv_heads,
                                             plan=plan, group=group, backend=backend)

    @property
    def comm(self):
        return self.impl.comm

    @property
    def plan(self) -> ShardPlan:
        return self.impl.plan

    def forward(self, q_local: torch.Tensor, k_local: torch.Tensor, v_local: torch.Tensor,
                window: WindowArg, text_length=None, select=None, window_rule: str = "sta",
                return_selection: bool = False, overlap: bool = True):
        if select is None and window_rule == "fastvideo" and window is not None and not return_selection:
            window, window_rule = _fastvideo_as_sta(window, self.impl.num_heads), "sta"
        attn = self.impl.attention()
        # Checked on every rank together: one rank's bad input fails them all.
        request = call.check_call(q_local, k_local, v_local, attn, self.plan, self.comm, lambda: window, text_length,
                                  select, window_rule)
        return call.run(q_local, k_local, v_local, request, attn, self.plan, self.comm, overlap=overlap,
                        return_selection=return_selection)


def _fastvideo_as_sta(window: WindowArg, num_heads: int):
    """FastVideo-rule windows as the sta_dist windows they equal (the window path); a
    window that does not parse is passed on as it is, for the collective check to refuse."""
    from .config import normalize_windows
    from .selection.rules import sta_window

    try:
        return [sta_window(w, "fastvideo") for w in normalize_windows(window, num_heads)]
    except (TypeError, ValueError):
        return window
