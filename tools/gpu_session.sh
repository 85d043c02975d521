#!/usr/bin/env bash
# One call on the GPU machine: install, GPU tests, then the kernel benchmark (check + time
# + table). Outputs land in $OUT (or out/ when run elsewhere). Usage:
#   bash tools/gpu_session.sh [bench args...]      e.g. --cases hunyuan_333,hunyuan_full
set -uo pipefail
source tools/gpu_setup.sh
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 500 python3 -m pytest -q -x tests/test_gpu.py tests/test_cuda_gpu.py tests/test_gluon_gpu.py 2>&1 | tail -n 15 | tee "$OUT/gpu_tests.log"
fi
python3 -m sta_dist.cli bench kernel --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
# First call at a new shape (compile, no autotuning) with empty and then warm on-disk
# caches (Triton's, and sta_dist's for the CUDA kernel's nvcc build), each in a new
# process: tile 5x8x8 takes the Triton kernel (5 t-slices do not make 128-row blocks),
# tile 4x8x8 the CUDA kernel on Hopper.
for tt in 5 4; do
  for cache in fresh warm; do
    TRITON_CACHE_DIR=/tmp/tc_$tt STA_DIST_CACHE=/tmp/sc_$tt python3 -c "
import time, torch, sta_dist
q = torch.randn(1, 20*40*64 + 50, 24, 128, device='cuda', dtype=torch.bfloat16)
t = time.perf_counter()
sta_dist.sliding_tile_attention(q, q, q, canvas=(20, 40, 64), tile=($tt, 8, 8), window=(3, 3, 3), text_length=50)
torch.cuda.synchronize()
print('tile ${tt}x8x8, $cache cache: first call at a new shape %.1f s' % (time.perf_counter() - t))" 2>&1 | tail -n 1
  done
done | tee "$OUT/first_call.log"
