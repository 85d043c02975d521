"""Sliding tile attention backward: a preprocess (delta), dq by query tile, dk/dv by key tile.

Legend: ``_bshd`` = ``[batch, seq, heads, head_dim]`` (read through strides); ``_bhs`` =
``[batch, heads, seq]``.

The forward's tables place the tokens (``kernels/sta_fwd.py``: ``q_tiles``, ``kv_tiles``,
``heads``, the table path's ``sel_keys``/``sel_count``); the backward adds:

- ``q_slot [n_tiles]``: each global tile's index among the query tiles, ``-1`` where it is
  not one of them;
- ``kv_list [n_kv, 4]``: per k/v tile present ``(global id, base, stride_t, stride_h)``;
- ``groups [Hkv, G + 1]``: per kv head, how many query heads read it, then their rows of
  ``heads`` (GQA: a dk/dv program loops over its group);
- the table path's transpose ``t_keys [Bk, Hk, n_tiles, n_q]`` / ``t_count [Bk, Hk,
  n_tiles]`` int32: per key tile, the query tiles (indices into ``q_tiles``) that list it,
  built on the device from the lists (:func:`transposed_tables`).

The rows' probabilities come from the given log-sum-exp, never a local normaliser:
``p = exp(s - lse)`` and ``ds = p * (dp - delta)`` with ``delta = rowsum(dout * out) -
dlse``, so the final (merged) result of the rows is what is differentiated.

``dq`` program ``(pid, b*H + h)``: the first ``n_text_blocks`` pids are text query blocks
(every video key below ``text_q_video_keys``, then the text keys); the rest are query
blocks of each query tile, over its window's key tiles (the forward's walk) and the text
keys. ``dk/dv`` program ``(pid, b*Hkv + g)``: the first pids are text key blocks (attended
by every video query and the text queries); the rest are key blocks of each k/v tile,
over the query tiles whose window holds it. That set is the window's transpose: per axis
the query tiles whose clamped window start covers the key tile form a range
(``sta_dist.geometry.query_span``), so every dk/dv row is written by one program, no
atomics; with tables it is the transposed lists.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .sta_fwd import _key_block, _load_kv, _token_rows, pick_block

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _query_span(c, k, n):
    """``[lo, hi)`` of the query tiles on one axis whose window holds key tile ``c``
    (``sta_dist.geometry.query_span``; ``k <= n``)."""
    a = (k - 1) // 2
    lo = tl.where(c < k, 0, c - k + 1 + a)
    hi = tl.where(c >= n - k, n, c + a + 1)
    return lo, hi


@triton.jit
def _preprocess_kernel(O, DO, DLSE, DELTA, sob, sos, soh, sdob, sdos, sdoh, sdlb, sdlh, n_heads, seq,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                       HAS_DLSE: tl.constexpr):
    """``delta [B, H, S] = rowsum(dout * out) - dlse`` in float32."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < seq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    o = tl.load(O + b * sob + h * soh + rows * sos + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdob + h * sdoh + rows * sdos + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + b * sdlb + h * sdlh + offs_m, mask=offs_m < seq, other=0.0)
    tl.store(DELTA + bh.to(tl.int64) * seq + offs_m, delta, mask=offs_m < seq)


@triton.jit
def _dq_update(dq, q, do, lse2, delta, row_ok, k, v, key_valid, qk_scale, IEEE: tl.constexpr):
    """Fold one key/value block into a query block's ``dq`` (unscaled)."""
    qk = _dot(q, tl.trans(k), tl.zeros([q.shape[0], k.shape[0]], dtype=tl.float32), IEEE)
    m = row_ok[:, None] & key_valid[None, :]
    p = tl.where(m, tl.math.exp2(qk * qk_scale - lse2[:, None]), 0.0)
    dp = _dot(do, tl.trans(v), tl.zeros([q.shape[0], k.shape[0]], dtype=tl.float32), IEEE)
    ds = tl.where(m, p * (dp - delta[:, None]), 0.0)
    return _dot(ds.to(k.dtype), k, dq, IEEE)


@triton.jit
def _dq_range(dq, q, do, lse2, delta, row_ok, k_base, v_base, start, count, sks, svs, offs_d, d_valid, qk_scale,
              BLOCK_N: tl.constexpr, DMASK: tl.constexpr, IEEE: tl.constexpr):
    """``dq`` over the contiguous key rows ``[start, start + count)``."""
    for nb in range(0, count, BLOCK_N):
        offs_n = nb + tl.arange(0, BLOCK_N)
        rows = (start + offs_n).to(tl.int64)
        k, v = _load_kv(k_base + rows[:, None] * sks + offs_d[None, :], v_base + rows[:, None] * svs + offs_d[None, :],
                        offs_n < count, d_valid, True, DMASK)
        dq = _dq_update(dq, q, do, lse2, delta, row_ok, k, v, offs_n < count, qk_scale, IEEE)
    return dq


@triton.jit
def _row_stats(LSE_BASE, DELTA_BASE, rows_m, valid_m):
    """The rows' ``lse`` in log2 units (0 where the row attends nothing), ``delta`` and
    whether the row has keys at all."""
    lse = tl.load(LSE_BASE + rows_m, mask=valid_m, other=float("-inf"))
    row_ok = valid_m & (lse > float("-inf"))
    lse2 = tl.where(row_ok, lse * 1.4426950408889634, 0.0)
    delta = tl.load(DELTA_BASE + rows_m, mask=valid_m, other=0.0)
    return lse2, delta, row_ok


@triton.jit
def _query_rows(Q_BASE, DO_BASE, LSE_BASE, DELTA_BASE, rows_m, valid_m, sqs, sdos, offs_d, d_valid):
    """A query block's ``q``, ``dout`` and row statistics (:func:`_row_stats`)."""
    mask_md = valid_m[:, None] & d_valid[None, :]
    q = tl.load(Q_BASE + rows_m[:, None] * sqs + offs_d[None, :], mask=mask_md, other=0.0)
    do = tl.load(DO_BASE + rows_m[:, None] * sdos + offs_d[None, :], mask=mask_md, other=0.0)
    lse2, delta, row_ok = _row_stats(LSE_BASE, DELTA_BASE, rows_m, valid_m)
    return q, do, lse2, delta, row_ok


@triton.jit
def _query_tile_block(Q_TILES, qi, sub, grid_h, grid_w, canvas_t, canvas_h, canvas_w,
                      TT: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, BLOCK_M: tl.constexpr,
                      EVEN: tl.constexpr):
    """Rows of block ``sub`` of query tile ``qi`` and which are real tokens; the tile's
    grid coordinates."""
    VOL: tl.constexpr = TT * TH * TW
    gid = tl.load(Q_TILES + qi * 4 + 0)
    ct = gid // (grid_h * grid_w)
    ch = (gid // grid_w) % grid_h
    cw = gid % grid_w
    offs_m = sub * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_m, lt, lh, lw = _token_rows(Q_TILES + qi * 4 + 1, offs_m, TH, TW)
    if EVEN:
        valid_m = offs_m < VOL
    else:
        valid_m = ((offs_m < VOL) & (lt < tl.minimum(TT, canvas_t - ct * TT))
                   & (lh < tl.minimum(TH, canvas_h - ch * TH)) & (lw < tl.minimum(TW, canvas_w - cw * TW)))
    return rows_m, valid_m, ct, ch, cw


@triton.jit
def _sta_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, Q_TILES, KV_TILES, HEADS,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdob, sdos, sdoh, sdqb, sdqs, sdqh, slb, slh, sdb, sdh,
    n_heads, grid_t, grid_h, grid_w, canvas_t, canvas_h, canvas_w,
    n_text_blocks, q_text_start, q_text_valid,
    kv_text_start, kv_text_for_video, kv_text_for_text, text_q_video_keys,
    qk_scale, sm_scale, SEL_KEYS, SEL_COUNT, sel_kb, sel_kh, sel_kq, sel_cb, sel_ch,
    clip_t0, clip_h0, clip_w0, clip_t1, clip_h1, clip_w1,
    TT: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN: tl.constexpr, IEEE: tl.constexpr, TABLE: tl.constexpr,
):
    VOL: tl.constexpr = TT * TH * TW
    BLOCKS_PER_TILE: tl.constexpr = (VOL + BLOCK_M - 1) // BLOCK_M
    KEY_BLOCKS_PER_TILE: tl.constexpr = (VOL + BLOCK_N - 1) // BLOCK_N
    DMASK: tl.constexpr = BLOCK_D != HEAD_DIM

    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    head_row = bh % n_heads
    kt = tl.load(HEADS + head_row * 5 + 0)
    kh = tl.load(HEADS + head_row * 5 + 1)
    kw = tl.load(HEADS + head_row * 5 + 2)
    kvh = tl.load(HEADS + head_row * 5 + 3).to(tl.int64)
    h = tl.load(HEADS + head_row * 5 + 4).to(tl.int64)

    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    lse_base = LSE + b * slb + h * slh
    delta_base = DELTA + b * sdb + h * sdh
    if pid < n_text_blocks:
        # Text queries: every video key below text_q_video_keys, then the valid text keys.
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_m = (q_text_start + offs_m).to(tl.int64)
        valid_m = offs_m < q_text_valid
        q, do, lse2, delta, row_ok = _query_rows(q_base, do_base, lse_base, delta_base, rows_m, valid_m, sqs, sdos,
                                                 offs_d, d_valid)
        dq = _dq_range(dq, q, do, lse2, delta, row_ok, k_base, v_base, 0, text_q_video_keys, sks, svs, offs_d,
                       d_valid, qk_scale, BLOCK_N, DMASK, IEEE)
        dq = _dq_range(dq, q, do, lse2, delta, row_ok, k_base, v_base, kv_text_start, kv_text_for_text, sks, svs,
                       offs_d, d_valid, qk_scale, BLOCK_N, DMASK, IEEE)
    else:
        vid = pid - n_text_blocks
        qi = vid // BLOCKS_PER_TILE
        rows_m, valid_m, ct, ch, cw = _query_tile_block(Q_TILES, qi, vid % BLOCKS_PER_TILE, grid_h, grid_w,
                                                        canvas_t, canvas_h, canvas_w, TT, TH, TW, BLOCK_M, EVEN)
        q, do, lse2, delta, row_ok = _query_rows(q_base, do_base, lse_base, delta_base, rows_m, valid_m, sqs, sdos,
                                                 offs_d, d_valid)
        if TABLE:
            sel_row = b * sel_kb + h * sel_kh + qi.to(tl.int64) * sel_kq
            n_steps = tl.load(SEL_COUNT + b * sel_cb + h * sel_ch + qi) * KEY_BLOCKS_PER_TILE
            st = 0
            sh = 0
            sw = 0
        else:
            # The forward's window start, then the cut to the clip box.
            sel_row = 0
            st0 = tl.minimum(tl.maximum(ct - (kt - 1) // 2, 0), grid_t - kt)
            sh0 = tl.minimum(tl.maximum(ch - (kh - 1) // 2, 0), grid_h - kh)
            sw0 = tl.minimum(tl.maximum(cw - (kw - 1) // 2, 0), grid_w - kw)
            st = tl.maximum(st0, clip_t0)
            sh = tl.maximum(sh0, clip_h0)
            sw = tl.maximum(sw0, clip_w0)
            kt = tl.maximum(tl.minimum(st0 + kt, clip_t1) - st, 0)
            kh = tl.maximum(tl.minimum(sh0 + kh, clip_h1) - sh, 0)
            kw = tl.maximum(tl.minimum(sw0 + kw, clip_w1) - sw, 0)
            n_steps = kt * kh * kw * KEY_BLOCKS_PER_TILE
        for j in range(0, n_steps):
            k, v, key_valid = _key_block(j, b, kvh, st, sh, sw, kh, kw, grid_h, grid_w, canvas_t, canvas_h,
                                         canvas_w, KV_TILES, None, None, 0, k_base, v_base, sks, svs, offs_d,
                                         d_valid, SEL_KEYS, sel_row, TT, TH, TW, HEAD_DIM, BLOCK_D, BLOCK_N, EVEN,
                                         0, DMASK, TABLE)
            dq = _dq_update(dq, q, do, lse2, delta, row_ok, k, v, key_valid, qk_scale, IEEE)
        dq = _dq_range(dq, q, do, lse2, delta, row_ok, k_base, v_base, kv_text_start, kv_text_for_video, sks, svs,
                       offs_d, d_valid, qk_scale, BLOCK_N, DMASK, IEEE)
    mask_md = valid_m[:, None] & d_valid[None, :]
    tl.store(DQ + b * sdqb + h * sdqh + rows_m[:, None] * sdqs + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask_md)


@triton.jit
def _dkdv_update(dk, dv, k, v, key_valid, Q_BASE, DO_BASE, LSE_BASE, DELTA_BASE, rows_m, valid_m, sqs, sdos, offs_d,
                 d_valid, qk_scale, IEEE: tl.constexpr):
    """Fold one query block (rows ``rows_m``) into a key block's ``dk`` (unscaled), ``dv``."""
    q, do, lse2, delta, row_ok = _query_rows(Q_BASE, DO_BASE, LSE_BASE, DELTA_BASE, rows_m, valid_m, sqs, sdos,
                                             offs_d, d_valid)
    zeros = tl.zeros([k.shape[0], q.shape[0]], dtype=tl.float32)
    m = key_valid[:, None] & row_ok[None, :]
    p_t = tl.where(m, tl.math.exp2(_dot(k, tl.trans(q), zeros, IEEE) * qk_scale - lse2[None, :]), 0.0)
    dv = _dot(p_t.to(do.dtype), do, dv, IEEE)
    dp_t = _dot(v, tl.trans(do), zeros, IEEE)
    ds_t = tl.where(m, p_t * (dp_t - delta[None, :]), 0.0)
    dk = _dot(ds_t.to(q.dtype), q, dk, IEEE)
    return dk, dv


@triton.jit
def _sta_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, Q_TILES, Q_SLOT, KV_LIST, HEADS, GROUPS,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdob, sdos, sdoh, sdkb, sdks, sdkh, sdvb, sdvs, sdvh,
    slb, slh, sdb, sdh, n_kv_heads, g_stride, n_q_tiles,
    grid_t, grid_h, grid_w, canvas_t, canvas_h, canvas_w,
    n_text_key_blocks, q_text_start, q_text_valid,
    kv_text_start, kv_text_for_video, kv_text_for_text, text_q_video_keys,
    qk_scale, sm_scale, T_KEYS, T_COUNT, t_kb, t_kh, t_kk, t_cb, t_ch,
    clip_t0, clip_h0, clip_w0, clip_t1, clip_h1, clip_w1,
    TT: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN: tl.constexpr, IEEE: tl.constexpr, TABLE: tl.constexpr,
):
    VOL: tl.constexpr = TT * TH * TW
    BLOCKS_PER_TILE: tl.constexpr = (VOL + BLOCK_M - 1) // BLOCK_M
    KEY_BLOCKS_PER_TILE: tl.constexpr = (VOL + BLOCK_N - 1) // BLOCK_N
    DMASK: tl.constexpr = BLOCK_D != HEAD_DIM

    pid = tl.program_id(0)
    bg = tl.program_id(1)
    b = (bg // n_kv_heads).to(tl.int64)
    kvh = (bg % n_kv_heads).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    text_block = pid < n_text_key_blocks

    if text_block:
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_n = (kv_text_start + offs_n).to(tl.int64)
        key_valid = offs_n < tl.maximum(kv_text_for_video, kv_text_for_text)
        for_video = offs_n < kv_text_for_video
        for_text = offs_n < kv_text_for_text
        n_text_q = q_text_valid
        kid = pid * 0  # the tile-block names, unused here
        ct = kid
        ch = kid
        cw = kid
        in_clip = pid < 0
    else:
        vid = pid - n_text_key_blocks
        ki = vid // KEY_BLOCKS_PER_TILE
        offs_n = (vid % KEY_BLOCKS_PER_TILE) * BLOCK_N + tl.arange(0, BLOCK_N)
        kid = tl.load(KV_LIST + ki * 4)
        ct = kid // (grid_h * grid_w)
        ch = (kid // grid_w) % grid_h
        cw = kid % grid_w
        rows_n, nt, nh, nw = _token_rows(KV_LIST + ki * 4 + 1, offs_n, TH, TW)
        key_valid = offs_n < VOL
        if not EVEN:
            key_valid = (key_valid & (nt < tl.minimum(TT, canvas_t - ct * TT))
                         & (nh < tl.minimum(TH, canvas_h - ch * TH)) & (nw < tl.minimum(TW, canvas_w - cw * TW)))
        for_video = key_valid
        for_text = key_valid & (rows_n < text_q_video_keys)
        # Text queries read the video key rows below text_q_video_keys; a tile's rows start at its base.
        n_text_q = tl.where(tl.load(KV_LIST + ki * 4 + 1) < text_q_video_keys, q_text_valid, 0)
        in_clip = ((ct >= clip_t0) & (ct < clip_t1) & (ch >= clip_h0) & (ch < clip_h1)
                   & (cw >= clip_w0) & (cw < clip_w1))
    kv_mask = key_valid[:, None] & d_valid[None, :]
    k = tl.load(K + b * skb + kvh * skh + rows_n[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + kvh * svh + rows_n[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    for g in range(0, tl.load(GROUPS + kvh * g_stride)):
        head_row = tl.load(GROUPS + kvh * g_stride + 1 + g)
        h = tl.load(HEADS + head_row * 5 + 4).to(tl.int64)
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        lse_base = LSE + b * slb + h * slh
        delta_base = DELTA + b * sdb + h * sdh
        if text_block:
            # Every video query of the call attends the valid text keys.
            for j in range(0, n_q_tiles * BLOCKS_PER_TILE):
                rows_m, valid_m, _, _, _ = _query_tile_block(Q_TILES, j // BLOCKS_PER_TILE, j % BLOCKS_PER_TILE,
                                                             grid_h, grid_w, canvas_t, canvas_h, canvas_w,
                                                             TT, TH, TW, BLOCK_M, EVEN)
                dk, dv = _dkdv_update(dk, dv, k, v, for_video, q_base, do_base, lse_base, delta_base, rows_m,
                                      valid_m, sqs, sdos, offs_d, d_valid, qk_scale, IEEE)
        else:
            if TABLE:
                t_row = b * t_kb + h * t_kh + kid.to(tl.int64) * t_kk
                n_steps = tl.load(T_COUNT + b * t_cb + h * t_ch + kid) * BLOCKS_PER_TILE
                for j in range(0, n_steps):
                    qi = tl.load(T_KEYS + t_row + j // BLOCKS_PER_TILE)
                    rows_m, valid_m, _, _, _ = _query_tile_block(Q_TILES, qi, j % BLOCKS_PER_TILE, grid_h, grid_w,
                                                                 canvas_t, canvas_h, canvas_w, TT, TH, TW,
                                                                 BLOCK_M, EVEN)
                    dk, dv = _dkdv_update(dk, dv, k, v, for_video, q_base, do_base, lse_base, delta_base, rows_m,
                                          valid_m, sqs, sdos, offs_d, d_valid, qk_scale, IEEE)
            else:
                # The window's transpose: a box of query tiles (empty outside the clip box).
                lo_t, hi_t = _query_span(ct, tl.load(HEADS + head_row * 5 + 0), grid_t)
                lo_h, hi_h = _query_span(ch, tl.load(HEADS + head_row * 5 + 1), grid_h)
                lo_w, hi_w = _query_span(cw, tl.load(HEADS + head_row * 5 + 2), grid_w)
                n_h = hi_h - lo_h
                n_w = hi_w - lo_w
                n_steps = tl.where(in_clip, (hi_t - lo_t) * n_h * n_w * BLOCKS_PER_TILE, 0)
                for j in range(0, n_steps):
                    i = j // BLOCKS_PER_TILE
                    gid = ((lo_t + i // (n_h * n_w)) * grid_h + lo_h + (i // n_w) % n_h) * grid_w + lo_w + i % n_w
                    qi = tl.load(Q_SLOT + gid)
                    if qi >= 0:  # a tile of the call's queries (a rank's halo tiles are not)
                        rows_m, valid_m, _, _, _ = _query_tile_block(Q_TILES, qi, j % BLOCKS_PER_TILE, grid_h,
                                                                     grid_w, canvas_t, canvas_h, canvas_w,
                                                                     TT, TH, TW, BLOCK_M, EVEN)
                        dk, dv = _dkdv_update(dk, dv, k, v, for_video, q_base, do_base, lse_base, delta_base,
                                              rows_m, valid_m, sqs, sdos, offs_d, d_valid, qk_scale, IEEE)
        for mb in range(0, n_text_q, BLOCK_M):
            offs_m = mb + tl.arange(0, BLOCK_M)
            dk, dv = _dkdv_update(dk, dv, k, v, for_text, q_base, do_base, lse_base, delta_base,
                                  (q_text_start + offs_m).to(tl.int64), offs_m < q_text_valid, sqs, sdos, offs_d,
                                  d_valid, qk_scale, IEEE)
    tl.store(DK + b * sdkb + kvh * sdkh + rows_n[:, None] * sdks + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * sdvb + kvh * sdvh + rows_n[:, None] * sdvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


def transposed_tables(keys: torch.Tensor, counts: torch.Tensor, n_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The table path's lists turned round, on the device without a host sync: ``keys
    [Bk, Hk, n_q, width]``, ``counts [Bk, Hk, n_q]`` int32 (each query tile's key tiles)
    -> ``t_keys [Bk, Hk, n_tiles, n_q]`` (each key tile's query tiles, ascending, padded
    past ``t_count``), ``t_count [Bk, Hk, n_tiles]`` int32."""
    Bk, Hk, n_q, width = keys.shape
    listed = torch.arange(width, device=keys.device) < counts[..., None].long()
    ids = torch.where(listed, keys.long(), n_tiles)
    attended = torch.zeros(Bk, Hk, n_q, n_tiles + 1, dtype=torch.bool, device=keys.device)
    attended.scatter_(-1, ids, True)
    by_key = attended[..., :n_tiles].transpose(-1, -2)  # [Bk, Hk, n_tiles, n_q]
    q_ids = torch.where(by_key, torch.arange(n_q, device=keys.device, dtype=torch.int32), n_q)
    t_keys = torch.sort(q_ids, dim=-1).values.contiguous()
    if t_keys.shape[-1] == 0:
        t_keys = torch.zeros(Bk, Hk, n_tiles, 1, dtype=torch.int32, device=keys.device)
    return t_keys, by_key.sum(-1, dtype=torch.int32)


def backward_config(volume: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Block sizes, warps and stages of the two backward kernels for a tile volume and head
    dim: ``{"dq": {...}, "dkdv": {...}}``, each with ``BLOCK_M`` (query rows) and ``BLOCK_N``
    (key rows). The dq program holds a query block and walks key blocks, the dk/dv program
    the other way round."""
    cap = 32 if head_dim > 128 or dtype == torch.float32 else 64
    one = dict(BLOCK_M=pick_block(volume, cap), BLOCK_N=pick_block(volume, cap),
               num_warps=4 if head_dim <= 64 else 8, num_stages=2)
    return {"dq": dict(one), "dkdv": dict(one)}


def preprocess(out_bshd: torch.Tensor, dout_bshd: torch.Tensor, dlse_bhs: torch.Tensor | None) -> torch.Tensor:
    """``delta [B, H, S] = rowsum(dout * out) - dlse`` float32 (``dlse_bhs``: ``None`` or
    ``[B, H, S]``)."""
    B, Sq, H, D = out_bshd.shape
    delta = torch.empty((B, H, Sq), dtype=torch.float32, device=out_bshd.device)
    if B * H and Sq:
        dl = dlse_bhs if dlse_bhs is None or dlse_bhs.stride(-1) == 1 else dlse_bhs.contiguous()
        _preprocess_kernel[(triton.cdiv(Sq, 64), B * H)](
            out_bshd, dout_bshd, dl, delta, out_bshd.stride(0), out_bshd.stride(1), out_bshd.stride(2),
            dout_bshd.stride(0), dout_bshd.stride(1), dout_bshd.stride(2),
            0 if dl is None else dl.stride(0), 0 if dl is None else dl.stride(1), H, Sq,
            HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_M=64, HAS_DLSE=dl is not None)
    return delta


def _kernel_config(base: dict, override: dict | None, volume: int, even: bool, **fixed) -> tuple[int, int, dict]:
    """One kernel's ``(BLOCK_M, BLOCK_N, launch keywords)`` from its base config and the
    caller's override."""
    cfg = dict(base, **(override or {}))
    block_m, block_n = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    return block_m, block_n, dict(fixed, BLOCK_M=block_m, BLOCK_N=block_n,
                                  EVEN=even and volume % block_m == 0 and volume % block_n == 0, **cfg)


def table_strides(keys) -> tuple:
    """A table pair's pointers and batch / head / row strides (0 where it broadcasts)."""
    if keys is None:
        return (None, None, 0, 0, 0, 0, 0)
    k, c = keys
    if k.dtype != torch.int32 or c.dtype != torch.int32 or k.stride(-1) != 1 or c.stride(-1) != 1:
        raise ValueError(f"key tables must be int32 with a contiguous last dim, got {k.dtype}, {c.dtype}")
    return (k, c, k.stride(0) if k.shape[0] > 1 else 0, k.stride(1) if k.shape[1] > 1 else 0, k.stride(2),
            c.stride(0) if c.shape[0] > 1 else 0, c.stride(1) if c.shape[1] > 1 else 0)


def sta_bwd(
    q_bshd: torch.Tensor,
    k_bshd: torch.Tensor,
    v_bshd: torch.Tensor,
    out_bshd: torch.Tensor,
    dout_bshd: torch.Tensor,
    lse_bhs: torch.Tensor,
    dlse_bhs: torch.Tensor | None,
    q_tiles: torch.Tensor,
    q_slot: torch.Tensor,
    kv_tiles: torch.Tensor,
    kv_list: torch.Tensor,
    heads: torch.Tensor,
    groups: torch.Tensor,
    *,
    canvas: tuple[int, int, int],
    tile: tuple[int, int, int],
    q_video: int,
    kv_video: int,
    text_q_video_keys: int,
    q_text_valid: int,
    kv_text_for_video: int,
    kv_text_for_text: int,
    scale: float,
    even: bool,
    keys=None,
    t_keys=None,
    clip=None,
    config: dict | None = None,
):
    """Launch the preprocess, the dq kernel and the dk/dv kernel; returns ``(dq, dk, dv)``.

    ``q_bshd, out_bshd, dout_bshd [B, Sq, H, D]``, ``k_bshd, v_bshd [B, Skv, Hkv, D]`` (last
    dim contiguous); ``lse_bhs [B, H, Sq]`` float32 (natural log, last dim contiguous) the
    rows' final log-sum-exp and ``dlse_bhs`` (same, or ``None``) its gradient. Tables, int32
    on the device (module docstring): ``q_tiles [n_q, 4]``, ``q_slot [n_tiles]``,
    ``kv_tiles [n_tiles, 3]``, ``kv_list [n_kv, 4]``, ``heads [H, 5]`` (every query head, in
    order), ``groups [Hkv, G + 1]``; ``keys = (sel_keys [Bk, Hk, n_q, width], sel_count [Bk,
    Hk, n_q])`` and ``t_keys = (t_keys [Bk, Hk, n_tiles, n_q'], t_count [Bk, Hk, n_tiles])``
    for the table path. The rows, text counts, ``even`` and ``clip`` are the forward's
    (``kernels/sta_fwd.py``); ``config`` overrides :func:`backward_config` per kernel
    (``{"dq": {"BLOCK_M": 128}, "dkdv": {...}}``). ``dq`` has ``q``'s shape and dtype, ``dk, dv`` ``k``'s;
    rows no program covers are zero.
    """
    B, Sq, H, D = q_bshd.shape
    Hkv = k_bshd.shape[2]
    grid_shape = tuple(-(-c // t) for c, t in zip(canvas, tile))
    clip_lo, clip_hi = clip if clip is not None else ((0, 0, 0), grid_shape)
    volume = math.prod(tile)
    block_d = triton.next_power_of_2(D)
    base = backward_config(volume, D, q_bshd.dtype)
    fixed = dict(TT=tile[0], TH=tile[1], TW=tile[2], HEAD_DIM=D, BLOCK_D=block_d, IEEE=q_bshd.dtype == torch.float32,
                 TABLE=keys is not None)
    dq_m, _, dq_args = _kernel_config(base["dq"], (config or {}).get("dq"), volume, even, **fixed)
    _, kv_n, kv_args = _kernel_config(base["dkdv"], (config or {}).get("dkdv"), volume, even, **fixed)

    delta = preprocess(out_bshd, dout_bshd, dlse_bhs)

    dq = torch.zeros_like(q_bshd)
    dk = torch.zeros_like(k_bshd)
    dv = torch.zeros_like(v_bshd)
    strides = (q_bshd.stride(0), q_bshd.stride(1), q_bshd.stride(2), k_bshd.stride(0), k_bshd.stride(1),
               k_bshd.stride(2), v_bshd.stride(0), v_bshd.stride(1), v_bshd.stride(2),
               dout_bshd.stride(0), dout_bshd.stride(1), dout_bshd.stride(2))
    text = (q_video, q_text_valid, kv_video, kv_text_for_video, kv_text_for_text, text_q_video_keys)
    lse_strides = (lse_bhs.stride(0), lse_bhs.stride(1), delta.stride(0), delta.stride(1))
    n_text_blocks = triton.cdiv(q_text_valid, dq_m)
    n_q_blocks = n_text_blocks + q_tiles.shape[0] * triton.cdiv(volume, dq_m)
    if n_q_blocks and B * H:
        _sta_bwd_dq_kernel[(n_q_blocks, B * H)](
            q_bshd, k_bshd, v_bshd, dout_bshd, dq, lse_bhs, delta, q_tiles, kv_tiles, heads, *strides,
            dq.stride(0), dq.stride(1), dq.stride(2), *lse_strides, H, *grid_shape, *canvas,
            n_text_blocks, *text, scale * LOG2E, scale, *table_strides(keys), *clip_lo, *clip_hi, **dq_args)
    n_text_keys = max(kv_text_for_video, kv_text_for_text)
    n_text_key_blocks = triton.cdiv(n_text_keys, kv_n)
    n_kv_blocks = n_text_key_blocks + kv_list.shape[0] * triton.cdiv(volume, kv_n)
    if n_kv_blocks and B * Hkv:
        _sta_bwd_dkdv_kernel[(n_kv_blocks, B * Hkv)](
            q_bshd, k_bshd, v_bshd, dout_bshd, dk, dv, lse_bhs, delta, q_tiles, q_slot, kv_list, heads, groups,
            *strides, dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            *lse_strides, Hkv, groups.stride(0), q_tiles.shape[0], *grid_shape, *canvas,
            n_text_key_blocks, *text, scale * LOG2E, scale, *table_strides(t_keys), *clip_lo, *clip_hi, **kv_args)
    return dq, dk, dv
