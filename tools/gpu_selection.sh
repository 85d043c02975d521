#!/usr/bin/env bash
# One call on a GPU machine: window plus selected tiles (issue 16), bf16. One GPU (default):
# the selection GPU tests, then `sta-dist bench kernel` at HunyuanVideo 30x48x80 + 256 text
# (200 valid), tile (6,8,8), window (3,3,3) with TopK(8) shared and Mass(0.9), each timed with
# the selection included beside the window alone and FlexAttention with the same block mask
# built per call (mask build timed), every output checked on sampled rows. NGPU=2: the
# 2-GPU tile-mode row (TopK(8)) and head mode beside one GPU, outputs compared with one GPU's.
# JSON and logs in $OUT; the short table last.
#   bash tools/gpu_selection.sh          NGPU=2 bash tools/gpu_selection.sh
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
source tools/gpu_setup.sh
if [ "${NGPU:-1}" -ge 2 ]; then
  timeout 360 torchrun --standalone --nproc-per-node 2 -m sta_dist.cli bench dist --reps 5 --modes tile,head \
    --text-len 256 --text-valid 200 --select topk:8 --out "$OUT" 2>&1 | grep -v Warn | tee "$OUT/dist_selected.log" \
    | tail -n 8
else
  timeout 180 python3 -m pytest -q -x tests/test_selection_gpu.py 2>&1 | tail -n 8 | tee "$OUT/selection_gpu_tests.log"
  timeout 300 python3 -m sta_dist.cli bench kernel --cases hunyuan_topk8,hunyuan_mass09 --out "$OUT" 2>&1 \
    | grep -v -i warn | tee "$OUT/bench_selection.log" | tail -n 18
fi
python3 tools/selection_table.py "$OUT" | tee "$OUT/selection_table.md"
