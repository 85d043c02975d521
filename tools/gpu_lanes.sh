#!/usr/bin/env bash
# One call on a machine of 4 GPUs: the client and selection benchmarks side by side on
# disjoint GPUs (timings on one GPU do not depend on work on another): GPUs 0-1 the
# diffusers step (tools/gpu_diffusers.sh: 1 GPU, then 2), GPU 2 the FastVideo layer
# (tools/gpu_fastvideo.sh) then the GPU tests, GPU 3 the selected-tiles bench
# (tools/gpu_selection.sh). Installs once; every lane's logs and JSON in one tarball in $OUT.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
FINAL=${OUT:-out}
RES=$(mktemp -d)
OUT=$RES
source tools/gpu_setup.sh
export SKIP_INSTALL=1
(CUDA_VISIBLE_DEVICES=0,1 OUT=$RES/diffusers timeout 560 bash tools/gpu_diffusers.sh >"$RES/diffusers.log" 2>&1) &
(CUDA_VISIBLE_DEVICES=2 OUT=$RES/fastvideo timeout 300 bash tools/gpu_fastvideo.sh >"$RES/fastvideo.log" 2>&1
 CUDA_VISIBLE_DEVICES=2 timeout 240 python3 -m pytest -q -x tests/test_gpu.py tests/test_cuda_gpu.py \
   tests/test_gluon_gpu.py >"$RES/gpu_tests.log" 2>&1) &
(CUDA_VISIBLE_DEVICES=3 OUT=$RES/selection timeout 540 bash tools/gpu_selection.sh >"$RES/selection.log" 2>&1) &
wait
mkdir -p "$FINAL" && tar czf "$FINAL/lanes.tgz" -C "$RES" .
for lane in gpu_tests fastvideo selection diffusers; do echo "=== $lane"; tail -n 22 "$RES/$lane.log"; done
