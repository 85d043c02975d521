"""What a caller asks for beyond the window: ``TopK``, ``Mass`` or an explicit tile mask,
and the window rule. Frozen, validated on construction; a call's checks (against the
tile count, the batch and the heads) live in :func:`check_select`.

Semantics (docs/design.md §1): per batch sample, head and tile, the mean of ``q`` (and
of ``k``) over the tile's tokens; ``s[i, j] = qbar_i . kbar_j``. ``TopK(k)``: query tile
``i`` selects the ``k`` key tiles of highest score, ties to the lower tile index.
``Mass(p)``: ``P[i, :] = softmax_j(s[i, :] / sqrt(D))``; tile ``i`` drops the largest set
of its lowest-scoring key tiles whose total ``P`` stays below ``1 - p``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch

WINDOW_RULES = ("sta", "fastvideo", "clipped")
"""``"sta"``: exactly ``min(k, n)`` tiles, shifted inward at the border (sta_dist's rule);
``"fastvideo"``: half-width ``k // 2`` around a centre clamped to ``[k//2, n-1-k//2]``
(``k + 1`` tiles for even ``k``; HunyuanVideo-1.5's kernel rule too); ``"clipped"``: the
tiles within ``k // 2`` of the query tile, cut at the border (NABLA's prior)."""


def _check_share_heads(owner: str, share_heads) -> None:
    if not isinstance(share_heads, bool):
        raise TypeError(f"{owner}.share_heads must be a bool, got share_heads={share_heads!r}")


@dataclass(frozen=True, slots=True)
class TopK:
    """Each query tile selects the ``k`` key tiles of highest tile-mean score."""

    k: int
    """Key tiles selected per query tile, ``1 <= k <= n_tiles`` (checked per call)."""
    share_heads: bool = True
    """One selection for all heads, from means averaged over the query heads (q) and the
    kv heads (k); else one selection per query head."""

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not hasattr(self.k, "__index__"):
            raise TypeError(f"TopK.k must be an int >= 1, got k={self.k!r} ({type(self.k).__name__})")
        object.__setattr__(self, "k", int(self.k))
        if self.k < 1:
            raise ValueError(f"TopK.k must be an int >= 1, got k={self.k}")
        _check_share_heads("TopK", self.share_heads)


@dataclass(frozen=True, slots=True)
class Mass:
    """Each query tile keeps the key tiles that carry a share ``p`` of the softmax of its
    tile-mean scores (NABLA's rule)."""

    p: float
    """The share kept, ``0 < p <= 1`` (``p = 1`` keeps every tile)."""
    share_heads: bool = False
    """As :attr:`TopK.share_heads`; NABLA selects per head."""

    def __post_init__(self) -> None:
        if isinstance(self.p, bool) or not isinstance(self.p, (int, float)):
            raise TypeError(f"Mass.p must be a float in (0, 1], got p={self.p!r} ({type(self.p).__name__})")
        p = float(self.p)
        if not (math.isfinite(p) and 0.0 < p <= 1.0):
            raise ValueError(f"Mass.p must be a float in (0, 1], got p={self.p!r}")
        object.__setattr__(self, "p", p)
        _check_share_heads("Mass", self.share_heads)


Rule = Union[TopK, Mass]
SelectArg = Union[TopK, Mass, torch.Tensor, None]


def check_window_rule(window_rule) -> str:
    if window_rule not in WINDOW_RULES:
        raise ValueError(f"window_rule must be one of {WINDOW_RULES}, got window_rule={window_rule!r}")
    return window_rule


def check_select(select: SelectArg, batch: int, num_heads: int, num_tiles: int, device) -> SelectArg:
    """``select`` checked against one call: a rule whose ``k`` fits the ``num_tiles`` key
    tiles, or a bool mask ``[B, H or 1, n_tiles, n_tiles]`` (moved to ``device``)."""
    if select is None or isinstance(select, Mass):
        return select
    if isinstance(select, TopK):
        if select.k > num_tiles:
            raise ValueError(f"TopK.k must be at most the number of key tiles n_tiles={num_tiles}, got k={select.k}")
        return select
    if not isinstance(select, torch.Tensor):
        raise TypeError(f"select must be sta_dist.TopK, sta_dist.Mass or a bool tile mask tensor, got "
                        f"select={select!r} ({type(select).__name__})")
    if select.dtype != torch.bool:
        raise TypeError(f"select mask must have dtype torch.bool [B, H or 1, n_q_tiles, n_kv_tiles], got "
                        f"select.dtype={select.dtype}")
    shape = tuple(select.shape)
    if len(shape) != 4 or shape[0] != batch or shape[1] not in (1, num_heads) or shape[2:] != (num_tiles, num_tiles):
        raise ValueError(f"select mask must be [B, H or 1, n_q_tiles, n_kv_tiles] = [{batch}, {num_heads} or 1, "
                         f"{num_tiles}, {num_tiles}], got select.shape={shape}")
    return select.to(device)


def check_window_or_select(window, select: SelectArg) -> None:
    if window is None and select is None:
        raise ValueError("window=None means the selection alone: give select=sta_dist.TopK(...), "
                         "sta_dist.Mass(...) or a tile mask, got window=None and select=None")


def describe(select: SelectArg, window_rule: str) -> str:
    """A short, rank-independent description (for the distributed agreement check)."""
    if isinstance(select, torch.Tensor):
        what = f"mask{tuple(select.shape)}"
    else:
        what = repr(select)
    return f"select={what} window_rule={window_rule}"


