#!/usr/bin/env bash
# One call on a 2-GPU machine: one denoising step of full-size random-weight HunyuanVideo
# and Wan 2.1 14B in diffusers (bf16), stock vs sta_dist, on one GPU and then on two
# (tools/diffusers_step_bench.py). diffusers comes from the wheelhouse carried in .whl/
# (the device has no package index). Outputs in $OUT.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
source tools/gpu_setup.sh
python3 -c "import diffusers; print('diffusers', diffusers.__version__)"
ARGS=${BENCH_ARGS:-}
timeout 330 python3 tools/diffusers_step_bench.py --out "$OUT" $ARGS 2>&1 | grep -v Warn | tee "$OUT/step_1gpu.log" | tail -n 12
timeout 330 torchrun --standalone --nproc-per-node ${NGPU:-2} tools/diffusers_step_bench.py --out "$OUT" $ARGS 2>&1 \
  | grep -v Warn | tee "$OUT/step_2gpu.log" | tail -n 16
rm -f "$OUT"/*_1gpu.pt  # the saved one-GPU outputs (compared already)
