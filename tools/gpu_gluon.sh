#!/usr/bin/env bash
# One GPU call for the Gluon kernel (kernels/sta_fwd_gluon.py), Hopper only: install, the
# Hunyuan timing of the Gluon kernel's default and of the switch sets given as arguments
# (such as V_STAGES=3) against the Triton kernel, each in its own
# process under `timeout 90` (a deadlocked config costs 90 s, not the call),
# then its GPU tests (each test has a 120 s pytest limit; the whole run 270 s).
# Outputs in $OUT.
set -uo pipefail
source tools/gpu_setup.sh
: >"$OUT/bench_gluon.jsonl"
run() {
  local label=$1; shift
  local line
  line=$(timeout 90 python3 tools/gluon_bench.py "$@" 2>"$OUT/bench_err_${label}.log" | tail -n 1)
  local rc=$?
  [ -n "$line" ] && echo "$line" >>"$OUT/bench_gluon.jsonl" || echo "{\"impl\": \"$label\", \"error\": \"rc=$rc (124 = timeout 90 s)\"}" >>"$OUT/bench_gluon.jsonl"
}
run triton --impl triton
run base --impl gluon --check
variants=("$@")  # e.g. V_STAGES=3 (v13's switch sets TREE, EARLY_S, POLY are in git history: 7fbe99c)
for v in "${variants[@]+"${variants[@]}"}"; do run "${v//[=,]/_}" --impl gluon --set "$v" --check; done
python3 - "$OUT/bench_gluon.jsonl" <<'PY'
import json, sys
print("| impl | ms | TFLOP/s | max diff vs triton |")
print("|---|---|---|---|")
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"| {r['impl']} | {r.get('ms', r.get('error'))} | {r.get('tflops', '')} | {r.get('max_diff_vs_triton', '')} |")
PY
timeout 270 python3 -m pytest -q -x -p no:cacheprovider tests/test_gluon_gpu.py 2>&1 | tee "$OUT/test_gluon.log" | tail -n 25
echo "pytest exit: ${PIPESTATUS[0]} (124 = the 270 s limit)"
