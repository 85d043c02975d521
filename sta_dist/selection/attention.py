"""Window plus selected tiles on one device: the selection computed on the device (tile
means, scores, TopK / Mass, the union with the window as per-query-tile key-tile lists),
then one launch over those lists. What :func:`sta_dist.sliding_tile_attention` runs when
it is given ``select=``, ``window=None``, a ``window_rule`` other than sta_dist's, or
``return_selection``.

Legend: ``_bshd`` = ``[batch, seq, heads, head_dim]``; ``_bhqn`` = ``[batch, heads, query
tiles, key tiles]``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..geometry import Triple
from ..local import LocalHeads, LocalLayout, LocalText, call_layout, index_on
from ..validation import check_call, check_layout
from .choose import select_tiles
from .config import check_select, check_window_or_select, check_window_rule
from .means import means, tile_counts, tile_sums
from .rules import covering_sta_window, sta_window
from .tables import KeyTiles, key_tiles, table_width, union_with_windows


def selected_tiles(q_bshd: torch.Tensor, k_bshd: torch.Tensor, layout: LocalLayout, kv_heads: Sequence[int],
                   select, use_triton: bool) -> torch.Tensor:
    """``[B, Hs, n_q, n]`` bool: the key tiles each of ``layout``'s query tiles selects,
    for a layout that holds every key tile (one device, or a head-parallel rank). A mask
    comes back as its rows of ``layout.q_tiles``; ``kv_heads``: each query head's kv head."""
    if isinstance(select, torch.Tensor):
        return select.index_select(2, index_on(layout.q_tiles, select.device))
    present = [t for t, r in enumerate(layout.kv_rows) if r is not None]
    if len(present) != len(layout.kv_rows):
        raise AssertionError("selected_tiles needs every key tile in the layout")
    canvas, tile = layout.canvas, layout.tile
    q_sums = tile_sums(q_bshd, layout.q_rows, layout.q_tiles, canvas, tile, use_triton)
    k_sums = tile_sums(k_bshd, layout.kv_rows, present, canvas, tile, use_triton)
    q_counts = tile_counts(layout.q_tiles, canvas, tile, q_bshd.device)
    k_counts = tile_counts(present, canvas, tile, q_bshd.device)
    if select.share_heads:
        qbar = means(q_sums.sum(1, keepdim=True), q_counts, q_sums.shape[1])
        kbar = means(k_sums.sum(1, keepdim=True), k_counts, k_sums.shape[1])
    else:
        qbar = means(q_sums, q_counts)
        kbar = means(k_sums, k_counts).index_select(1, index_on(kv_heads, q_bshd.device))
    return select_tiles(qbar, kbar, select, q_bshd.shape[3])


def needs_table(select, window_rule: str) -> bool:
    """Whether a call takes the table path: a selection, or windows that are not sta_dist
    windows (``"clipped"``). ``"fastvideo"`` windows alone are sta_dist windows."""
    return select is not None or window_rule == "clipped"


def table_heads(windows: Optional[Sequence[Triple]], window_rule: str, num_heads: int, grid: Triple,
                num_kv_heads: int) -> LocalHeads:
    """The heads of a table-path call: the table path reads only their kv heads; their
    windows are sta_dist windows that hold each head's (what schedules and costs see)."""
    if windows is None:
        return LocalHeads.build([(1, 1, 1)] * num_heads, grid, num_kv_heads)
    return LocalHeads.build([covering_sta_window(w, window_rule) for w in windows], grid, num_kv_heads)


def build_key_tiles(selected_bhqn: Optional[torch.Tensor], windows: Optional[Sequence[Triple]], window_rule: str,
                    layout: LocalLayout, select, device) -> tuple[KeyTiles, torch.Tensor]:
    """The lists the kernels walk, and the attended tile mask ``[Bk, Hm, n_q, n]`` they
    come from."""
    attended = union_with_windows(selected_bhqn, windows, window_rule, layout.q_tiles, layout.grid, device)
    width = table_width(select, windows, window_rule, layout.grid, len(layout.kv_rows))
    return key_tiles(attended, width), attended


def local_key_tiles(q, k, layout: LocalLayout, heads: LocalHeads, windows, window_rule: str, select,
                    use_triton: bool) -> tuple[KeyTiles, torch.Tensor]:
    """Everything a table-path call does before its kernel (one device): the selection,
    its union with the windows, the lists. Returns ``(KeyTiles, attended [Bk, Hm, n, n])``."""
    selected = None if select is None else selected_tiles(q, k, layout, heads.kv_heads, select, use_triton)
    return build_key_tiles(selected, windows, window_rule, layout, select, q.device)


def selected_attention(q, k, v, *, canvas, tile, window, text_length, scale, backend, layout, return_lse, select,
                       window_rule, return_selection, differentiable: bool = False):
    """:func:`sta_dist.sliding_tile_attention` with ``select`` / ``window_rule`` /
    ``return_selection`` (same arguments and results). ``differentiable``: through
    :mod:`sta_dist.autograd`, the selection computed without gradients (its tiles are
    constants of the call)."""
    if differentiable:
        with torch.no_grad():
            return _selected(q, k, v, canvas, tile, window, text_length, scale, backend, layout, return_lse, select,
                             window_rule, return_selection, differentiable)
    return _selected(q, k, v, canvas, tile, window, text_length, scale, backend, layout, return_lse, select,
                     window_rule, return_selection, differentiable)


def _selected(q, k, v, canvas, tile, window, text_length, scale, backend, layout, return_lse, select, window_rule,
              return_selection, differentiable):
    from ..autograd import Problem, attention
    from ..dispatch import choose_backend, local_attention

    def run(local, heads, text, keys=None):
        if not differentiable:
            return local_attention(q, k, v, local, heads, text, scale, backend, return_lse, keys=keys)
        with torch.enable_grad():
            return attention(q, k, v, Problem(local, heads, text, scale, backend, keys), return_lse)

    window_rule = check_window_rule(window_rule)
    check_window_or_select(window, select)
    cfg, windows, text_length, scale, hkv = check_call(q, k, v, canvas, tile, (1, 1, 1) if window is None else window,
                                                       text_length, scale)
    windows = None if window is None else windows
    B, _, H, _ = q.shape
    select = check_select(select, B, H, cfg.num_tiles, q.device)
    local = call_layout(cfg.canvas, cfg.tile, cfg.text_len, check_layout(layout))
    text = LocalText.per_sample(text_length)
    attended = None
    if not needs_table(select, window_rule):  # sta_dist windows: the window path, untouched
        heads = LocalHeads.build([sta_window(w, window_rule) for w in windows], cfg.grid, hkv)
        result = run(local, heads, text)
        if return_selection:
            attended = union_with_windows(None, windows, window_rule, local.q_tiles, cfg.grid, q.device)
    else:
        heads = table_heads(windows, window_rule, H, cfg.grid, hkv)
        use_triton = choose_backend(q, backend) == "triton"
        keys, attended = local_key_tiles(q, k, local, heads, windows, window_rule, select, use_triton)
        result = run(local, heads, text, keys)
    if not return_selection:
        return result
    attended = attended.expand(B, -1, -1, -1)
    return (*result, attended) if return_lse else (result, attended)
