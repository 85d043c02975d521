#!/usr/bin/env bash
# One call on the GPU machine (no network): the wheels carried in .whl/ that the machine
# lacks (FastVideo 0.1.7, fastvideo-kernel 0.2.2, and what FastVideo's imports need),
# installed by gpu_setup.sh into a scratch folder with --no-deps, then tools/fastvideo_bench.py.
# Usage (repo root, .whl carried): bash tools/gpu_fastvideo.sh [bench args...]
set -uo pipefail
source tools/gpu_setup.sh
timeout 280 python3 tools/fastvideo_bench.py "$OUT" "$@" 2>&1 | tee "$OUT/fastvideo_bench.log"
