/* The host interface of the Hopper forward kernel (sta_fwd_cuda.cu): one plain C struct,
 * filled by the caller (sta_fwd_cuda.py's ctypes.Structure of the same name, checked
 * against this definition by tests/test_cuda_build.py) and passed by pointer to
 * sta_fwd_cuda_launch, which copies what the kernel's Params need. One declaration a
 * line; pointers are device pointers, strides in elements. */
#ifndef STA_FWD_CUDA_ARGS_H
#define STA_FWD_CUDA_ARGS_H

#ifdef __cplusplus
extern "C" {
#endif

typedef struct StaFwdArgs {
  void* q;                    /* [B, s_q, q_heads, 128], strides (sq_b, sq_s, 128, 1) */
  void* k;                    /* [B, s_kv, kv_heads, 128], strides (sk_b, sk_s, 128, 1) */
  void* v;                    /* as k, strides (sv_b, sv_s, 128, 1) */
  void* out;                  /* q's shape and dtype, strides (so_b, so_s, 128, 1) */
  float* lse;                 /* NULL, or [B, q heads, S] float32, strides (lse_b, lse_h, 1) */
  const int* heads;           /* [n_heads, 5]: (kt, kh, kw, kv_head, q_head) */
  int n_heads;
  const int* q_tiles;         /* packed: [n_q_tiles, >= 2] rows q_stride apart; ignored in natural order */
  int q_stride;
  int n_q_tiles;
  const int* kv_tiles;        /* packed: per global tile its first k/v row (~r: row r of the halo) */
  int kv_stride;
  int packed;                 /* 1: packed order (the tables), 0: natural */
  int f16;                    /* 1: fp16, 0: bf16 */
  int B;
  int T;                      /* the canvas */
  int H;
  int W;
  int TT;                     /* the tile */
  int TH;
  int TW;
  int q_heads;
  int kv_heads;
  long long s_q;              /* rows of q */
  long long s_kv;             /* rows of k and v (the fewer) */
  long long sq_b;
  long long sq_s;
  long long sk_b;
  long long sk_s;
  long long sv_b;
  long long sv_s;
  long long so_b;
  long long so_s;
  long long lse_b;
  long long lse_h;
  const int* sel_keys;        /* NULL (windows), or the key tables */
  const int* sel_counts;
  long long sel_strides[5];   /* keys b, h, query tile; counts b, h (0: one list for every sample or head) */
  int text_row;               /* the first text row of k/v */
  int n_text;                 /* text key rows the video queries attend */
  void* k_halo;               /* NULL, or (packed) the halo's rows, read where kv_tiles holds ~r */
  void* v_halo;
  long long halo_rows;
  long long sh_b;             /* the halo's strides */
  long long sh_s;
  int clip[6];                /* lo[3], hi[3]: windows cut to the key tiles [lo, hi) per axis */
  int resume;                 /* 1: fold into what out and lse hold */
  float scale;                /* softmax scale * log2(e) */
  void* stream;               /* the cudaStream_t to launch on */
} StaFwdArgs;

/* Launch on a->stream. Returns 0, or 1 (no tensor-map encoder), 100 + CUresult (a tensor
 * map), 1000 + cudaError_t (the launch). */
int sta_fwd_cuda_launch(const StaFwdArgs* a);
/* sizeof(StaFwdArgs) as built: the loader checks it against its own. */
int sta_fwd_cuda_args_size(void);

#ifdef __cplusplus
}
#endif

#endif
