#!/usr/bin/env bash
# One GPU, one call: this tree against an older commit's, side by side in one session.
#   git archive OLD | (mkdir -p .ab/old && tar -x -C .ab/old)   # here, once; carry .ab
#   bash tools/noregress.sh                                      # on the GPU machine
# Steps (each with its own time limit): install this tree; the GPU tests (TESTS, default the
# kernels' and the backward's); the kernel bench (CASES) of the old tree, then of this one;
# the 1-GPU main job (RUN_ARGS) of each; the backward bench (sta-dist bench kernel --backward).
# STEPS (default "tests kernel run backward") picks some of them, e.g. to split the work over
# two calls of a warm machine. Outputs in $OUT (out/ when unset); the last lines
# print the two trees' tables.
set -uo pipefail
OUT=${OUT:-out}
OLD=${OLD:-.ab/old}
CASES=${CASES:-hunyuan_333,hunyuan_333_text,wan_335}
RUN_ARGS=${RUN_ARGS:---config hunyuan_720p --start-step 13 --steps 4}
TESTS=${TESTS:-tests/test_gpu.py tests/test_hopper_gpu.py tests/test_backward.py}
STEPS=${STEPS:-tests kernel run backward}
step() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton-cache}
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
  || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"

if step tests; then
  # shellcheck disable=SC2086
  timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -q $TESTS 2>&1 | tail -n 12 | tee "$OUT/gpu_tests.log"
fi

# the old tree first (its own copy of sta_dist on PYTHONPATH), then this one
# ORDER (default "old new new old"): the trees' kernel benches in turn, so that a GPU warmed by
# the first process falls on both alike; each tree's log gathers its runs.
step kernel && for tree in ${ORDER:-old new new old}; do
  path=$([ $tree = old ] && echo "$(realpath "$OLD")" || echo "")
  PYTHONPATH="$path" timeout ${BENCH_TIMEOUT:-240} python3 -m sta_dist.cli bench kernel --cases "$CASES" \
    --out "$OUT/kernel_$tree" >>"$OUT/kernel_$tree.log" 2>&1
  echo "kernel bench ($tree tree): rc $?"
done
step run && for tree in old new; do
  path=$([ $tree = old ] && echo "$(realpath "$OLD")" || echo "")
  # shellcheck disable=SC2086
  PYTHONPATH="$path" timeout ${RUN_TIMEOUT:-150} torchrun --standalone --nproc-per-node 1 -m sta_dist.cli run \
    $RUN_ARGS --summary "$OUT/run_$tree.json" >"$OUT/run_$tree.log" 2>&1
  echo "sta-dist run ($tree tree): rc $?"
done
if step backward; then
  timeout ${BACKWARD_TIMEOUT:-300} python3 -m sta_dist.cli bench kernel --backward --step-timeout 150 2>&1 \
    | tee "$OUT/backward_bench.log" | grep -v "^  (" | tail -n 16
fi
for tree in old new; do
  echo "== $tree tree =="
  [ -f "$OUT/kernel_$tree.log" ] && grep -E "^\| [a-z]" "$OUT/kernel_$tree.log" | grep -v "^| case"
  [ -f "$OUT/run_$tree.log" ] && tail -n 4 "$OUT/run_$tree.log"
done
