#!/usr/bin/env bash
# On the lent GPU machine (device tool), in one call: build the extensions, run the CUDA tests of
# the sampler, the Emulator and nearest_code, then time generation end to end and print one table:
#   Emulator.sample galaxies/s (shipped default model) at n = 256 and 4096, the 15x128 prior's
#   code maps/s at batch 256 against the naive float64 / float32 samplers (benchmarks/
#   gpu_generation.py), the GalSim config path's galaxies/s for 2048 galaxies (blocks of 512) at
#   image.nproc 1, 4 and 8 (all workers on the one GPU) with the split of the worker time between
#   generation, GalSim drawing and the rest (benchmarks/gpu_config_path.py), nearest_code
#   against torch at (112896, 64, 512) and K = 8192 (benchmarks/gpu_nearest_code.py --quick).
# Usage there: bash benchmarks/gpu_generation.sh   (about 5-7 minutes on one H100; estimate)
# Needs .whl/gpusite.tar.xz (GalSim + astropy for the GPU machine's Python: make_gpu_site.sh).
# Writes build.log, tests.log, generation.log/.json, config_path.log, nearest_code.log under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
. benchmarks/gpu_site.sh  # GalSim and astropy for this machine's Python
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
echo "commit: $(cat COMMIT 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
echo "build rc=$? after ${SECONDS}s"
grep -iE "error|warning \(galsim" "$OUT/build.log" | head -20
python3 -c "from galsim_vqvae import ops; print('backends: sampler', ops.sampler_backend('cuda'), \
'nearest_code', ops.backend())"
(cd tests && timeout 150 python3 -m pytest -q -p no:cacheprovider -rs -m cuda \
  test_compiled_sampling.py test_sampling.py test_emulator.py test_ops.py 2>&1 \
  | tee "$OUT/tests.log" | tail -8)
echo "tests done after ${SECONDS}s"
timeout 150 python3 benchmarks/gpu_generation.py --out "$OUT" 2>&1 | tee "$OUT/generation.log"
echo "generation done after ${SECONDS}s"
timeout 240 python3 benchmarks/gpu_config_path.py --device cuda --nobjects 2048 \
  --batch-size 512 --nprocs 1 4 8 > "$OUT/config_path.log" 2>&1
echo "config path rc=$? after ${SECONDS}s"; grep -A2 "^config path" "$OUT/config_path.log"
timeout 60 python3 benchmarks/gpu_nearest_code.py --no-build --quick --out "$OUT" \
  > "$OUT/nearest_code.log" 2>&1
echo "nearest_code rc=$? after ${SECONDS}s"; tail -8 "$OUT/nearest_code.log"
echo "total ${SECONDS}s"
