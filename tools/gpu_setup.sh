# Sourced by the tools/gpu_*.sh scripts, from the repo root on the GPU machine: $OUT made,
# unbuffered output, the Triton cache inside the tree, the package installed from the
# working tree (the device has torch and triton; no network), and the card named.
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton-cache}
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
  || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
