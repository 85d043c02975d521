"""The table path: each query tile's key tiles as a list, the window's tiles united with
the selected ones, built on the device without a host sync. The Triton kernel walks
these lists (``kernels/sta_fwd.py``, ``TABLE``); the torch backend gathers them.

Legend: ``_bhqn`` = ``[batch, heads, query tiles, key tiles]`` (key tiles by global id).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .. import geometry
from ..geometry import Triple
from .rules import rule_volume, window_mask


@dataclass(frozen=True)
class KeyTiles:
    """Per (batch sample, head, query tile): the global ids of the key tiles it attends.

    ``keys [Bk, Hk, n_q, width]`` int32, ascending, padded past ``counts`` (entries there
    are never read); ``counts [Bk, Hk, n_q]`` int32. ``Bk`` is 1 (every sample) or ``B``;
    ``Hk`` is 1 (every head) or the call's query heads; query tiles are the layout's
    ``q_tiles`` in order."""

    keys: torch.Tensor
    counts: torch.Tensor

    def samples(self, index) -> "KeyTiles":
        """The tables of some batch samples (``index``: a slice or a list)."""
        if self.keys.shape[0] == 1:
            return self
        return KeyTiles(self.keys[index], self.counts[index])


def union_with_windows(selected_bhqn: Optional[torch.Tensor], windows: Optional[Sequence[Triple]], rule: str,
                       q_tiles: Sequence[int], grid: Triple, device) -> torch.Tensor:
    """``[Bk, Hm, n_q, n]`` bool: each query tile's window (``windows``: one per query
    head, or ``None`` for none) united with its selected tiles (``[B, Hs, n_q, n]`` or
    ``None``). One head (``Hm = 1``) when the selection is shared or absent and every
    head has the same window, else one per query head."""
    if windows is None:
        return selected_bhqn
    if not windows:  # a rank without heads
        empty = torch.zeros(1, 0, len(q_tiles), geometry.num_tiles(grid), dtype=torch.bool, device=device)
        return empty if selected_bhqn is None else selected_bhqn[:, :0] | empty
    distinct = list(dict.fromkeys(tuple(w) for w in windows))
    masks = {w: window_mask(q_tiles, w, grid, rule, device) for w in distinct}
    if len(distinct) == 1:
        win = masks[distinct[0]][None, None]
    else:
        win = torch.stack([masks[tuple(w)] for w in windows])[None]
    return win if selected_bhqn is None else selected_bhqn | win


def table_width(select, windows: Optional[Sequence[Triple]], rule: str, grid: Triple, n_tiles: int) -> int:
    """A bound on the key tiles one query tile attends, known without looking at the data
    (so the table is built without a host sync): the widest window plus ``k`` for
    ``TopK``, every tile for ``Mass`` and masks."""
    from .config import TopK

    widest = max((rule_volume(tuple(w), grid, rule) for w in set(map(tuple, windows))), default=0) if windows else 0
    if select is None:
        return widest
    if isinstance(select, TopK):
        return min(n_tiles, widest + select.k)
    return n_tiles


def key_tiles(attended_bhqn: torch.Tensor, width: int) -> KeyTiles:
    """The lists of ``attended [Bk, Hk, n_q, n]``, ``width`` entries wide (a bound on
    every row's count)."""
    n = attended_bhqn.shape[-1]
    ids = torch.where(attended_bhqn, torch.arange(n, device=attended_bhqn.device, dtype=torch.int32), n)
    keys = torch.sort(ids, dim=-1).values[..., :max(width, 1)].contiguous()
    return KeyTiles(keys, attended_bhqn.sum(-1, dtype=torch.int32))
