"""Pure-torch sliding tile attention: gathers each query tile's window of key tiles and
runs small dense attentions, in float32. Same semantics and the same
:mod:`sta_dist.local` description as the Triton kernel; serves CPU runs.

Legend: ``_bshd`` = ``[batch, seq, heads, head_dim]``; ``_bhs`` = ``[batch, heads, seq]``.
"""

from __future__ import annotations

import torch

from typing import TYPE_CHECKING, Optional

from . import geometry
from .local import LocalHeads, LocalLayout, LocalText, tile_row_index

_CHUNK_BYTES = 1 << 28  # bound on one chunk's score tensor

if TYPE_CHECKING:
    from .selection.tables import KeyTiles


def _attend(q, k, v, key_ok, scale):
    """Softmax attention of ``q [B, n, m, D]`` over ``k, v [B, n, j, D]``; ``key_ok`` is
    ``[n, j]`` or ``[j]``. Returns output and natural-log LSE (``-inf`` where no key)."""
    scores = torch.einsum("bnmd,bnjd->bnmj", q, k) * scale
    mask = key_ok[:, None, :] if key_ok.dim() == 2 else key_ok[None, None, :]
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.einsum("bnmj,bnjd->bnmd", probs, v), lse


def sta_torch(
    q_bshd: torch.Tensor,
    k_bshd: torch.Tensor,
    v_bshd: torch.Tensor,
    layout: LocalLayout,
    heads: LocalHeads,
    text: LocalText,
    scale: float,
    return_lse: bool = False,
    keys: Optional["KeyTiles"] = None,
):
    """Local STA described by ``layout``/``heads``/``text``. Returns ``out_bshd`` in the
    input dtype (rows no query of this call covers stay zero), and with ``return_lse``
    also ``lse_bhs`` in float32. ``keys`` (the table path, :mod:`sta_dist.selection.tables`)
    gives each query tile's key tiles per batch sample and head instead of the windows."""
    B, Sq, H, D = q_bshd.shape
    q32, k32, v32 = (x.float() for x in (q_bshd, k_bshd, v_bshd))
    out = torch.zeros(B, Sq, H, D, dtype=torch.float32, device=q_bshd.device)
    lse = torch.full((B, H, Sq), float("-inf"), dtype=torch.float32, device=q_bshd.device)
    dev = q_bshd.device
    grid = layout.grid

    q_idx, q_ok = (t.to(dev) for t in tile_row_index(layout.q_rows, layout.q_tiles, layout.canvas, layout.tile))
    present = [t for t, r in enumerate(layout.kv_rows) if r is not None]
    kv_idx_p, kv_ok_p = tile_row_index([layout.kv_rows[t] for t in present], present, layout.canvas, layout.tile)
    slot = {t: i for i, t in enumerate(present)}
    text_keys = layout.kv_video + torch.arange(text.kv_for_video_q, device=dev)

    keys_by_window: dict = {}
    for window in set(heads.windows) if keys is None and layout.q_tiles else ():
        win = [[t for t in geometry.window_tiles(geometry.tile_coords(qt, grid), window, grid)
                if _kept(t, layout.key_box, grid)] for qt in layout.q_tiles]
        width = max(map(len, win))  # lists cut by the key box are padded (masked) to the longest
        kept = torch.tensor([[i < len(tiles) for i in range(width)] for tiles in win], dtype=torch.bool)
        win_t = torch.tensor([[slot[t] for t in tiles] + [0] * (width - len(tiles)) for tiles in win],
                             dtype=torch.long).reshape(len(layout.q_tiles), -1)
        idx = kv_idx_p[win_t].reshape(len(layout.q_tiles), -1).to(dev)
        ok = (kv_ok_p[win_t] & kept.reshape(len(layout.q_tiles), -1, 1)).reshape(len(layout.q_tiles), -1).to(dev)
        idx = torch.cat([idx, text_keys.expand(len(layout.q_tiles), -1)], 1)
        ok = torch.cat([ok, torch.ones_like(text_keys, dtype=torch.bool).expand(len(layout.q_tiles), -1)], 1)
        keys_by_window[window] = (idx, ok)

    n_q, vol = q_idx.shape
    for h in range(H):
        kvh = heads.kv_heads[h]
        # Table path: key lists per batch sample (one sample at a time); else one per window.
        for samples, (k_idx, k_ok) in (() if not layout.q_tiles else
                                       _table_keys(keys, h, len(layout.kv_rows), present, kv_idx_p, kv_ok_p, text_keys)
                                       if keys is not None else [(slice(None), keys_by_window[heads.windows[h]])]):
            chunk = max(1, _CHUNK_BYTES // max(1, B * vol * k_idx.shape[1] * 4))
            for lo in range(0, n_q, chunk):
                qi, qo, ki, ko = q_idx[lo : lo + chunk], q_ok[lo : lo + chunk], k_idx[lo : lo + chunk], k_ok[lo : lo + chunk]
                o, l = _attend(q32[samples, qi, h], k32[samples, ki, kvh], v32[samples, ki, kvh], ko, scale)
                rows = qi[qo]
                out[samples, rows, h] = o[:, qo]
                lse[samples, h, rows] = l[:, qo]

        if text.q_valid:
            t_rows = layout.q_video + torch.arange(text.q_valid, device=dev)
            t_keys = torch.cat(
                [
                    torch.arange(layout.text_q_video_keys, device=dev),
                    layout.kv_video + torch.arange(text.kv_for_text_q, device=dev),
                ]
            )
            ok = torch.ones(len(t_keys), dtype=torch.bool, device=dev)
            o, l = _attend(q32[:, None, t_rows, h], k32[:, None, t_keys, kvh], v32[:, None, t_keys, kvh], ok, scale)
            out[:, t_rows, h] = o[:, 0]
            lse[:, h, t_rows] = l[:, 0]
    out = out.to(q_bshd.dtype)
    return (out, lse) if return_lse else out


def _kept(tile_id: int, key_box, grid) -> bool:
    """Whether a window's key tile counts under the layout's ``key_box``."""
    return key_box is None or key_box.contains(geometry.tile_coords(tile_id, grid))


def _table_keys(keys: "KeyTiles", h: int, n_tiles: int, present: list, kv_idx_p: torch.Tensor,
                kv_ok_p: torch.Tensor, text_keys: torch.Tensor):
    """``(samples, (key rows [n_q, width * vol + text], valid))`` for query head ``h``, one
    entry per batch sample (all samples at once when the tables are shared by them)."""
    dev = keys.keys.device
    slot_of = torch.zeros(n_tiles + 1, dtype=torch.long)  # global id -> slot; padding (id n_tiles) -> 0, masked
    slot_of[torch.tensor(present, dtype=torch.long)] = torch.arange(len(present))
    slot_of, kv_idx_p, kv_ok_p = slot_of.to(dev), kv_idx_p.to(dev), kv_ok_p.to(dev)
    hk = h if keys.keys.shape[1] > 1 else 0
    out = []
    for b in range(keys.keys.shape[0]):
        k_list, count = keys.keys[b, hk].long(), keys.counts[b, hk].long()  # [n_q, width], [n_q]
        slots = slot_of[k_list]
        listed = torch.arange(k_list.shape[1], device=dev)[None, :] < count[:, None]
        idx = kv_idx_p[slots].reshape(len(k_list), -1)
        ok = (kv_ok_p[slots] & listed[:, :, None]).reshape(len(k_list), -1)
        idx = torch.cat([idx, text_keys.expand(len(k_list), -1)], 1)
        ok = torch.cat([ok, torch.ones_like(text_keys, dtype=torch.bool).expand(len(k_list), -1)], 1)
        out.append((slice(None) if keys.keys.shape[0] == 1 else slice(b, b + 1), (idx, ok)))
    return out
