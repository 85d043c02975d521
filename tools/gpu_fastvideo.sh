#!/usr/bin/env bash
# One call on the GPU machine (no network): the wheels carried in .whl/ that the machine
# lacks (FastVideo 0.1.7, fastvideo-kernel 0.2.2, and what FastVideo's imports need),
# installed into a scratch folder with --no-deps, then tools/fastvideo_bench.py.
# Usage (repo root, .whl carried): bash tools/gpu_fastvideo.sh [bench args...]
set -uo pipefail
source tools/gpu_setup.sh
SITE=$(mktemp -d)
for wheel in .whl/*.whl; do
  dist=$(basename "$wheel" | cut -d- -f1)             # e.g. fastvideo_kernel, remote_pdb
  module=$dist
  python3 -c "import $module" 2>/dev/null && { echo "have $module"; continue; }
  python3 -m pip install -q --no-deps --no-index --target "$SITE" "$wheel" && echo "installed $dist" \
    || echo "could not install $wheel"
done 2>&1 | tee "$OUT/wheels.log"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
timeout 280 python3 tools/fastvideo_bench.py "$OUT" "$@" 2>&1 | tee "$OUT/fastvideo_bench.log"
