"""Selected tiles from tile means, on the device, without a host sync: scores, then
:class:`~sta_dist.selection.config.TopK` or :class:`~sta_dist.selection.config.Mass`.

Scores are taken in float64 from the float32 means (each product is exact there), so
every backend and rank ranks the tiles the same way but for ties within float64 rounding.
A tile's rank orders by score, then by tile index (ties go to the lower index): one
stable descending sort gives it.

Legend: ``_bhnd`` = ``[batch, heads, tiles, head_dim]``.
"""

from __future__ import annotations

import math

import torch

from .config import Mass, TopK


def scores(qbar_bhnd: torch.Tensor, kbar_bhnd: torch.Tensor) -> torch.Tensor:
    """``[B, Hs, n_q, n_kv]`` float64: ``qbar_i . kbar_j``."""
    return qbar_bhnd.double() @ kbar_bhnd.double().transpose(-1, -2)


def select_tiles(qbar_bhnd: torch.Tensor, kbar_bhnd: torch.Tensor, rule, head_dim: int) -> torch.Tensor:
    """``[B, Hs, n_q, n_kv]`` bool: the key tiles each query tile selects under ``rule``,
    from float32 means ``qbar [B, Hs, n_q, D]`` and ``kbar [B, Hs, n_kv, D]``."""
    s = scores(qbar_bhnd, kbar_bhnd)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices  # rank -> tile
    n = s.shape[-1]
    if isinstance(rule, TopK):
        keep = (torch.arange(n, device=s.device) < rule.k).expand_as(s)
    elif isinstance(rule, Mass):
        p = torch.softmax(s / math.sqrt(head_dim), -1).gather(-1, order)
        # Kept: a tile whose own P plus that of every tile ranked below it reaches 1 - p,
        # so the dropped ones are the largest lowest-ranked set whose total stays below.
        tail = p.flip(-1).cumsum(-1).flip(-1)
        keep = tail >= 1.0 - rule.p
    else:
        raise TypeError(f"rule must be TopK or Mass, got {rule!r}")
    return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, order, keep)
