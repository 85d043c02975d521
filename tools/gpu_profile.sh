#!/usr/bin/env bash
# One GPU call: Nsight Compute on one launch of the Triton and of the Gluon kernel at the
# Hunyuan (3,3,3) shape (tools/gluon_bench.py --no-time), clocks left free: headline
# metrics, then for the Gluon kernel the stall reasons and the per-instruction stall
# samples of its SASS (CSV). Reports in $OUT.
set -uo pipefail
source tools/gpu_setup.sh
NCU="ncu --clock-control none --launch-count 1 -k regex:sta"
for impl in triton gluon; do
  timeout 150 $NCU --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \
    --section SourceCounters --import-source no -o "$OUT/$impl" python3 tools/gluon_bench.py --impl $impl --no-time \
    >"$OUT/ncu_log_$impl.txt" 2>&1
  echo "ncu $impl rc=$? (124 = timeout 150 s)"
  ncu -i "$OUT/$impl.ncu-rep" --page details --print-details all >"$OUT/ncu_$impl.txt" 2>&1
  grep -E "Duration|SM Busy|Issue Slots Busy|Warp Cycles Per Issued|Stall" "$OUT/ncu_$impl.txt" | head -30
done
ncu -i "$OUT/gluon.ncu-rep" --page source --print-source sass --csv >"$OUT/gluon_sass.csv" 2>&1
rm -f "$OUT"/*.ncu-rep
wc -c "$OUT/gluon_sass.csv"
