#!/usr/bin/env bash
# One call on the GPU machine, from the repo root: bash tools/gpu.sh JOB [args...]
# Every job first runs `setup` (the package installed from the working tree, carried wheels,
# the card named); outputs land in $OUT (out/ when unset). The jobs:
#   kernel [bench args]  GPU tests, `sta-dist bench kernel`, first-call compile time (1 GPU)
#   sweep                real-shape checks, the launch-config sweep, chosen cases, bench dist on one rank
#   dist                 bench dist (every mode, with and without text) and the main job (NGPU, default 2)
#   profile              Nsight Compute on one launch of the Triton and of the CUDA kernel (PROFILE_RUNS:
#                        kernel:case pairs of tools/hopper_bench.py, default "triton:natural cuda:natural")
#   scale                the layer and the real strategy on 1, 2 and P GPUs (P = NGPU or all visible)
#   overlap              head mode in chunks of heads vs one exchange (2 GPUs): the layer, the strategy
#   diffusers            one diffusers denoising step, stock vs sta_dist, on 1 GPU then NGPU (default 2)
#   fastvideo [args]     FastVideo 0.1.7's STA layer driving sta_dist beside its own kernel (1 GPU)
#   selection            window plus selected tiles on 1 GPU, then tools/profile_selection.py (NGPU=2: the
#                        2-GPU rows, PROFILE=1 then each call kernel by kernel; SKIP_TESTS=1: no tests)
#   lanes                on 4 GPUs, two 2-GPU lanes: diffusers; the layer in every mode, then selection
#   tables               GPU tests + 1-GPU selection; 2-GPU selection + strategy; 1-GPU strategy (LANES)
#   route                the route's GPU tests on two GPUs side by side, then the 2-GPU selection rows
#   hopper [kernels]     the CUDA kernel's GPU tests, then tools/hopper_bench.py (default cuda,triton); AB="DIR ...":
#                        twice, each time also each DIR's copy of sta_dist (e.g. an older commit's)
#   fa4                  FlashAttention-4 beside our kernel (tools/fa4_bench.py; wheels in .whl-fa4/a, .whl-fa4/b;
#                        FA4_CASES, FA4_ROWS: a subset; NCU=1: also Nsight Compute on one call of each row,
#                        and each kernel's hot loop region by region)
#   fba                  HunyuanVideo-1.5's flex-block-attn built from .fba/src, beside ours (tools/fba_bench.py)
#   halo                 the overlapped exchanges (halo beside the box's keys, head mode in place) on 2 GPUs:
#                        GPU tests, one GPU, the layer (default vs staged), PROFILE=1 its profile, the real
#                        strategy (STRATEGY=0: not; STRATEGY_MODES, default "auto tile"; AB=DIR: also DIR's copy
#                        of sta_dist, e.g. an older commit's; KERNEL_CASES: the one-GPU bench's cases)
set -uo pipefail
JOBS="kernel sweep dist profile scale overlap diffusers fastvideo selection lanes tables route hopper fa4 halo fba"

# $OUT made, unbuffered output, the Triton cache inside the tree, the package installed from
# the working tree (the device has torch and triton; no network; SKIP_INSTALL=1 when a caller
# running several jobs side by side installed it once), and the card named.
setup() {
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
}

# GPU tests, then the kernel benchmark (check + time + table), then the first call at a new
# shape. Arguments go to the bench, e.g. --cases hunyuan_333,hunyuan_full. SKIP_TESTS=1: no tests.
job_kernel() {
  setup
  if [ "${SKIP_TESTS:-0}" != 1 ]; then
    timeout 500 python3 -m pytest -q -x tests/test_gpu.py tests/test_hopper_gpu.py 2>&1 | tail -n 15 | tee "$OUT/gpu_tests.log"
  fi
  python3 -m sta_dist.cli bench kernel --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
  # First call at a new shape (compile, no autotuning) with empty and then warm on-disk
  # caches (Triton's, and sta_dist's for the CUDA kernel's nvcc build), each in a new
  # process: tile 5x8x8 takes the Triton kernel (5 t-slices do not make 128-row blocks),
  # tile 4x8x8 the CUDA kernel on Hopper.
  for tt in 5 4; do
    for cache in fresh warm; do
      TRITON_CACHE_DIR=/tmp/tc_$tt STA_DIST_CACHE=/tmp/sc_$tt python3 -c "
import time, torch, sta_dist
q = torch.randn(1, 20*40*64 + 50, 24, 128, device='cuda', dtype=torch.bfloat16)
t = time.perf_counter()
sta_dist.sliding_tile_attention(q, q, q, canvas=(20, 40, 64), tile=($tt, 8, 8), window=(3, 3, 3), text_length=50)
torch.cuda.synchronize()
print('tile ${tt}x8x8, $cache cache: first call at a new shape %.1f s' % (time.perf_counter() - t))" 2>&1 | tail -n 1
    done
  done | tee "$OUT/first_call.log"
}

# Kernel work: real-shape GPU checks, the launch-config sweep (SWEEP_CASES), chosen bench
# cases (CASES), the distributed bench on one rank (code path). First-call time: job kernel.
job_sweep() {
  setup
  python3 -m pytest -q -x tests/test_gpu.py -k "real_shapes" 2>&1 | tail -n 4
  # One process per config with a time limit: a config that hangs costs 120 s, not the call.
  local n_configs i
  n_configs=$(python3 -c "from sta_dist.bench.kernel import SWEEP_CONFIGS; print(len(SWEEP_CONFIGS))")
  for i in $(seq 0 $((n_configs - 1))); do
    timeout 120 python3 -m sta_dist.cli bench kernel --sweep --config "$i" --cases ${SWEEP_CASES:-hunyuan_333} 2>&1 \
      | grep --line-buffered '^sweep' | tee -a "$OUT/sweep.log"
  done
  python3 -m sta_dist.cli bench kernel --out "$OUT" --cases ${CASES:-hunyuan_full} 2>&1 | grep -v Warn | tail -n 6
  torchrun --standalone --nproc-per-node 1 -m sta_dist.cli bench dist --reps 3 --out "$OUT" 2>&1 | grep -v Warn | tail -n 8
}

# On NGPU GPUs (default 2): the distributed bench (every mode vs one GPU and the Ulysses +
# FlexAttention-STA anchor, HunyuanVideo shape, bf16), the same with 256 text tokens, and the
# main job under torchrun at real shapes.
job_dist() {
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
  setup
  nvidia-smi topo -m | head -n 4
  local NG=${NGPU:-2}
  torchrun --standalone --nproc-per-node $NG -m sta_dist.cli bench dist --reps 10 --out "$OUT" 2>&1 | grep -v Warn | tee "$OUT/dist.log" | tail -n 12
  mv "$OUT/dist_bench_$NG.json" "$OUT/dist_bench_${NG}_notext.json"
  torchrun --standalone --nproc-per-node $NG -m sta_dist.cli bench dist --reps 5 --text-len 256 --text-valid 200 --out "$OUT" 2>&1 | grep -v Warn | tee "$OUT/dist_text.log" | tail -n 8
  NGPU=$NG CONFIG=hunyuan_720p bash launch/torchrun.sh --start-step 20 --steps 1 --layers 6 2>&1 | grep -v Warn | tail -n 8
}

# The CUDA kernel: its GPU tests and the route's (each test limited to 120 s), then beside
# the other kernels on the runtime's local calls (natural, log-sum-exp, fp16, text, tiled, a
# tile-mode rank's box and halo). SOURCES=a.cu,b.cu: also the CUDA kernel built from each of
# those main sources, its headers from beside it, else from kernels/ (one file: `git show
# OLD:kernels/sta_fwd_cuda.cu > .ab/old.cu`; all of them: `mkdir -p .ab/old && git archive OLD
# kernels | tar -x --strip-components=1 -C .ab/old`, then .ab/old/sta_fwd_cuda.cu; carried), as
# cuda@<stem> (cuda@<folder> for a sta_fwd_cuda.cu); a source from before the StaFwdArgs host
# interface does not load: AB=DIR for those. CASES: a subset of the cases; SKIP_TESTS=1: no tests.
job_hopper() {
  setup
  if [ "${SKIP_TESTS:-0}" != 1 ]; then
    timeout 330 python3 -m pytest -q -p no:cacheprovider tests/test_hopper_gpu.py tests/test_gpu.py -k "hopper or route" \
      2>&1 | tee "$OUT/hopper_tests.log" | tail -n 25
    echo "pytest exit: ${PIPESTATUS[0]} (124 = the 330 s limit)"
  fi
  local round dir
  for round in 1 2; do
    timeout 200 python3 tools/hopper_bench.py --kernels "${1:-cuda,triton}" ${SOURCES:+--sources "$SOURCES"} \
      ${CASES:+--cases "$CASES"} --out "$OUT" 2>&1 | tee "$OUT/hopper_bench_$round.log"
    [ -z "${AB:-}" ] && break
    for dir in $AB; do
      echo "--- AB: sta_dist from $dir"
      PYTHONPATH="$(realpath "$dir")" timeout 200 python3 tools/hopper_bench.py --kernels "${1:-cuda,triton}" \
        --cases "${AB_CASES:-natural,tiled,box_halo,table}" 2>&1 | tee -a "$OUT/hopper_bench_ab_$round.log"
    done
  done
}

# FlashAttention-4 as an anchor (issue 15 item 5), one GPU: tools/fa4_bench.py times our kernel,
# FlexAttention-STA with its Triton and its FLASH (FA4 CuTe-DSL) backend, FA4 directly
# (block-sparse; dense on the whole canvas) and cuDNN, each output checked. FA4 and what it
# needs come as wheels too big for one call's carry: .whl-fa4/a (the first 55 MiB of the
# CuTe-DSL cu13 library wheel) carried by one call, .whl-fa4/b (the rest of it, the other
# wheels, SHA256SUMS) by the next on the same warm machine. The split wheel is put together,
# every wheel checked against SHA256SUMS, and those whose distribution the machine lacks (or
# has at a version another wheel rejects) go with --no-deps into a scratch folder on
# PYTHONPATH, beside CuTe-DSL's package folder (its .pth is not read from PYTHONPATH).
# Making the folder (here, with an index): in a scratch folder W,
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     --platform any flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
#     nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 einops 'apache-tvm-ffi<0.2' \
#     torch-c-dlpack-ext quack-kernels protobuf
# (libs-core holds the `cutlass.cute` Python package; without it FA4 does not import), then
# `sha256sum *.whl > .whl-fa4/b/SHA256SUMS`, `split -b 55M` the cu13 wheel into NAME.whl.part-aa
# (to .whl-fa4/a) and NAME.whl.part-ab (to .whl-fa4/b), and the other wheels into .whl-fa4/b.
job_fa4() {
  setup
  local WH SITE_FA4 part name PICK
  WH=$(mktemp -d)
  SITE_FA4=$(mktemp -d)
  cp .whl-fa4/*.whl .whl-fa4/*/*.whl .whl-fa4/SHA256SUMS .whl-fa4/*/SHA256SUMS "$WH"/ 2>/dev/null
  for part in $(find .whl-fa4 -name '*.whl.part-aa' 2>/dev/null); do
    name=$(basename "${part%.part-aa}")
    find .whl-fa4 -name "$name.part-*" | awk -F/ '{print $NF "\t" $0}' | sort | cut -f2 | xargs cat >"$WH/$name"
  done
  if ! (cd "$WH" && sha256sum -c --quiet SHA256SUMS); then
    echo "fa4: wheels missing or incomplete (carry .whl-fa4/a in one call, then .whl-fa4/b in the next on the same machine); FA4 rows will say not installed"
  fi
  PICK=$(cd "$WH" && sha256sum -c --ignore-missing SHA256SUMS 2>/dev/null | sed -n 's/: OK$//p' | sed "s|^|$WH/|" | python3 -c '
import email, sys, zipfile
from importlib import metadata
try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename
wheels, specs = {}, {}
for path in sys.stdin.read().split():
    wheels[parse_wheel_filename(path.rsplit("/", 1)[-1])[0]] = path
    with zipfile.ZipFile(path) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA")))
    for line in email.message_from_bytes(meta).get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            specs.setdefault(canonicalize_name(req.name), []).append(req.specifier)
for name, path in sorted(wheels.items()):
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        have = None
    if have is not None and all(s.contains(have, prereleases=True) for s in specs.get(name, [])):
        print(f"fa4: the machine has {name} {have}", file=sys.stderr)
    else:
        print(path)
')
  if [ -n "$PICK" ]; then
    # shellcheck disable=SC2086
    python3 -m pip install -q --no-deps --no-index --target "$SITE_FA4" $PICK >>"$OUT/install.log" 2>&1 \
      && echo "fa4: installed $(echo $PICK | xargs -n1 basename | cut -d- -f1-2 | tr '\n' ' ')" \
      || { echo "fa4: pip install failed:"; tail -n 5 "$OUT/install.log"; }
  fi
  export PYTHONPATH="$SITE_FA4:$SITE_FA4/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}"
  python3 -c "import flash_attn.cute, cutlass; print('fa4: flash_attn.cute imports; cutlass-dsl', cutlass.__version__)" 2>&1 | tail -n 2
  local args="${FA4_CASES:+--cases $FA4_CASES} ${FA4_ROWS:+--rows $FA4_ROWS}"
  timeout 500 python3 tools/fa4_bench.py --out "$OUT" $args 2>&1 | grep -v Warn | tee "$OUT/fa4_bench.log"
  echo "fa4_bench exit: ${PIPESTATUS[0]} (124 = the 500 s limit)"
  # NCU=1: Nsight Compute on one call of each row (clocks free), its headline numbers side by side
  if [ "${NCU:-0}" = 1 ]; then
    timeout 300 ncu --clock-control none --nvtx --nvtx-include "profile/" --section SpeedOfLight \
      --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section WarpStateStats \
      --section SchedulerStats --section LaunchStats --section SourceCounters --import-source no -o "$OUT/fa4_ncu" \
      python3 tools/fa4_bench.py --out "$OUT/once" --once $args >"$OUT/fa4_ncu_run.log" 2>&1
    echo "ncu exit: $? (124 = the 300 s limit)"
    ncu -i "$OUT/fa4_ncu.ncu-rep" --page details --print-details all >"$OUT/fa4_ncu.txt" 2>&1
    grep -E "^  [a-z_]|Duration|Throughput|Busy|Hit Rate|Issue Slots|Executed Ipc|Warp Cycles Per Issued|Registers Per|Block Size|Grid Size|Stall (Wait|Long|Barrier|Math|Not Selected|Selected|Short)|No Eligible|Eligible Warps" \
      "$OUT/fa4_ncu.txt" | head -80
    # each kernel's hot loop region by region (tools/stall_regions.py), from the source page
    ncu -i "$OUT/fa4_ncu.ncu-rep" --page source --print-source sass --csv >"$OUT/fa4_sass.csv" 2>&1
    local k
    for k in sta_fwd_kernel FlashAttentionForwardSm90; do
      grep -q "$k" "$OUT/fa4_sass.csv" && python3 tools/stall_regions.py "$OUT/fa4_sass.csv" --kernel "$k" \
        | tee "$OUT/stall_regions_$k.txt" | head -n 70
    done
    gzip -f "$OUT/fa4_sass.csv"
    rm -f "$OUT/fa4_ncu.ncu-rep"
  fi
}

# Nsight Compute on one launch of the Triton and of the CUDA kernel at the Hunyuan (3,3,3)
# shape (tools/hopper_bench.py --once), clocks left free: headline metrics, then for the
# CUDA kernel the stall reasons and the per-instruction stall samples of its SASS (CSV), and
# its hot loop region by region (tools/stall_regions.py: stall_regions.txt).
job_profile() {
  setup
  local NCU="ncu --clock-control none --launch-count 1 -k regex:sta"
  local run impl case
  for run in ${PROFILE_RUNS:-triton:natural cuda:natural}; do
    impl=${run%%:*} case=${run#*:}
    timeout 150 $NCU --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \
      --section MemoryWorkloadAnalysis --section SourceCounters --import-source no -o "$OUT/${impl}_$case" \
      python3 tools/hopper_bench.py --kernels $impl --cases $case --once >"$OUT/ncu_log_${impl}_$case.txt" 2>&1
    echo "ncu $impl $case rc=$? (124 = timeout 150 s)"
    ncu -i "$OUT/${impl}_$case.ncu-rep" --page details --print-details all >"$OUT/ncu_${impl}_$case.txt" 2>&1
    grep -E "Duration|SM Busy|Issue Slots Busy|Warp Cycles Per Issued|Stall|L2 Hit|DRAM Through|Memory Through" \
      "$OUT/ncu_${impl}_$case.txt" | head -30
  done
  [ -f "$OUT/cuda_natural.ncu-rep" ] && ncu -i "$OUT/cuda_natural.ncu-rep" --page source --print-source sass --csv \
    >"$OUT/cuda_sass.csv" 2>&1 && python3 tools/stall_regions.py "$OUT/cuda_sass.csv" >"$OUT/stall_regions.txt"
  rm -f "$OUT"/*.ncu-rep
}

# On P GPUs (NGPU, default all visible): the scaling of the layer and of the real HunyuanVideo
# strategy from one GPU to P (and to 2 on the way), every output checked against one GPU's,
# the cost model's prediction beside each measured layer, and the cost of the per-call
# agreement check (each mode timed with and without it); the table by tools/scale_table.py.
job_scale() {
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  setup
  local P=${NGPU:-$(nvidia-smi -L | wc -l)}
  nvidia-smi topo -m | head -n $((P + 1))
  local SIZES n
  SIZES=$(python3 -c "print(' '.join(str(n) for n in sorted({1, 2, $P}) if n <= $P))")
  for n in $SIZES; do
    [ "$n" = 1 ] && continue
    # the (3,3,3) layer: every mode beside one GPU and the Ulysses + FlexAttention-STA anchor
    timeout 300 torchrun --standalone --nproc-per-node "$n" -m sta_dist.cli bench dist --reps 10 \
      --modes head,tile,hybrid,auto --out "$OUT" 2>&1 | grep -v Warn | tee "$OUT/dist_$n.log" | tail -n 9
  done
  # The real strategy (steps 0-14 whole canvas, 15-49 sparse): step 13 (the process's first,
  # whole), 14 (whole, warm), 15 (first sparse step: its compiles) and 16 (sparse, warm), on 1
  # GPU and on each size.
  for n in $SIZES; do
    timeout 420 torchrun --standalone --nproc-per-node "$n" -m sta_dist.cli run --config hunyuan_720p \
      --start-step 13 --steps 4 --summary "$OUT/run_$n.json" 2>&1 | grep -v Warn | tail -n 5
  done
  python3 tools/scale_table.py "$OUT" $SIZES | tee "$OUT/scale_table.md"
}

# Head mode in chunks of heads (each chunk's all-to-all beside the attention of the one
# before) against one exchange then the attention, on 2 GPUs: the (3,3,3) layer, then the
# real strategy's steps 13-16 (one GPU, then 2 GPUs with and without the chunks).
job_overlap() {
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  setup
  local chunks
  for chunks in 1 3; do
    timeout 200 torchrun --standalone --nproc-per-node 2 -m sta_dist.cli bench dist --reps 10 --modes head,auto \
      --head-chunks $chunks --out "$OUT/chunks_$chunks" 2>&1 | grep -v Warn | tee "$OUT/dist_chunks_$chunks.log" | tail -n 7
  done
  timeout 200 torchrun --standalone --nproc-per-node 1 -m sta_dist.cli run --config hunyuan_720p \
    --start-step 13 --steps 4 --summary "$OUT/run_1.json" 2>&1 | grep -v Warn | tail -n 3
  for chunks in 1 3; do
    timeout 150 torchrun --standalone --nproc-per-node 2 -m sta_dist.cli run --config hunyuan_720p \
      --start-step 13 --steps 4 --head-chunks $chunks --summary "$OUT/run_2_chunks_$chunks.json" 2>&1 \
      | grep -v Warn | tail -n 3
  done
  python3 tools/scale_table.py "$OUT" run_1.json run_2_chunks_1.json run_2_chunks_3.json | tee "$OUT/overlap_table.md"
}

# The halo exchange beside the query tiles that need no halo, the box's k/v and the halo read
# where they lie, head mode received in place (2 GPUs): the GPU tests of the halo launch, the
# one-GPU (3,3,3) layer, the 2-GPU layer in every mode (default beside the staged path,
# interleaved), the real strategy's steps 13-16 on 1 and 2 GPUs (auto, and tile mode with
# its mixed calls). AB=DIR: the one-GPU layer and the 2-GPU strategy also from DIR's copy of
# sta_dist (e.g. `git archive OLD sta_dist | tar -x -C DIR`), same machine, same call.
job_halo() {
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  setup
  OUT=$(cd "$OUT" && pwd)
  [ -n "${AB:-}" ] && (cd "$AB" && python3 -c "import sta_dist; print('AB: sta_dist from', sta_dist.__file__)")
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_hopper_gpu.py tests/test_attention.py \
    -k "halo or packed or tiled or fold or hopper" 2>&1 \
    | tail -n 6 | tee "$OUT/halo_tests.log"
  # the kernel built once before every timed run, so no run's first step pays the build
  timeout 120 python3 -m sta_dist.kernels.sta_fwd_cuda | tail -n 1
  timeout 200 python3 -m sta_dist.cli bench kernel --cases "${KERNEL_CASES:-hunyuan_333}" --out "$OUT/kernel" 2>&1 \
    | grep -v Warn | tail -n 6
  if [ -n "${AB:-}" ]; then
    (cd "$AB" && timeout 150 python3 -m sta_dist.cli bench kernel --cases hunyuan_333 --out "$OUT/kernel_ab" 2>&1 \
      | grep -v Warn | tail -n 5)
  fi
  timeout 300 torchrun --standalone --nproc-per-node 2 -m sta_dist.cli bench dist --reps 10 --modes head,tile,auto \
    --out "$OUT" 2>&1 | grep -v Warn | tee "$OUT/dist_2.log" | tail -n 9
  if [ "${PROFILE:-0}" = 1 ]; then  # where the (3,3,3) layer's time goes, tile mode then head mode
    local mode
    for mode in tile head; do
      timeout 150 torchrun --standalone --nproc-per-node 2 tools/profile_layer.py --window 3 3 3 --no-text \
        --mode $mode --layers 0,1,2 --rows 14 2>&1 | grep -v Warn | tee "$OUT/profile_$mode.log" | tail -n 24
    done
  fi
  [ "${STRATEGY:-1}" = 1 ] || return 0
  timeout 200 torchrun --standalone --nproc-per-node 1 -m sta_dist.cli run --config hunyuan_720p \
    --start-step 13 --steps 4 --summary "$OUT/run_1.json" 2>&1 | grep -v Warn | tail -n 3
  local mode runs="run_1.json"
  for mode in ${STRATEGY_MODES:-auto tile}; do
    timeout 150 torchrun --standalone --nproc-per-node 2 -m sta_dist.cli run --config hunyuan_720p --mode $mode \
      --start-step 13 --steps 4 --summary "$OUT/run_2_$mode.json" 2>&1 | grep -v Warn | tail -n 3
    runs="$runs run_2_$mode.json"
  done
  if [ -n "${AB:-}" ]; then
    (cd "$AB" && timeout 150 torchrun --standalone --nproc-per-node 2 -m sta_dist.cli run --config hunyuan_720p \
      --start-step 13 --steps 4 --summary "$OUT/run_2_ab.json" 2>&1 | grep -v Warn | tail -n 3)
    runs="$runs run_2_ab.json"
  fi
  python3 tools/scale_table.py "$OUT" $runs | tee "$OUT/halo_table.md"
}

# One denoising step of full-size random-weight HunyuanVideo and Wan 2.1 14B in diffusers
# (bf16), stock vs sta_dist, on one GPU and then on NGPU (default 2)
# (tools/diffusers_step_bench.py, extra arguments in BENCH_ARGS). diffusers comes from the
# wheelhouse carried in .whl/ (the device has no package index).
job_diffusers() {
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
  setup
  python3 -c "import diffusers; print('diffusers', diffusers.__version__)"
  local ARGS=${BENCH_ARGS:-}
  timeout 330 python3 tools/diffusers_step_bench.py --out "$OUT" $ARGS 2>&1 | grep -v Warn | tee "$OUT/step_1gpu.log" | tail -n 12
  timeout 330 torchrun --standalone --nproc-per-node ${NGPU:-2} tools/diffusers_step_bench.py --out "$OUT" $ARGS 2>&1 \
    | grep -v Warn | tee "$OUT/step_2gpu.log" | tail -n 16
  rm -f "$OUT"/*_1gpu.pt  # the saved one-GPU outputs (compared already)
}

# tools/fastvideo_bench.py (arguments go to it) after `setup` put the wheels carried in .whl/
# that the machine lacks (FastVideo 0.1.7, fastvideo-kernel 0.2.2, and what FastVideo's
# imports need) into a scratch folder with --no-deps.
job_fastvideo() {
  setup
  timeout 280 python3 tools/fastvideo_bench.py "$OUT" "$@" 2>&1 | tee "$OUT/fastvideo_bench.log"
}

# Window plus selected tiles (issue 16), bf16. One GPU (default): the selection GPU tests,
# then `sta-dist bench kernel` at HunyuanVideo 30x48x80 + 256 text (200 valid), tile (6,8,8),
# window (3,3,3) with TopK(8) shared and Mass(0.9), each timed with the selection included
# beside the window alone and FlexAttention with the same block mask built per call (mask
# build timed), every output checked on sampled rows. NGPU=2: the 2-GPU tile-mode row
# (TopK(8)) and head mode beside one GPU, outputs compared with one GPU's. The short table last.
job_selection() {
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
  setup
  if [ "${NGPU:-1}" -ge 2 ]; then
    timeout 360 torchrun --standalone --nproc-per-node 2 -m sta_dist.cli bench dist --reps 5 --modes tile,head \
      --text-len 256 --text-valid 200 --select topk:8 --out "$OUT" 2>&1 | grep -v Warn | tee "$OUT/dist_selected.log" \
      | tail -n 8
    if [ "${PROFILE:-0}" = 1 ]; then  # where a call's time goes, kernel by kernel on each rank
      local mode
      for mode in ${PROFILE_MODES:-tile head}; do
        timeout 150 torchrun --standalone --nproc-per-node 2 tools/profile_layer.py --window 3 3 3 --select topk:8 \
          --mode "$mode" --layers 0 --rows 25 --timeline 2>&1 | grep -v Warn | tee "$OUT/profile_selected_$mode.log"
      done
    fi
  else
    [ "${SKIP_TESTS:-0}" != 1 ] && timeout 180 python3 -m pytest -q -x tests/test_selection_gpu.py 2>&1 | tail -n 8 \
      | tee "$OUT/selection_gpu_tests.log"
    timeout 300 python3 -m sta_dist.cli bench kernel --cases "${SELECTION_CASES:-hunyuan_topk8,hunyuan_mass09}" \
      --out "$OUT" 2>&1 | grep -v -i warn | tee "$OUT/bench_selection.log" | tail -n 18
    timeout 120 python3 tools/profile_selection.py 2>&1 | grep -v -i warn | tee "$OUT/profile_selection.log"
  fi
  python3 tools/selection_table.py "$OUT" | tee "$OUT/selection_table.md"
}

# On 4 GPUs, the 2-GPU measurements as two lanes side by side on disjoint pairs (NVLink within
# a pair; timings on one pair do not depend on work on the other): GPUs 0-1 job diffusers (one
# GPU, then two); GPUs 2-3 the (3,3,3) layer in every mode beside the anchor, then job
# selection's 2-GPU rows. Installs once; every lane's logs and JSON in $OUT/lanes.tgz.
job_lanes() {
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  local FINAL=${OUT:-out}
  local RES
  RES=$(mktemp -d)
  OUT=$RES
  setup
  export SKIP_INSTALL=1
  (CUDA_VISIBLE_DEVICES=0,1 OUT=$RES/diffusers timeout 570 bash tools/gpu.sh diffusers >"$RES/diffusers.log" 2>&1) &
  (export CUDA_VISIBLE_DEVICES=2,3
   mkdir -p "$RES/layer"
   timeout 240 torchrun --standalone --nproc-per-node 2 -m sta_dist.cli bench dist --reps 10 \
     --modes head,tile,hybrid,auto --out "$RES/layer" >"$RES/layer.log" 2>&1
   OUT=$RES/selection NGPU=2 timeout 300 bash tools/gpu.sh selection >"$RES/selection.log" 2>&1) &
  wait
  mkdir -p "$FINAL" && tar czf "$FINAL/lanes.tgz" -C "$RES" .
  local lane
  for lane in layer selection diffusers; do echo "=== $lane"; grep -v Warn "$RES/$lane.log" | tail -n 16; done
}

# Three lanes: "tests" (one GPU) the CUDA kernel's and the selection's GPU tests, then the
# 1-GPU selection bench; "pair" (two GPUs) the 2-GPU selection rows, then the real strategy
# (steps 14-16) on 2 GPUs; "single" (one GPU) the real strategy on 1 GPU. LANES picks them
# (default all three, side by side on 4 GPUs; on 2 GPUs call "tests single", then "pair").
# Logs and JSON in $OUT/tables.tgz; the tables: tools/selection_table.py, tools/scale_table.py.
job_tables() {
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  local FINAL=${OUT:-out} RES lanes=${LANES:-tests pair single} gpu=0
  RES=$(mktemp -d)
  OUT=$RES
  setup
  mkdir -p "$RES/selection" "$RES/scale"
  for lane in $lanes; do
    case $lane in
      tests) (export CUDA_VISIBLE_DEVICES=$gpu
        timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_hopper_gpu.py tests/test_selection_gpu.py \
          tests/test_gpu.py -k "not small_cases_on_gpu" >"$RES/tests.log" 2>&1
        timeout 240 python3 -m sta_dist.cli bench kernel --cases hunyuan_topk8,hunyuan_mass09 --out "$RES/selection" \
          >"$RES/selection_1gpu.log" 2>&1) &
        gpu=$((gpu + 1)) ;;
      single) (CUDA_VISIBLE_DEVICES=$gpu timeout 420 python3 -m sta_dist.cli run --config hunyuan_720p \
          --start-step 14 --steps 3 --summary "$RES/scale/run_1.json" >"$RES/run_1.log" 2>&1) &
        gpu=$((gpu + 1)) ;;
      pair) (export CUDA_VISIBLE_DEVICES=$gpu,$((gpu + 1))
        timeout 200 torchrun --standalone --nproc-per-node 2 -m sta_dist.cli bench dist --reps 5 --modes tile,head \
          --text-len 256 --text-valid 200 --select topk:8 --out "$RES/selection" >"$RES/selection_2gpu.log" 2>&1
        timeout 330 torchrun --standalone --nproc-per-node 2 -m sta_dist.cli run --config hunyuan_720p --start-step 14 \
          --steps 3 --summary "$RES/scale/run_2.json" >"$RES/run_2.log" 2>&1) &
        gpu=$((gpu + 2)) ;;
    esac
  done
  wait
  mkdir -p "$FINAL" && tar czf "$FINAL/tables.tgz" -C "$RES" .
  local f
  for f in tests.log selection_1gpu.log selection_2gpu.log run_1.log run_2.log; do
    [ -f "$RES/$f" ] && { echo "=== $f"; grep -v Warn "$RES/$f" | tail -n 14; }
  done
}

# On 2 GPUs: the GPU tests of the kernels and their route, half on each card side by side (the
# conformance test on its Hopper cases and two random seeds; the Triton kernel's 36 small
# cases are the kernel job's), then job selection's 2-GPU rows. Logs in $OUT.
job_route() {
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
  setup
  (CUDA_VISIBLE_DEVICES=0 timeout 240 python3 -m pytest -q tests/test_gpu.py \
     tests/test_attention.py -k "not small_cases and (not kernel_matches or hopper or seed0 or seed3)" \
     >"$OUT/tests_gpu0.log" 2>&1) &
  (CUDA_VISIBLE_DEVICES=1 timeout 240 python3 -m pytest -q tests/test_hopper_gpu.py tests/test_selection_gpu.py \
     tests/test_route.py >"$OUT/tests_gpu1.log" 2>&1) &
  wait
  local log
  for log in tests_gpu0 tests_gpu1; do echo "=== $log"; tail -n 12 "$OUT/$log.log"; done
  SKIP_INSTALL=1 NGPU=2 job_selection
}

# HunyuanVideo-1.5's own block-sparse kernel (flex-block-attn, ThunderKittens) beside ours at
# window plus TopK(8) (issue 16): its source and ThunderKittens' headers carried in .fba/src
# (git-ignored; Tencent-Hunyuan/flex-block-attn with tk/ = HazyResearch/ThunderKittens at the
# submodule's commit, include/ and prototype/), built here with its setup.py, then
# tools/fba_bench.py.
job_fba() {
  setup
  [ -f .fba/src/setup.py ] || { echo "fba: .fba/src/setup.py missing (carry .fba)"; return 1; }
  local BIN
  BIN=$(mktemp -d)
  printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" >"$BIN/python"  # its setup.py runs "python"
  chmod +x "$BIN/python"
  # nvcc 13.0's -arch=sm_90a shorthand also runs a plain sm_90 pass, which rejects wgmma (HOPPER.md)
  sed -i 's/-arch=sm_90a/-gencode=arch=compute_90a,code=sm_90a/' .fba/src/setup.py
  (cd .fba/src && PATH="$BIN:$PATH" TORCH_CUDA_ARCH_LIST=9.0a timeout 420 python3 setup.py build_ext --inplace >"$OUT/fba_build.log" 2>&1)
  echo "flex_block_attn build exit: $? ($(grep -c -i ' error' "$OUT/fba_build.log") error lines)"
  grep -i -m 8 ' error' "$OUT/fba_build.log"
  PYTHONPATH=.fba/src timeout 150 python3 tools/fba_bench.py --out "$OUT" 2>&1 | grep -v -i warn | tee "$OUT/fba_bench.log"
}

if [ $# -lt 1 ] || [[ " $JOBS " != *" $1 "* ]]; then
  echo "usage: bash tools/gpu.sh {${JOBS// /|}} [args...]  (what each job does: the top of tools/gpu.sh)" >&2
  exit 2
fi
job=$1
shift
"job_$job" "$@"
