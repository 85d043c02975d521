// Sliding tile attention forward for Hopper (sm_90a), hand-written CUDA in FA3's
// structure: the one Hopper kernel of the route (sta_dist/route.py; what it takes: kernels/rules.py).
// Semantics as kernels/sta_fwd.py (the portable Triton kernel).
//
// q/k/v [B, S, heads, 128], bf16 or fp16 (template F16), video tokens placed by one of
// two orders, then text rows:
// - natural: the whole canvas, token (t, h, w) at row (t*H + h)*W + w;
// - packed: whole tiles of consecutive rows, each tile's tokens in (t, h, w) order inside
//   it, placed by two tables: q_tiles [n_q, >=2] per query tile to compute (global tile
//   id, first row), kv_tiles [n_tiles, >=1] per global tile its first k/v row (the whole
//   canvas in tiled order, a head-mode rank's tokens, a tile-mode rank's box and halo).
//   A tile-mode rank's k/v may come in two tensors: a kv_tiles entry ~r (negative) is
//   row r of a second pair (the halo as received), so box and halo need not be copied
//   into one tensor; text rows are in the first.
// Tiles (TT, TH, TW): packed, TT*TH*TW a multiple of 128; natural, TH*TW divides 64 and
// TT is a multiple of 128 / (TH*TW). Per-head windows come from heads[n, 5] = (kt, kh,
// kw, kv_head, q_head); video queries attend their window's key tiles, or with key tables
// (selected tiles, other window rules) the tiles of their list, sel_keys[b, q_head, query
// tile, :sel_counts[b, q_head, query tile]] (global tile ids; stride 0 where one list
// serves every sample or head), and the first n_text text rows (from text_row on); a query
// that attends nothing gets 0 (log-sum-exp -inf). Text queries are the caller's (the route
// gives them to SDPA or to a Triton launch). Optionally the natural-log log-sum-exp of
// every video row, lse [B, q heads, S] float32.
// Two more knobs make one query's keys computable in parts (a tile-mode rank's own box
// while its halo is on the way, then the halo): a clip box cuts every window to the key
// tiles [lo, hi) per axis, and a resumed launch (template RESUME) starts each row from
// what out and lse hold (an earlier launch's normalised output and log-sum-exp over other
// keys), folds its keys in, and writes both back; a row with no key here is left alone.
//
// Program (query block, head row): 128 query rows (consecutive rows of one tile, packed;
// 128 / (TH*TW) t-slices of one tile, natural), 384 threads in three warpgroups.
// - Warpgroup 0 (setmaxnreg 24) loads: warp 0 issues the bulk tensor copies (TMA) of q
//   and of every K block, warp 1 of every V block, each into a two-slot ring guarded by
//   mbarriers (full: the copy's bytes; empty: one arrival per consumer warp).
// - Warpgroups 1 and 2 (setmaxnreg 240) each compute 64 query rows (half c of the
//   block): S_j = Q K_j^T and O += P_{j-1} V_{j-1} issued together as asynchronous wgmma,
//   the softmax of S_j run while PV_{j-1} is in flight (FA3's intra-warpgroup overlap),
//   and the two warpgroups take turns issuing (FA3's ping-pong, named barriers 1 and 2).
// - Trip j (FA4's order): S_j and PV_{j-1} issued in turn, then PV_{j-1} retired and P_j
//   written over P_{j-1} (one register operand array; the retire comes before P is written,
//   so ptxas needs no hint). The exponentials are taken against a fixed reference per row,
//   block 0's maximum, so a trip has no maxima and no rescale of O; where a row's sum shows
//   a later key outgrew the formats, the program streams its keys again for an online pass
//   (FA's running maximum: S_j's maxima while PV_{j-1} runs, O rescaled). See Consumer.
//
// Key blocks of BN rows: 192 where a tile holds whole blocks of 192 (HunyuanVideo's and
// Wan's 6x8x8; half again the keys per turn, so the turn's fixed costs (the handover, the
// waits, and in the online pass the maxima's shuffles and O's rescale) count a third less:
// 3-4% faster at v23), else 128. Text blocks first
// (the partial one as block 0, so the one column mask sits outside the loop), then the
// window's video blocks, tile by tile (t, then h, then w), BN rows at a time. Natural: a
// 5-D box [1, BN/(TH*TW), TH, TW, 64] of the view [B, T, H, W, heads*128] per 64-column
// half; packed: a 3-D box [1, BN, 64] of [B, S, heads*128] at the tile's first row from
// kv_tiles. Either way shared memory holds BN rows of 128 bytes in (t, h, w) order with
// the 128-byte swizzle (two copies per block).
// Text blocks are such 3-D boxes from text_row on.
//
// The file reads top to bottom: the kernel's constants and Params, loading (the loader
// warps' rings), computing (the consumer warpgroups), the kernel, then the host entry
// (Params from the caller's StaFwdArgs, the launch). Beside it: hopper/ptx.cuh (the PTX
// wrappers), hopper/tensor_maps.cuh (the tensor maps' host side) and sta_fwd_cuda_args.h
// (the host interface); nvcc finds them through -I kernels/ (sta_fwd_cuda.py's build).
#include <cuda.h>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "hopper/ptx.cuh"
#include "hopper/tensor_maps.cuh"
#include "sta_fwd_cuda_args.h"

namespace {

constexpr int KST = 2, VST = 2;                     // ring slots
constexpr int THREADS = 384;                        // loader + two consumer warpgroups
constexpr int Q_BYTES = 2 * 16384;                 // q: two 64-row halves
// Key blocks of BN rows (128, or 192 where the tiles allow: half the turns per key). K or V:
// BN rows of 256 bytes, as two 64-column halves of BN rows each.
template <int BN>
constexpr int KV_BYTES = BN * 256;
template <int BN>
constexpr int SMEM_BYTES = Q_BYTES + (KST + VST) * KV_BYTES<BN> + 1024 /*barriers*/ + 1024 /*alignment*/;
constexpr uint32_t DESC_HI = 0x40000040u;           // descriptor high word: 128-byte swizzle, SBO 1024 B
constexpr float LN2 = 0.6931471805599453f;

struct Params {
  CUtensorMap q, k, v, kt, vt;  // q: 5-D (natural) or 3-D rows (packed); k, v: 5-D (natural) or the halo's 3-D rows
                                // (packed); kt, vt: 3-D rows
  uint16_t* out;                // bf16 or fp16
  float* lse;                   // nullptr: none
  const int *heads, *q_tiles, *kv_tiles, *sel_keys, *sel_counts;  // sel_keys nullptr: windows
  long long so_b, so_s, lse_b, lse_h, sel_kb, sel_kh, sel_kq, sel_cb, sel_ch;
  int q_stride, kv_stride, packed, n_heads, grid_t, grid_h, grid_w, TT, TH, TW, bpt, canvas_h, canvas_w, text_row,
      n_text;
  int clip_lo[3], clip_hi[3];  // windows cut to the key tiles [lo, hi) per axis (the whole grid: no cut)
  float scale;  // softmax scale * log2(e)
};

// --- loading -------------------------------------------------------------------------------
// Which key block j is: text blocks first (the partial last one as block 0), then the
// window's video tiles (t, then h, then w) or the list's, BN rows (``slices`` t-slices; ``bpt``
// blocks a tile) at a time.
struct Window {
  const int* kv_tiles;  // packed: per global tile its first k/v row (stride kv_stride); natural: unused
  const int* list;      // key tables: this program's list of global tile ids; nullptr: the window
  int kv_stride, packed, b, kv_col, st, sh, sw, kh, kw, TT, TH, TW, slices, bpt, grid_h, grid_w, n_tb, text_row, n;
};

// floor(g / d) for 0 <= g < 2^22 (the route keeps grids below that many tiles): (g + 0.5) / d
// lies at least 0.5 / d from an integer, and the float product's error is below that there.
DEV int quotient(int g, int d) { return __float2int_rz((g + 0.5f) * __frcp_rn(static_cast<float>(d))); }

// The program's mbarriers (shared addresses): q, the rings' full and empty slots (8 bytes
// apart), and the verdict of the fixed reference (eight consumer warps arrive; ``redo`` is a
// shared word a warp sets to 1 when a row of it needs the online pass).
struct Bars {
  uint32_t q_full, k_full, v_full, k_empty, v_empty, verdict, redo;
};

// One ring (K or V) of BN-row blocks, filled 2n times at most: fills 0..n-1 are the key
// blocks for the consumers' first pass; then, if the verdict asks for the online pass, fills
// n..2n-1 the same blocks again. Fill f of slot f % 2 waits for the consumers' release of
// fill f - 2 (eight warp arrivals), then copies its block as two 64-column halves. Where the
// block lies is worked out before that wait, so a key table's reads (the list entry, the
// tile's first row) are in flight while the slot drains, not in the ring's critical path.
template <int BN>
DEV void load_ring(const Window& w, const CUtensorMap* video, const CUtensorMap* rows, uint32_t base, uint32_t full,
                   uint32_t empty, const Bars& bars) {
  int sub = 0, ti = 0, hi = 0, wi = 0, e = 0;  // the next video block (window: without divisions)
#pragma unroll 1
  for (int f = 0; f < 2 * w.n; ++f) {
    if (f == w.n) {  // the first pass loaded: a second only on the consumers' word
      mbar_sleep(bars.verdict, 0);
      if (!ld_shared(bars.redo)) break;
      sub = ti = hi = wi = e = 0;
    }
    const int j = f < w.n ? f : f - w.n;  // the key block
    const CUtensorMap* map = rows;  // 3-D rows at (row), or the 5-D video view at (w0, h0, t0)
    int row = 0, w0 = 0, h0 = 0, t0 = 0;
    const bool text = j < w.n_tb, five = !text && !w.packed;
    if (text) {
      row = w.text_row + (w.n_tb - 1 - j) * BN;
    } else if (w.packed) {
      const int g = w.list ? __ldg(w.list + e) : ((w.st + ti) * w.grid_h + w.sh + hi) * w.grid_w + w.sw + wi;
      // ~row: the halo's row, through its map (Params' k or v, two maps before kt or vt)
      const int first = __ldg(w.kv_tiles + g * w.kv_stride);
      map = rows - (first < 0 ? 2 : 0);
      row = (first < 0 ? ~first : first) + sub * BN;
    } else {
      int ct = w.st + ti, ch = w.sh + hi, cw = w.sw + wi;
      if (w.list) {  // the listed tile's (t, h, w) without integer divisions (~30 dependent instructions each)
        const int g = __ldg(w.list + e), hw = w.grid_h * w.grid_w;
        ct = quotient(g, hw);
        const int r = g - ct * hw;
        ch = quotient(r, w.grid_w);
        cw = r - ch * w.grid_w;
      }
      t0 = ct * w.TT + sub * w.slices, h0 = ch * w.TH, w0 = cw * w.TW;
    }
    const int s = f % KST;
    if (f >= KST) mbar_sleep(empty + 8 * s, (f / KST - 1) & 1);
    const uint32_t dst = base + s * KV_BYTES<BN>, bar = full + 8 * s;
    mbar_expect_tx(bar, KV_BYTES<BN>);
    for (int h = 0; h < 2; ++h) {
      if (five)
        tma_load5(dst + h * (BN * 128), video, bar, w.kv_col + h * 64, w0, h0, t0, w.b);
      else
        tma_load3(dst + h * (BN * 128), map, bar, w.kv_col + h * 64, row, w.b);
    }
    if (text || ++sub < w.bpt) continue;
    sub = 0;
    ++e;
    if (++wi < w.kw) continue;
    wi = 0;
    if (++hi < w.kh) continue;
    hi = 0;
    ++ti;
  }
}

// --- computing -----------------------------------------------------------------------------
// One consumer warpgroup: 64 query rows. Per thread two rows (r0, r0 + 8) of S and O.
// Two passes over the keys (template ONLINE):
// - fixed reference (the first pass): each row's exponent reference m is block 0's row
//   maximum and stays: later blocks add 2^(s - m) as they come, with no maxima and no
//   rescale of O (1.10x at (3,3,3) on an H200). Exact while no term outgrows the formats:
//   every term is at most the row sum l, so l <= LIMIT (and not NaN) bounds them all; and
//   the largest term is at least 1 (the true maximum is at least block 0's), so nothing
//   that counts underflows.
// - online (a redo, only where a row's l passed LIMIT, 2^15 in fp16 and 2^64 in bf16: keys
//   far above block 0's maximum): FA's running maximum, O rescaled as it moves.
template <int C, bool F16, bool RESUME, int BN>
struct Consumer {
  static constexpr int NS = BN / 2, NP = BN / 4;  // S's accumulators and P's registers per thread
  // The fixed reference's bound on a row sum: every term (of P too) stays finite; O's range
  // is checked apart (``over_limit``).
  static constexpr float LIMIT = F16 ? 32768.f : 18446744073709551616.f;  // 2^15 (fp16's largest 65504), 2^64
  float S[NS];
  float O[64];
  float m[2], l[2], alpha[2];
  uint32_t q_desc, k_desc, v_desc;  // descriptor low words of q's half and slot 0 of K, V
  Bars bars;
  int n, r0;  // key blocks; the rings' fill of block 0 (0, then n on a redo)
  float scale;
  const uint16_t* o_src[2];  // resumed: where the earlier output of the thread's two rows lies

  // A resumed launch's O: the earlier normalised output, as ``store`` wrote it.
  DEV void load_o() {
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int jj = 0; jj < 16; ++jj) {
        const uint32_t x = *reinterpret_cast<const uint32_t*>(o_src[r] + 8 * jj);
        float2 f;
        if constexpr (F16)
          f = __half22float2(*reinterpret_cast<const __half2*>(&x));
        else
          f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&x));
        O[4 * jj + 2 * r] = f.x, O[4 * jj + 2 * r + 1] = f.y;
      }
  }

  // Block j's slot in a ring and the parity its fill completes.
  DEV int slot(int j) const { return (r0 + j) % KST; }
  DEV uint32_t parity(int j) const { return ((r0 + j) / KST) & 1; }
  DEV void turn_wait(bool first) {
    if (!(first && C == 0)) bar_sync(1 + C);
  }
  DEV void turn_pass(bool last) {
    if (!(last && C == 1)) bar_arrive(2 - C);
  }
  DEV void release(uint32_t bar) {
    __syncwarp();
    if ((threadIdx.x & 31) == 0) mbar_arrive(bar);
  }
  // Descriptors as 64-bit values (the constant high word joined once), offsets added whole.
  DEV static uint64_t desc(uint32_t lo) { return (static_cast<uint64_t>(DESC_HI) << 32) | lo; }
  DEV void issue_s(int sk) {
    const uint64_t qd = desc(q_desc), kd = desc(k_desc + sk * (KV_BYTES<BN> >> 4));
#pragma unroll
    for (int kk = 0; kk < 8; ++kk)
      wgmma_ss<F16>(S, qd + ((kk >> 2) * 8192 + (kk & 3) * 32) / 16, kd + ((kk >> 2) * (BN * 128) + (kk & 3) * 32) / 16,
                    kk > 0);
    wg_commit();
  }
  DEV void issue_pv(const uint32_t (&P)[NP], int sv) {
    const uint64_t vd = desc(v_desc + sv * (KV_BYTES<BN> >> 4));
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) wgmma_rs<F16>(O, P, kk, vd + kk * (2048 / 16));
    wg_commit();
  }
  // Online softmax of S (exp2, the scale folded into one FMA), each pair of exponentials
  // packed at once into the operand P; row sums kept per thread. ``valid``: columns of
  // this block that count (block 0 may be a partial text block).
  DEV void softmax(bool first, uint32_t (&P)[NP], int valid = BN) {
    row_max(first, valid);
    exps(first, P);
  }
  DEV void row_max(bool first, int valid = BN) {
    if (valid < BN) {
      const int q2 = 2 * (threadIdx.x & 3);
#pragma unroll
      for (int i = 0; i < NS; ++i)
        if (8 * (i >> 2) + q2 + (i & 1) >= valid) S[i] = -INFINITY;
    }
    // Four independent maxima per row (S[i] is row (i >> 1) & 1), each started at its first value.
    float m4[2][4];
#pragma unroll
    for (int i = 0; i < NS; ++i) {
      const int r = (i >> 1) & 1, k = (i >> 2) & 3;
      m4[r][k] = (i < 16 && !(i & 1)) ? S[i] : fmaxf(m4[r][k], S[i]);
    }
    float mx[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(fmaxf(m4[r][0], m4[r][1]), fmaxf(m4[r][2], m4[r][3]));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffff, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffff, mx[r], 2));
      const float m_new = first ? mx[r] * scale : fmaxf(m[r], mx[r] * scale);
      alpha[r] = first ? 1.f : ex2(m[r] - m_new);
      m[r] = m_new;
    }
  }
  // The exponentials against m; ``rescaled``: l is first multiplied by alpha (the online
  // pass), else the terms are added to it (the fixed reference).
  DEV void exps(bool first, uint32_t (&P)[NP], bool rescaled = true) {
    float s4[2][4];  // four independent partial sums per row
#pragma unroll
    for (int i = 0; i < NP; ++i) {
      const int r = i & 1, k = (i >> 1) & 3;  // S[2i], S[2i+1] lie in row r0 for even i, r0 + 8 for odd i
      const float e0 = ex2(fmaf(S[2 * i], scale, -m[r])), e1 = ex2(fmaf(S[2 * i + 1], scale, -m[r]));
      s4[r][k] = i < 8 ? e0 + e1 : s4[r][k] + (e0 + e1);
      P[i] = pack2<F16>(e0, e1);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float sum = (s4[r][0] + s4[r][1]) + (s4[r][2] + s4[r][3]);
      l[r] = first ? sum : rescaled ? fmaf(l[r], alpha[r], sum) : l[r] + sum;
    }
  }
  DEV void rescale_o() {
#pragma unroll
    for (int i = 0; i < 64; ++i) O[i] *= alpha[(i >> 1) & 1];
  }
  // Trip j >= 1 (P = P_{j-1} in, P_j out): S_j and PV_{j-1} issued in turn; online, S_j's row
  // maxima; then PV_{j-1} retired (P free again, its V slot released), online O rescaled,
  // and the exponentials of S_j written into P (ptxas places O's multiplies after them).
  template <bool ONLINE>
  DEV void trip(int j, uint32_t (&P)[NP]) {
    const int sk = slot(j), sv = slot(j - 1);
    mbar_wait(bars.k_full + 8 * sk, parity(j));
    mbar_wait(bars.v_full + 8 * sv, parity(j - 1));
    turn_wait(false);
    fence_f(O);
    fence_r(P);
    wg_fence();
    issue_s(sk);
    issue_pv(P, sv);
    turn_pass(j == n - 1);
    wg_wait<1>();
    fence_f(S);
    release(bars.k_empty + 8 * sk);
    if constexpr (ONLINE) row_max(false);
    wg_wait<0>();
    fence_f(O);
    fence_r(P);
    release(bars.v_empty + 8 * sv);
    if constexpr (ONLINE) rescale_o();
    exps(false, P, ONLINE);
  }
  // After the last trip (P = P_{n-1}).
  DEV void last_pv(uint32_t (&P)[NP]) {
    const int sv = slot(n - 1);
    mbar_wait(bars.v_full + 8 * sv, parity(n - 1));
    fence_f(O);
    fence_r(P);
    wg_fence();
    issue_pv(P, sv);
    wg_wait<0>();
    fence_f(O);
    fence_r(P);
    release(bars.v_empty + 8 * sv);  // a redo's fills reuse the slot
  }

  // One pass over the n key blocks (m and l as ``resume_state`` left them, resumed).
  template <bool ONLINE>
  DEV void run(int first_valid) {
    uint32_t P[NP];
    const int sk = slot(0);
    mbar_wait(bars.k_full + 8 * sk, parity(0));
    turn_wait(true);
    wg_fence();
    issue_s(sk);
    turn_pass(n == 1);
    wg_wait<0>();
    fence_f(S);
    release(bars.k_empty + 8 * sk);
    softmax(!RESUME, P, first_valid);  // resumed: m and l hold the earlier keys' state
    if constexpr (RESUME) {
      load_o();
      rescale_o();  // to block 0's maximum, before PV_0 adds to it
    } else {
#pragma unroll
      for (int i = 0; i < 64; ++i) O[i] = 0.f;
    }
    for (int j = 1; j < n; ++j) trip<ONLINE>(j, P);
    last_pv(P);
  }

  // Whether a row of this thread's passed the fixed reference's bound, or an O value is not
  // finite (terms up to LIMIT times values of V beyond fp32's range over LIMIT, or a NaN of
  // the inputs): the online pass then gives what FA's order gives.
  DEV bool over_limit() const {
    bool over = false;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float s = l[r];
      s += __shfl_xor_sync(0xffffffff, s, 1);
      s += __shfl_xor_sync(0xffffffff, s, 2);
      over |= !(s <= LIMIT);
    }
#pragma unroll
    for (int i = 0; i < 64; ++i) over |= !(fabsf(O[i]) <= 3.0e38f);
    return over;
  }
};

// Where the program's query rows are: packed, consecutive rows from ``row0``; natural,
// row i of the block is t-slice t0 + i / (TH*TW), (h0, w0) + ((i % (TH*TW)) / TW, i % TW).
struct QueryRows {
  int packed, row0, t0, h0, w0, plane, TW, canvas_h, canvas_w;
  DEV long long token(int i) const {
    if (packed) return row0 + i;
    const int r = i % plane;
    return (static_cast<long long>(t0 + i / plane) * canvas_h + h0 + r / TW) * canvas_w + w0 + r % TW;
  }
};

// Normalise O and write the warpgroup's 64 rows (block rows 64*C on), and their
// log-sum-exp if asked: (m + log2 l) in natural-log units (m is kept in log2 units).
template <int C, bool F16, bool RESUME, int BN>
DEV void store(const Params& p, const Consumer<C, F16, RESUME, BN>& cs, int b, int qh, const QueryRows& rows) {
  const int lane = threadIdx.x & 31, warp = (threadIdx.x / 32) & 3;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float s = cs.l[r];
    s += __shfl_xor_sync(0xffffffff, s, 1);
    s += __shfl_xor_sync(0xffffffff, s, 2);
    const float inv = s > 0.f ? 1.f / s : 0.f;  // s == 0: no key at all (an empty list)
    const long long tok = rows.token(64 * C + 16 * warp + lane / 4 + 8 * r);
    uint16_t* dst = p.out + b * p.so_b + tok * p.so_s + qh * 128 + 2 * (lane % 4);
#pragma unroll
    for (int jj = 0; jj < 16; ++jj) {
      const int i = 4 * jj + 2 * r;
      *reinterpret_cast<uint32_t*>(dst + 8 * jj) = pack2<F16>(cs.O[i] * inv, cs.O[i + 1] * inv);
    }
    if (p.lse && lane % 4 == 0)
      p.lse[b * p.lse_b + qh * p.lse_h + tok] = s > 0.f ? (cs.m[r] + __log2f(s)) * LN2 : -INFINITY;
  }
}

// A resumed launch's state of the warpgroup's rows, as ``store`` left them: m the
// log-sum-exp (log2 units), the row sum 1 spread over the four threads of a row (``store``
// adds them up), and where the output lies (read into O after the first block's softmax).
template <int C, bool F16, bool RESUME, int BN>
DEV void resume_state(const Params& p, Consumer<C, F16, RESUME, BN>& cs, int b, int qh, const QueryRows& rows) {
  const int lane = threadIdx.x & 31, warp = (threadIdx.x / 32) & 3;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const long long tok = rows.token(64 * C + 16 * warp + lane / 4 + 8 * r);
    cs.o_src[r] = p.out + b * p.so_b + tok * p.so_s + qh * 128 + 2 * (lane % 4);
    cs.m[r] = p.lse[b * p.lse_b + qh * p.lse_h + tok] * (1.f / LN2);
    cs.l[r] = 0.25f;
  }
}

// The warpgroup's pass with the fixed reference; its rows stored if none passed the bound.
// Then the verdict of all eight consumer warps: if any warp's rows passed it, every
// warpgroup runs the online pass over the keys streamed again (the rings must drain), and
// stores only the rows it had held back (a resumed launch: out and lse still hold the earlier
// result there).
template <int C, bool F16, bool RESUME, int BN>
DEV void consume(const Params& p, uint32_t q_base, uint32_t k_base, uint32_t v_base, const Bars& bars, int n, int n_tb,
                 int b, int qh, const QueryRows& rows) {
  Consumer<C, F16, RESUME, BN> cs;
  cs.n = n;
  cs.r0 = 0;
  cs.scale = p.scale;
  cs.q_desc = ((q_base + C * 16384) & 0x3FFFF) >> 4;  // the warpgroup's half of q
  cs.k_desc = (k_base & 0x3FFFF) >> 4;
  cs.v_desc = ((v_base & 0x3FFFF) >> 4) | (((BN * 128) >> 4) << 16);  // V: LBO = the second 64-column half
  cs.bars = bars;
  mbar_wait(bars.q_full, 0);
  if (n == 0) {  // not resumed (the kernel returned before): no key at all
#pragma unroll
    for (int i = 0; i < 64; ++i) cs.O[i] = 0.f;
    cs.l[0] = cs.l[1] = 0.f;
    store(p, cs, b, qh, rows);
    return;
  }
  const int partial = p.n_text % BN, first_valid = n_tb > 0 && partial ? partial : BN;
  if constexpr (RESUME) resume_state(p, cs, b, qh, rows);
  cs.template run<false>(first_valid);
  const bool over = __any_sync(0xffffffff, cs.over_limit());
  if (!over) store(p, cs, b, qh, rows);
  if ((threadIdx.x & 31) == 0) {
    if (over) st_shared(bars.redo, 1);
    mbar_arrive(bars.verdict);
  }
  mbar_wait(bars.verdict, 0);
  if (!ld_shared(bars.redo)) return;
  if constexpr (RESUME) resume_state(p, cs, b, qh, rows);
  cs.r0 = n;
  cs.template run<true>(first_valid);
  if (over) store(p, cs, b, qh, rows);
}

template <bool F16, bool RESUME, int BN>
__global__ void __launch_bounds__(THREADS, 1) sta_fwd_kernel(const __grid_constant__ Params p) {
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const uint32_t q_base = smem_u32(smem);
  const uint32_t k_base = q_base + Q_BYTES;
  const uint32_t v_base = k_base + KST * KV_BYTES<BN>;
  const uint32_t q_full = v_base + VST * KV_BYTES<BN>;
  const uint32_t k_full = q_full + 8, v_full = k_full + 8 * KST, k_empty = v_full + 8 * VST, v_empty = k_empty + 8 * KST;
  const Bars bars{q_full, k_full, v_full, k_empty, v_empty, v_empty + 8 * VST, v_empty + 8 * VST + 8};

  const int pid = blockIdx.x, bh = blockIdx.y;
  const int b = bh / p.n_heads, row = bh % p.n_heads;
  const int kt = p.heads[row * 5 + 0], kh = p.heads[row * 5 + 1], kw = p.heads[row * 5 + 2];
  const int kvh = p.heads[row * 5 + 3], qh = p.heads[row * 5 + 4];
  const int qi = pid / p.bpt, sub = pid % p.bpt;  // query tile (of the table, packed), block in it
  const int gid = p.packed ? __ldg(p.q_tiles + qi * p.q_stride) : qi;
  const int ct = gid / (p.grid_h * p.grid_w), ch = (gid / p.grid_w) % p.grid_h, cw = gid % p.grid_w;
  const int slices = 128 / (p.TH * p.TW);  // natural: t-slices per block
  const QueryRows rows{p.packed, p.packed ? __ldg(p.q_tiles + qi * p.q_stride + 1) + sub * 128 : 0,
                       ct * p.TT + sub * slices, ch * p.TH, cw * p.TW, p.TH * p.TW, p.TW, p.canvas_h, p.canvas_w};
  // Window start per axis: clamp(c - (k - 1) / 2, 0, n - k), k already <= n.
  // Then cut to the clip box (a tile-mode rank's box, or a neighbour's: its halo).
  const int st0 = min(max(ct - (kt - 1) / 2, 0), p.grid_t - kt);
  const int sh0 = min(max(ch - (kh - 1) / 2, 0), p.grid_h - kh);
  const int sw0 = min(max(cw - (kw - 1) / 2, 0), p.grid_w - kw);
  const int st = max(st0, p.clip_lo[0]), sh = max(sh0, p.clip_lo[1]), sw = max(sw0, p.clip_lo[2]);
  const int nt = max(min(st0 + kt, p.clip_hi[0]) - st, 0), nh = max(min(sh0 + kh, p.clip_hi[1]) - sh, 0),
            nw = max(min(sw0 + kw, p.clip_hi[2]) - sw, 0);
  const int n_tb = (p.n_text + BN - 1) / BN;
  const int kbpt = p.bpt * 128 / BN;  // key blocks per tile
  const int* list = p.sel_keys ? p.sel_keys + b * p.sel_kb + qh * p.sel_kh + qi * p.sel_kq : nullptr;
  const int n = n_tb + (list ? __ldg(p.sel_counts + b * p.sel_cb + qh * p.sel_ch + qi) : nt * nh * nw) * kbpt;
  if (RESUME && n == 0) return;  // no key of this launch: the earlier result stands (q not even loaded)

  if (threadIdx.x == 0) {
    mbar_init(q_full, 1);
    for (int s = 0; s < KST; ++s) mbar_init(k_full + 8 * s, 1), mbar_init(k_empty + 8 * s, 8);
    for (int s = 0; s < VST; ++s) mbar_init(v_full + 8 * s, 1), mbar_init(v_empty + 8 * s, 8);
    mbar_init(bars.verdict, 8);
    st_shared(bars.redo, 0);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  const int wg = threadIdx.x / 128;
  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
    const int warp = threadIdx.x / 32;
    if ((threadIdx.x & 31) != 0 || warp >= 2) return;
    const Window w{p.kv_tiles, list, p.kv_stride, p.packed, b, kvh * 128, st, sh, sw, nh, nw, p.TT, p.TH, p.TW,
                   BN / (p.TH * p.TW), kbpt, p.grid_h, p.grid_w, n_tb, p.text_row, n};
    if (warp == 0) {
      mbar_expect_tx(q_full, Q_BYTES);
      for (int c = 0; c < 2; ++c)
        for (int h = 0; h < 2; ++h) {
          const uint32_t dst = q_base + c * 16384 + h * 8192;
          if (p.packed)
            tma_load3(dst, &p.q, q_full, qh * 128 + h * 64, rows.row0 + 64 * c, b);
          else
            tma_load5(dst, &p.q, q_full, qh * 128 + h * 64, rows.w0, rows.h0, rows.t0 + c * slices / 2, b);
        }
      load_ring<BN>(w, &p.k, &p.kt, k_base, k_full, k_empty, bars);
    } else {
      load_ring<BN>(w, &p.v, &p.vt, v_base, v_full, v_empty, bars);
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
  if (wg == 1)
    consume<0, F16, RESUME, BN>(p, q_base, k_base, v_base, bars, n, n_tb, b, qh, rows);
  else
    consume<1, F16, RESUME, BN>(p, q_base, k_base, v_base, bars, n, n_tb, b, qh, rows);
}

// --- host entry ----------------------------------------------------------------------------
// The instantiation for (BN, f16, resume), launched on ``stream``: 0, or 1000 + cudaError_t.
template <int BN>
int launch(const Params& p, dim3 grid, int f16, int resume, void* stream) {
  auto kernel = f16 ? (resume ? sta_fwd_kernel<true, true, BN> : sta_fwd_kernel<true, false, BN>)
                    : (resume ? sta_fwd_kernel<false, true, BN> : sta_fwd_kernel<false, false, BN>);
  // Per launch, not once per process: the attribute belongs to the current device's context.
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES<BN>);
  kernel<<<grid, THREADS, SMEM_BYTES<BN>, static_cast<cudaStream_t>(stream)>>>(p);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? 0 : 1000 + static_cast<int>(err);
}

}  // namespace

extern "C" int sta_fwd_cuda_args_size(void) { return static_cast<int>(sizeof(StaFwdArgs)); }

// The kernel on ``args->stream`` (fields: sta_fwd_cuda_args.h): Params from the caller's
// arguments, then the instantiation for the key block rows, dtype and resume.
extern "C" int sta_fwd_cuda_launch(const StaFwdArgs* args) {
  const StaFwdArgs& in = *args;
  Params p;
  int e;
  const int slices = 128 / (in.TH * in.TW);
  const int bn = (in.TT * in.TH * in.TW) % 192 == 0 ? 192 : 128;  // key block rows: 192 where whole tiles hold whole blocks
  if (in.packed) {
    (e = rows_map(&p.q, in.q, in.f16, in.B, in.s_q, in.q_heads, in.sq_b, in.sq_s, 64)) ||
        (in.k_halo &&
         ((e = rows_map(&p.k, in.k_halo, in.f16, in.B, in.halo_rows, in.kv_heads, in.sh_b, in.sh_s, bn)) ||
          (e = rows_map(&p.v, in.v_halo, in.f16, in.B, in.halo_rows, in.kv_heads, in.sh_b, in.sh_s, bn))));
  } else {
    (e = video_map(&p.q, in.q, in.f16, in.B, in.T, in.H, in.W, in.q_heads, in.sq_b, in.sq_s, slices / 2, in.TH,
                   in.TW)) ||
        (e = video_map(&p.k, in.k, in.f16, in.B, in.T, in.H, in.W, in.kv_heads, in.sk_b, in.sk_s, bn / (in.TH * in.TW),
                       in.TH, in.TW)) ||
        (e = video_map(&p.v, in.v, in.f16, in.B, in.T, in.H, in.W, in.kv_heads, in.sv_b, in.sv_s, bn / (in.TH * in.TW),
                       in.TH, in.TW));
  }
  if (e || (e = rows_map(&p.kt, in.k, in.f16, in.B, in.s_kv, in.kv_heads, in.sk_b, in.sk_s, bn)) ||
      (e = rows_map(&p.vt, in.v, in.f16, in.B, in.s_kv, in.kv_heads, in.sv_b, in.sv_s, bn)))
    return e;
  p.out = static_cast<uint16_t*>(in.out);
  p.lse = in.lse;
  p.heads = in.heads, p.q_tiles = in.q_tiles, p.kv_tiles = in.kv_tiles;
  p.sel_keys = in.sel_keys, p.sel_counts = in.sel_counts;
  p.sel_kb = in.sel_strides[0], p.sel_kh = in.sel_strides[1], p.sel_kq = in.sel_strides[2];
  p.sel_cb = in.sel_strides[3], p.sel_ch = in.sel_strides[4];
  p.so_b = in.so_b, p.so_s = in.so_s, p.lse_b = in.lse_b, p.lse_h = in.lse_h;
  p.q_stride = in.q_stride, p.kv_stride = in.kv_stride, p.packed = in.packed;
  p.n_heads = in.n_heads, p.grid_t = in.T / in.TT, p.grid_h = in.H / in.TH, p.grid_w = in.W / in.TW;
  p.TT = in.TT, p.TH = in.TH, p.TW = in.TW, p.bpt = in.TT * in.TH * in.TW / 128;
  p.canvas_h = in.H, p.canvas_w = in.W, p.text_row = in.text_row, p.n_text = in.n_text, p.scale = in.scale;
  for (int a = 0; a < 3; ++a) p.clip_lo[a] = in.clip[a], p.clip_hi[a] = in.clip[3 + a];
  const int q_blocks = (in.packed ? in.n_q_tiles : p.grid_t * p.grid_h * p.grid_w) * p.bpt;
  const dim3 grid(q_blocks, in.B * in.n_heads);
  return bn == 192 ? launch<192>(p, grid, in.f16, in.resume, in.stream)
                   : launch<128>(p, grid, in.f16, in.resume, in.stream);
}
