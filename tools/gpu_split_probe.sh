set -uo pipefail
source tools/gpu_setup.sh
b() { timeout 120 python3 tools/gluon_bench.py "$@" 2>>"$OUT/err.log" | tail -n 1 | tee -a "$OUT/split.jsonl"; }
b --impl triton
b --impl gluon --check
b --impl split --check
b --impl split --set PINGPONG=0 --check
b --impl gluon --check
b --impl split --check
tail -5 "$OUT/err.log"
