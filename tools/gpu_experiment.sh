#!/usr/bin/env bash
# One GPU call for kernel work: install, real-shape GPU checks, the launch-config sweep,
# chosen bench cases, the distributed bench on one rank (code path), first-call compile
# time with an empty and a warm cache. Outputs in $OUT.
set -uo pipefail
source tools/gpu_setup.sh
python3 -m pytest -q -x tests/test_gpu.py -k "real_shapes" 2>&1 | tail -n 4
# One process per config with a time limit: a config that hangs costs 120 s, not the call.
n_configs=$(python3 -c "from sta_dist.bench import SWEEP_CONFIGS; print(len(SWEEP_CONFIGS))")
for i in $(seq 0 $((n_configs - 1))); do
  timeout 120 python3 -m sta_dist.cli bench kernel --sweep --config "$i" --cases ${SWEEP_CASES:-hunyuan_333} 2>&1 \
    | grep --line-buffered '^sweep' | tee -a "$OUT/sweep.log"
done
python3 -m sta_dist.cli bench kernel --out "$OUT" --cases ${CASES:-hunyuan_full} 2>&1 | grep -v Warn | tail -n 6
torchrun --standalone --nproc-per-node 1 -m sta_dist.cli bench dist --reps 3 --out "$OUT" 2>&1 | grep -v Warn | tail -n 8
for cache in fresh warm; do
  TRITON_CACHE_DIR=/tmp/tc python3 -c "
import time, torch, sta_dist
q = torch.randn(1, 20*40*64 + 64, 24, 128, device='cuda', dtype=torch.bfloat16)
t = time.perf_counter(); sta_dist.sliding_tile_attention(q, q, q, canvas=(20, 40, 64), tile=(5, 8, 8), window=(3, 3, 3), text_length=50); torch.cuda.synchronize()
print('$cache cache: first call at a new shape %.1f s' % (time.perf_counter() - t))"
done
