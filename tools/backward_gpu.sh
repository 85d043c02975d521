#!/usr/bin/env bash
# One GPU call for the backward (issue 30): install this tree, build the Hopper backward,
# its GPU tests, then `sta-dist bench kernel --backward` (check, then forward+backward beside
# FlexAttention-STA and dense SDPA); each step with its own time limit. STEPS picks some
# of "tests bench configs" (default: all); outputs in $OUT (out/ when unset).
set -uo pipefail
OUT=${OUT:-out}
STEPS=${STEPS:-tests bench configs}
step() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
mkdir -p "$OUT"
export STA_DIST_CUDA_BACKWARD=${STA_DIST_CUDA_BACKWARD:-1} PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton-cache}
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
  || { tail -n 5 "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 120 python3 -c "from sta_dist.kernels import sta_bwd_cuda as m; print('bwd library:', m.library(), m.build_error())" \
  2>&1 | tail -n 20
if step tests; then
  timeout ${TESTS_TIMEOUT:-240} python3 -m pytest -q -x ${TESTS:-tests/test_backward_gpu.py} 2>&1 | tail -n 25 \
    | tee "$OUT/backward_gpu_tests.log"
fi
if step bench; then
  timeout ${BENCH_TIMEOUT:-330} python3 -m sta_dist.cli bench kernel --backward --step-timeout 150 --reps-ms 150 2>&1 \
    | tee "$OUT/backward_bench.log" | tail -n 30
fi
if step configs; then
  timeout ${CONFIGS_TIMEOUT:-200} python3 tools/bwd_configs.py --budget-s 150 --reps-ms 100 2>&1 \
    | tee "$OUT/bwd_configs.log" | tail -n 14
fi
