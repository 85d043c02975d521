"""Sliding tile attention forward: one Triton launch for every batch, head and query block.

Legend: ``_bshd`` = ``[batch, seq, heads, head_dim]`` (read through strides, never
copied); ``_bhs`` = ``[batch, heads, seq]``.

Where tokens sit is given by small int32 tables on the device, so one kernel serves the
natural order, the tiled order, and a rank's own tiles plus its halo:

- ``q_tiles [n_q_tiles, 4]``: per query tile ``(global tile id, base, stride_t, stride_h)``;
  local token ``(lt, lh, lw)`` of the tile is row ``base + lt*stride_t + lh*stride_h + lw``.
- ``kv_tiles [n_tiles, 3]``: the same ``(base, stride_t, stride_h)`` for every global tile
  in ``k``/``v`` (entries of tiles that no window reaches are never read).
- ``heads [n, 5]``: per computed query head ``(kt, kh, kw, kv_head, q_head)``, windows
  already clamped to ``min(k, n)`` tiles; a launch may compute a subset of the heads.
- the table path (``TABLE``; selected tiles, windows of other rules): ``sel_keys [Bk, Hk,
  n_q_tiles, width]`` and ``sel_count [Bk, Hk, n_q_tiles]`` int32 list each query tile's key
  tiles by global id, per batch sample and query head (``Bk``/``Hk`` of 1 broadcast); the
  windows of ``heads`` are then not read. Without ``TABLE`` the kernel is compiled exactly
  as before (the branch is a compile-time constant).

Program ``(pid, b*n + i)``: the first ``n_text_blocks`` pids are text query blocks (they
attend every video key, so they are long and go first); the rest are ``BLOCKS_PER_TILE``
blocks of each query tile, which walk the window's key tiles in one flat loop and then
the valid text keys.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .descriptors import bulk_copy_layout_ok, natural_box

LOG2E = 1.4426950408889634


@triton.jit
def _load_kv(k_ptrs, v_ptrs, key_valid, d_valid, MASKED: tl.constexpr, DMASK: tl.constexpr):
    """One key/value block through pointers (gathered rows; masked where asked)."""
    if MASKED:
        kv_mask = key_valid[:, None]
        if DMASK:
            kv_mask = kv_mask & d_valid[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    elif DMASK:
        k = tl.load(k_ptrs, mask=d_valid[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=d_valid[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    return k, v


@triton.jit
def _softmax_update(acc, m_i, l_i, q, k, v, key_valid, qk_scale, MASKED: tl.constexpr, IEEE: tl.constexpr):
    """Fold one key/value block into the running softmax. ``m_i`` is in scaled log2 units:
    the row max is taken on raw scores and the scale applied in one multiply-add each."""
    if IEEE:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    if MASKED:
        qk = tl.where(key_valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        # A row that has seen no key yet keeps m = -inf; subtract 0 instead (p = 0).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_use = m_new
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if IEEE:
        acc = tl.dot(p, v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _attend_range(acc, m_i, l_i, q, k_base, v_base, start, count, sks, svs, offs_d, d_valid, qk_scale,
                  BLOCK_N: tl.constexpr, DMASK: tl.constexpr, IEEE: tl.constexpr):
    """Attend the contiguous key rows ``[start, start + count)``."""
    for nb in range(0, count, BLOCK_N):
        offs_n = nb + tl.arange(0, BLOCK_N)
        rows = (start + offs_n).to(tl.int64)
        k_ptrs = k_base + rows[:, None] * sks + offs_d[None, :]
        v_ptrs = v_base + rows[:, None] * svs + offs_d[None, :]
        k, v = _load_kv(k_ptrs, v_ptrs, offs_n < count, d_valid, True, DMASK)
        acc, m_i, l_i = _softmax_update(acc, m_i, l_i, q, k, v, offs_n < count, qk_scale, True, IEEE)
    return acc, m_i, l_i


@triton.jit
def _token_rows(entry, offs, TH: tl.constexpr, TW: tl.constexpr):
    """Rows of a tile's tokens ``offs`` (tile-local, t-major) from its table ``entry``
    ``(base, stride_t, stride_h)``: ``(rows, lt, lh, lw)``."""
    lt = offs // (TH * TW)
    lh = (offs // TW) % TH
    lw = offs % TW
    rows = tl.load(entry) + lt * tl.load(entry + 1) + lh * tl.load(entry + 2) + lw
    return rows.to(tl.int64), lt, lh, lw


@triton.jit
def _key_block(j, b, kvh, st, sh, sw, kh, kw, grid_h, grid_w, canvas_t, canvas_h, canvas_w,
               KV_TILES, K_DESC, V_DESC, kv_rows, k_base, v_base, sks, svs, offs_d, d_valid, SEL_KEYS, sel_row,
               TT: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr, TMA: tl.constexpr,
               DMASK: tl.constexpr, TABLE: tl.constexpr):
    """Key/value block ``j`` of a query tile's window (window starts ``st, sh, sw``, sizes
    ``kh, kw`` in tiles), or with ``TABLE`` of its key-tile list at ``SEL_KEYS + sel_row``:
    ``(k, v, key_valid)``. Keys outside the canvas are masked, and only when not ``EVEN``."""
    VOL: tl.constexpr = TT * TH * TW
    KEY_BLOCKS_PER_TILE: tl.constexpr = (VOL + BLOCK_N - 1) // BLOCK_N
    i = j // KEY_BLOCKS_PER_TILE
    nb = (j % KEY_BLOCKS_PER_TILE) * BLOCK_N
    if TABLE:
        kid = tl.load(SEL_KEYS + sel_row + i)
        wt = kid // (grid_h * grid_w)
        wh = (kid // grid_w) % grid_h
        ww = kid % grid_w
    else:
        wt = st + i // (kh * kw)
        wh = sh + (i // kw) % kh
        ww = sw + i % kw
        kid = (wt * grid_h + wh) * grid_w + ww
    offs_n = nb + tl.arange(0, BLOCK_N)
    key_valid = offs_n < VOL
    if TMA == 2:
        # Natural order, whole tiles: the block is BLOCK_N // (TH*TW) t-slices of the
        # tile, a (1, t, h, w, d) box of the 5-D view [B, T, H, W, Hkv*D].
        box = [b.to(tl.int32), (wt * TT + nb // (TH * TW)).to(tl.int32), (wh * TH).to(tl.int32),
               (ww * TW).to(tl.int32), (kvh * HEAD_DIM).to(tl.int32)]
        k = K_DESC.load(box).reshape(BLOCK_N, BLOCK_D)
        v = V_DESC.load(box).reshape(BLOCK_N, BLOCK_D)
    elif TMA:
        # Packed whole tiles: the block is BLOCK_N consecutive rows; one bulk copy each.
        k_row = (b * kv_rows + tl.load(KV_TILES + kid * 3 + 0) + nb).to(tl.int32)
        col = (kvh * HEAD_DIM).to(tl.int32)
        k = K_DESC.load([k_row, col])
        v = V_DESC.load([k_row, col])
    else:
        rows_n, nt, nh, nw = _token_rows(KV_TILES + kid * 3, offs_n, TH, TW)
        k_ptrs = k_base + rows_n[:, None] * sks + offs_d[None, :]
        v_ptrs = v_base + rows_n[:, None] * svs + offs_d[None, :]
        if not EVEN:
            key_valid = (key_valid & (nt < tl.minimum(TT, canvas_t - wt * TT))
                         & (nh < tl.minimum(TH, canvas_h - wh * TH)) & (nw < tl.minimum(TW, canvas_w - ww * TW)))
        k, v = _load_kv(k_ptrs, v_ptrs, key_valid, d_valid, not EVEN, DMASK)
    return k, v, key_valid


@triton.jit
def _sta_fwd_kernel(
    Q, K, V, O, LSE, Q_TILES, KV_TILES, HEADS, K_DESC, V_DESC, kv_rows,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh, slb, slh,
    n_heads, grid_t, grid_h, grid_w, canvas_t, canvas_h, canvas_w,
    n_text_blocks, q_text_start, q_text_rows, q_text_valid,
    kv_text_start, kv_text_for_video, kv_text_for_text, text_q_video_keys,
    qk_scale, SEL_KEYS, SEL_COUNT, sel_kb, sel_kh, sel_kq, sel_cb, sel_ch,
    clip_t0, clip_h0, clip_w0, clip_t1, clip_h1, clip_w1,
    TT: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN: tl.constexpr, STORE_LSE: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr, TABLE: tl.constexpr,
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
    h = tl.load(HEADS + head_row * 5 + 4)

    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    q_base = Q + b * sqb + h.to(tl.int64) * sqh
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    o_base = O + b * sob + h.to(tl.int64) * soh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if pid < n_text_blocks:
        # Text queries: every video key of [0, text_q_video_keys), then the valid text keys.
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_m = (q_text_start + offs_m).to(tl.int64)
        store_m = offs_m < q_text_rows
        attend_m = offs_m < q_text_valid
        q = tl.load(q_base + rows_m[:, None] * sqs + offs_d[None, :],
                    mask=attend_m[:, None] & d_valid[None, :], other=0.0)
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, 0, text_q_video_keys, sks, svs,
                                      offs_d, d_valid, qk_scale, BLOCK_N, DMASK, IEEE)
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, kv_text_start, kv_text_for_text,
                                      sks, svs, offs_d, d_valid, qk_scale, BLOCK_N, DMASK, IEEE)
        # Padding text rows attend nothing: zero output, LSE -inf.
        l_i = tl.where(attend_m, l_i, 0.0)
    else:
        vid = pid - n_text_blocks
        qi = vid // BLOCKS_PER_TILE
        sub = vid % BLOCKS_PER_TILE
        gid = tl.load(Q_TILES + qi * 4 + 0)
        ct = gid // (grid_h * grid_w)
        ch = (gid // grid_w) % grid_h
        cw = gid % grid_w
        offs_m = sub * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_m, lt, lh, lw = _token_rows(Q_TILES + qi * 4 + 1, offs_m, TH, TW)
        if EVEN:
            store_m = offs_m < VOL
        else:
            store_m = ((offs_m < VOL) & (lt < tl.minimum(TT, canvas_t - ct * TT))
                       & (lh < tl.minimum(TH, canvas_h - ch * TH)) & (lw < tl.minimum(TW, canvas_w - cw * TW)))
        q = tl.load(q_base + rows_m[:, None] * sqs + offs_d[None, :],
                    mask=store_m[:, None] & d_valid[None, :], other=0.0)

        if TABLE:
            # This (sample, head, query tile)'s list of key tiles.
            sel_row = b * sel_kb + h.to(tl.int64) * sel_kh + qi.to(tl.int64) * sel_kq
            n_steps = tl.load(SEL_COUNT + b * sel_cb + h.to(tl.int64) * sel_ch + qi) * KEY_BLOCKS_PER_TILE
            st = 0
            sh = 0
            sw = 0
        else:
            # Window start per axis: clamp(c - (k - 1) // 2, 0, n - k), k already <= n; then
            # the window cut to the clip box [clip_*0, clip_*1).
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
            k, v, valid = _key_block(j, b, kvh, st, sh, sw, kh, kw, grid_h, grid_w, canvas_t, canvas_h, canvas_w,
                                     KV_TILES, K_DESC, V_DESC, kv_rows, k_base, v_base, sks, svs, offs_d,
                                     d_valid, SEL_KEYS, sel_row, TT, TH, TW, HEAD_DIM, BLOCK_D, BLOCK_N, EVEN, TMA,
                                     DMASK, TABLE)
            acc, m_i, l_i = _softmax_update(acc, m_i, l_i, q, k, v, valid, qk_scale, not EVEN, IEEE)
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, kv_text_start, kv_text_for_video,
                                      sks, svs, offs_d, d_valid, qk_scale, BLOCK_N, DMASK, IEEE)

    has_keys = l_i > 0.0
    out = tl.where(has_keys[:, None], acc / tl.where(has_keys, l_i, 1.0)[:, None], 0.0)
    o_mask = store_m[:, None] & d_valid[None, :] if DMASK else store_m[:, None]
    tl.store(o_base + rows_m[:, None] * sos + offs_d[None, :], out.to(O.dtype.element_ty), mask=o_mask)
    if STORE_LSE:
        ln2 = 0.6931471805599453
        lse = tl.where(has_keys, (m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0))) * ln2, float("-inf"))
        tl.store(LSE + b * slb + h.to(tl.int64) * slh + rows_m, lse, mask=store_m)


def _tma_mode(wanted: bool, k_bshd, v_bshd, tile, block_n: int, even: bool, packed: bool, natural: bool) -> int:
    """Whether k/v blocks can be bulk-copied: 1 = packed tiles (consecutive rows), 2 =
    natural order (a 5-D box per block), 0 = no (gathered rows through pointers). Needs a
    GPU, whole tiles, a power-of-two head dim and each token's heads adjacent in memory."""
    D = k_bshd.shape[3]
    plane = tile[1] * tile[2]
    ok = (wanted and even and k_bshd.is_cuda and triton.next_power_of_2(D) == D and math.prod(tile) % block_n == 0
          and bulk_copy_layout_ok(k_bshd, v_bshd) and v_bshd.stride() == k_bshd.stride())
    if not ok:
        return 0
    if packed and k_bshd.stride(0) == k_bshd.shape[1] * k_bshd.stride(1):
        return 1
    if natural and block_n % plane == 0 and tile[0] % (block_n // plane) == 0:
        return 2
    return 0


def _table_args(keys) -> tuple:
    """``SEL_KEYS, SEL_COUNT`` and their batch / head / query-tile strides (0 where the
    tables broadcast); ``None`` and zeros without tables."""
    if keys is None:
        return (None, None, 0, 0, 0, 0, 0)
    k, c = keys.keys, keys.counts
    if k.dtype != torch.int32 or c.dtype != torch.int32 or k.stride(-1) != 1 or c.stride(-1) != 1:
        raise ValueError(f"key tables must be int32 with a contiguous last dim, got {k.dtype}, {c.dtype}")
    return (k, c, k.stride(0) if k.shape[0] > 1 else 0, k.stride(1) if k.shape[1] > 1 else 0, k.stride(2),
            c.stride(0) if c.shape[0] > 1 else 0, c.stride(1) if c.shape[1] > 1 else 0)


def pick_block(volume: int, cap: int) -> int:
    """The block (16..cap, a power of two) that pads a tile's ``volume`` least; the larger
    block on a tie (fewer, bigger matrix products)."""
    sizes = [b for b in (128, 64, 32, 16) if b <= cap]
    return min(sizes, key=lambda b: (-(-volume // b) * b, -b))


def launch_config(volume: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Block sizes, warps and pipeline depth for a tile volume and head dim."""
    wide = head_dim > 128 or dtype == torch.float32
    block_m = pick_block(volume, 128)
    block_n = pick_block(volume, 64 if wide else 128)
    warps = 8 if block_m * block_n >= 128 * 64 else 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=2 if wide else 3)


def sta_fwd(
    q_bshd: torch.Tensor,
    k_bshd: torch.Tensor,
    v_bshd: torch.Tensor,
    q_tiles: torch.Tensor,
    kv_tiles: torch.Tensor,
    heads: torch.Tensor,
    *,
    canvas: tuple[int, int, int],
    tile: tuple[int, int, int],
    q_video: int,
    q_text: int,
    kv_video: int,
    text_q_video_keys: int,
    q_text_valid: int,
    kv_text_for_video: int,
    kv_text_for_text: int,
    scale: float,
    even: bool,
    packed: bool = False,
    natural: bool = False,
    return_lse: bool = False,
    config: dict | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    keys=None,
    clip=None,
):
    """Launch the kernel.

    ``q_bshd [B, Sq, H, D]``, ``k_bshd``/``v_bshd [B, Skv, Hkv, D]`` (last dim contiguous),
    ``q_tiles [n_q_tiles, 4]``, ``kv_tiles [n_tiles, 3]``, ``heads [n, 5]`` int32 tables on
    the same device (module docstring); only the ``n`` heads of ``heads`` are computed
    (``out``, and with ``return_lse`` ``lse``, are allocated by the caller when it fills
    the other heads or rows itself). ``q`` rows ``[q_video, q_video + q_text)`` are text
    queries; ``k``/``v`` rows from ``kv_video`` on are text keys. ``even`` promises full
    tiles that the blocks divide (no key or query masking); ``packed`` promises that every
    k/v tile's rows are consecutive (tiled storage), ``natural`` that k/v are the whole
    canvas in natural order; either allows bulk copies. Returns ``out_bshd`` (input
    dtype) and, with ``return_lse``, ``lse_bhs`` float32 (natural log). ``keys`` (a
    ``sta_dist.selection.tables.KeyTiles``: ``keys [Bk, Hk, n_q_tiles, width]``,
    ``counts [Bk, Hk, n_q_tiles]`` int32, indexed by the q head) takes the table path.
    ``clip = (lo, hi)`` (tile coordinates per axis) cuts every window to the key tiles in
    ``[lo, hi)``.
    """
    B, Sq, H, D = q_bshd.shape
    for name, x in (("q", q_bshd), ("k", k_bshd), ("v", v_bshd)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim, got stride {x.stride()}")
    grid_shape = tuple(-(-c // t) for c, t in zip(canvas, tile))
    clip_lo, clip_hi = clip if clip is not None else ((0, 0, 0), grid_shape)
    volume = math.prod(tile)
    cfg = dict(launch_config(volume, D, q_bshd.dtype), **(config or {}))
    block_m, block_n = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    # Bulk tensor copies (TMA) of k/v blocks, for whole tiles in contiguous [B, S, H, D]:
    # 1 = packed tiles (rows consecutive), 2 = natural order (a 4-D box per block).
    tma = _tma_mode(cfg.pop("TMA", True), k_bshd, v_bshd, tile, block_n, even, packed, natural)
    k_desc = v_desc = None
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        Hkv = k_bshd.shape[2]
        if tma == 1:
            row_major = [[k_bshd.shape[0] * k_bshd.shape[1], Hkv * D], [k_bshd.stride(1), 1], [block_n, D]]
            k_desc, v_desc = (TensorDescriptor(x, *row_major) for x in (k_bshd, v_bshd))
        else:
            k_desc, v_desc = (TensorDescriptor(x, *natural_box(x, canvas, tile, block_n)) for x in (k_bshd, v_bshd))
    if out is None:
        out = torch.empty(q_bshd.shape, dtype=q_bshd.dtype, device=q_bshd.device)
    if return_lse and lse is None:
        lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q_bshd.device)
    elif not return_lse:
        lse = out
    n_text_blocks = triton.cdiv(q_text, block_m)
    n_blocks = n_text_blocks + q_tiles.shape[0] * triton.cdiv(volume, block_m)
    n_heads = heads.shape[0]
    if n_blocks and B * n_heads:
        _sta_fwd_kernel[(n_blocks, B * n_heads)](
            q_bshd, k_bshd, v_bshd, out, lse, q_tiles, kv_tiles, heads, k_desc, v_desc, k_bshd.shape[1],
            q_bshd.stride(0), q_bshd.stride(1), q_bshd.stride(2),
            k_bshd.stride(0), k_bshd.stride(1), k_bshd.stride(2),
            v_bshd.stride(0), v_bshd.stride(1), v_bshd.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0) if return_lse else 0, lse.stride(1) if return_lse else 0,
            n_heads, *grid_shape, *canvas,
            n_text_blocks, q_video, q_text, q_text_valid,
            kv_video, kv_text_for_video, kv_text_for_text, text_q_video_keys,
            scale * LOG2E, *_table_args(keys), *clip_lo, *clip_hi,
            TT=tile[0], TH=tile[1], TW=tile[2],
            HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_M=block_m, BLOCK_N=block_n,
            EVEN=even and volume % block_m == 0 and volume % block_n == 0,
            STORE_LSE=return_lse, IEEE=q_bshd.dtype == torch.float32, TMA=tma, TABLE=keys is not None,
            **cfg,
        )
    return (out, lse) if return_lse else out
