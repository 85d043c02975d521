// Host side of the Hopper kernels' bulk tensor copies: the tensor-map encoder (the driver's
// cuTensorMapEncodeTiled, found through the runtime, so no -lcuda) and the two views of a
// [B, S, heads, 128] bf16/fp16 tensor the copies read (the natural canvas as 5-D, rows as 3-D).
// Each returns 0, 1 (no encoder) or 100 + CUresult.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

namespace {  // internal linkage, as the one .cu file had it

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

}  // namespace
