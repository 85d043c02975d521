#!/usr/bin/env bash
# One call on the GPU machine: install, GPU tests, then the kernel benchmark (check + time
# + table). Outputs land in $OUT (or out/ when run elsewhere). Usage:
#   bash tools/gpu_session.sh [bench args...]      e.g. --cases hunyuan_333,hunyuan_full
set -uo pipefail
source tools/gpu_setup.sh
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -q -x tests/test_gpu.py 2>&1 | tail -n 15 | tee "$OUT/gpu_tests.log"
fi
python3 -m sta_dist.cli bench kernel --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
