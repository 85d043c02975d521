// Sliding tile attention backward for Hopper (sm_90a), hand-written CUDA beside the forward
// (sta_fwd_cuda.cu): the route's Hopper backward (sta_dist/route.py; what it takes:
// kernels/rules.py). Semantics as kernels/sta_bwd.py (the portable Triton backward, whose
// module docstring describes the tables), packed order only: whole tiles of consecutive rows.
//
// Two kernels of one shape, no atomics:
// - dq: a program holds 128 query rows (Q and dO) and streams the key blocks their windows
//   (or lists) reach, then the text keys: S = Q K^T, dP = dO V^T, dS = P (dP - delta),
//   dQ += dS K.
// - dk/dv: a program holds 128 key rows (K and V) and streams the query blocks whose windows
//   hold them (the window's transpose per axis, as sta_bwd.py's _query_span; with tables the
//   lists turned round), for every query head of its kv head's group, then the text queries:
//   S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q.
// The rows' probabilities come from the final log-sum-exp (p = 2^(s*scale - lse2)); lse2
// and delta come per query row from the caller (sta_bwd_cuda.py), +inf in lse2 where a row
// counts nothing, so such a row's p is 0 wherever it is streamed.
//
// Program: 384 threads in three warpgroups. Warpgroup 0 (setmaxnreg 40) loads: one thread
// issues the bulk tensor copies (TMA) of the resident pair, then of every streamed block
// (64 rows of both operands, and for dk/dv the block's lse2 and delta by plain bulk copy)
// into a two-slot ring guarded by mbarriers, with a meta word per slot: how many of the
// block's columns count and how many of the resident rows (a text key block's partial
// counts), or END. Warpgroups 1 and 2 (setmaxnreg 232) each own 64 resident rows; a trip
// issues both score products as asynchronous wgmma, takes p once S is in, dS once dP is in,
// then the accumulating products with P and dS from registers (A operand) against the
// streamed block read transposed (B operand, its 64-column halves LBO apart).
//
// Shared memory: the resident operands as two 64-row halves each of two 64-column halves
// (8 KB), the streamed blocks as two 64-column halves (8 KB) of 64 rows, all with the
// 128-byte swizzle (the forward's layout), so one tile of rows is read both ways.
#include <cuda.h>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "hopper/ptx.cuh"
#include "hopper/tensor_maps.cuh"
#include "sta_bwd_cuda_args.h"

namespace {

constexpr int THREADS = 384;
constexpr int ST = 2;                   // ring slots
constexpr int XB = 2 * 16384;           // a resident operand: 128 rows of 256 bytes
constexpr int YB = 16384;               // a streamed operand block: 64 rows of 256 bytes
constexpr int STATB = 512;              // a streamed query block's lse2 and delta (64 floats each)
constexpr int SMEM_BYTES = 2 * XB + ST * (2 * YB + STATB) + 1024 /*barriers, meta*/ + 1024 /*alignment*/;
constexpr uint32_t DESC_HI = 0x40000040u;  // descriptor high word: 128-byte swizzle, SBO 1024 B
constexpr uint32_t END = 0xFFFFFFFFu;      // a slot's meta word: the program's blocks are done

struct Params {
  CUtensorMap q, k, v, dout;  // 3-D rows [B, S, heads*128], box [1, 64, 64]
  uint16_t *dq, *dk, *dv;
  const float *lse2, *delta;
  long long s_pad, sdq_b, sdq_s, sdk_b, sdk_s, sel_kb, sel_kh, sel_kq, sel_cb, sel_ch, t_kb, t_kh, t_kk, t_cb, t_ch;
  const int *heads, *q_tiles, *q_slot, *kv_tiles, *kv_list, *groups, *sel_keys, *sel_counts, *t_keys, *t_counts;
  int B, n_heads, n_q_tiles, n_kv, g_stride, q_heads, kv_heads, grid_t, grid_h, grid_w, vol;
  int q_video, q_text_valid, kv_video, kv_for_video, kv_for_text, text_q_video_keys;
  int n_text_progs, n_video_progs;  // per (sample, head): text programs first (the long ones), then video
  int clip_lo[3], clip_hi[3];
  float scale, sm_scale;
};

// The block schedule (which rows each program holds and streams) is host and device code:
// the kernels run it, and sta_bwd_cuda_schedule (below) runs it on the CPU for the tests.
#define HD __host__ __device__ __forceinline__

template <class T>
HD T ldg(const T* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}
HD int clamp_rows(int x) { return min(max(x, 0), 128); }

// --- loading -------------------------------------------------------------------------------
// The ring's one writer: fill f of slot f % ST waits for the consumers' release of fill
// f - ST (eight warp arrivals), writes the meta word, then copies the block.
struct Ring {
  uint32_t y1, y2, stats, meta, full, empty;  // slot 0's shared addresses
  const CUtensorMap *m1, *m2;
  const float *lse2, *delta;  // dk/dv: the streamed query rows' statistics; dq: nullptr
  long long s_pad;
  int b, q_heads, f;

  DEV void claim(int s) {
    if (f >= ST) mbar_sleep(empty + 8 * s, (f / ST - 1) & 1);
  }
  // Rows [row, row + 64) of head ``head`` of both streamed tensors; ``cols`` of them count,
  // and ``rows`` of the resident block.
  DEV void emit(int row, int head, int cols, int rows) {
    const int s = f % ST;
    claim(s);
    st_shared(meta + 8 * s, static_cast<uint32_t>(cols) | (static_cast<uint32_t>(rows) << 16));
    const uint32_t bar = full + 8 * s;
    mbar_expect_tx(bar, 2 * YB + (lse2 ? STATB : 0));
    for (int h = 0; h < 2; ++h) {
      tma_load3(y1 + s * YB + h * 8192, m1, bar, head * 128 + h * 64, row, b);
      tma_load3(y2 + s * YB + h * 8192, m2, bar, head * 128 + h * 64, row, b);
    }
    if (lse2) {
      const long long o = (static_cast<long long>(b) * q_heads + head) * s_pad + row;
      bulk_load(stats + s * STATB, lse2 + o, bar, 256);
      bulk_load(stats + s * STATB + 256, delta + o, bar, 256);
    }
    ++f;
  }
  DEV void finish() {
    const int s = f % ST;
    claim(s);
    st_shared(meta + 8 * s, END);
    mbar_arrive(full + 8 * s);
    ++f;
  }
};

// ``count`` consecutive rows from ``row`` in blocks of 64 (the last one partial).
template <class Sink>
HD void emit_range(Sink& sink, int row, int count, int head, int rows) {
  for (int r = 0; r < count; r += 64) sink.emit(row + r, head, min(64, count - r), rows);
}

// ``[lo, hi)`` of the query tiles on one axis whose window (k tiles of n) holds key tile c.
HD void query_span(int c, int k, int n, int& lo, int& hi) {
  const int a = (k - 1) / 2;
  lo = c < k ? 0 : c - k + 1 + a;
  hi = c >= n - k ? n : c + a + 1;
}

// dq program: the key blocks of query tile ``qi``'s window (cut to the clip box) or list,
// then the text keys the video queries attend; a text query block: every video key below
// text_q_video_keys, then the text keys for text queries.
template <class Sink>
HD void load_dq(const Params& p, Sink& ring, bool text, int qi, int b, int row) {
  const int kvh = p.heads[row * 5 + 3], qh = p.heads[row * 5 + 4];
  if (text) {
    emit_range(ring, 0, p.text_q_video_keys, kvh, 128);
    emit_range(ring, p.kv_video, p.kv_for_text, kvh, 128);
    return;
  }
  const int gid = ldg(p.q_tiles + qi * 4);
  const int blocks = p.vol / 64;
  if (p.sel_keys) {
    const int* list = p.sel_keys + b * p.sel_kb + qh * p.sel_kh + qi * p.sel_kq;
    const int n = ldg(p.sel_counts + b * p.sel_cb + qh * p.sel_ch + qi);
    for (int e = 0; e < n; ++e) {
      const int first = ldg(p.kv_tiles + ldg(list + e) * 3);
      for (int s = 0; s < blocks; ++s) ring.emit(first + 64 * s, kvh, 64, 128);
    }
  } else {
    const int kt = p.heads[row * 5 + 0], kh = p.heads[row * 5 + 1], kw = p.heads[row * 5 + 2];
    const int hw = p.grid_h * p.grid_w, ct = gid / hw, ch = (gid / p.grid_w) % p.grid_h, cw = gid % p.grid_w;
    const int st0 = min(max(ct - (kt - 1) / 2, 0), p.grid_t - kt);
    const int sh0 = min(max(ch - (kh - 1) / 2, 0), p.grid_h - kh);
    const int sw0 = min(max(cw - (kw - 1) / 2, 0), p.grid_w - kw);
    const int st = max(st0, p.clip_lo[0]), sh = max(sh0, p.clip_lo[1]), sw = max(sw0, p.clip_lo[2]);
    const int et = min(st0 + kt, p.clip_hi[0]), eh = min(sh0 + kh, p.clip_hi[1]), ew = min(sw0 + kw, p.clip_hi[2]);
    for (int t = st; t < et; ++t)
      for (int h = sh; h < eh; ++h)
        for (int w = sw; w < ew; ++w) {
          const int first = ldg(p.kv_tiles + ((t * p.grid_h + h) * p.grid_w + w) * 3);
          for (int s = 0; s < blocks; ++s) ring.emit(first + 64 * s, kvh, 64, 128);
        }
  }
  emit_range(ring, p.kv_video, p.kv_for_video, kvh, 128);
}

// dk/dv program of kv head ``kvh``: per query head of its group, the query blocks whose
// windows (or lists) hold key tile ``kid`` (every video query for a text key block), then
// the text queries; ``rows_video``, ``rows_text``: the resident rows each kind of query
// attends.
template <class Sink>
HD void load_dkdv(const Params& p, Sink& ring, bool text, int kid, int b, int kvh, int rows_video, int rows_text) {
  const int blocks = p.vol / 64;
  const int hw = p.grid_h * p.grid_w, ct = kid / hw, ch = (kid / p.grid_w) % p.grid_h, cw = kid % p.grid_w;
  const bool in_clip = ct >= p.clip_lo[0] && ct < p.clip_hi[0] && ch >= p.clip_lo[1] && ch < p.clip_hi[1] &&
                       cw >= p.clip_lo[2] && cw < p.clip_hi[2];
  const int members = ldg(p.groups + kvh * p.g_stride);
  for (int g = 0; g < members; ++g) {
    const int row = ldg(p.groups + kvh * p.g_stride + 1 + g);
    const int h = p.heads[row * 5 + 4];
    auto tile = [&](int qi) {
      const int first = ldg(p.q_tiles + qi * 4 + 1);
      for (int s = 0; s < blocks; ++s) ring.emit(first + 64 * s, h, 64, rows_video);
    };
    if (rows_video > 0) {
      if (text) {
        for (int qi = 0; qi < p.n_q_tiles; ++qi) tile(qi);
      } else if (p.t_keys) {
        const int* list = p.t_keys + b * p.t_kb + h * p.t_kh + kid * p.t_kk;
        const int n = ldg(p.t_counts + b * p.t_cb + h * p.t_ch + kid);
        for (int e = 0; e < n; ++e) tile(ldg(list + e));
      } else if (in_clip) {
        int lt, ht, lh, hh, lw, hw2;
        query_span(ct, p.heads[row * 5 + 0], p.grid_t, lt, ht);
        query_span(ch, p.heads[row * 5 + 1], p.grid_h, lh, hh);
        query_span(cw, p.heads[row * 5 + 2], p.grid_w, lw, hw2);
        for (int t = lt; t < ht; ++t)
          for (int hh2 = lh; hh2 < hh; ++hh2)
            for (int w = lw; w < hw2; ++w) {
              const int qi = ldg(p.q_slot + (t * p.grid_h + hh2) * p.grid_w + w);
              if (qi >= 0) tile(qi);  // a tile of the call's queries (a rank's halo tiles are not)
            }
      }
    }
    if (rows_text > 0) emit_range(ring, p.q_video, p.q_text_valid, h, rows_text);
  }
}

// One program's resident block: the sample, its head (dq: a head row of ``heads``; dk/dv: a
// kv head), its first row and head in the resident tensors, how many of its rows are
// real (stored), and for dk/dv how many of them the video and the text queries attend.
struct Program {
  bool text;
  int b, hh, tile_id, x_row, x_head, valid, rows_video, rows_text;
};

// Program ``pid``: text programs first (the long ones), then video, per (sample, head).
template <bool DKDV>
HD Program program(const Params& p, long long pid) {
  Program pr{};
  const int per_head = DKDV ? p.kv_heads : p.n_heads;
  const long long n_text_all = static_cast<long long>(p.B) * per_head * p.n_text_progs;
  pr.text = pid < n_text_all;
  const long long bh = pr.text ? pid / p.n_text_progs : (pid - n_text_all) / p.n_video_progs;
  const int prog = static_cast<int>(pr.text ? pid % p.n_text_progs : (pid - n_text_all) % p.n_video_progs);
  pr.b = static_cast<int>(bh / per_head), pr.hh = static_cast<int>(bh % per_head);
  const int bpt = p.vol / 128;
  pr.rows_video = 128, pr.valid = 128;
  if constexpr (DKDV) {
    pr.x_head = pr.hh;
    if (pr.text) {
      pr.x_row = p.kv_video + 128 * prog;
      pr.rows_video = clamp_rows(p.kv_for_video - 128 * prog);
      pr.rows_text = clamp_rows(p.kv_for_text - 128 * prog);
      pr.valid = max(pr.rows_video, pr.rows_text);
    } else {
      const int ki = prog / bpt;
      pr.tile_id = ldg(p.kv_list + ki * 4);
      pr.x_row = ldg(p.kv_list + ki * 4 + 1) + 128 * (prog % bpt);
      pr.rows_text = p.q_text_valid > 0 ? clamp_rows(p.text_q_video_keys - pr.x_row) : 0;
    }
  } else {
    pr.x_head = p.heads[pr.hh * 5 + 4];
    if (pr.text) {
      pr.x_row = p.q_video + 128 * prog;
      pr.valid = min(128, p.q_video + p.q_text_valid - pr.x_row);
    } else {
      pr.tile_id = prog / bpt;  // the query tile's index in q_tiles
      pr.x_row = ldg(p.q_tiles + pr.tile_id * 4 + 1) + 128 * (prog % bpt);
    }
  }
  return pr;
}

// The streamed blocks of program ``pr``, in order, into ``sink`` (the ring, or a recorder).
template <bool DKDV, class Sink>
HD void schedule(const Params& p, const Program& pr, Sink& sink) {
  if constexpr (DKDV)
    load_dkdv(p, sink, pr.text, pr.tile_id, pr.b, pr.hh, pr.rows_video, pr.rows_text);
  else
    load_dq(p, sink, pr.text, pr.tile_id, pr.b, pr.hh);
}

// --- computing -----------------------------------------------------------------------------
DEV uint64_t desc(uint32_t addr, uint32_t lbo = 0) {
  return (static_cast<uint64_t>(DESC_HI) << 32) | ((addr & 0x3FFFF) >> 4) | ((lbo >> 4) << 16);
}
// d (64 x 64) = A (64 resident rows x 128) B^T (64 streamed rows x 128), both K-major.
template <bool F16>
DEV void score(float (&d)[32], uint64_t a, uint64_t b) {
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    const int off = ((kk >> 2) * 8192 + (kk & 3) * 32) / 16;
    wgmma_ss<F16>(d, a + off, b + off, kk > 0);
  }
}
// d (64 x 128) += A (64 x 64, registers) B (64 streamed rows x 128, read transposed).
template <bool F16>
DEV void accumulate(float (&d)[64], const uint32_t (&a)[16], uint64_t bt) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) wgmma_rs<F16>(d, a, kk, bt + kk * (2048 / 16));
}

DEV void release(uint32_t bar) {
  __syncwarp();
  if ((threadIdx.x & 31) == 0) mbar_arrive(bar);
}

// One accumulator's rows (the thread's two, of the warpgroup's 64) times ``scale`` into
// ``dst`` (bf16/fp16, rows ``row_stride`` apart); rows from ``valid`` on are not written.
template <bool F16>
DEV void store_rows(const float (&acc)[64], uint16_t* dst, long long row_stride, int rr, int valid, float scale) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rr + 8 * r >= valid) continue;
    uint16_t* out = dst + (rr + 8 * r) * row_stride + 2 * (lane % 4);
#pragma unroll
    for (int jj = 0; jj < 16; ++jj) {
      const int i = 4 * jj + 2 * r;
      *reinterpret_cast<uint32_t*>(out + 8 * jj) = pack2<F16>(acc[i] * scale, acc[i + 1] * scale);
    }
  }
}

struct Slots {
  uint32_t x1, x2, y1, y2, stats, meta, x_full, full, empty;
};

// One consumer warpgroup (C: its 64 of the 128 resident rows). DKDV: dk/dv, else dq.
// ``row_lse2``, ``row_delta`` (dq): the statistics of the thread's two rows.
template <int C, bool DKDV, bool F16>
DEV void consume(const Params& p, const Slots& sl, float (&acc1)[64], float (&acc2)[64], const float (&row_lse2)[2],
                 const float (&row_delta)[2]) {
  const int lane = threadIdx.x & 31, warp = (threadIdx.x / 32) & 3;
  const int rr = 64 * C + 16 * warp + lane / 4, q2 = 2 * (lane & 3);
  const uint64_t x1d = desc(sl.x1 + C * 16384), x2d = desc(sl.x2 + C * 16384);
#pragma unroll
  for (int i = 0; i < 64; ++i) acc1[i] = 0.f, acc2[i] = 0.f;
  mbar_wait(sl.x_full, 0);
  for (int f = 0;; ++f) {
    const int s = f % ST;
    mbar_wait(sl.full + 8 * s, (f / ST) & 1);
    const uint32_t meta = ld_shared(sl.meta + 8 * s);
    if (meta == END) break;
    const int cols = meta & 0xFFFF, rows = meta >> 16;
    float S[32], dP[32];
    const uint32_t y1 = sl.y1 + s * YB, y2 = sl.y2 + s * YB;
    wg_fence();
    score<F16>(S, x1d, desc(y1));
    wg_commit();
    score<F16>(dP, x2d, desc(y2));
    wg_commit();
    wg_wait<1>();
    fence_f(S);
    const uint32_t stats = sl.stats + s * STATB;
#pragma unroll
    for (int i = 0; i < 32; i += 2) {
      const int col = 8 * (i >> 2) + q2, r = (i >> 1) & 1;
      float l0 = row_lse2[r], l1 = row_lse2[r];
      if constexpr (DKDV) {
        l0 = __uint_as_float(ld_shared(stats + 4 * col));
        l1 = __uint_as_float(ld_shared(stats + 4 * col + 4));
      }
      float p0 = ex2(fmaf(S[i], p.scale, -l0)), p1 = ex2(fmaf(S[i + 1], p.scale, -l1));
      if (col >= cols) p0 = 0.f;
      if (col + 1 >= cols) p1 = 0.f;
      if (DKDV && rr + 8 * r >= rows) p0 = p1 = 0.f;
      S[i] = p0, S[i + 1] = p1;
    }
    wg_wait<0>();
    fence_f(dP);
    uint32_t Pp[16], Dp[16];
#pragma unroll
    for (int i = 0; i < 32; i += 2) {
      const int col = 8 * (i >> 2) + q2, r = (i >> 1) & 1;
      float d0 = row_delta[r], d1 = row_delta[r];
      if constexpr (DKDV) {
        d0 = __uint_as_float(ld_shared(stats + 256 + 4 * col));
        d1 = __uint_as_float(ld_shared(stats + 256 + 4 * col + 4));
      }
      Dp[i / 2] = pack2<F16>(S[i] * (dP[i] - d0), S[i + 1] * (dP[i + 1] - d1));
      if constexpr (DKDV) Pp[i / 2] = pack2<F16>(S[i], S[i + 1]);
    }
    fence_r(Dp);
    if constexpr (DKDV) fence_r(Pp);
    fence_f(acc1);
    if constexpr (DKDV) fence_f(acc2);
    wg_fence();
    if constexpr (DKDV) accumulate<F16>(acc2, Pp, desc(y2, 8192));  // dV += P^T dO
    accumulate<F16>(acc1, Dp, desc(y1, 8192));                       // dK += dS^T Q, or dQ += dS K
    wg_commit();
    wg_wait<0>();
    fence_f(acc1);
    if constexpr (DKDV) fence_f(acc2);
    release(sl.empty + 8 * s);
  }
}

template <bool DKDV, bool F16>
__global__ void __launch_bounds__(THREADS, 1) sta_bwd_kernel(const __grid_constant__ Params p) {
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  Slots sl;
  sl.x1 = smem_u32(smem);
  sl.x2 = sl.x1 + XB;
  sl.y1 = sl.x2 + XB;
  sl.y2 = sl.y1 + ST * YB;
  sl.stats = sl.y2 + ST * YB;
  sl.x_full = sl.stats + ST * STATB;
  sl.full = sl.x_full + 8;
  sl.empty = sl.full + 8 * ST;
  sl.meta = sl.empty + 8 * ST;

  const Program pr = program<DKDV>(p, blockIdx.x);

  if (threadIdx.x == 0) {
    mbar_init(sl.x_full, 1);
    for (int s = 0; s < ST; ++s) mbar_init(sl.full + 8 * s, 1), mbar_init(sl.empty + 8 * s, 8);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  const int wg = threadIdx.x / 128;
  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (threadIdx.x != 0) return;
    const CUtensorMap *x1 = DKDV ? &p.k : &p.q, *x2 = DKDV ? &p.v : &p.dout;
    mbar_expect_tx(sl.x_full, 2 * XB);
    for (int c = 0; c < 2; ++c)
      for (int h = 0; h < 2; ++h) {
        tma_load3(sl.x1 + c * 16384 + h * 8192, x1, sl.x_full, pr.x_head * 128 + h * 64, pr.x_row + 64 * c, pr.b);
        tma_load3(sl.x2 + c * 16384 + h * 8192, x2, sl.x_full, pr.x_head * 128 + h * 64, pr.x_row + 64 * c, pr.b);
      }
    Ring ring{sl.y1, sl.y2, sl.stats, sl.meta, sl.full, sl.empty, DKDV ? &p.q : &p.k, DKDV ? &p.dout : &p.v,
              DKDV ? p.lse2 : nullptr, p.delta, p.s_pad, pr.b, p.q_heads, 0};
    schedule<DKDV>(p, pr, ring);
    ring.finish();
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  float acc1[64], acc2[64], row_lse2[2] = {0.f, 0.f}, row_delta[2] = {0.f, 0.f};
  const int lane = threadIdx.x & 31, warp = (threadIdx.x / 32) & 3, c = wg - 1;
  const int rr = 64 * c + 16 * warp + lane / 4;
  if constexpr (!DKDV) {
    for (int r = 0; r < 2; ++r) {
      const long long o = (static_cast<long long>(pr.b) * p.q_heads + pr.x_head) * p.s_pad + pr.x_row + rr + 8 * r;
      row_lse2[r] = p.lse2[o];
      row_delta[r] = p.delta[o];
    }
  }
  if (c == 0)
    consume<0, DKDV, F16>(p, sl, acc1, acc2, row_lse2, row_delta);
  else
    consume<1, DKDV, F16>(p, sl, acc1, acc2, row_lse2, row_delta);
  if constexpr (DKDV) {
    const long long base = pr.b * p.sdk_b + static_cast<long long>(pr.x_row) * p.sdk_s + pr.x_head * 128;
    store_rows<F16>(acc1, p.dk + base, p.sdk_s, rr, pr.valid, p.sm_scale);
    store_rows<F16>(acc2, p.dv + base, p.sdk_s, rr, pr.valid, 1.f);
  } else {
    const long long base = pr.b * p.sdq_b + static_cast<long long>(pr.x_row) * p.sdq_s + pr.x_head * 128;
    store_rows<F16>(acc1, p.dq + base, p.sdq_s, rr, pr.valid, p.sm_scale);
  }
}

}  // namespace

extern "C" int sta_bwd_cuda_args_size(void) { return static_cast<int>(sizeof(StaBwdArgs)); }

// --- host entry ----------------------------------------------------------------------------
namespace {

// Params from the caller's arguments, all but the tensor maps; the program counts of the
// dq (DKDV false) or the dk/dv kernel.
void fill(Params& p, const StaBwdArgs& in, bool dkdv) {
  p.dq = static_cast<uint16_t*>(in.dq), p.dk = static_cast<uint16_t*>(in.dk), p.dv = static_cast<uint16_t*>(in.dv);
  p.lse2 = in.lse2, p.delta = in.delta, p.s_pad = in.s_pad;
  p.sdq_b = in.sdq_b, p.sdq_s = in.sdq_s, p.sdk_b = in.sdk_b, p.sdk_s = in.sdk_s;
  p.sel_keys = in.sel_keys, p.sel_counts = in.sel_counts;
  p.sel_kb = in.sel_strides[0], p.sel_kh = in.sel_strides[1], p.sel_kq = in.sel_strides[2];
  p.sel_cb = in.sel_strides[3], p.sel_ch = in.sel_strides[4];
  p.t_keys = in.t_keys, p.t_counts = in.t_counts;
  p.t_kb = in.t_strides[0], p.t_kh = in.t_strides[1], p.t_kk = in.t_strides[2];
  p.t_cb = in.t_strides[3], p.t_ch = in.t_strides[4];
  p.heads = in.heads, p.q_tiles = in.q_tiles, p.q_slot = in.q_slot, p.kv_tiles = in.kv_tiles;
  p.kv_list = in.kv_list, p.groups = in.groups;
  p.B = in.B, p.n_heads = in.n_heads, p.n_q_tiles = in.n_q_tiles, p.n_kv = in.n_kv, p.g_stride = in.g_stride;
  p.q_heads = in.q_heads, p.kv_heads = in.kv_heads;
  p.grid_t = in.T / in.TT, p.grid_h = in.H / in.TH, p.grid_w = in.W / in.TW, p.vol = in.TT * in.TH * in.TW;
  p.q_video = in.q_video, p.q_text_valid = in.q_text_valid, p.kv_video = in.kv_video;
  p.kv_for_video = in.kv_text_for_video, p.kv_for_text = in.kv_text_for_text;
  p.text_q_video_keys = in.text_q_video_keys;
  for (int a = 0; a < 3; ++a) p.clip_lo[a] = in.clip[a], p.clip_hi[a] = in.clip[3 + a];
  p.scale = in.scale, p.sm_scale = in.sm_scale;
  const int bpt = p.vol / 128;
  p.n_text_progs = dkdv ? (max(in.kv_text_for_video, in.kv_text_for_text) + 127) / 128 : (in.q_text_valid + 127) / 128;
  p.n_video_progs = (dkdv ? in.n_kv : in.n_q_tiles) * bpt;
}

long long programs(const Params& p, bool dkdv) {
  return static_cast<long long>(p.B) * (dkdv ? p.kv_heads : p.n_heads) * (p.n_text_progs + p.n_video_progs);
}

template <bool DKDV>
int launch(const Params& p, int f16, void* stream) {
  auto kernel = f16 ? sta_bwd_kernel<DKDV, true> : sta_bwd_kernel<DKDV, false>;
  const long long n = programs(p, DKDV);
  if (n == 0) return 0;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES);
  kernel<<<static_cast<unsigned>(n), THREADS, SMEM_BYTES, static_cast<cudaStream_t>(stream)>>>(p);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? 0 : 1000 + static_cast<int>(err);
}

// The schedule's sink on the host: each block as four ints (row, head, cols, rows).
struct Recorder {
  int* out;
  int cap, n;
  HD void emit(int row, int head, int cols, int rows) {
    if (n + 4 <= cap) out[n] = row, out[n + 1] = head, out[n + 2] = cols, out[n + 3] = rows;
    n += 4;
  }
};

}  // namespace

// dq, then dk/dv, on ``args->stream`` (fields: sta_bwd_cuda_args.h).
extern "C" int sta_bwd_cuda_launch(const StaBwdArgs* args) {
  const StaBwdArgs& in = *args;
  Params p;
  int e;
  if ((e = rows_map(&p.q, in.q, in.f16, in.B, in.s_q, in.q_heads, in.sq_b, in.sq_s, 64)) ||
      (e = rows_map(&p.dout, in.dout, in.f16, in.B, in.s_q, in.q_heads, in.sdo_b, in.sdo_s, 64)) ||
      (e = rows_map(&p.k, in.k, in.f16, in.B, in.s_kv, in.kv_heads, in.sk_b, in.sk_s, 64)) ||
      (e = rows_map(&p.v, in.v, in.f16, in.B, in.s_kv, in.kv_heads, in.sv_b, in.sv_s, 64)))
    return e;
  fill(p, in, false);
  if ((e = launch<false>(p, in.f16, in.stream))) return e;
  fill(p, in, true);
  return launch<true>(p, in.f16, in.stream);
}

// The kernels' programs on the host, for the tests (tables in host memory): with
// ``pid`` < 0, how many programs the dq (``dkdv`` 0) or dk/dv kernel has; else program
// ``pid``'s (text, b, head, x_row, x_head, valid, rows_video, rows_text) and then its
// streamed blocks, four ints each, into ``out`` (``cap`` ints). Returns the ints the whole
// record takes (more than ``cap``: only the first ``cap`` written).
extern "C" long long sta_bwd_cuda_schedule(const StaBwdArgs* args, int dkdv, long long pid, int* out, int cap) {
  Params p;
  fill(p, *args, dkdv != 0);
  if (pid < 0) return programs(p, dkdv != 0);
  const Program pr = dkdv ? program<true>(p, pid) : program<false>(p, pid);
  const int head[8] = {pr.text, pr.b, pr.hh, pr.x_row, pr.x_head, pr.valid, pr.rows_video, pr.rows_text};
  for (int i = 0; i < 8 && i < cap; ++i) out[i] = head[i];
  Recorder rec{out + 8, cap - 8, 0};
  if (dkdv)
    schedule<true>(p, pr, rec);
  else
    schedule<false>(p, pr, rec);
  return 8 + rec.n;
}
