/* The host interface of the Hopper backward kernels (sta_bwd_cuda.cu): one plain C struct,
 * filled by the caller (sta_bwd_cuda.py's ctypes.Structure of the same name, checked
 * against this definition by tests/test_cuda_build.py) and passed by pointer to
 * sta_bwd_cuda_launch. One declaration a line; pointers are device pointers, strides in
 * elements. Tables as kernels/sta_bwd.py documents them (packed order only). */
#ifndef STA_BWD_CUDA_ARGS_H
#define STA_BWD_CUDA_ARGS_H

#ifdef __cplusplus
extern "C" {
#endif

typedef struct StaBwdArgs {
  void* q;                    /* [B, s_q, q_heads, 128], strides (sq_b, sq_s, 128, 1) */
  void* k;                    /* [B, s_kv, kv_heads, 128], strides (sk_b, sk_s, 128, 1) */
  void* v;                    /* as k, strides (sv_b, sv_s, 128, 1) */
  void* dout;                 /* q's shape, strides (sdo_b, sdo_s, 128, 1) */
  void* dq;                   /* q's shape, strides (sdq_b, sdq_s, 128, 1): written where a program covers */
  void* dk;                   /* k's shape, strides (sdk_b, sdk_s, 128, 1) */
  void* dv;                   /* k's shape, strides (sdk_b, sdk_s, 128, 1) */
  const float* lse2;          /* [B, q_heads, s_pad]: log2-unit log-sum-exp, +inf where a row counts nothing */
  const float* delta;         /* [B, q_heads, s_pad]: rowsum(dout * out) - dlse */
  long long s_pad;            /* lse2's and delta's row count (s_q padded), a multiple of 4 */
  const int* heads;           /* [n_heads, 5]: (kt, kh, kw, kv_head, q_head), every query head */
  int n_heads;
  const int* q_tiles;         /* [n_q_tiles, 4]: (global id, first row, stride_t, stride_h) */
  int n_q_tiles;
  const int* q_slot;          /* [n_tiles]: each global tile's index in q_tiles, -1: none */
  const int* kv_tiles;        /* [n_tiles, 3]: first k/v row of each global tile */
  const int* kv_list;         /* [n_kv, 4]: (global id, first row, stride_t, stride_h) per k/v tile present */
  int n_kv;
  const int* groups;          /* [kv_heads, g_stride]: how many query heads read the kv head, their head rows */
  int g_stride;
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
  long long s_q;
  long long s_kv;
  long long sq_b;
  long long sq_s;
  long long sk_b;
  long long sk_s;
  long long sv_b;
  long long sv_s;
  long long sdo_b;
  long long sdo_s;
  long long sdq_b;
  long long sdq_s;
  long long sdk_b;
  long long sdk_s;
  int q_video;                /* the first text row of q */
  int q_text_valid;           /* text query rows that count */
  int kv_video;               /* the first text row of k/v */
  int kv_text_for_video;      /* text key rows the video queries attend */
  int kv_text_for_text;       /* text key rows the text queries attend */
  int text_q_video_keys;      /* the text queries attend the video key rows below this */
  const int* sel_keys;        /* NULL (windows), or the key tables (dq) */
  const int* sel_counts;
  long long sel_strides[5];   /* keys b, h, query tile; counts b, h (0: one list for every sample or head) */
  const int* t_keys;          /* NULL, or the tables turned round (dk/dv): per key tile its query tiles */
  const int* t_counts;
  long long t_strides[5];
  int clip[6];                /* lo[3], hi[3]: windows cut to the key tiles [lo, hi) per axis */
  float scale;                /* softmax scale * log2(e) */
  float sm_scale;             /* softmax scale */
  void* stream;               /* the cudaStream_t to launch on */
} StaBwdArgs;

/* Launch the dq kernel, then the dk/dv kernel, on a->stream. Returns 0, or 1 (no tensor-map
 * encoder), 100 + CUresult (a tensor map), 1000 + cudaError_t (a launch). */
int sta_bwd_cuda_launch(const StaBwdArgs* a);
/* sizeof(StaBwdArgs) as built: the loader checks it against its own. */
int sta_bwd_cuda_args_size(void);

#ifdef __cplusplus
}
#endif

#endif
