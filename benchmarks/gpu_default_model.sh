#!/usr/bin/env bash
# On the lent GPU machine (device tool): set up, then train and measure the shipped default model.
# Usage there: bash benchmarks/gpu_default_model.sh STAGE
#   STAGE: vqvae | prior | all (both) | plain (the plain autoencoder of the issue-2 comparison,
#   trained on the same stamps without the PSF/noise layers) | config (config-path galaxies/s
#   of the new bundle on the GPU)
# Needs .whl/gpusite.tar.xz carried (GalSim + astropy for Python 3.12): benchmarks/make_gpu_site.sh.
# Idempotent: each step skips what exists under $RUN, so a later call continues an earlier one.
set -euo pipefail
STAGE=${1:-all}
export RUN=${RUN:-/tmp/runs/default}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}
mkdir -p "$RUN" "$OUT"
if [ ! -d /tmp/site/galsim ]; then
  mkdir -p /tmp/site && tar xJf .whl/gpusite.tar.xz -C /tmp/site
fi
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import torch, galsim; print('torch', torch.__version__, 'galsim', galsim.__version__, torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader || true

if [ "$STAGE" = vqvae ] || [ "$STAGE" = all ]; then
  [ -n "${SKIP_THROUGHPUT:-}" ] || python3 benchmarks/train_throughput.py --device cuda \
      --batch-sizes 256 1024 4096 2>&1 | tee "$OUT/train_throughput.txt" || true
  bash examples/train_default_model.sh vqvae \
      2>&1 | tee "$OUT/train_vqvae.txt"
  cp "$RUN/vqvae/log.jsonl" "$OUT/vqvae_log.jsonl" 2>/dev/null || true
  cp "$RUN/vqvae/gallery.png" "$OUT/vqvae_gallery.png" 2>/dev/null || true
fi
if [ "$STAGE" = prior ] || [ "$STAGE" = all ]; then
  bash examples/train_default_model.sh prior 2>&1 | tee "$OUT/train_prior.txt"
  cp "$RUN/prior/model.safetensors" "$OUT/model.safetensors"
  cp "$RUN/prior/log.jsonl" "$OUT/prior_log.jsonl" 2>/dev/null || true
  python3 - <<'PY' 2>&1 | tee "$OUT/conditioning.txt"
import json, os, time
import numpy as np
from galsim_vqvae import Emulator
from galsim_vqvae.metrics import conditioning_accuracy
emu = Emulator.load(os.environ["RUN"] + "/prior/model.safetensors", device="cuda")
t = time.time()
r = conditioning_accuracy(emu, n=1000, seed=123)
print(f"1000 samples (fast sampler, cuda) in {time.time() - t:.1f} s")
print(json.dumps({k: v for k, v in r.items() if not isinstance(v, np.ndarray)}, indent=1))
np.savez(os.environ.get("OUT", "/tmp/out") + "/conditioning.npz",
         **{k: v for k, v in r.items() if isinstance(v, np.ndarray)})
PY
fi
if [ "$STAGE" = plain ]; then
  [ -f "$RUN/plain/checkpoint.pt" ] || python3 -m galsim_vqvae.cli train-vqvae \
      --data "$RUN/synthetic.h5" --out "$RUN/plain" --no-psf-layers --steps "${PLAIN_STEPS:-2000}" \
      --batch-size 512 --lr 3e-4 --lr-schedule cosine --ae-warmup 500 --warmup 200 \
      --restart-every 20 --log-every 100 --checkpoint-every 1000 --seed 1 --device cuda \
      2>&1 | tee "$OUT/train_plain.txt"
  cp "$RUN/plain/log.jsonl" "$OUT/plain_log.jsonl" 2>/dev/null || true
fi
if [ "$STAGE" = config ]; then
  python3 benchmarks/gpu_config_path.py --model "$RUN/prior/model.safetensors" --device cuda \
      --nobjects 512 --batch-size 128 --nprocs 1 4 2>&1 | tee "$OUT/config_path_gpu.txt"
fi
ls -la "$OUT"
