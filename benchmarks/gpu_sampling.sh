#!/usr/bin/env bash
# On the lent GPU machine (device tool), in one call: build the extensions, run the sampler tests
# (the CUDA ones included), then time the samplers (benchmarks/gpu_sampling.py).
# Usage there: bash benchmarks/gpu_sampling.sh [TOTAL_SECONDS] [gpu_sampling.py options...]
#   TOTAL_SECONDS (default 400): the benchmark is stopped in time to end the whole script within
#   it; gpu_sampling.py saves its results after every case, so a cut-short run keeps them.
# Needs .whl/gpusite.tar.xz carried (GalSim + astropy for Python 3.12: benchmarks/make_gpu_site.sh).
# Writes build.log, tests.log, gpu_sampling.log and gpu_sampling.json under $OUT.
set -uo pipefail
TOTAL=${1:-400}
shift || true
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
. benchmarks/gpu_site.sh  # GalSim and astropy for this machine's Python
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
  --format=csv,noheader | tee "$OUT/device.txt"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
echo "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
echo "build rc=$? after ${SECONDS}s"
grep -iE "error|warning \(galsim" "$OUT/build.log" | head -20
python3 -c "from galsim_vqvae import ops; print('sampler backend on cuda:', \
ops.sampler_backend('cuda'), ops.sampler_load_error('cuda'))"
g++ --version | head -1
# the CUDA tests first, then the others of the file (a crash in one run spares the other's report)
(cd tests && timeout 150 python3 -m pytest -q -p no:cacheprovider -rs -k cuda \
  test_compiled_sampling.py 2>&1 | tee "$OUT/tests.log" | tail -25)
(cd tests && timeout 60 python3 -m pytest -q -p no:cacheprovider -rs -k "not cuda" \
  test_compiled_sampling.py 2>&1 | tee -a "$OUT/tests.log" | tail -25)
echo "tests done after ${SECONDS}s"
LEFT=$((TOTAL - SECONDS - 10))
echo "benchmark: ${LEFT}s left"
timeout "$LEFT" python3 benchmarks/gpu_sampling.py --out "$OUT" "$@" > "$OUT/bench_stdout.txt" 2>&1
echo "benchmark rc=$? after ${SECONDS}s"
# the last table the benchmark printed (it prints one after each batch size)
awk '/^maps\/s/ {buf=""} {buf = buf $0 "\n"} END {printf "%s", buf}' "$OUT/bench_stdout.txt" \
  | tail -30
