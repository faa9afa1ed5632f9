#!/usr/bin/env bash
# Reproduce the shipped default model, galsim_vqvae/models/default/model.safetensors.
# Run from the repository root on a machine with one CUDA GPU:
#   bash examples/train_default_model.sh [all | vqvae | prior]
# ('vqvae' makes the dataset and trains the VQ-VAE; 'prior' trains the prior and writes the
# bundle; each step skips what already exists under $RUN.)
# PY names the Python that has galsim_vqvae's dependencies; RUN the run directory.
set -euo pipefail
STAGE=${1:-all}
PY=${PY:-python3}
RUN=${RUN:-runs/default}
N=${N:-40000}
WORKERS=${WORKERS:-$(nproc)}
VQ_STEPS=${VQ_STEPS:-4000}
PRIOR_STEPS=${PRIOR_STEPS:-5000}
mkdir -p "$RUN"
cli() { "$PY" -m galsim_vqvae.cli "$@"; }

if [ "$STAGE" = all ] || [ "$STAGE" = vqvae ]; then
  [ -f "$RUN/synthetic.h5" ] || cli make-dataset --source synthetic --n "$N" --seed 2026 \
      --workers "$WORKERS" --out "$RUN/synthetic.h5"
  [ -f "$RUN/vqvae/checkpoint.pt" ] || cli train-vqvae --data "$RUN/synthetic.h5" \
      --out "$RUN/vqvae" --steps "$VQ_STEPS" --batch-size 512 --lr 3e-4 --lr-schedule cosine --ae-warmup 500 \
      --warmup 200 --restart-every 20 --log-every 100 --checkpoint-every 1000 --seed 1 --noise independent \
      --device cuda
fi
if [ "$STAGE" = all ] || [ "$STAGE" = prior ]; then
  cli train-prior --data "$RUN/synthetic.h5" --vqvae "$RUN/vqvae" --out "$RUN/prior" \
      --steps "$PRIOR_STEPS" --batch-size 256 --lr 1e-3 --seed 2 --device cuda \
      --conditions mag,hlr --channels 64 --layers 10 --kernel-size 5 --resume
  "$PY" -c "import sys; from galsim_vqvae.plots import save_training_curves as s; s(*sys.argv[1:])" \
      "$RUN/training_curves.png" "$RUN/vqvae/log.jsonl" "$RUN/prior/log.jsonl"
  echo "bundle: $RUN/prior/model.safetensors (copy it to galsim_vqvae/models/default/);" \
       "curves: $RUN/training_curves.png"
fi
