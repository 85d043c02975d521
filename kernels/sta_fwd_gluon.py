"""Sliding tile attention forward in Gluon for Hopper (sm_90), FA3-style. EXPERIMENTAL.

Covers one case only (the router keeps the Triton kernel ``kernels/sta_fwd.py`` for
everything else): whole tiles (canvas divisible by the tile), q/k/v ``[B, S, heads, D]``
holding the whole canvas in natural token order (token ``(t, h, w)`` is row
``(t*H + h)*W + w``), text rows after the canvas ignored (no text keys, no text queries),
head dim 128, bf16 or fp16. Per-head windows come from ``heads [n, 5]`` =
``(kt, kh, kw, kv_head, q_head)`` (windows clamped to the grid; GQA allowed). A query tile
``(ct, ch, cw)`` attends the key tiles ``[st, st+kt) x [sh, sh+kh) x [sw, sw+kw)`` with
``st = clamp(ct - (kt-1)//2, 0, nt - kt)`` (likewise per axis), softmax over all of them.

Blocks. A query or key block is ``BLOCK // (TH*TW)`` consecutive t-slices of one tile
(two slices of an 8x8 tile = 128 tokens): one TMA box ``[1, BLOCK//(TH*TW), TH, TW, D]`` of
the 5-D view ``[B, T, H, W, heads*D]`` (strides ``(sB, H*W*sS, W*sS, sS, 1)``). In shared
memory the box is reshaped (a memdesc view, no copy) to a ``[BLOCK, D]`` matrix with the
same 128-byte NVMMA swizzle: the TMA writes the box as two 64-column halves (hardware
boxes ``[1, slices, TH, TW, 64]``, the second 16 KiB after the first), each 128 rows of
128 bytes in ``(t, h, w)`` order, swizzled by shared address; that is the layout of a 2-D
``[128, 128]`` NVMMA tile (the wgmma descriptors and the output store use the same
halves).

Program ``(pid, b*n + i)``: query block ``pid`` (tile ``pid // BLOCKS_PER_TILE``, slice
group ``pid % BLOCKS_PER_TILE``) of head row ``i`` of batch ``b``.

Warp roles (``gl.warp_specialize``):

- producer: one worker warp. Issues the TMA copies: q once, then for every key block j
  of the window its K and V boxes into ring slot ``j % STAGES``.
- consumers: the default partition, 8 warps = two warpgroups. The 128 query rows are
  split between them by the wgmma layout (``warps_per_cta=[8, 1]``: warpgroup 0 rows
  0-63, warpgroup 1 rows 64-127); both read the same K/V slot. Each warpgroup runs
  FA3's intra-warpgroup overlap, with the loop rotated so that the wait retiring PV
  sits at the top of the next trip::

      S_0 = Q K_0^T; P_0 = exp2 part of S_0; release K slot 0
      for j in 1..n-1:
          wait for all wgmma (retires PV_{j-2}); release V slot of j-2; O *= alpha_{j-1}
          issue S_j = Q K_j^T            (async)
          issue O += P_{j-1} V_{j-1}     (async, P from registers)
          wait until 1 group is outstanding          -> S_j done, PV still running
          release K slot of j
          softmax of S_j (max, exp2, row sums)       <- overlaps the PV product
      retire PV_{n-2}; O *= alpha; O += P_{n-1} V_{n-1}; O /= l; TMA store via q's buffer

  (With the PV wait after the exponentials in the same trip, ptxas hoists it up to the
  S wait and nothing overlaps; the compile check shows the difference.)

Barrier protocol (mbarriers; count 1 each: a consumer ``arrive`` is lowered by Gluon to a
barrier over the 8 consumer warps followed by one elected thread's arrive, so one
arrival covers both warpgroups):

- ``q_bar``: producer ``expect``s the q bytes; the TMA completes it. Consumers wait
  parity 0 once.
- ``k_ready[s]`` / ``v_ready[s]``: for fill ``u = j // STAGES`` of slot ``s`` the producer
  ``expect``s one box and issues the copy; consumers wait parity ``u & 1``. K and V
  have separate barriers so QK^T starts before V has landed.
- ``k_empty[s]`` / ``v_empty[s]``: consumers arrive when the wgmma reading the slot is
  retired (K after the S wait of the same trip, V at the top of the trip after next).
  The producer, before fill ``u`` of slot ``s``, waits parity ``(u & 1) ^ 1``: fill 0
  passes at once on a fresh barrier (the phase "before" phase 0 counts as complete),
  fill ``u >= 1`` waits for the consumers' release of fill ``u - 1``.

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

LOG2E = 1.4426950408889634
HEAD_DIM = 128
BLOCK = 128
DEFAULT_CONFIG = dict(STAGES=2, num_warps=8, PRODUCER_REGS=24)


@gluon.jit
def _block_origin(j, st, sh, sw, kh, kw, TT: gl.constexpr, TH: gl.constexpr, TW: gl.constexpr,
                  SLICES: gl.constexpr):
    """Canvas coordinates ``(t, h, w)`` of key block ``j`` of a window (t-slice group of
    a key tile; tiles walked t, then h, then w)."""
    KB_PER_TILE: gl.constexpr = TT // SLICES
    i = j // KB_PER_TILE
    sub = j % KB_PER_TILE
    wt = st + i // (kh * kw)
    wh = sh + (i // kw) % kh
    ww = sw + i % kw
    return wt * TT + sub * SLICES, wh * TH, ww * TW


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
              b, q_col, kv_col, q_t, q_h, q_w, st, sh, sw, kh, kw, n_steps,
              TT: gl.constexpr, TH: gl.constexpr, TW: gl.constexpr, SLICES: gl.constexpr,
              STAGES: gl.constexpr):
    """One warp: TMA copies of q, then K and V of every key block into the ring. K and V
    slots are refilled independently (K is released earlier than V)."""
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [b, q_t, q_h, q_w, q_col], q_bar, q_smem)
    for j in range(n_steps):
        s = j % STAGES
        empty_phase = ((j // STAGES) & 1) ^ 1
        t0, h0, w0 = _block_origin(j, st, sh, sw, kh, kw, TT, TH, TW, SLICES)
        mbarrier.wait(k_empty.index(s), empty_phase)
        mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [b, t0, h0, w0, kv_col], k_ready.index(s), k_smem.index(s))
        mbarrier.wait(v_empty.index(s), empty_phase)
        mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [b, t0, h0, w0, kv_col], v_ready.index(s), v_smem.index(s))


@gluon.jit
def _consumer(o_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, LSE,
              b, q_col, q_t, q_h, q_w, h, n_steps, qk_scale, slb, slh, canvas_h, canvas_w,
              TH: gl.constexpr, TW: gl.constexpr, SLICES: gl.constexpr, STAGES: gl.constexpr,
              STORE_LSE: gl.constexpr, num_warps: gl.constexpr):
    """Two warpgroups (8 warps): QK^T, online softmax and PV for 128 query rows.

    Loop trip j (1 <= j < n): retire PV_{j-2}, release V slot of j-2, rescale O by
    alpha_{j-1}, convert P_{j-1} to a register operand; issue S_j = Q K_j^T and
    O += P_{j-1} V_{j-1}; wait for S_j only (one group left in flight), release the K slot
    of j, and run softmax_j while PV_{j-1} runs. The wait that retires PV_{j-1} is at the
    top of the next trip, so the compiler cannot hoist it above softmax_j (ptxas moves a
    `wgmma.wait_group 0` placed after the exponentials up to the `wait_group 1`)."""
    dtype: gl.constexpr = q_smem.dtype
    BM: gl.constexpr = SLICES * TH * TW
    D: gl.constexpr = q_smem.shape[4]
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    row: gl.constexpr = gl.SliceLayout(1, mma)

    q2 = q_smem.reshape([BM, D])
    zero = gl.zeros([BM, BM], gl.float32, mma)

    mbarrier.wait(q_bar, 0)
    # Block 0: scores and their exponentials.
    mbarrier.wait(k_ready.index(0), 0)
    s_tok = warpgroup_mma(q2, k_smem.index(0).reshape([BM, D]).permute((1, 0)), zero, use_acc=False,
                          is_async=True)
    s = warpgroup_mma_wait(0, deps=(s_tok, ))
    mbarrier.arrive(k_empty.index(0))
    m_i = gl.max(s, 1) * qk_scale
    p = gl.exp2(s * qk_scale - m_i[:, None])
    l_i = gl.sum(p, 1)
    alpha = gl.full([BM], 1.0, gl.float32, row)
    o_tok = warpgroup_mma_init(gl.zeros([BM, D], gl.float32, mma))

    for j in range(1, n_steps):
        sj = j % STAGES
        sp = (j - 1) % STAGES
        # PV_{j-2} is done: its V slot goes back, O takes alpha_{j-1}.
        acc = warpgroup_mma_wait(0, deps=(o_tok, ))
        mbarrier.arrive(v_empty.index((j + STAGES - 2) % STAGES), pred=j >= 2)
        acc = acc * alpha[:, None]
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        # S_j = Q K_j^T, then O += P_{j-1} V_{j-1}; both in flight.
        mbarrier.wait(k_ready.index(sj), (j // STAGES) & 1)
        s_tok = warpgroup_mma(q2, k_smem.index(sj).reshape([BM, D]).permute((1, 0)), zero, use_acc=False,
                              is_async=True)
        mbarrier.wait(v_ready.index(sp), ((j - 1) // STAGES) & 1)
        o_tok = warpgroup_mma(p_op, v_smem.index(sp).reshape([BM, D]), acc, is_async=True)
        # S_j done (PV_{j-1} may still run): the softmax below overlaps it.
        s = warpgroup_mma_wait(1, deps=(s_tok, ))
        mbarrier.arrive(k_empty.index(sj))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new

    last = n_steps - 1
    acc = warpgroup_mma_wait(0, deps=(o_tok, ))
    acc = acc * alpha[:, None]
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
    o_tok = warpgroup_mma(p_op, v_smem.index(last % STAGES).reshape([BM, D]), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(o_tok, ))
    # Every wgmma that read q is done: the q buffer takes the output tile.
    out = acc / l_i[:, None]
    q2.store(out.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [b, q_t, q_h, q_w, q_col], q_smem)

    if STORE_LSE:
        r = gl.arange(0, BM, layout=row)
        rows = ((q_t + r // (TH * TW)) * canvas_h + q_h + (r // TW) % TH) * canvas_w + q_w + r % TW
        lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
        gl.store(LSE + b.to(gl.int64) * slb + h.to(gl.int64) * slh + rows, lse)
    tma.store_wait(0)


@gluon.jit
def _sta_fwd_gluon_kernel(q_desc, k_desc, v_desc, o_desc, HEADS, LSE, n_heads, grid_t, grid_h, grid_w,
                          canvas_h, canvas_w, slb, slh, qk_scale,
                          TT: gl.constexpr, TH: gl.constexpr, TW: gl.constexpr, STAGES: gl.constexpr,
                          STORE_LSE: gl.constexpr, PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr):
    SLICES: gl.constexpr = q_desc.block_type.shape[1]
    D: gl.constexpr = q_desc.block_type.shape[4]
    BLOCKS_PER_TILE: gl.constexpr = TT // SLICES
    KB_PER_TILE: gl.constexpr = TT // SLICES

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
    ct = qi // (grid_h * grid_w)
    ch = (qi // grid_w) % grid_h
    cw = qi % grid_w
    q_t = ct * TT + sub * SLICES
    q_h = ch * TH
    q_w = cw * TW
    # Window start per axis: clamp(c - (k - 1) // 2, 0, n - k), k already <= n.
    st = gl.minimum(gl.maximum(ct - (kt - 1) // 2, 0), grid_t - kt)
    sh = gl.minimum(gl.maximum(ch - (kh - 1) // 2, 0), grid_h - kh)
    sw = gl.minimum(gl.maximum(cw - (kw - 1) // 2, 0), grid_w - kw)
    n_steps = kt * kh * kw * KB_PER_TILE
    q_col = h * D
    kv_col = kvh * D

    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(s), count=1)
        mbarrier.init(v_ready.index(s), count=1)
        mbarrier.init(k_empty.index(s), count=1)
        mbarrier.init(v_empty.index(s), count=1)
    fence_async_shared()

    gl.warp_specialize(
        [
            (_consumer, (o_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, LSE,
                         b, q_col, q_t, q_h, q_w, h, n_steps, qk_scale, slb, slh, canvas_h, canvas_w,
                         TH, TW, SLICES, STAGES, STORE_LSE, num_warps)),
            (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
                         b, q_col, kv_col, q_t, q_h, q_w, st, sh, sw, kh, kw, n_steps,
                         TT, TH, TW, SLICES, STAGES)),
        ],
        [1],
        [PRODUCER_REGS],
    )

    mbarrier.invalidate(q_bar)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(k_ready.index(s))
        mbarrier.invalidate(v_ready.index(s))
        mbarrier.invalidate(k_empty.index(s))
        mbarrier.invalidate(v_empty.index(s))


def box_layout(dtype: torch.dtype, rank: int = 5):
    """The NVMMA shared layout of a ``[1, slices, TH, TW, 128]`` box: 128-byte swizzle."""
    bits = torch.finfo(dtype).bits
    return gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=bits, rank=rank)


def supported(q, k, v, canvas, tile) -> bool:
    """Whether this kernel covers the call (the router falls back otherwise)."""
    T, H, W = canvas
    tt, th, tw = tile
    plane = th * tw
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype and v.dtype == q.dtype
            and q.shape[3] == HEAD_DIM and T % tt == 0 and H % th == 0 and W % tw == 0
            and BLOCK % plane == 0 and tt % (BLOCK // plane) == 0
            and min(x.shape[1] for x in (q, k, v)) >= T * H * W
            and all(x.stride(3) == 1 and x.stride(2) == HEAD_DIM and x.stride(1) % 8 == 0 and x.stride(0) % 8 == 0
                    for x in (q, k, v)))


def _five_d(x: torch.Tensor, canvas, tile):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    T, H, W = canvas
    B, _, heads, D = x.shape
    sS = x.stride(1)
    block = [1, BLOCK // (tile[1] * tile[2]), tile[1], tile[2], D]
    return TensorDescriptor(x, [B, T, H, W, heads * D], [x.stride(0), H * W * sS, W * sS, sS, 1], block,
                            box_layout(x.dtype))


def sta_fwd_gluon(q, k, v, heads, out, *, canvas, tile, scale, config=None, lse=None):
    """Fill the video rows of ``out [B, S, Hq, D]`` (``q``'s dtype) with sliding tile
    attention for the ``n`` head rows of ``heads [n, 5]`` (int32, on q's device). ``q``,
    ``k``, ``v`` are ``[B, S, H, D]`` with the canvas in natural order first (text rows
    after it are ignored). ``lse``, if given, ``[B, Hq, S]`` float32 (last dim contiguous),
    gets the natural-log LSE of the video rows. ``config`` overrides ``STAGES``,
    ``num_warps`` (8: two consumer warpgroups) and ``PRODUCER_REGS``."""
    if not supported(q, k, v, canvas, tile):
        raise ValueError("sta_fwd_gluon: unsupported shapes/layout (whole tiles, natural order, D=128, bf16/fp16)")
    if out.shape != q.shape or out.dtype != q.dtype or out.stride() != q.stride():
        raise ValueError("sta_fwd_gluon: out must match q's shape, dtype and strides")
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    T, H, W = canvas
    grid_shape = (T // tile[0], H // tile[1], W // tile[2])
    blocks_per_tile = tile[0] // (BLOCK // (tile[1] * tile[2]))
    B = q.shape[0]
    n = heads.shape[0]
    q_desc, k_desc, v_desc, o_desc = (_five_d(x, canvas, tile) for x in (q, k, v, out))
    store_lse = lse is not None
    lse_arg = lse if store_lse else heads
    grid = (math.prod(grid_shape) * blocks_per_tile, B * n)
    if grid[0] and grid[1]:
        _sta_fwd_gluon_kernel[grid](
            q_desc, k_desc, v_desc, o_desc, heads, lse_arg, n, *grid_shape, H, W,
            lse.stride(0) if store_lse else 0, lse.stride(1) if store_lse else 0, scale * LOG2E,
            TT=tile[0], TH=tile[1], TW=tile[2], STAGES=cfg["STAGES"], STORE_LSE=store_lse,
            PRODUCER_REGS=cfg["PRODUCER_REGS"], num_warps=cfg["num_warps"],
        )
    return out
