#!/usr/bin/env bash
# One call on a 2-GPU machine: the distributed bench (every mode vs one GPU and the Ulysses
# + FlexAttention-STA anchor, HunyuanVideo shape, bf16), the same with 256 text tokens, and
# the main job under torchrun at real shapes. Outputs in $OUT.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
source tools/gpu_setup.sh
nvidia-smi topo -m | head -n 4
NG=${NGPU:-2}
torchrun --standalone --nproc-per-node $NG -m sta_dist.cli bench dist --reps 10 --out "$OUT" 2>&1 | grep -v Warn | tee "$OUT/dist.log" | tail -n 12
mv "$OUT/dist_bench_$NG.json" "$OUT/dist_bench_${NG}_notext.json"
torchrun --standalone --nproc-per-node $NG -m sta_dist.cli bench dist --reps 5 --text-len 256 --text-valid 200 --out "$OUT" 2>&1 | grep -v Warn | tee "$OUT/dist_text.log" | tail -n 8
NGPU=$NG CONFIG=hunyuan_720p bash launch/torchrun.sh --start-step 20 --steps 1 --layers 6 2>&1 | grep -v Warn | tail -n 8
