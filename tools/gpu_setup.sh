# Sourced by the tools/gpu_*.sh scripts, from the repo root on the GPU machine: $OUT made,
# unbuffered output, the Triton cache inside the tree, the package installed from the
# working tree (the device has torch and triton; no network; SKIP_INSTALL=1 when a caller
# running several scripts side by side installed it once), and the card named.
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton-cache}
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
    || { cat "$OUT/install.log"; exit 1; }
  # Wheels carried in .whl/ (diffusers, FastVideo, what their imports need): only those whose
  # module the machine lacks, into a scratch folder, never over the machine's own packages.
  if ls .whl/*.whl >/dev/null 2>&1; then
    SITE=${SITE:-$(mktemp -d)}
    for wheel in .whl/*.whl; do
      module=$(basename "$wheel" | cut -d- -f1)
      python3 -c "import $module" 2>/dev/null && continue
      python3 -m pip install -q --no-deps --no-index --target "$SITE" "$wheel" >>"$OUT/install.log" 2>&1 \
        && echo "installed $module" || echo "could not install $wheel"
    done
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
