"""The backward of one local call: dq, dk, dv from the FINAL output and log-sum-exp of its
query rows (what :mod:`sta_dist.autograd` and a distributed runtime, whose ``out``/``lse``
come from a merge over ranks, both call).

The softmax is never normalised here: ``p = exp(s - lse)`` with the given ``lse``, and
``delta = rowsum(dout * out) - dlse``, so partial key sets (a rank's box, its halo)
differentiate exactly against the merged result.

Legend: ``_bshd`` = ``[batch, seq, heads, head_dim]``; ``_bhs`` = ``[batch, heads, seq]``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Optional

import torch

from . import geometry
from .local import LocalHeads, LocalLayout, LocalText, natural_order, sample_groups, tile_row_index, tiled_order
from .torch_backend import _CHUNK_BYTES, _kept, _table_keys

if TYPE_CHECKING:
    from .selection.tables import KeyTiles


def local_backward(q_bshd, k_bshd, v_bshd, out_bshd, lse_bhs, dout_bshd, layout: LocalLayout, heads: LocalHeads,
                   text, scale: float, backend: str = "auto", keys: Optional["KeyTiles"] = None,
                   dlse_bhs: Optional[torch.Tensor] = None):
    """``(dq, dk, dv)`` of one local STA problem (the forward's semantics for every
    :class:`LocalLayout`: natural, tiled, packed with k/v tiles beyond the query tiles,
    ``text_q_video_keys``, ``key_box``; ``keys``: the table path).

    ``q_bshd [B, Sq, H, D]``, ``k_bshd, v_bshd [B, Skv, Hkv, D]``; ``out_bshd`` and
    ``dout_bshd [B, Sq, H, D]``; ``lse_bhs [B, H, Sq]`` (natural log, float32; ``-inf``
    for rows with no key) the final log-sum-exp of the rows; ``dlse_bhs`` (same shape,
    ``None``: zero) the gradient of the log-sum-exp output. ``text``: one
    :class:`LocalText` or one per batch sample. Returns ``dq`` of ``q``'s shape and
    ``dk, dv`` of ``k``'s (GQA: summed over each kv head's query heads), in the input
    dtype; rows no query of the call covers, text query rows past ``q_valid`` and text
    keys past the valid counts get zero. ``backend``: as the forward's; the route's
    ``backward`` field says which kernel runs (:func:`backward_kernel`)."""
    if isinstance(text, LocalText):
        return _one_group(q_bshd, k_bshd, v_bshd, out_bshd, lse_bhs, dout_bshd, layout, heads, text, scale,
                          backend, keys, dlse_bhs)
    groups = sample_groups(text)
    if len(groups) == 1:
        return _one_group(q_bshd, k_bshd, v_bshd, out_bshd, lse_bhs, dout_bshd, layout, heads, groups[0][0], scale,
                          backend, keys, dlse_bhs)
    dq, dk, dv = torch.empty_like(q_bshd), torch.empty_like(k_bshd), torch.empty_like(v_bshd)
    for group_text, idx in groups:
        part = _one_group(q_bshd[idx], k_bshd[idx], v_bshd[idx], out_bshd[idx], lse_bhs[idx], dout_bshd[idx],
                          layout, heads, group_text, scale, backend, None if keys is None else keys.samples(idx),
                          None if dlse_bhs is None else dlse_bhs[idx])
        dq[idx], dk[idx], dv[idx] = part
    return dq, dk, dv


def backward_kernel(q_bshd, k_bshd, v_bshd, layout: LocalLayout, heads: LocalHeads, text: LocalText,
                    backend: str = "auto", table: bool = False) -> str:
    """The kernel the backward of this call runs (``"cuda"``, ``"triton"`` or ``"torch"``): the route's
    ``backward`` field (:func:`sta_dist.route.route`)."""
    from .dispatch import call_route, choose_backend

    if choose_backend(q_bshd, backend) == "torch":
        return "torch"
    return call_route(q_bshd, k_bshd, v_bshd, layout, heads, text, backend, True, table).backward


def _one_group(q, k, v, out, lse, dout, layout, heads, text: LocalText, scale, backend, keys, dlse):
    kernel = backward_kernel(q, k, v, layout, heads, text, backend, keys is not None)
    run = {"torch": torch_backward, "triton": triton_backward, "cuda": cuda_backward}[kernel]
    return run(q, k, v, out, lse, dout, layout, heads, text, scale, keys, dlse)


# ---------------------------------------------------------------------------------------
# The torch backend: each query tile's keys gathered as the forward's, dk/dv by index_add
# ---------------------------------------------------------------------------------------


def _attend_backward(q, k, v, do, lse, delta, key_ok, q_ok, scale):
    """The backward of ``_attend`` for ``q, do [b, n, m, D]`` over ``k, v [b, n, j, D]``
    with the rows' final ``lse, delta [b, n, m]``; ``key_ok [n, j]``, ``q_ok [n, m]``.
    Returns ``dq [b, n, m, D]``, ``dk, dv [b, n, j, D]``."""
    scores = torch.einsum("bnmd,bnjd->bnmj", q, k) * scale
    mask = key_ok[None, :, None, :] & q_ok[None, :, :, None] & torch.isfinite(lse)[..., None]
    lse = torch.where(torch.isfinite(lse), lse, 0.0)
    probs = torch.exp(scores - lse[..., None]).masked_fill(~mask, 0.0)
    dv = torch.einsum("bnmj,bnmd->bnjd", probs, do)
    dp = torch.einsum("bnmd,bnjd->bnmj", do, v)
    ds = (probs * (dp - delta[..., None])).masked_fill(~mask, 0.0)
    dq = torch.einsum("bnmj,bnjd->bnmd", ds, k) * scale
    dk = torch.einsum("bnmj,bnmd->bnjd", ds, q) * scale
    return dq, dk, dv


def torch_backward(q_bshd, k_bshd, v_bshd, out_bshd, lse_bhs, dout_bshd, layout: LocalLayout, heads: LocalHeads,
                   text: LocalText, scale: float, keys: Optional["KeyTiles"] = None,
                   dlse_bhs: Optional[torch.Tensor] = None):
    """:func:`local_backward` of one text group in pure torch (float32, float64 for float64
    inputs): exact, memory bounded by the forward's chunks."""
    B, Sq, H, D = q_bshd.shape
    dev = q_bshd.device
    ct = torch.float64 if q_bshd.dtype == torch.float64 else torch.float32
    q, k, v, do = (x.to(ct) for x in (q_bshd, k_bshd, v_bshd, dout_bshd))
    delta = (do * out_bshd.to(ct)).sum(-1).transpose(1, 2)  # [B, H, Sq]
    if dlse_bhs is not None:
        delta = delta - dlse_bhs.to(ct)
    lse = lse_bhs.to(ct)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    q_idx, q_ok = (t.to(dev) for t in tile_row_index(layout.q_rows, layout.q_tiles, layout.canvas, layout.tile))
    present = [t for t, r in enumerate(layout.kv_rows) if r is not None]
    kv_idx_p, kv_ok_p = tile_row_index([layout.kv_rows[t] for t in present], present, layout.canvas, layout.tile)
    text_keys = layout.kv_video + torch.arange(text.kv_for_video_q, device=dev)
    n_q, vol = q_idx.shape
    for h in range(H):
        kvh = heads.kv_heads[h]
        lists = (() if not layout.q_tiles else
                 _table_keys(keys, h, len(layout.kv_rows), present, kv_idx_p, kv_ok_p, text_keys) if keys is not None
                 else [(slice(None), _window_keys(layout, heads.windows[h], text.kv_for_video_q, dev))])
        for samples, (k_idx, k_ok) in lists:
            chunk = max(1, _CHUNK_BYTES // max(1, B * vol * k_idx.shape[1] * 4))
            for lo in range(0, n_q, chunk):
                qi, qo, ki, ko = (x[lo:lo + chunk] for x in (q_idx, q_ok, k_idx, k_ok))
                g_q, g_k, g_v = _attend_backward(q[samples, qi, h], k[samples, ki, kvh], v[samples, ki, kvh],
                                                 do[samples, qi, h], lse[samples, h][:, qi], delta[samples, h][:, qi],
                                                 ko, qo, scale)
                dq[samples, qi[qo], h] = g_q[:, qo]
                flat = ki.reshape(-1)
                dk[samples, :, kvh].index_add_(1, flat, g_k.reshape(g_k.shape[0], -1, D))
                dv[samples, :, kvh].index_add_(1, flat, g_v.reshape(g_v.shape[0], -1, D))
        if text.q_valid:
            rows = layout.q_video + torch.arange(text.q_valid, device=dev)
            t_keys = torch.cat([torch.arange(layout.text_q_video_keys, device=dev),
                                layout.kv_video + torch.arange(text.kv_for_text_q, device=dev)])
            ok_k = torch.ones(1, len(t_keys), dtype=torch.bool, device=dev)
            ok_q = torch.ones(1, len(rows), dtype=torch.bool, device=dev)
            g_q, g_k, g_v = _attend_backward(q[:, None, rows, h], k[:, None, t_keys, kvh], v[:, None, t_keys, kvh],
                                             do[:, None, rows, h], lse[:, None, h, rows], delta[:, None, h, rows],
                                             ok_k, ok_q, scale)
            dq[:, rows, h] = g_q[:, 0]
            dk[:, :, kvh].index_add_(1, t_keys, g_k[:, 0])
            dv[:, :, kvh].index_add_(1, t_keys, g_v[:, 0])
    return dq.to(q_bshd.dtype), dk.to(k_bshd.dtype), dv.to(v_bshd.dtype)


@functools.lru_cache(maxsize=256)
def _window_keys(layout: LocalLayout, window, n_text: int, device: torch.device):
    """Key rows of every query tile's window (cut to the ``key_box``), then the text keys:
    ``(rows [n_q, width * vol + n_text] long, valid [same] bool)``, as the forward's."""
    grid = layout.grid
    present = [t for t, r in enumerate(layout.kv_rows) if r is not None]
    kv_idx_p, kv_ok_p = tile_row_index([layout.kv_rows[t] for t in present], present, layout.canvas, layout.tile)
    slot = {t: i for i, t in enumerate(present)}
    win = [[t for t in geometry.window_tiles(geometry.tile_coords(qt, grid), window, grid)
            if _kept(t, layout.key_box, grid)] for qt in layout.q_tiles]
    n_q, width = len(win), max(map(len, win))
    kept = torch.tensor([[i < len(t) for i in range(width)] for t in win], dtype=torch.bool).reshape(n_q, -1)
    win_t = torch.tensor([[slot[t] for t in tiles] + [0] * (width - len(tiles)) for tiles in win],
                         dtype=torch.long).reshape(n_q, -1)
    idx = kv_idx_p[win_t].reshape(n_q, -1)
    ok = (kv_ok_p[win_t] & kept[:, :, None]).reshape(n_q, -1)
    text_keys = layout.kv_video + torch.arange(n_text)
    idx = torch.cat([idx, text_keys.expand(n_q, -1)], 1)
    ok = torch.cat([ok, torch.ones(n_q, n_text, dtype=torch.bool)], 1)
    return idx.to(device), ok.to(device)


# ---------------------------------------------------------------------------------------
# The Triton backward (kernels/sta_bwd.py): its tables
# ---------------------------------------------------------------------------------------


def triton_backward(q_bshd, k_bshd, v_bshd, out_bshd, lse_bhs, dout_bshd, layout: LocalLayout, heads: LocalHeads,
                    text: LocalText, scale: float, keys: Optional["KeyTiles"] = None,
                    dlse_bhs: Optional[torch.Tensor] = None, config: dict | None = None):
    """:func:`local_backward` of one text group on the Triton kernels."""
    from .kernel_calls import clip, head_table, layout_facts
    from .kernels.sta_bwd import sta_bwd, transposed_tables

    dev = q_bshd.device
    facts = layout_facts(layout, dev)
    all_heads = tuple(range(len(heads.windows)))
    t_keys = None if keys is None else transposed_tables(keys.keys, keys.counts, len(layout.kv_rows))
    q_slot, kv_list, groups = _bwd_tables(layout, heads, k_bshd.shape[2], dev)
    lse = lse_bhs if lse_bhs.stride(-1) == 1 else lse_bhs.contiguous()
    return sta_bwd(*(x if x.stride(-1) == 1 else x.contiguous() for x in (q_bshd, k_bshd, v_bshd, out_bshd, dout_bshd)),
                   lse, None if dlse_bhs is None else dlse_bhs.float(), facts.q_tiles, q_slot, facts.kv_tiles, kv_list,
                   head_table(heads, all_heads, dev), groups, canvas=layout.canvas, tile=layout.tile,
                   q_video=layout.q_video, kv_video=layout.kv_video, text_q_video_keys=layout.text_q_video_keys,
                   q_text_valid=text.q_valid, kv_text_for_video=text.kv_for_video_q,
                   kv_text_for_text=text.kv_for_text_q, scale=scale, even=facts.even,
                   keys=None if keys is None else (keys.keys, keys.counts), t_keys=t_keys, clip=clip(layout),
                   config=config)


def cuda_backward(q_bshd, k_bshd, v_bshd, out_bshd, lse_bhs, dout_bshd, layout: LocalLayout, heads: LocalHeads,
                  text: LocalText, scale: float, keys: Optional["KeyTiles"] = None,
                  dlse_bhs: Optional[torch.Tensor] = None):
    """:func:`local_backward` of one text group on the Hopper kernels (packed tiles; the
    route's ``cuda_backward_rule``). The whole canvas in natural order goes through tiled
    order: the five inputs and the log-sum-exp gathered there, the three gradients back."""
    from .kernel_calls import layout_facts

    if layout_facts(layout, q_bshd.device).whole_natural:
        tiled = LocalLayout.tiled(layout.canvas, layout.tile, layout.q_text)
        there, back = (order(layout.canvas, layout.tile, q_bshd.device) for order in (tiled_order, natural_order))
        q_there, kv_there = _rows_in(there, q_bshd.shape[1]), _rows_in(there, k_bshd.shape[1])
        q, out, dout = (x[:, q_there] for x in (q_bshd, out_bshd, dout_bshd))
        k, v = (x[:, kv_there] for x in (k_bshd, v_bshd))
        lse, dlse = (None if x is None else x[:, :, q_there] for x in (lse_bhs, dlse_bhs))
        dq, dk, dv = _cuda_packed(q, k, v, out, lse, dout, tiled, heads, text, scale, keys, dlse)
        kv_back = _rows_in(back, k_bshd.shape[1])
        return dq[:, _rows_in(back, q_bshd.shape[1])], dk[:, kv_back], dv[:, kv_back]
    return _cuda_packed(q_bshd, k_bshd, v_bshd, out_bshd, lse_bhs, dout_bshd, layout, heads, text, scale, keys,
                        dlse_bhs)


def _rows_in(video_order: torch.Tensor, rows: int) -> torch.Tensor:
    """``video_order`` for the video rows, then the text rows where they are."""
    n = len(video_order)
    return torch.cat([video_order, torch.arange(n, rows, device=video_order.device)])


def _cuda_packed(q_bshd, k_bshd, v_bshd, out_bshd, lse_bhs, dout_bshd, layout, heads, text, scale, keys, dlse_bhs):
    from .kernel_calls import layout_facts
    from .kernels.descriptors import bulk_copy_layout_ok
    from .kernels.sta_bwd_cuda import sta_bwd_cuda

    q, k, v, out, dout = (x if bulk_copy_layout_ok(x, x, x) else x.contiguous()
                          for x in (q_bshd, k_bshd, v_bshd, out_bshd, dout_bshd))
    return sta_bwd_cuda(q, k, v, out, dout, lse_bhs, None if dlse_bhs is None else dlse_bhs.float(),
                        **cuda_tables(layout, heads, text, k_bshd.shape[2], keys, q_bshd.device), scale=scale,
                        even=layout_facts(layout, q_bshd.device).even,
                        rows_aligned=all(r.base % 4 == 0 for r in layout.q_rows))


def cuda_tables(layout: LocalLayout, heads: LocalHeads, text: LocalText, num_kv_heads: int,
                keys: Optional["KeyTiles"], device: torch.device) -> dict:
    """What the Hopper backward takes besides the tensors (``kernels/sta_bwd_cuda.py``'s
    ``launch_args``): the tables on ``device`` and the layout's numbers."""
    from .kernel_calls import clip, head_table, layout_facts
    from .kernels.sta_bwd import transposed_tables

    facts = layout_facts(layout, device)
    q_slot, kv_list, groups = _bwd_tables(layout, heads, num_kv_heads, device)
    return dict(q_tiles=facts.q_tiles, q_slot=q_slot, kv_tiles=facts.kv_tiles, kv_list=kv_list,
                heads=head_table(heads, tuple(range(len(heads.windows))), device), groups=groups,
                canvas=layout.canvas, tile=layout.tile, q_video=layout.q_video, kv_video=layout.kv_video,
                text_q_video_keys=layout.text_q_video_keys, q_text_valid=text.q_valid,
                kv_text_for_video=text.kv_for_video_q, kv_text_for_text=text.kv_for_text_q,
                keys=None if keys is None else (keys.keys, keys.counts),
                t_keys=None if keys is None else transposed_tables(keys.keys, keys.counts, len(layout.kv_rows)),
                clip=clip(layout))


@functools.lru_cache(maxsize=64)
def _bwd_tables(layout: LocalLayout, heads: LocalHeads, num_kv_heads: int, device: torch.device):
    """``q_slot [n_tiles]`` (each global tile's index among the query tiles, -1: not one),
    ``kv_list [n_present, 4]`` (global id, base, stride_t, stride_h of each k/v tile there)
    and ``groups [Hkv, G + 1]`` (per kv head: how many query heads use it, then their rows
    of the head table) int32 on ``device``."""
    q_slot = torch.full((len(layout.kv_rows),), -1, dtype=torch.int32)
    q_slot[list(layout.q_tiles)] = torch.arange(len(layout.q_tiles), dtype=torch.int32)
    kv_list = torch.tensor([[t, r.base, r.stride_t, r.stride_h] for t, r in enumerate(layout.kv_rows)
                            if r is not None], dtype=torch.int32).reshape(-1, 4)
    members = [[h for h, kvh in enumerate(heads.kv_heads) if kvh == g] for g in range(num_kv_heads)]
    width = max(map(len, members), default=0)
    groups = torch.tensor([[len(m), *m, *[0] * (width - len(m))] for m in members], dtype=torch.int32)
    return q_slot.to(device), kv_list.to(device), groups.reshape(num_kv_heads, width + 1).to(device)
