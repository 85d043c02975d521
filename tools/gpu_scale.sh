#!/usr/bin/env bash
# One call on a machine of P GPUs (P = all visible): the scaling of the layer and of the real
# HunyuanVideo strategy from one GPU to P (and to 2 on the way), every output checked
# against one GPU's, the cost model's prediction beside each measured layer, and the cost
# of the per-call agreement check (each mode timed with and without it). Outputs in $OUT.
#   bash tools/gpu_scale.sh                    (CLIENTS=1 also runs tools/gpu_clients.sh's steps)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
source tools/gpu_setup.sh
P=${NGPU:-$(nvidia-smi -L | wc -l)}
nvidia-smi topo -m | head -n $((P + 1))
SIZES=$(python3 -c "print(' '.join(str(n) for n in sorted({1, 2, $P}) if n <= $P))")
for n in $SIZES; do
  [ "$n" = 1 ] && continue
  # the (3,3,3) layer: every mode beside one GPU and the Ulysses + FlexAttention-STA anchor
  timeout 300 torchrun --standalone --nproc-per-node "$n" -m sta_dist.cli bench dist --reps 10 \
    --modes head,tile,hybrid,auto --out "$OUT" 2>&1 | grep -v Warn | tee "$OUT/dist_$n.log" | tail -n 9
done
# The real strategy (steps 0-14 whole canvas, 15-49 sparse): step 14 (whole), 15 (first sparse
# step of the process: its compiles) and 16 (sparse, warm), on 1 GPU and on each size.
for n in $SIZES; do
  timeout 420 torchrun --standalone --nproc-per-node "$n" -m sta_dist.cli run --config hunyuan_720p \
    --start-step 14 --steps 3 --summary "$OUT/run_$n.json" 2>&1 | grep -v Warn | tail -n 5
done
python3 tools/scale_table.py "$OUT" $SIZES | tee "$OUT/scale_table.md"
