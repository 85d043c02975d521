"""A distributed call with selected tiles: each rank selects for its own query tiles and
fetches exactly the remote key tiles they attend (its window halo united with the tiles
it chose), wherever on the canvas they lie.

After the head all-to-all (:func:`~sta_dist.parallel.runtime.head_exchange`) a rank holds
its box's tokens for its heads, and:

1. sums ``q`` and ``k`` over each box tile in float64 (exact, so any split of the sum
   across ranks gives the same bits); a shared selection adds the head group's partial
   sums (an all-gather of ``[B, 2, n_box, D]`` float64, summed in rank order);
2. all-gathers the box's ``k`` means over the tile group: every rank then has every key
   tile's mean (a few hundred KB at HunyuanVideo's shape, shared);
3. selects its query tiles' key tiles and unites them with their windows (the lists the
   kernel walks);
4. all-gathers over the tile group which tiles it needs (one byte per tile): the counts
   of the exchange, known only now; the host reads them (the one wait for the device);
5. fetches exactly those tiles' k/v rows (an all-to-all with uneven splits), runs the
   kernel over its lists, and finishes as any call (text merge, output all-to-all).

On several ranks (one text length for the batch) the kernel first walks each query tile's
window tiles of the own box (and the text), which need no selection, and in the executor's
overlapped order (:mod:`sta_dist.parallel.call`) a side stream selects, gathers the counts
(the host waits for that stream only) and fetches meanwhile; then the rest of each list,
the fetched tiles read where they arrived, is folded in (:func:`_attend_beside_fetch`).
This module is the selected key source; :func:`attend_selected` is its one entry.

Legend: ``_bshd`` = ``[batch, seq, heads, head_dim]``; ``_bhnd`` = ``[batch, heads, tiles,
head_dim]``; ``_bhqn`` = ``[batch, heads, query tiles, key tiles]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .. import geometry
from ..geometry import Triple
from ..dispatch import local_attention
from ..kernel_calls import layout_facts
from ..local import Halo, LocalLayout, LocalText, index_on, longest_text
from ..selection.choose import select_tiles
from ..selection.means import means, tile_counts, tile_sums
from ..selection.tables import KeyTiles, key_tiles, table_width, union_with_windows
from .comm import Comm
from .plan import ShardPlan
from .runtime import BoxInputs, PartialOutput, attend, fork, halo_exchange, start_halo
from .schedule import CallSchedule


@dataclass(frozen=True)
class SelectionInfo:
    """What one rank's call selected and fetched (``return_selection=True``)."""

    q_tiles: tuple[int, ...]
    """The query tiles this rank computed (global ids, its box)."""
    q_heads: tuple[int, ...]
    """The query heads this rank computed."""
    attended: torch.Tensor
    """``[B, 1 or len(q_heads), len(q_tiles), n_tiles]`` bool: the key tiles each query tile
    attended (window and selection united)."""
    fetched: tuple[tuple[int, ...], ...]
    """Per member of the tile group: the tiles of its box this rank fetched."""


@functools.lru_cache(maxsize=256)
def _packed(canvas: Triple, tile: Triple, text_len: int, q_tiles: tuple[int, ...],
            kv_tiles: tuple[int, ...], text_q_video_keys: int) -> LocalLayout:
    return LocalLayout.packed(canvas, tile, text_len, q_tiles, kv_tiles, text_q_video_keys=text_q_video_keys)


def _owned_kv(sched: CallSchedule) -> list[int]:
    """Local indices of the kv heads this rank counts in a shared sum: each kv head on the
    first head-group member that holds it, so the group's sum sees it once."""
    me = sched.me_in_head_group
    first = {}
    for m, kvs in enumerate(sched.kv_heads):
        for j in kvs:
            first.setdefault(j, m)
    return [i for i, j in enumerate(sched.kv_heads[me]) if first[j] == me]


def _box_means(box: BoxInputs, sched: CallSchedule, select, num_heads: int, num_kv_heads: int, comm: Comm,
               use_triton: bool, overlap: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 means of the box tiles: ``qbar [B, Hs, n_box, D]`` for this rank's heads
    (``Hs = 1`` shared) and ``kbar [B, Hk, n_box, D]`` (its kv heads, or 1 shared). Before
    the halo arrives, ``k`` holds the box's tokens in the same rows as ``q``."""
    q_box, k_box, _ = box
    layout = sched.layout
    canvas, tile = layout.canvas, layout.tile
    rows = layout.q_rows
    q_sums = tile_sums(q_box, rows, layout.q_tiles, canvas, tile, use_triton)
    k_sums = tile_sums(k_box, rows, layout.q_tiles, canvas, tile, use_triton)
    counts = tile_counts(layout.q_tiles, canvas, tile, q_box.device)
    if not select.share_heads:
        return means(q_sums, counts), means(k_sums, counts)
    owned = k_sums.index_select(1, index_on(_owned_kv(sched), k_sums.device))
    part = torch.stack([q_sums.sum(1), owned.sum(1)], 1)  # [B, 2, n_box, D] float64
    if len(sched.head_group) > 1:
        part = torch.stack(comm.all_gather("selection sums", sched.head_group, part, overlap=overlap)).sum(0)
    return means(part[:, :1], counts, num_heads), means(part[:, 1:], counts, num_kv_heads)


def _all_key_means(kbar_box: torch.Tensor, plan: ShardPlan, sched: CallSchedule, comm: Comm,
                   overlap: bool = False) -> torch.Tensor:
    """``[B, Hk, n_tiles, D]``: every tile's ``k`` mean, gathered over the tile group (each
    member sends its box's, padded to the largest box; ``overlap``: beside the attention)."""
    n = len(sched.layout.kv_rows)
    B, Hk, _, D = kbar_box.shape
    out = kbar_box.new_zeros(B, Hk, n, D)
    if len(sched.tile_group) == 1:
        return out.index_copy_(2, index_on(sched.layout.q_tiles, out.device), kbar_box)
    boxes = [plan.box_tiles(plan.head_group(r)) for r in sched.tile_group]
    widest = max(len(b) for b in boxes)
    padded = kbar_box.new_zeros(B, Hk, widest, D)
    padded[:, :, :kbar_box.shape[2]] = kbar_box
    for tiles, theirs in zip(boxes, comm.all_gather("tile means", sched.tile_group, padded, overlap=overlap)):
        out.index_copy_(2, index_on(tiles, out.device), theirs[:, :, :len(tiles)])
    return out


def _fetch_lists(attended: torch.Tensor, plan: ShardPlan, sched: CallSchedule, comm: Comm, overlap: bool = False):
    """Per tile-group member, the tiles this rank sends it and those it fetches from it,
    from every member's tiles needed by any of its lists (``attended`` reduced to
    ``[n_tiles]``, gathered here: the exchange's counts; ``overlap``: beside the attention,
    see :meth:`Comm.all_gather`). One rank in the tile group: nothing to fetch."""
    if len(sched.tile_group) == 1:
        return ((),), ((),)
    needed = attended.any(0).any(0).any(0)
    everyone = comm.all_gather("tile requests", sched.tile_group, needed.to(torch.uint8), overlap=overlap)
    comm.settle_agreements()  # before the host waits for the device: ranks that disagree fail here, at once
    everyone = torch.stack(everyone).cpu().tolist()  # the host learns the sizes: the one wait for the device
    mine = plan.box_tiles(sched.head_group)
    me = sched.me_in_tile_group
    sends, recvs = [], []
    for i, r in enumerate(sched.tile_group):
        if i == me:
            sends.append(())
            recvs.append(())
            continue
        sends.append(tuple(t for t in mine if everyone[i][t]))
        recvs.append(tuple(t for t in plan.box_tiles(plan.head_group(r)) if everyone[me][t]))
    return tuple(sends), tuple(recvs)


def _attended(box: BoxInputs, sched: CallSchedule, plan: ShardPlan, comm: Comm, *, select,
              windows: Optional[Sequence[Triple]], window_rule: str, num_heads: int, num_kv_heads: int,
              use_triton: bool, overlap: bool = False) -> tuple[torch.Tensor, int]:
    """Steps 1-3: ``(attended [Bk, Hm, n_q, n_tiles] bool, the lists' width)``: the key tiles
    each of this rank's query tiles attends (window and selection united), and a bound on
    their count known without looking at the data. ``windows``: one per query head of
    the call (all heads), or ``None``. ``overlap``: the gathers run beside the attention."""
    my_q = sched.q_heads[sched.me_in_head_group]
    q_tiles = sched.layout.q_tiles
    if select is None:
        selected = None
    elif isinstance(select, torch.Tensor):
        selected = select.index_select(2, index_on(q_tiles, select.device))
        selected = selected if selected.shape[1] == 1 else selected.index_select(1, index_on(my_q, select.device))
    else:
        qbar, kbar_box = _box_means(box, sched, select, num_heads, num_kv_heads, comm, use_triton, overlap)
        kbar = _all_key_means(kbar_box, plan, sched, comm, overlap)
        if not select.share_heads:
            kbar = kbar.index_select(1, index_on(sched.heads.kv_heads, kbar.device))
        selected = select_tiles(qbar, kbar, select, box.q_bshd.shape[3])
    my_windows = None if windows is None else [windows[h] for h in my_q]
    device = box.q_bshd.device
    attended = union_with_windows(selected, my_windows, window_rule, q_tiles, sched.layout.grid, device)
    width = table_width(select, my_windows, window_rule, sched.layout.grid, len(sched.layout.kv_rows))
    return attended, width


def _fetched_layout(sched: CallSchedule, plan: ShardPlan, recvs, text_len: int) -> LocalLayout:
    """The box's query tiles over the box's key tiles, then the fetched ones (``recvs``)."""
    q_tiles = sched.layout.q_tiles
    kv_tiles = q_tiles + tuple(t for tiles in recvs for t in tiles)
    return _packed(plan.canvas, plan.tile, text_len, q_tiles, kv_tiles, sched.box_tokens)


def _fetched(sched: CallSchedule, plan: ShardPlan, sends, recvs) -> CallSchedule:
    """The schedule of a call whose halo is the fetched tiles: box, then ``recvs``."""
    layout = _fetched_layout(sched, plan, recvs, plan.text_len)
    return dataclasses.replace(sched, layout=layout, halo_send=sends, halo_recv=recvs)


def _fetch(box: BoxInputs, attended, sched: CallSchedule, plan: ShardPlan, comm: Comm):
    """Step 4 in series: the counts, then the fetch, waited for. ``(the box inputs with the
    fetched tiles joined after the box's keys, the call's schedule (its halo: the fetched
    tiles, so :func:`~sta_dist.parallel.adjoint.halo_back` sends their gradients back), the
    tiles fetched per tile-group member)``."""
    sends, recvs = _fetch_lists(attended, plan, sched, comm)
    inputs = halo_exchange(box, sched, comm, sends, recvs)
    if len(sched.tile_group) > 1:
        sched = _fetched(sched, plan, sends, recvs)
    return inputs, sched, recvs


def _attend_after_fetch(box: BoxInputs, attended, width: int, sched: CallSchedule, plan: ShardPlan, comm: Comm,
                        text_length, scale: float, backend: str):
    """Steps 4-5 in series: the counts, the fetch, one launch over the whole lists.
    ``(PartialOutput, the call's schedule, the tiles fetched per tile-group member)``."""
    inputs, sched, recvs = _fetch(box, attended, sched, plan, comm)
    return attend(inputs, sched, text_length, scale, backend, keys=key_tiles(attended, width)), sched, recvs


def _attend_beside_fetch(box: BoxInputs, choose, windows: Optional[tuple[Triple, ...]], window_rule: str,
                         sched: CallSchedule, plan: ShardPlan, comm: Comm, text: LocalText, text_length, scale: float,
                         backend: str, overlap: bool):
    """Steps 1-5 as two launches: every query tile first attends its window's tiles of the
    own box (and the text), known before the data is looked at; ``choose`` (:func:`_attended`)
    selects, the counts are gathered and the chosen remote tiles fetched (a tile group; in
    head mode the box is the canvas, nothing to fetch); then the rest of each list (its
    selected tiles, and its window's tiles in other boxes, read where they arrived) is
    folded in by the log-sum-exp. ``overlap``: the first launch starts at once and the
    selection, the counts (the host waits for that stream only) and the fetch run on a side
    stream beside it; else they run before it (the staged order, the same launches).
    ``(PartialOutput, the call's schedule, the tiles fetched per tile-group member, attended)``."""
    device = box.q_bshd.device
    q_tiles = sched.layout.q_tiles
    first, first_keys = _window_in_box(q_tiles, windows, window_rule, sched.layout.grid, device)
    side = fork(device) if overlap else None  # after what is enqueued so far, beside the launch
    n_box = sched.box_tokens
    fetching = len(sched.tile_group) > 1
    own = _packed(plan.canvas, plan.tile, plan.text_len, q_tiles, q_tiles, n_box) if fetching else sched.layout

    def select_and_fetch():
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            attended, width = choose(overlap=overlap)
            rest = key_tiles(attended & ~first, width)
            sends, recvs = _fetch_lists(attended, plan, sched, comm, overlap=overlap)
            call = dataclasses.replace(sched, halo_send=sends, halo_recv=recvs) if fetching else sched
            layout = _fetched_layout(call, plan, recvs, 0) if fetching else _without_text_queries(sched.layout)
            # A new selection fetches new tiles: the second launch's tables are copied to the
            # device here, as a copy waits for its stream's queue, and this one holds no launch.
            facts = layout_facts(layout, device)
        return attended, rest, recvs, call, layout, facts

    chosen = None if overlap else select_and_fetch()
    out, lse = local_attention(*box, own, sched.heads, text, scale, backend, return_lse=True, keys=first_keys)
    attended, rest, recvs, sched, rest_layout, facts = chosen or select_and_fetch()
    if side is not None:  # made on the side stream, read on this one
        torch.cuda.current_stream(device).wait_stream(side)
        for x in (attended, rest.keys, rest.counts, facts.q_tiles, facts.kv_tiles):
            x.record_stream(torch.cuda.current_stream(device))
    halo = None
    if fetching:
        waits = [start_halo(x, sched, comm, side) for x in (box.k_bshd, box.v_bshd)]
        halo = Halo(*(wait() for wait in waits), n_box)
    # the video queries only: the text rows stay as the first launch left them
    local_attention(*box, rest_layout, sched.heads, LocalText(0, 0, 0), scale, backend, keys=rest, out=out, lse=lse,
                    resume=True, halo=halo)
    merge = fetching and longest_text(text_length) > 0
    return PartialOutput(out, lse[:, :, n_box:] if merge else None), sched, recvs, attended


@functools.lru_cache(maxsize=256)
def _without_text_queries(layout: LocalLayout) -> LocalLayout:
    return dataclasses.replace(layout, q_text=0)


@functools.lru_cache(maxsize=256)
def _window_in_box(q_tiles: tuple[int, ...], windows: Optional[tuple[Triple, ...]], rule: str, grid: Triple,
                   device: torch.device) -> tuple[torch.Tensor, KeyTiles]:
    """``(mask [1, Hm, n_q, n_tiles] bool, its KeyTiles)`` on ``device`` (kept there): each
    query tile's window tiles that lie among ``q_tiles`` (the own box); ``windows``: this
    rank's heads' (``None``: no window, nothing)."""
    n = geometry.num_tiles(grid)
    if windows is None:
        mask = torch.zeros(1, 1, len(q_tiles), n, dtype=torch.bool, device=device)
    else:
        mask = union_with_windows(None, windows, rule, q_tiles, grid, device) & _tile_mask(q_tiles, n, device)
    return mask, key_tiles(mask, table_width(None, windows, rule, grid, n))


@functools.lru_cache(maxsize=256)
def _tile_mask(tiles: tuple[int, ...], n: int, device: torch.device) -> torch.Tensor:
    """``[n]`` bool on ``device``: which tiles are among ``tiles`` (kept there)."""
    mask = torch.zeros(n, dtype=torch.bool)
    mask[list(tiles)] = True
    return mask.to(device)


def attend_selected(box: BoxInputs, sched: CallSchedule, plan: ShardPlan, comm: Comm, *, select, windows,
                    window_rule: str, num_heads: int, num_kv_heads: int, text_length, scale: float, backend: str,
                    use_triton: bool, overlap: bool = True):
    """Steps 1-5 on this rank's box (after the head exchange): ``(PartialOutput, the call's
    schedule, SelectionInfo)``. Over several ranks with one text length for the batch, two
    launches (:func:`_attend_beside_fetch`: the window's own-box tiles, then the rest folded
    in; ``overlap``: the selection and the fetch beside the first); a rank alone, or
    per-sample text lengths: the selection, the counts, the fetch, then one launch over the
    whole lists (:func:`_attend_after_fetch`)."""
    choose = functools.partial(_attended, box, sched, plan, comm, select=select, windows=windows,
                               window_rule=window_rule, num_heads=num_heads, num_kv_heads=num_kv_heads,
                               use_triton=use_triton)
    text = LocalText.per_sample(text_length, kv_for_text_q=sched.counts_text_keys)
    my_q = sched.q_heads[sched.me_in_head_group]
    if len(sched.tile_group) * len(sched.head_group) > 1 and isinstance(text, LocalText):
        my_windows = None if windows is None else tuple(tuple(windows[h]) for h in my_q)
        partial, call_sched, recvs, attended = _attend_beside_fetch(box, choose, my_windows, window_rule, sched, plan,
                                                                    comm, text, text_length, scale, backend, overlap)
    else:
        attended, width = choose()
        partial, call_sched, recvs = _attend_after_fetch(box, attended, width, sched, plan, comm, text_length, scale,
                                                         backend)
    info = SelectionInfo(sched.layout.q_tiles, my_q, attended.expand(box.q_bshd.shape[0], -1, -1, -1), recvs)
    return partial, call_sched, info


def fetch_selected(box: BoxInputs, sched: CallSchedule, plan: ShardPlan, comm: Comm, *, select, windows,
                   window_rule: str, num_heads: int, num_kv_heads: int, use_triton: bool):
    """Steps 1-4 in series, for a call that keeps what its backward reads (the training
    path of :mod:`sta_dist.parallel.call`): ``(the box inputs with the fetched tiles joined,
    the call's schedule, the lists (:class:`~sta_dist.selection.tables.KeyTiles`),
    SelectionInfo)``; the caller runs one launch over the whole lists."""
    attended, width = _attended(box, sched, plan, comm, select=select, windows=windows, window_rule=window_rule,
                                num_heads=num_heads, num_kv_heads=num_kv_heads, use_triton=use_triton)
    inputs, call_sched, recvs = _fetch(box, attended, sched, plan, comm)
    my_q = sched.q_heads[sched.me_in_head_group]
    info = SelectionInfo(sched.layout.q_tiles, my_q, attended.expand(box.q_bshd.shape[0], -1, -1, -1), recvs)
    return inputs, call_sched, key_tiles(attended, width), info
