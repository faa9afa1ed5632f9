#!/usr/bin/env bash
# Rebuild the shipped default model, galsim_vqvae/models/default/model.safetensors, from scratch.
# Run from the repository root on a machine with one CUDA GPU:
#   bash examples/train_default_model.sh [all | dataset | vqvae | prior]
# 'dataset' renders the training set and the held-out set (a population no model sees, for
# evaluate); 'vqvae' trains the VQ-VAE; 'prior' trains the prior and writes the bundle. Each step
# skips what already exists under $RUN, and training resumes from its last checkpoint, so the
# script can be run again after an interruption (or split over several sessions).
# PY names the Python that has galsim_vqvae's dependencies; RUN the run directory.
set -euo pipefail
STAGE=${1:-all}
PY=${PY:-python3}
RUN=${RUN:-runs/default}
N=${N:-40000}
N_HELDOUT=${N_HELDOUT:-10000}
WORKERS=${WORKERS:-$(nproc)}
VQ_STEPS=${VQ_STEPS:-8000}
PRIOR_STEPS=${PRIOR_STEPS:-5000}
VQ_BATCH=${VQ_BATCH:-512}
PRIOR_BATCH=${PRIOR_BATCH:-256}
DEVICE=${DEVICE:-cuda}
VQ_DIR=${VQ_DIR:-$RUN/vqvae}
# The shipped model's population and VQ-VAE loss, padding and decoder (docs/default_model.md
# says why). The next model's, built but not yet trained: POPULATION=2026-12 and
# VQ_LOSS="--truth-weight 1 --truth-norm l1 --decoder-padding zeros --encoder-padding replicate
# --decoder-refine 32" (the chain of benchmarks/gpu_default_model.sh trains it beside the same
# with --decoder-refine 0 and keeps one).
POPULATION=${POPULATION:-2026-11}
VQ_LOSS=${VQ_LOSS:---truth-weight 1 --truth-norm l1 --decoder-padding zeros --encoder-padding zeros --decoder-refine 0}
mkdir -p "$RUN"
cli() { "$PY" -m galsim_vqvae.cli "$@"; }
resume() { [ -f "$1/checkpoint.pt" ] && echo --resume || true; }  # continue an interrupted run

if [ "$STAGE" = all ] || [ "$STAGE" = dataset ] || [ "$STAGE" = vqvae ]; then
  [ -f "$RUN/synthetic.h5" ] || cli make-dataset --source synthetic --n "$N" --seed 2026 \
      --population "$POPULATION" --workers "$WORKERS" --out "$RUN/synthetic.h5"
fi
if [ "$STAGE" = all ] || [ "$STAGE" = dataset ]; then
  [ -f "$RUN/val.h5" ] || cli make-dataset --source synthetic --n "$N_HELDOUT" --seed 99 \
      --population "$POPULATION" --workers "$WORKERS" --out "$RUN/val.h5"
fi
if [ "$STAGE" = all ] || [ "$STAGE" = vqvae ]; then
  # Noise2Noise targets, the truth term (the synthetic set's pre-PSF truth constrains what the
  # PSF hides: frames at the stamp edges, rings, faint junk; see docs/default_model.md), the
  # 8 rotations/flips.
  cli train-vqvae --data "$RUN/synthetic.h5" --out "$VQ_DIR" --steps "$VQ_STEPS" \
      --batch-size "$VQ_BATCH" --lr 3e-4 --lr-schedule cosine --ae-warmup "${AE_WARMUP:-500}" --warmup 200 \
      --restart-every 20 --log-every 100 --checkpoint-every 1000 --seed 1 --noise independent \
      $VQ_LOSS --augment --device "$DEVICE" $(resume "$VQ_DIR")
fi
if [ "$STAGE" = all ] || [ "$STAGE" = prior ]; then
  cli train-prior --data "$RUN/synthetic.h5" --vqvae "$RUN/vqvae" --out "$RUN/prior" \
      --steps "$PRIOR_STEPS" --batch-size "$PRIOR_BATCH" --lr 1e-3 --seed 2 --device "$DEVICE" \
      --conditions mag,hlr --class-label morph_class --channels 96 --layers 10 --kernel-size 5 \
      --dropout 0.1 --ema 0.999 $(resume "$RUN/prior")
  "$PY" -c "import sys; from galsim_vqvae.plots import save_training_curves as s; s(*sys.argv[1:])" \
      "$RUN/training_curves.png" "$RUN/vqvae/log.jsonl" "$RUN/prior/log.jsonl"
  echo "bundle: $RUN/prior/model.safetensors (copy it to galsim_vqvae/models/default/);" \
       "curves: $RUN/training_curves.png"
fi
