"""The window rules as index math: which key tiles a query tile's window holds under
``"sta"``, ``"fastvideo"`` or ``"clipped"`` (:data:`~sta_dist.selection.config.WINDOW_RULES`).
Pure functions of integers (the masks come back as bool tensors built from them).

Every rule's window is a box, one interval per axis, and each interval's ends are
non-decreasing in the query coordinate, so the windows of a box of query tiles reach a
box of key tiles (:func:`rule_key_box`), as for sta_dist's own rule.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from .. import geometry
from ..geometry import Box, Triple


def fastvideo_as_sta(k: int) -> int:
    """FastVideo's window of ``k`` tiles (half-width ``k // 2``, centre clamped into the
    grid) is exactly sta_dist's window of ``2 * (k // 2) + 1`` tiles: ``k + 1`` for even
    ``k`` (proven against the centre-clamp formula by brute force in the tests)."""
    return 2 * (k // 2) + 1


def rule_span(q: int, k: int, n: int, rule: str) -> tuple[int, int]:
    """Half-open key tile range ``[lo, hi)`` on one axis for query tile ``q``, window
    ``k``, ``n`` tiles."""
    if rule == "sta":
        return geometry.window_span(q, k, n)
    if rule == "fastvideo":
        return geometry.window_span(q, fastvideo_as_sta(k), n)
    if rule == "clipped":
        return max(q - k // 2, 0), min(q + k // 2 + 1, n)
    raise ValueError(f"window_rule must be one of ('sta', 'fastvideo', 'clipped'), got window_rule={rule!r}")


def sta_window(window: Triple, rule: str) -> Optional[Triple]:
    """The sta_dist window that equals ``window`` under ``rule`` for every query tile, or
    ``None`` when there is none (``"clipped"`` is cut at the border, not shifted)."""
    if rule == "sta":
        return tuple(window)  # type: ignore[return-value]
    if rule == "fastvideo":
        return tuple(fastvideo_as_sta(k) for k in window)  # type: ignore[return-value]
    return None


def covering_sta_window(window: Triple, rule: str) -> Triple:
    """An sta_dist window that holds ``window``'s tiles under ``rule`` for every query tile
    (equal for "sta" and "fastvideo"; for "clipped", the shifted box of the same width,
    which contains the cut one): what the schedule's head costs and fallback look at."""
    return sta_window(window, rule) or tuple(fastvideo_as_sta(k) for k in window)  # type: ignore[return-value]


def rule_box(q_tile: Triple, window: Triple, grid: Triple, rule: str) -> Box:
    spans = [rule_span(q, k, n, rule) for q, k, n in zip(q_tile, window, grid)]
    return Box(tuple(s[0] for s in spans), tuple(s[1] for s in spans))  # type: ignore[arg-type]


def rule_tiles(q_tile: Triple, window: Triple, grid: Triple, rule: str) -> list[int]:
    return rule_box(q_tile, window, grid, rule).tile_ids(grid)


def rule_volume(window: Triple, grid: Triple, rule: str) -> int:
    """The most key tiles one query tile's window holds."""
    widths = [max(hi - lo for lo, hi in (rule_span(q, k, n, rule) for q in range(n))) for k, n in zip(window, grid)]
    return geometry.volume(tuple(widths))  # type: ignore[arg-type]


def rule_key_box(box: Box, window: Triple, grid: Triple, rule: str) -> Box:
    """Every key tile some query tile of ``box`` attends under ``window`` and ``rule``: the
    ends of each axis' interval are non-decreasing in the query coordinate, so the union is
    the interval from the first query's start to the last query's end."""
    if box.empty:
        return box
    lo = tuple(rule_span(box.lo[a], window[a], grid[a], rule)[0] for a in range(3))
    hi = tuple(rule_span(box.hi[a] - 1, window[a], grid[a], rule)[1] for a in range(3))
    return Box(lo, hi)  # type: ignore[arg-type]


def window_mask(q_tiles: Sequence[int], window: Triple, grid: Triple, rule: str,
                device=torch.device("cpu")) -> torch.Tensor:
    """``[len(q_tiles), n_tiles]`` bool: which key tiles each query tile's window holds
    (cached per device)."""
    return _window_mask(tuple(q_tiles), tuple(window), tuple(grid), rule, torch.device(device))


@functools.lru_cache(maxsize=256)
def _window_mask(q_tiles: tuple[int, ...], window: Triple, grid: Triple, rule: str,
                 device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        return _window_mask(q_tiles, window, grid, rule, torch.device("cpu")).to(device)
    ids = torch.tensor(q_tiles, dtype=torch.long).reshape(-1)
    n = geometry.num_tiles(grid)
    q = torch.stack([ids // (grid[1] * grid[2]), (ids // grid[2]) % grid[1], ids % grid[2]], 1)  # [nq, 3]
    all_ids = torch.arange(n)
    c = torch.stack([all_ids // (grid[1] * grid[2]), (all_ids // grid[2]) % grid[1], all_ids % grid[2]], 1)
    inside = torch.ones(len(q_tiles), n, dtype=torch.bool)
    for a in range(3):
        spans = torch.tensor([rule_span(x, window[a], grid[a], rule) for x in range(grid[a])]).reshape(-1, 2)
        lo, hi = spans[q[:, a], 0], spans[q[:, a], 1]
        inside &= (lo[:, None] <= c[None, :, a]) & (c[None, :, a] < hi[:, None])
    return inside
