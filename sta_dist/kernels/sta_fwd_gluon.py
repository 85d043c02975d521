"""Sliding tile attention forward in Gluon for Hopper (sm_90), FA3-style.

Covers whole tiles (the route, ``sta_dist/route.py``, keeps the Triton kernel
``kernels/sta_fwd.py`` for everything else): q/k/v ``[B, S, heads, D]`` holding video
tokens in natural order (the whole canvas; token ``(t, h, w)`` is row ``(t*H + h)*W + w``)
or packed (each tile's tokens consecutive rows in ``(t, h, w)`` order, tiles placed by two
small tables: the whole canvas in tiled order as ``sta_dist.to_tiled`` lays it, head
mode's local layout, or a tile-mode rank's own box plus its halo), then text rows; head
dim 128, bf16 or fp16. Per-head windows come from ``heads [n, 5]`` = ``(kt, kh, kw,
kv_head, q_head)`` (windows clamped to the grid; GQA allowed). A query tile ``(ct, ch,
cw)`` attends the key tiles ``[st, st+kt) x [sh, sh+kh) x [sw, sw+kw)`` with ``st =
clamp(ct - (kt-1)//2, 0, nt - kt)`` (likewise per axis) and the first ``text_keys`` text
rows, softmax over all of them. Text queries are the caller's (dense attention over a few
hundred rows).

Blocks. Natural order: a query or video key block is ``BLOCK // (TH*TW)`` consecutive
t-slices of one tile (two slices of an 8x8 tile = 128 tokens): one TMA box ``[1,
BLOCK//(TH*TW), TH, TW, D]`` of the 5-D view ``[B, T, H, W, heads*D]`` (strides ``(sB,
H*W*sS, W*sS, sS, 1)``). In shared memory the box is reshaped (a memdesc view, no copy) to
a ``[BLOCK, D]`` matrix with the same 128-byte NVMMA swizzle: the TMA writes the box as two
64-column halves (hardware boxes ``[1, slices, TH, TW, 64]``, the second 16 KiB after the
first), each 128 rows of 128 bytes in ``(t, h, w)`` order, swizzled by shared address;
that is the layout of a 2-D ``[128, 128]`` NVMMA tile (the wgmma descriptors and the
output store use the same halves). Packed (``PACKED``): every block is consecutive rows, a
3-D box ``[1, rows, D]`` of the view ``[B, S, heads*D]`` (the same two swizzled halves in
shared memory) at the tile's first row from the tables (``Q_TILES`` per query tile: global
id, first row; ``KV_TILES`` per global tile: first row) plus ``128 * (block in tile)``. A
text key block is ``BLOCK`` consecutive rows from ``text_row`` on, such a 3-D box, in
either order. Text blocks go first, the partial one as block 0, so the one mask (columns
past ``text_keys``) sits outside the loop.

Program ``(pid, b*n + i)``: query block ``pid`` (tile ``pid // BLOCKS_PER_TILE``, slice
group ``pid % BLOCKS_PER_TILE``) of head row ``i`` of batch ``b``. Its 128 query rows are
two halves of 64 (``BLOCK // 2`` tokens: q and the output move as half boxes), one per
consumer warpgroup; both read the same K/V ring.

Warp roles (``gl.warp_specialize``): two warpgroups, warpgroup 0 the default partition
and warpgroup 1 the one worker partition. (A separate producer warp would make two
worker partitions; Gluon then dispatches workers through an indirect branch and ptxas
serialises every wgmma: ptxas -v reports C7512 "insufficient register resources".)
Warpgroup 1 also issues every TMA copy: q, the first ring fills, and each refill as soon
as it has released the slot itself (it is the second in turn, so warpgroup 0's release
is already there). Each warpgroup runs FA3's intra-warpgroup overlap, with the loop
rotated so that the wait retiring PV sits at the top of the next trip::

    S_0 = Q K_0^T; P_0 = exp2 part of S_0; release K slot 0
    for j in 1..n-1:
        wait for all wgmma (retires PV_{j-2}); release V slot of j-2; O *= alpha_{j-1}
        take the turn
        issue S_j = Q K_j^T            (async)
        issue O += P_{j-1} V_{j-1}     (async, P from registers)
        pass the turn
        wait until 1 group is outstanding          -> S_j done, PV still running
        release K slot of j
        softmax of S_j (max, exp2, row sums)       <- overlaps PV and the other
                                                      warpgroup's products
    retire PV_{n-2}; O *= alpha; O += P_{n-1} V_{n-1}; O /= l; TMA store via q's half

(With the PV wait after the exponentials in the same trip, ptxas hoists it up to the
S wait and nothing overlaps; the compile check shows the difference.) Ping-pong
(``PINGPONG``, FA3's inter-warpgroup schedule): the warpgroups take turns issuing their
products, so one's softmax runs while the other's products hold the tensor cores.

Barrier protocol (mbarriers; a warpgroup's ``arrive`` is lowered by Gluon to a barrier
over its 4 warps followed by one elected thread's arrive: one arrival per warpgroup):

- ``q_bar`` (count 1): warpgroup 1 ``expect``s both q halves; the TMA completes it. Both
  wait parity 0 once.
- ``k_ready[s]`` / ``v_ready[s]`` (count 1): for fill ``u = j // K_STAGES`` (likewise V)
  of slot ``s`` warpgroup 1 ``expect``s one box and issues the copy; both wait parity
  ``u & 1``. K and V have separate rings, so QK^T starts before V has landed.
- ``k_empty[s]`` / ``v_empty[s]`` (count 2, one arrival per warpgroup): arrive when the
  wgmma reading the slot is retired (K after the S wait of the same trip, V at the top
  of the trip after next). Before fill ``u`` of slot ``s`` warpgroup 1 waits parity
  ``(u & 1) ^ 1``: fill 0 passes at once on a fresh barrier (the phase "before" phase 0
  counts as complete), fill ``u >= 1`` waits for both releases of fill ``u - 1``.
- ``turn[w]`` (count 1): before issuing trip ``j`` warpgroup ``w`` waits parity
  ``(j & 1) ^ (1 - w)`` (warpgroup 0's first wait passes on the fresh barrier); after
  issuing it arrives on ``turn[1 - w]``. Each warpgroup's waits need the other's
  previous arrival, so the barrier is never two phases ahead of its waiter.

Scale: ``qk_scale = scale * log2(e)``; the row max is taken on raw scores and the scale
folded into the exp2 argument (one FMA per score), as in the Triton kernel.

LSE: optional (``lse`` argument), natural log, ``[B, heads, S]`` float32, video rows only.
"""

from __future__ import annotations

import math

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)

from ..route import HOPPER_BLOCK as BLOCK
from .descriptors import natural_box

LOG2E = 1.4426950408889634
DEFAULT_CONFIG = dict(K_STAGES=2, V_STAGES=2, num_warps=4, PINGPONG=True, CONSUMER_REGS=256)


@gluon.jit
def _copy_video_block(desc, dst, bar, j, b, col, st, sh, sw, kh, kw, grid_h, grid_w, kv_tiles, kv_stride,
                      TT: gl.constexpr, TH: gl.constexpr, TW: gl.constexpr, BN: gl.constexpr, PACKED: gl.constexpr):
    """TMA copy of key block ``j`` of a window: the ``BN``-row piece ``j % KB_PER_TILE`` of
    window tile ``j // KB_PER_TILE`` (tiles walked t, then h, then w). Natural order: a 5-D
    box at canvas ``(t, h, w)``; packed: ``BN`` of the tile's consecutive rows, from the
    tile's first row in the ``kv_tiles`` table (row ``tile id * kv_stride``)."""
    KB_PER_TILE: gl.constexpr = TT * TH * TW // BN
    i = j // KB_PER_TILE
    sub = j % KB_PER_TILE
    wt = st + i // (kh * kw)
    wh = sh + (i // kw) % kh
    ww = sw + i % kw
    if PACKED:
        base = gl.load(kv_tiles + ((wt * grid_h + wh) * grid_w + ww) * kv_stride)
        tma.async_copy_global_to_shared(desc, [b, base + sub * BN, col], bar, dst)
    else:
        tma.async_copy_global_to_shared(desc, [b, wt * TT + sub * (BN // (TH * TW)), wh * TH, ww * TW, col], bar, dst)


@gluon.jit
def _load_block(desc, text_desc, smem, ready, empty, j, win,
                TT: gl.constexpr, TH: gl.constexpr, TW: gl.constexpr, BN: gl.constexpr, PACKED: gl.constexpr,
                STAGES: gl.constexpr):
    """TMA copy of key block ``j`` (its K or its V box) into ring slot ``j % STAGES``, once
    both warpgroups have released the slot's previous fill (fill 0 passes at once). Text
    blocks come first, the last (partial) one as block 0: block ``j < n_tb`` is the text
    rows from ``text_row + (n_tb - 1 - j) * BN`` on, a 3-D box; block ``j >= n_tb`` is video
    block ``j - n_tb`` of the window. ``win = (b, col, st, sh, sw, kh, kw, n_tb, text_row,
    grid_h, grid_w, kv_tiles, kv_stride)``: batch, first column of the kv head, the window's
    first tile and extent in h and w, text blocks, first text row, the tile grid's h and w,
    the packed tiles' row table and its row stride."""
    b, col, st, sh, sw, kh, kw, n_tb, text_row, grid_h, grid_w, kv_tiles, kv_stride = win
    s = j % STAGES
    mbarrier.wait(empty.index(s), ((j // STAGES) & 1) ^ 1)
    mbarrier.expect(ready.index(s), desc.block_type.nbytes)
    if j < n_tb:
        tma.async_copy_global_to_shared(text_desc, [b, text_row + (n_tb - 1 - j) * BN, col], ready.index(s),
                                        smem.index(s).reshape(text_desc.block_type.shape))
    else:
        _copy_video_block(desc, smem.index(s), ready.index(s), j - n_tb, b, col, st, sh, sw, kh, kw, grid_h, grid_w,
                          kv_tiles, kv_stride, TT, TH, TW, BN, PACKED)


@gluon.jit
def _issue_turn(turn, WG: gl.constexpr, j, PINGPONG: gl.constexpr):
    """Ping-pong: before issuing the products of trip ``j`` a warpgroup waits for its turn
    (warpgroup 0 goes first: parity 1 of a fresh barrier passes)."""
    if PINGPONG:
        mbarrier.wait(turn.index(WG), (j & 1) ^ (1 - WG))


@gluon.jit
def _pass_turn(turn, WG: gl.constexpr, PINGPONG: gl.constexpr):
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - WG))


@gluon.jit
def _consumer(WG: gl.constexpr, q_desc, k_desc, v_desc, kt_desc, vt_desc, o_desc, q_smem, k_smem, v_smem, q_bar,
              k_ready, v_ready, k_empty, v_empty, turn, LSE, win, q_col, q_t, q_h, q_w, h, n_steps, n_text,
              qk_scale, slb, slh,
              TT: gl.constexpr, TH: gl.constexpr, TW: gl.constexpr, BN: gl.constexpr, PACKED: gl.constexpr,
              KS: gl.constexpr, VS: gl.constexpr, STORE_LSE: gl.constexpr, PINGPONG: gl.constexpr,
              num_warps: gl.constexpr):
    """One warpgroup: QK^T, online softmax and PV for its 64 query rows (half ``WG``).
    Warpgroup 1, the second in turn, also issues every TMA copy (see the module doc).
    ``(q_t, q_h, q_w)``: the query block's first token (natural order) or first row and
    two zeros (tiled order); ``win``: see ``_load_block``.

    Loop trip j (1 <= j < n): retire PV_{j-2}, release V slot of j-2, rescale O by
    alpha_{j-1}, convert P_{j-1} to a register operand; (take the turn) issue
    S_j = Q K_j^T and O += P_{j-1} V_{j-1} (pass the turn); wait for S_j only (one group
    left in flight), release the K slot of j, and run softmax_j while PV_{j-1} and the
    other warpgroup's products run. The wait that retires PV_{j-1} is at the top of the
    next trip, so the compiler cannot hoist it above softmax_j (ptxas moves a
    `wgmma.wait_group 0` placed after the exponentials up to the `wait_group 1`).
    Block 0, if it is a partial text block, masks its key columns past ``n_text``."""
    b = win[0]
    dtype: gl.constexpr = q_smem.dtype
    BM: gl.constexpr = BN // 2  # query rows of this warpgroup
    HALF: gl.constexpr = BM // (TH * TW)  # natural order: t-slices of a half
    D: gl.constexpr = q_smem.shape[-1]
    LOADS: gl.constexpr = WG == 1
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BN, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    row: gl.constexpr = gl.SliceLayout(1, mma)

    if LOADS:
        mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
        for w in gl.static_range(2):
            if PACKED:
                tma.async_copy_global_to_shared(q_desc, [b, q_t + w * BM, q_col], q_bar, q_smem.index(w))
            else:
                tma.async_copy_global_to_shared(q_desc, [b, q_t + w * HALF, q_h, q_w, q_col], q_bar, q_smem.index(w))
        for i in gl.static_range(VS):
            if i < n_steps:
                if i < KS:
                    _load_block(k_desc, kt_desc, k_smem, k_ready, k_empty, i, win, TT, TH, TW, BN, PACKED, KS)
                _load_block(v_desc, vt_desc, v_smem, v_ready, v_empty, i, win, TT, TH, TW, BN, PACKED, VS)

    q_half = q_smem.index(WG)
    q2 = q_half.reshape([BM, D])
    zero = gl.zeros([BM, BN], gl.float32, mma)

    mbarrier.wait(q_bar, 0)
    # Block 0: scores and their exponentials.
    mbarrier.wait(k_ready.index(0), 0)
    _issue_turn(turn, WG, 0, PINGPONG)
    s_tok = warpgroup_mma(q2, k_smem.index(0).reshape([BN, D]).permute((1, 0)), zero, use_acc=False,
                          is_async=True)
    _pass_turn(turn, WG, PINGPONG)
    s = warpgroup_mma_wait(0, deps=(s_tok, ))
    if n_text % BN != 0:
        cols = gl.arange(0, BN, layout=gl.SliceLayout(0, mma))
        s = gl.where((cols < n_text % BN)[None, :], s, float("-inf"))
    mbarrier.arrive(k_empty.index(0))
    if LOADS:
        if KS < n_steps:
            _load_block(k_desc, kt_desc, k_smem, k_ready, k_empty, KS, win, TT, TH, TW, BN, PACKED, KS)
    m_i = gl.max(s, 1) * qk_scale
    p = gl.exp2(s * qk_scale - m_i[:, None])
    l_i = gl.sum(p, 1)
    alpha = gl.full([BM], 1.0, gl.float32, row)
    o_tok = warpgroup_mma_init(gl.zeros([BM, D], gl.float32, mma))

    for j in range(1, n_steps):
        sj = j % KS
        sp = (j - 1) % VS
        # PV_{j-2} is done: its V slot goes back (and is refilled), O takes alpha_{j-1}.
        acc = warpgroup_mma_wait(0, deps=(o_tok, ))
        mbarrier.arrive(v_empty.index((j + VS - 2) % VS), pred=j >= 2)
        if LOADS:
            if (j >= 2) & (j - 2 + VS < n_steps):
                _load_block(v_desc, vt_desc, v_smem, v_ready, v_empty, j - 2 + VS, win, TT, TH, TW, BN, PACKED, VS)
        acc = acc * alpha[:, None]
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        # S_j = Q K_j^T, then O += P_{j-1} V_{j-1}; both in flight.
        mbarrier.wait(k_ready.index(sj), (j // KS) & 1)
        mbarrier.wait(v_ready.index(sp), ((j - 1) // VS) & 1)
        _issue_turn(turn, WG, j, PINGPONG)
        s_tok = warpgroup_mma(q2, k_smem.index(sj).reshape([BN, D]).permute((1, 0)), zero, use_acc=False,
                              is_async=True)
        o_tok = warpgroup_mma(p_op, v_smem.index(sp).reshape([BN, D]), acc, is_async=True)
        _pass_turn(turn, WG, PINGPONG)
        # S_j done (PV_{j-1} may still run): the softmax below overlaps it.
        s = warpgroup_mma_wait(1, deps=(s_tok, ))
        mbarrier.arrive(k_empty.index(sj))
        if LOADS:
            if j + KS < n_steps:
                _load_block(k_desc, kt_desc, k_smem, k_ready, k_empty, j + KS, win, TT, TH, TW, BN, PACKED, KS)
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new

    last = n_steps - 1
    acc = warpgroup_mma_wait(0, deps=(o_tok, ))
    acc = acc * alpha[:, None]
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    mbarrier.wait(v_ready.index(last % VS), (last // VS) & 1)
    o_tok = warpgroup_mma(p_op, v_smem.index(last % VS).reshape([BN, D]), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(o_tok, ))
    # Every wgmma of this warpgroup that read its q half is done: the half takes the output.
    out = acc / l_i[:, None]
    q2.store(out.to(dtype))
    fence_async_shared()
    if PACKED:
        tma.async_copy_shared_to_global(o_desc, [b, q_t + WG * BM, q_col], q_half)
    else:
        tma.async_copy_shared_to_global(o_desc, [b, q_t + WG * HALF, q_h, q_w, q_col], q_half)

    if STORE_LSE:
        r = gl.arange(0, BM, layout=row)
        if PACKED:
            rows = q_t + WG * BM + r
        else:
            canvas_h = win[9] * TH  # grid_h, grid_w: whole tiles
            canvas_w = win[10] * TW
            rows = ((q_t + WG * HALF + r // (TH * TW)) * canvas_h + q_h + (r // TW) % TH) * canvas_w + q_w + r % TW
        lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
        gl.store(LSE + b.to(gl.int64) * slb + h.to(gl.int64) * slh + rows, lse)
    tma.store_wait(0)


@gluon.jit
def _sta_fwd_gluon_kernel(q_desc, k_desc, v_desc, kt_desc, vt_desc, o_desc, HEADS, LSE, Q_TILES, q_stride,
                          KV_TILES, kv_stride, n_heads, grid_t, grid_h, grid_w, text_row, n_text,
                          slb, slh, qk_scale,
                          TT: gl.constexpr, TH: gl.constexpr, TW: gl.constexpr, BN: gl.constexpr,
                          PACKED: gl.constexpr, K_STAGES: gl.constexpr, V_STAGES: gl.constexpr,
                          STORE_LSE: gl.constexpr, PINGPONG: gl.constexpr,
                          CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
    D: gl.constexpr = k_desc.block_type.shape[-1]
    VOL: gl.constexpr = TT * TH * TW
    BLOCKS_PER_TILE: gl.constexpr = VOL // BN  # query blocks and key blocks (BN rows) per tile

    pid = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // n_heads
    head_row = bh % n_heads
    kt = gl.load(HEADS + head_row * 5 + 0)
    kh = gl.load(HEADS + head_row * 5 + 1)
    kw = gl.load(HEADS + head_row * 5 + 2)
    kvh = gl.load(HEADS + head_row * 5 + 3)
    h = gl.load(HEADS + head_row * 5 + 4)

    qi = pid // BLOCKS_PER_TILE
    sub = pid % BLOCKS_PER_TILE
    # Where the query block sits: natural order (t, h, w) of its first token; packed, its
    # first row (and two zeros), from the query tile table (global tile id, first row).
    if PACKED:
        gid = gl.load(Q_TILES + qi * q_stride)
        q_t = gl.load(Q_TILES + qi * q_stride + 1) + sub * BN
        q_h = 0
        q_w = 0
    else:
        gid = qi
    ct = gid // (grid_h * grid_w)
    ch = (gid // grid_w) % grid_h
    cw = gid % grid_w
    if not PACKED:
        q_t = ct * TT + sub * (BN // (TH * TW))
        q_h = ch * TH
        q_w = cw * TW
    # Window start per axis: clamp(c - (k - 1) // 2, 0, n - k), k already <= n.
    st = gl.minimum(gl.maximum(ct - (kt - 1) // 2, 0), grid_t - kt)
    sh = gl.minimum(gl.maximum(ch - (kh - 1) // 2, 0), grid_h - kh)
    sw = gl.minimum(gl.maximum(cw - (kw - 1) // 2, 0), grid_w - kw)
    n_tb = (n_text + BN - 1) // BN
    n_steps = n_tb + kt * kh * kw * BLOCKS_PER_TILE
    q_col = h * D
    kv_col = kvh * D
    # Where the loads go (see _load_block).
    win = (b, kv_col, st, sh, sw, kh, kw, n_tb, text_row, grid_h, grid_w, KV_TILES, kv_stride)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [K_STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [V_STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for s in gl.static_range(K_STAGES):
        mbarrier.init(k_ready.index(s), count=1)
        mbarrier.init(k_empty.index(s), count=2)
    for s in gl.static_range(V_STAGES):
        mbarrier.init(v_ready.index(s), count=1)
        mbarrier.init(v_empty.index(s), count=2)
    for w in gl.static_range(2):
        mbarrier.init(turn.index(w), count=1)
    fence_async_shared()

    gl.warp_specialize(
        [
            (_consumer, (0, q_desc, k_desc, v_desc, kt_desc, vt_desc, o_desc, q_smem, k_smem, v_smem, q_bar,
                         k_ready, v_ready, k_empty, v_empty, turn, LSE, win, q_col, q_t, q_h, q_w, h, n_steps,
                         n_text, qk_scale, slb, slh,
                         TT, TH, TW, BN, PACKED, K_STAGES, V_STAGES, STORE_LSE, PINGPONG, num_warps)),
            (_consumer, (1, q_desc, k_desc, v_desc, kt_desc, vt_desc, o_desc, q_smem, k_smem, v_smem, q_bar,
                         k_ready, v_ready, k_empty, v_empty, turn, LSE, win, q_col, q_t, q_h, q_w, h, n_steps,
                         n_text, qk_scale, slb, slh,
                         TT, TH, TW, BN, PACKED, K_STAGES, V_STAGES, STORE_LSE, PINGPONG, num_warps)),
        ],
        [num_warps],
        [CONSUMER_REGS],
    )

    mbarrier.invalidate(q_bar)
    for s in gl.static_range(K_STAGES):
        mbarrier.invalidate(k_ready.index(s))
        mbarrier.invalidate(k_empty.index(s))
    for s in gl.static_range(V_STAGES):
        mbarrier.invalidate(v_ready.index(s))
        mbarrier.invalidate(v_empty.index(s))
    for w in gl.static_range(2):
        mbarrier.invalidate(turn.index(w))


def box_layout(dtype: torch.dtype, rank: int = 5):
    """The NVMMA shared layout of a ``[1, slices, TH, TW, 128]`` box: 128-byte swizzle."""
    bits = torch.finfo(dtype).bits
    return gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=bits, rank=rank)


def _five_d(x: torch.Tensor, canvas, tile, rows: int = BLOCK):
    """A 5-D natural-order descriptor whose box is ``rows`` tokens: ``rows // (TH*TW)``
    t-slices of a tile."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    return TensorDescriptor(x, *natural_box(x, canvas, tile, rows), box_layout(x.dtype))


def _rows_desc(x: torch.Tensor, rows: int = BLOCK):
    """A 3-D descriptor ``[B, S, heads*D]`` whose box is ``rows`` consecutive rows (text
    keys; every block of packed tiles)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    B, S, heads, D = x.shape
    return TensorDescriptor(x, [B, S, heads * D], [x.stride(0), x.stride(1), 1], [1, rows, D],
                            box_layout(x.dtype, rank=3))


def sta_fwd_gluon(q, k, v, heads, out, *, canvas, tile, scale, text_keys=0, order="natural", tables=None,
                  config=None, lse=None):
    """Fill the video rows of ``out [B, S, Hq, D]`` (``q``'s dtype) with sliding tile
    attention for the ``n`` head rows of ``heads [n, 5]`` (int32, on q's device). ``q``,
    ``k``, ``v`` are ``[B, S, H, D]``, placed by ``order``:

    - "natural": the whole canvas first, token ``(t, h, w)`` at row ``(t*H + h)*W + w``;
    - "packed": tiles of consecutive rows, each tile's tokens in ``(t, h, w)`` order inside
      it (as ``sta_dist.to_tiled`` lays them), wherever ``tables =
      (q_tiles, kv_tiles, kv_video)`` put them: ``q_tiles [n_q, >=2]`` int32 holds per query
      tile to compute (global tile id, first row in q), ``kv_tiles [n_tiles, >=1]`` per
      global tile its first row in k/v (read for the tiles some window reaches), and text
      keys start at k/v row ``kv_video`` (``sta_dist.kernel_calls.gluon_tables`` makes
      them for any ``LocalLayout``, such as the whole canvas in tiled order).

    Video queries also attend the ``text_keys`` text key rows; text query rows of ``out``
    are not written. ``lse``, if given, ``[B, Hq, S]`` float32 (last dim contiguous), gets
    the natural-log LSE of the video rows. ``config`` overrides ``K_STAGES`` and
    ``V_STAGES`` (ring slots, 2 <= K <= V), ``PINGPONG``, ``num_warps`` (4: per
    warpgroup) and ``CONSUMER_REGS`` (warpgroup 1's register budget)."""
    if order == "packed" and tables is None:
        raise ValueError("sta_fwd_gluon: order='packed' needs tables=(q_tiles, kv_tiles, kv_video)")
    packed = order == "packed"
    kv_video = tables[2] if packed else math.prod(canvas)
    from ..route import Call, Device, gluon_rule

    reason = gluon_rule(Call.of(q, k, v, canvas, tile, order, kv_video=kv_video, text_keys=text_keys), Device.hopper())
    if reason:
        raise ValueError(f"sta_fwd_gluon: unsupported call: the kernel {reason}")
    if out.shape != q.shape or out.dtype != q.dtype or out.stride() != q.stride():
        raise ValueError("sta_fwd_gluon: out must match q's shape, dtype and strides")
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    if not 2 <= cfg["K_STAGES"] <= cfg["V_STAGES"]:
        raise ValueError(f"sta_fwd_gluon: need 2 <= K_STAGES <= V_STAGES, got {cfg['K_STAGES']}, {cfg['V_STAGES']}")
    T, H, W = canvas
    grid_shape = (T // tile[0], H // tile[1], W // tile[2])
    blocks_per_tile = math.prod(tile) // BLOCK
    B = q.shape[0]
    n = heads.shape[0]
    q_desc, o_desc = (_rows_desc(x, BLOCK // 2) if packed else _five_d(x, canvas, tile, BLOCK // 2) for x in (q, out))
    kt_desc, vt_desc = (_rows_desc(x) for x in (k, v))  # text keys; packed, every key block
    k_desc, v_desc = (kt_desc, vt_desc) if packed else (_five_d(x, canvas, tile) for x in (k, v))
    q_tiles, kv_tiles = tables[:2] if packed else (heads, heads)  # unread in natural order
    store_lse = lse is not None
    lse_arg = lse if store_lse else heads
    grid = ((q_tiles.shape[0] if packed else math.prod(grid_shape)) * blocks_per_tile, B * n)
    if grid[0] and grid[1]:
        _sta_fwd_gluon_kernel[grid](
            q_desc, k_desc, v_desc, kt_desc, vt_desc, o_desc, heads, lse_arg, q_tiles, q_tiles.stride(0), kv_tiles,
            kv_tiles.stride(0), n, *grid_shape, kv_video, text_keys,
            lse.stride(0) if store_lse else 0, lse.stride(1) if store_lse else 0, scale * LOG2E,
            TT=tile[0], TH=tile[1], TW=tile[2], BN=BLOCK, PACKED=packed, K_STAGES=cfg["K_STAGES"],
            V_STAGES=cfg["V_STAGES"], STORE_LSE=store_lse, PINGPONG=cfg["PINGPONG"],
            CONSUMER_REGS=cfg["CONSUMER_REGS"], num_warps=cfg["num_warps"],
        )
    return out
