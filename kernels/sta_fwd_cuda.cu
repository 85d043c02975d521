// Sliding tile attention forward for Hopper (sm_90a), hand-written CUDA in FA3's
// structure: the one Hopper kernel of the route (sta_dist/route.py, rule ``cuda_rule``).
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
#include <cuda.h>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define DEV __device__ __forceinline__

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

// --- PTX wrappers ------------------------------------------------------------------------
DEV uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
DEV void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count));
}
DEV void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
DEV void mbar_arrive(uint32_t bar) { asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory"); }
// The consumers' wait: try_wait's own short timeout, then again (their waits are short).
DEV void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\nWAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// The loaders' wait for a ring slot (most of a trip): with a suspend-time hint (10 ms, an
// upper bound) the thread sleeps until the phase completes instead of re-trying every few
// dozen cycles in the issue slots of the consumer warps beside it (even to +1% on an H200).
DEV void mbar_sleep(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\nWAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1, %2;\n"
      "@!p bra WAIT_%=;\n}\n" ::"r"(bar),
      "r"(parity), "r"(10000000)
      : "memory");
}
DEV void st_shared(uint32_t addr, uint32_t x) { asm volatile("st.shared.u32 [%0], %1;" ::"r"(addr), "r"(x) : "memory"); }
DEV uint32_t ld_shared(uint32_t addr) {
  uint32_t x;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(x) : "r"(addr) : "memory");
  return x;
}
DEV void tma_load5(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1, int c2, int c3, int c4) {
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5, %6}], "
      "[%7];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4), "r"(bar)
      : "memory");
}
DEV void tma_load3(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}
DEV void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
DEV void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
DEV void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
template <int N>
DEV void fence_f(float (&x)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(x[i])::"memory");
}
template <int N>
DEV void fence_r(uint32_t (&x)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(x[i])::"memory");
}
DEV void bar_sync(int id) { asm volatile("bar.sync %0, 256;" ::"r"(id) : "memory"); }
DEV void bar_arrive(int id) { asm volatile("bar.arrive %0, 256;" ::"r"(id) : "memory"); }
DEV float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
// Two fp32 values as one register of two 16-bit values (lo in the low half).
template <bool F16>
DEV uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (F16)
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  else
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
// wgmma m64nNk16 (N = 128 or 192), fp32 accumulators d (row r0 = 16*warp + lane/4: index % 4 < 2; row
// r0 + 8: the rest; column 8*(index/4) + 2*(lane%4) + index%2). Descriptors are 64-bit: the
// low word (shared address >> 4) | (LBO >> 4) << 16, the high word DESC_HI, joined once per
// product (``Consumer::desc``) and stepped by adding to the whole value (no carry leaves the
// 14-bit address field: shared memory is below 2^18 bytes); joining them per instruction
// cost three uniform moves each.
#define ACC64 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}"
#define D64(d) "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define ACC96 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95}"
#define D96(d) "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95])
#define WGMMA_SS(T, N, ACC, A, B, SD)                                         \
  "{\n.reg .pred p;\nsetp.ne.b32 p, %" SD ", 0;\n"                            \
  "wgmma.mma_async.sync.aligned.m64n" N "k16.f32." T "." T " " ACC ", %" A ", %" B ", p, 1, 1, 0, 0;\n}\n"
#define WGMMA_RS(T)                                      \
  "wgmma.mma_async.sync.aligned.m64n128k16.f32." T "." T " " ACC64 ", {%64, %65, %66, %67}, %68, 1, 1, 1, 1;\n"

// S = Q K^T for a key block of 128 or 192 rows (64 or 96 accumulators).
template <bool F16, int NA>
DEV void wgmma_ss(float (&d)[NA], uint64_t a, uint64_t b, int scale_d) {
  static_assert(NA == 64 || NA == 96);
  if constexpr (NA == 64 && F16)
    asm volatile(WGMMA_SS("f16", "128", ACC64, "64", "65", "66") : D64(d) : "l"(a), "l"(b), "r"(scale_d));
  else if constexpr (NA == 64)
    asm volatile(WGMMA_SS("bf16", "128", ACC64, "64", "65", "66") : D64(d) : "l"(a), "l"(b), "r"(scale_d));
  else if constexpr (F16)
    asm volatile(WGMMA_SS("f16", "192", ACC96, "96", "97", "98") : D96(d) : "l"(a), "l"(b), "r"(scale_d));
  else
    asm volatile(WGMMA_SS("bf16", "192", ACC96, "96", "97", "98") : D96(d) : "l"(a), "l"(b), "r"(scale_d));
}
// A from registers (four per 16-column step, the accumulator layout packed in pairs),
// B (V) transposed: N = head dim contiguous.
template <bool F16, int NP>
DEV void wgmma_rs(float (&d)[64], const uint32_t (&a)[NP], int kk, uint64_t b) {
  if constexpr (F16)
    asm volatile(WGMMA_RS("f16") : D64(d)
                 : "r"(a[4 * kk]), "r"(a[4 * kk + 1]), "r"(a[4 * kk + 2]), "r"(a[4 * kk + 3]), "l"(b));
  else
    asm volatile(WGMMA_RS("bf16") : D64(d)
                 : "r"(a[4 * kk]), "r"(a[4 * kk + 1]), "r"(a[4 * kk + 2]), "r"(a[4 * kk + 3]), "l"(b));
}

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

// --- host ----------------------------------------------------------------------------------
using EncodeFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                              const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                              CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeFn encode_fn() {
  static EncodeFn fn = nullptr;
  if (!fn) {
    cudaDriverEntryPointQueryResult status;
    void* ptr = nullptr;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &status) ==
            cudaSuccess &&
        status == cudaDriverEntryPointSuccess)
      fn = reinterpret_cast<EncodeFn>(ptr);
  }
  return fn;
}

int encode(CUtensorMap* map, void* ptr, bool f16, cuuint32_t rank, const cuuint64_t* dims, const cuuint64_t* strides,
           const cuuint32_t* box) {
  EncodeFn fn = encode_fn();
  if (!fn) return 1;
  const cuuint32_t ones[5] = {1, 1, 1, 1, 1};
  CUresult r = fn(map, f16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, rank, ptr, dims,
                  strides, box, ones, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                  CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? 0 : 100 + static_cast<int>(r);
}

// The 5-D view [B, T, H, W, heads*128] of a natural-order canvas, box [1, slices, TH, TW, 64].
int video_map(CUtensorMap* map, void* ptr, bool f16, int B, int T, int H, int W, int heads, long long s_b,
              long long s_s, int slices, int TH, int TW) {
  const cuuint64_t dims[5] = {static_cast<cuuint64_t>(heads) * 128, static_cast<cuuint64_t>(W),
                              static_cast<cuuint64_t>(H), static_cast<cuuint64_t>(T), static_cast<cuuint64_t>(B)};
  const cuuint64_t strides[4] = {static_cast<cuuint64_t>(s_s) * 2, static_cast<cuuint64_t>(W * s_s) * 2,
                                 static_cast<cuuint64_t>(H * W * s_s) * 2, static_cast<cuuint64_t>(s_b) * 2};
  const cuuint32_t box[5] = {64, static_cast<cuuint32_t>(TW), static_cast<cuuint32_t>(TH),
                             static_cast<cuuint32_t>(slices), 1};
  return encode(map, ptr, f16, 5, dims, strides, box);
}

// The 3-D view [B, S, heads*128] (packed tiles, text rows), box [1, box_rows, 64].
int rows_map(CUtensorMap* map, void* ptr, bool f16, int B, long long S, int heads, long long s_b, long long s_s,
             int box_rows) {
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(heads) * 128, static_cast<cuuint64_t>(S),
                              static_cast<cuuint64_t>(B)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(s_s) * 2, static_cast<cuuint64_t>(s_b) * 2};
  const cuuint32_t box[3] = {64, static_cast<cuuint32_t>(box_rows), 1};
  return encode(map, ptr, f16, 3, dims, strides, box);
}

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

// Launch on ``stream``. Strides in elements. ``q_tiles``/``kv_tiles``: the packed order's
// tables (``n_q_tiles`` query tiles; ignored in natural order); ``lse``: nullptr or [B,
// q heads, S] float32 with strides (lse_b, lse_h, 1); ``sel_keys``: nullptr (windows) or
// the key tables, with ``sel_counts`` and their strides (``sel_strides``: keys b, h, query
// tile, counts b, h); ``k_halo``/``v_halo``: nullptr, or (packed) the halo's rows (the
// kv_tiles entries ~r read row r of them), ``halo_rows`` of them, strides (sh_b, sh_s).
// Returns 0, or 1 (no tensor-map encoder), 100 + CUresult (a tensor map), 1000 +
// cudaError_t (the launch).
extern "C" int sta_fwd_cuda(void* q, void* k, void* v, void* out, float* lse, const int* heads, int n_heads,
                            const int* q_tiles, int q_stride, int n_q_tiles, const int* kv_tiles, int kv_stride,
                            int packed, int f16, int B, int T, int H, int W, int TT, int TH, int TW, int q_heads,
                            int kv_heads, long long s_q, long long s_kv, long long sq_b, long long sq_s,
                            long long sk_b, long long sk_s, long long sv_b, long long sv_s, long long so_b,
                            long long so_s, long long lse_b, long long lse_h, const int* sel_keys,
                            const int* sel_counts, const long long* sel_strides, int text_row, int n_text,
                            void* k_halo, void* v_halo, long long halo_rows, long long sh_b,
                            long long sh_s, const int* clip, int resume, float scale, void* stream) {
  Params p;
  int e;
  const int slices = 128 / (TH * TW);
  const int bn = (TT * TH * TW) % 192 == 0 ? 192 : 128;  // key block rows: 192 where whole tiles hold whole blocks
  if (packed) {
    (e = rows_map(&p.q, q, f16, B, s_q, q_heads, sq_b, sq_s, 64)) ||
        (k_halo && ((e = rows_map(&p.k, k_halo, f16, B, halo_rows, kv_heads, sh_b, sh_s, bn)) ||
                    (e = rows_map(&p.v, v_halo, f16, B, halo_rows, kv_heads, sh_b, sh_s, bn))));
  } else {
    (e = video_map(&p.q, q, f16, B, T, H, W, q_heads, sq_b, sq_s, slices / 2, TH, TW)) ||
        (e = video_map(&p.k, k, f16, B, T, H, W, kv_heads, sk_b, sk_s, bn / (TH * TW), TH, TW)) ||
        (e = video_map(&p.v, v, f16, B, T, H, W, kv_heads, sv_b, sv_s, bn / (TH * TW), TH, TW));
  }
  if (e || (e = rows_map(&p.kt, k, f16, B, s_kv, kv_heads, sk_b, sk_s, bn)) ||
      (e = rows_map(&p.vt, v, f16, B, s_kv, kv_heads, sv_b, sv_s, bn)))
    return e;
  p.out = static_cast<uint16_t*>(out);
  p.lse = lse;
  p.heads = heads, p.q_tiles = q_tiles, p.kv_tiles = kv_tiles, p.sel_keys = sel_keys, p.sel_counts = sel_counts;
  p.sel_kb = sel_strides[0], p.sel_kh = sel_strides[1], p.sel_kq = sel_strides[2];
  p.sel_cb = sel_strides[3], p.sel_ch = sel_strides[4];
  p.so_b = so_b, p.so_s = so_s, p.lse_b = lse_b, p.lse_h = lse_h;
  p.q_stride = q_stride, p.kv_stride = kv_stride, p.packed = packed;
  p.n_heads = n_heads, p.grid_t = T / TT, p.grid_h = H / TH, p.grid_w = W / TW;
  p.TT = TT, p.TH = TH, p.TW = TW, p.bpt = TT * TH * TW / 128;
  p.canvas_h = H, p.canvas_w = W, p.text_row = text_row, p.n_text = n_text, p.scale = scale;
  for (int a = 0; a < 3; ++a) p.clip_lo[a] = clip[a], p.clip_hi[a] = clip[3 + a];
  const int q_blocks = (packed ? n_q_tiles : p.grid_t * p.grid_h * p.grid_w) * p.bpt;
  const dim3 grid(q_blocks, B * n_heads);
  return bn == 192 ? launch<192>(p, grid, f16, resume, stream) : launch<128>(p, grid, f16, resume, stream);
}
