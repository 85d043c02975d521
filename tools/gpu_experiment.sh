#!/usr/bin/env bash
# One GPU call for kernel work: install, real-shape GPU checks, the launch-config sweep,
# chosen bench cases, the distributed bench on one rank (code path). (First-call compile
# time: tools/gpu_session.sh.) Outputs in $OUT.
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
