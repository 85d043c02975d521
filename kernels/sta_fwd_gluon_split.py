"""EXPERIMENT (v15): the Gluon kernel with 192-key steps, natural order, no text, no LSE.

Hypothesis: FA3 runs head dim 128 with 176-key blocks, so each warpgroup's softmax has a
longer stretch of the other warpgroup's products to hide behind, and the per-step fixed
work (O rescale, row reductions, barriers, turn hand-offs) is spread over more keys.
Gluon tensors must be powers of two, so a step here is two products per operand: a
128-key box (two t-slices of an 8x8 tile) and a 64-key box (one t-slice), one softmax
over both. A tile of 6 slices is two steps. Everything else as ``sta_fwd_gluon.py``.
"""

from __future__ import annotations

import math

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

from .sta_fwd_gluon import BLOCK, LOG2E, _five_d, _issue_turn, _pass_turn, supported

SLICES_PER_STEP = 3  # 192 keys of an 8x8 tile


@gluon.jit
def _load_step(desc_a, desc_b, smem_a, smem_b, ready, empty, j, b, col, st, sh, sw, kh, kw,
               TT: gl.constexpr, TH: gl.constexpr, TW: gl.constexpr, STAGES: gl.constexpr):
    """Step ``j`` of the window (its K or V): slices ``3*sub .. 3*sub+2`` of window tile
    ``j // STEPS``, as a 2-slice box and a 1-slice box, into ring slot ``j % STAGES``."""
    STEPS: gl.constexpr = TT // 3
    s = j % STAGES
    mbarrier.wait(empty.index(s), ((j // STAGES) & 1) ^ 1)
    mbarrier.expect(ready.index(s), desc_a.block_type.nbytes + desc_b.block_type.nbytes)
    i = j // STEPS
    t0 = (st + i // (kh * kw)) * TT + (j % STEPS) * 3
    y = (sh + (i // kw) % kh) * TH
    x = (sw + i % kw) * TW
    tma.async_copy_global_to_shared(desc_a, [b, t0, y, x, col], ready.index(s), smem_a.index(s))
    tma.async_copy_global_to_shared(desc_b, [b, t0 + 2, y, x, col], ready.index(s), smem_b.index(s))


@gluon.jit
def _consumer(WG: gl.constexpr, q_desc, ka_desc, kb_desc, va_desc, vb_desc, o_desc, q_smem, ka, kb, va, vb, q_bar,
              k_ready, v_ready, k_empty, v_empty, turn, b, kv_col, st, sh, sw, kh, kw, q_col, q_t, q_h, q_w, n_steps,
              qk_scale, TT: gl.constexpr, TH: gl.constexpr, TW: gl.constexpr, KS: gl.constexpr, VS: gl.constexpr,
              PINGPONG: gl.constexpr, num_warps: gl.constexpr):
    dtype: gl.constexpr = q_smem.dtype
    BA: gl.constexpr = 128
    BB: gl.constexpr = 64
    BM: gl.constexpr = 64
    HALF: gl.constexpr = BM // (TH * TW)
    D: gl.constexpr = q_smem.shape[-1]
    LOADS: gl.constexpr = WG == 1
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BA, 16])
    mma_b: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                    instr_shape=[16, BB, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    row: gl.constexpr = gl.SliceLayout(1, mma)
    row_b: gl.constexpr = gl.SliceLayout(1, mma_b)

    if LOADS:
        mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
        for w in gl.static_range(2):
            tma.async_copy_global_to_shared(q_desc, [b, q_t + w * HALF, q_h, q_w, q_col], q_bar, q_smem.index(w))
        for i in gl.static_range(VS):
            if i < n_steps:
                if i < KS:
                    _load_step(ka_desc, kb_desc, ka, kb, k_ready, k_empty, i, b, kv_col, st, sh, sw, kh, kw,
                               TT, TH, TW, KS)
                _load_step(va_desc, vb_desc, va, vb, v_ready, v_empty, i, b, kv_col, st, sh, sw, kh, kw, TT, TH, TW, VS)

    q_half = q_smem.index(WG)
    q2 = q_half.reshape([BM, D])
    zero_a = gl.zeros([BM, BA], gl.float32, mma)
    zero_b = gl.zeros([BM, BB], gl.float32, mma_b)

    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_ready.index(0), 0)
    _issue_turn(turn, WG, 0, PINGPONG)
    sa_tok = warpgroup_mma(q2, ka.index(0).reshape([BA, D]).permute((1, 0)), zero_a, use_acc=False, is_async=True)
    sb_tok = warpgroup_mma(q2, kb.index(0).reshape([BB, D]).permute((1, 0)), zero_b, use_acc=False, is_async=True)
    _pass_turn(turn, WG, PINGPONG)
    sa, sb = warpgroup_mma_wait(0, deps=(sa_tok, sb_tok))
    mbarrier.arrive(k_empty.index(0))
    if LOADS:
        if KS < n_steps:
            _load_step(ka_desc, kb_desc, ka, kb, k_ready, k_empty, KS, b, kv_col, st, sh, sw, kh, kw, TT, TH, TW, KS)
    m_i = gl.maximum(gl.max(sa, 1), gl.convert_layout(gl.max(sb, 1), row)) * qk_scale
    pa = gl.exp2(sa * qk_scale - m_i[:, None])
    pb = gl.exp2(sb * qk_scale - gl.convert_layout(m_i, row_b)[:, None])
    l_i = gl.sum(pa, 1) + gl.convert_layout(gl.sum(pb, 1), row)
    pa_op = gl.convert_layout(pa.to(dtype), p_layout)
    pb_op = gl.convert_layout(pb.to(dtype), p_layout)
    alpha = gl.full([BM], 1.0, gl.float32, row)
    o_tok = warpgroup_mma_init(gl.zeros([BM, D], gl.float32, mma))

    for j in range(1, n_steps):
        sj = j % KS
        sp = (j - 1) % VS
        acc = warpgroup_mma_wait(0, deps=(o_tok, ))
        mbarrier.arrive(v_empty.index((j + VS - 2) % VS), pred=j >= 2)
        if LOADS:
            if (j >= 2) & (j - 2 + VS < n_steps):
                _load_step(va_desc, vb_desc, va, vb, v_ready, v_empty, j - 2 + VS, b, kv_col, st, sh, sw, kh, kw,
                           TT, TH, TW, VS)
        acc = acc * alpha[:, None]
        mbarrier.wait(k_ready.index(sj), (j // KS) & 1)
        mbarrier.wait(v_ready.index(sp), ((j - 1) // VS) & 1)
        _issue_turn(turn, WG, j, PINGPONG)
        sa_tok = warpgroup_mma(q2, ka.index(sj).reshape([BA, D]).permute((1, 0)), zero_a, use_acc=False,
                               is_async=True)
        sb_tok = warpgroup_mma(q2, kb.index(sj).reshape([BB, D]).permute((1, 0)), zero_b, use_acc=False,
                               is_async=True)
        o_tok = warpgroup_mma(pa_op, va.index(sp).reshape([BA, D]), acc, is_async=True)
        o_tok = warpgroup_mma(pb_op, vb.index(sp).reshape([BB, D]), o_tok, is_async=True)
        _pass_turn(turn, WG, PINGPONG)
        sa, sb = warpgroup_mma_wait(2, deps=(sa_tok, sb_tok))
        mbarrier.arrive(k_empty.index(sj))
        if LOADS:
            if j + KS < n_steps:
                _load_step(ka_desc, kb_desc, ka, kb, k_ready, k_empty, j + KS, b, kv_col, st, sh, sw, kh, kw,
                           TT, TH, TW, KS)
        m_new = gl.maximum(m_i, gl.maximum(gl.max(sa, 1), gl.convert_layout(gl.max(sb, 1), row)) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        pa = gl.exp2(sa * qk_scale - m_new[:, None])
        pb = gl.exp2(sb * qk_scale - gl.convert_layout(m_new, row_b)[:, None])
        l_i = l_i * alpha + gl.sum(pa, 1) + gl.convert_layout(gl.sum(pb, 1), row)
        m_i = m_new
        pa_op = gl.convert_layout(pa.to(dtype), p_layout)
        pb_op = gl.convert_layout(pb.to(dtype), p_layout)

    last = n_steps - 1
    acc = warpgroup_mma_wait(0, deps=(o_tok, ))
    acc = acc * alpha[:, None]
    mbarrier.wait(v_ready.index(last % VS), (last // VS) & 1)
    o_tok = warpgroup_mma(pa_op, va.index(last % VS).reshape([BA, D]), acc, is_async=True)
    o_tok = warpgroup_mma(pb_op, vb.index(last % VS).reshape([BB, D]), o_tok, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(o_tok, ))
    out = acc / l_i[:, None]
    q2.store(out.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [b, q_t + WG * HALF, q_h, q_w, q_col], q_half)
    tma.store_wait(0)


@gluon.jit
def _sta_fwd_gluon_split_kernel(q_desc, ka_desc, kb_desc, va_desc, vb_desc, o_desc, HEADS, n_heads, grid_t, grid_h,
                                grid_w, qk_scale, TT: gl.constexpr, TH: gl.constexpr, TW: gl.constexpr,
                                K_STAGES: gl.constexpr, V_STAGES: gl.constexpr, PINGPONG: gl.constexpr,
                                CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
    D: gl.constexpr = ka_desc.block_type.shape[-1]
    QB: gl.constexpr = TT * TH * TW // 128  # 128-row query blocks per tile
    pid = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // n_heads
    head_row = bh % n_heads
    kt = gl.load(HEADS + head_row * 5 + 0)
    kh = gl.load(HEADS + head_row * 5 + 1)
    kw = gl.load(HEADS + head_row * 5 + 2)
    kvh = gl.load(HEADS + head_row * 5 + 3)
    h = gl.load(HEADS + head_row * 5 + 4)
    gid = pid // QB
    ct = gid // (grid_h * grid_w)
    ch = (gid // grid_w) % grid_h
    cw = gid % grid_w
    q_t = ct * TT + (pid % QB) * (128 // (TH * TW))
    q_h = ch * TH
    q_w = cw * TW
    st = gl.minimum(gl.maximum(ct - (kt - 1) // 2, 0), grid_t - kt)
    sh = gl.minimum(gl.maximum(ch - (kh - 1) // 2, 0), grid_h - kh)
    sw = gl.minimum(gl.maximum(cw - (kw - 1) // 2, 0), grid_w - kw)
    n_steps = kt * kh * kw * (TT // 3)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    ka = gl.allocate_shared_memory(ka_desc.dtype, [K_STAGES] + ka_desc.block_type.shape, ka_desc.layout)
    kb = gl.allocate_shared_memory(kb_desc.dtype, [K_STAGES] + kb_desc.block_type.shape, kb_desc.layout)
    va = gl.allocate_shared_memory(va_desc.dtype, [V_STAGES] + va_desc.block_type.shape, va_desc.layout)
    vb = gl.allocate_shared_memory(vb_desc.dtype, [V_STAGES] + vb_desc.block_type.shape, vb_desc.layout)
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
            (_consumer, (0, q_desc, ka_desc, kb_desc, va_desc, vb_desc, o_desc, q_smem, ka, kb, va, vb, q_bar, k_ready, v_ready,
                         k_empty, v_empty, turn, b, kvh * D, st, sh, sw, kh, kw, h * D, q_t, q_h, q_w, n_steps,
                         qk_scale, TT, TH, TW, K_STAGES, V_STAGES, PINGPONG, num_warps)),
            (_consumer, (1, q_desc, ka_desc, kb_desc, va_desc, vb_desc, o_desc, q_smem, ka, kb, va, vb, q_bar, k_ready, v_ready,
                         k_empty, v_empty, turn, b, kvh * D, st, sh, sw, kh, kw, h * D, q_t, q_h, q_w, n_steps,
                         qk_scale, TT, TH, TW, K_STAGES, V_STAGES, PINGPONG, num_warps)),
        ],
        [num_warps],
        [CONSUMER_REGS],
    )


DEFAULT_CONFIG = dict(K_STAGES=2, V_STAGES=2, num_warps=4, PINGPONG=True, CONSUMER_REGS=256)


def sta_fwd_gluon_split(q, k, v, heads, out, *, canvas, tile, scale, config=None):
    """As ``sta_fwd_gluon`` (natural order, no text, no LSE) with 192-key steps; 8x8 tile planes, t extent a multiple of 3."""
    if not (supported(q, k, v, canvas, tile) and tile[1] * tile[2] == 64 and tile[0] % 3 == 0):
        raise ValueError("sta_fwd_gluon_split: natural order, 8x8 tile planes, tile t a multiple of 3, D=128")
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    grid_shape = tuple(c // t for c, t in zip(canvas, tile))
    q_desc, o_desc = (_five_d(x, canvas, tile, BLOCK // 2) for x in (q, out))
    ka_desc, va_desc = (_five_d(x, canvas, tile, 128) for x in (k, v))
    kb_desc, vb_desc = (_five_d(x, canvas, tile, 64) for x in (k, v))
    n = heads.shape[0]
    grid = (math.prod(grid_shape) * math.prod(tile) // BLOCK, q.shape[0] * n)
    _sta_fwd_gluon_split_kernel[grid](
        q_desc, ka_desc, kb_desc, va_desc, vb_desc, o_desc, heads, n, *grid_shape, scale * LOG2E,
        TT=tile[0], TH=tile[1], TW=tile[2], K_STAGES=cfg["K_STAGES"], V_STAGES=cfg["V_STAGES"],
        PINGPONG=cfg["PINGPONG"], CONSUMER_REGS=cfg["CONSUMER_REGS"], num_warps=cfg["num_warps"])
    return out
