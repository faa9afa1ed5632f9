#!/usr/bin/env bash
# Train galsim_vqvae on real galaxies: COSMOS 25.2 (HST/ACS F814W, about 87,000 galaxies) at its
# native 0.03"/pixel on 128 x 128 stamps (the grid of Lanusse et al. 2021), through each
# galaxy's own PSF and correlated noise, then validate on real galaxies (evaluate --real).
#
# Get the catalog once with GalSim:  galsim_download_cosmos -s 25.2 -d DIR
# then, from the repository root on a machine with one CUDA GPU:
#   COSMOS_DIR=DIR/COSMOS_25.2_training_sample bash examples/train_cosmos.sh [all | data | vqvae | prior | evaluate]
# Each stage skips what already exists under $RUN. Data-parallel training on N GPUs of one
# host: NPROC=N (runs train-vqvae and train-prior under torchrun; VQ_BATCH and PRIOR_BATCH are
# per process).
#
# Expected time, from the training throughput of benchmarks/README.md (H100, 84 x 84 stamps:
# 22,000-24,000 images/s for the VQ-VAE, 12,000 code maps/s of 21 x 21 for the prior; scaled by
# the pixel count to 128 x 128 stamps and 32 x 32 code maps: about 9,500 images/s and 5,200
# maps/s): make-dataset about 20 minutes (one process, no resampling at 0.03"); train-vqvae
# 20,000 steps x 256 = 5.1 million images (65 epochs of the 78,000 training galaxies) about
# 10 minutes; train-prior 20,000 steps x 256 maps about 17 minutes; evaluate a few minutes. So
# about 50 minutes on one H100; under torchrun on 8 GPUs with the same per-process batches,
# the same step counts see 8x the images in about the same time (or divide the steps by 8:
# about 4 minutes of training), while make-dataset stays one process.
#
# The same recipe on the 100 real COSMOS galaxies of ../shared/data/hst/cosmos_btk (an overfit
# check: reconstructions at reduced chi^2 near 1 under the right noise model, < 4 minutes on a
# GPU):
#   COSMOS_DIR=../shared/data/hst/cosmos_btk CATALOG=real_galaxy_catalog_26_extension_example.fits \
#   RUN=runs/cosmos_overfit VQ_STEPS=3000 VQ_BATCH=64 AE_WARMUP=300 PRIOR_STEPS=1500 \
#   PRIOR_BATCH=64 EVAL_N=100 EVAL_SPLIT=all DEVICE=cuda bash examples/train_cosmos.sh
#
# Settings (environment): PY (the Python with galsim_vqvae), COSMOS_DIR, CATALOG, RUN,
# PIXEL_SCALE (0.03), STAMP (128), MAX_GALAXIES (all), DEVICE (cuda), NPROC (1), VQ_STEPS,
# VQ_BATCH, AE_WARMUP, WARMUP, VQ_LR, RESTART_EVERY, VQ_MODEL (extra train-vqvae options, e.g.
# "--hidden 16 --embed-dim 8 --num-codes 32"), PRIOR_STEPS, PRIOR_BATCH, PRIOR_LR, CONDITIONS
# (catalog_mag: the catalog's MAG column, a clean label where a faint stamp's own sum can be
# negative; any params/NAME of the dataset), PRIOR_MODEL, LOG_EVERY, CHECKPOINT_EVERY, EVAL_N (200), EVAL_SPLIT (test: the held-out
# galaxies), SEED, QUIET (1: no progress bars).
set -euo pipefail
STAGE=${1:-all}
PY=${PY:-python3}
COSMOS_DIR=${COSMOS_DIR:-COSMOS_25.2_training_sample}
CATALOG=${CATALOG:-real_galaxy_catalog_25.2.fits}
RUN=${RUN:-runs/cosmos}
PIXEL_SCALE=${PIXEL_SCALE:-0.03}
STAMP=${STAMP:-128}
MAX_GALAXIES=${MAX_GALAXIES:-}
DEVICE=${DEVICE:-cuda}
NPROC=${NPROC:-1}
VQ_STEPS=${VQ_STEPS:-20000}
VQ_BATCH=${VQ_BATCH:-256}
AE_WARMUP=${AE_WARMUP:-1000}
WARMUP=${WARMUP:-200}
VQ_LR=${VQ_LR:-3e-4}
RESTART_EVERY=${RESTART_EVERY:-20}
VQ_MODEL=${VQ_MODEL:-}
PRIOR_STEPS=${PRIOR_STEPS:-20000}
PRIOR_BATCH=${PRIOR_BATCH:-256}
PRIOR_LR=${PRIOR_LR:-1e-3}
CONDITIONS=${CONDITIONS:-catalog_mag}
PRIOR_MODEL=${PRIOR_MODEL:---channels 64 --layers 10 --kernel-size 5}
LOG_EVERY=${LOG_EVERY:-100}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-1000}
EVAL_N=${EVAL_N:-200}
EVAL_SPLIT=${EVAL_SPLIT:-test}
SEED=${SEED:-1}
QUIET=${QUIET:-}
case "$STAGE" in all|data|vqvae|prior|evaluate) ;; *)
  echo "train_cosmos.sh: unknown stage '$STAGE' (all, data, vqvae, prior or evaluate)" >&2; exit 2;;
esac
mkdir -p "$RUN"
quiet=${QUIET:+--quiet}
cli() { "$PY" -m galsim_vqvae.cli "$@"; }
train() {  # one process, or NPROC of them under torchrun
  if [ "$NPROC" -gt 1 ]; then
    "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m galsim_vqvae.cli "$@"
  else
    cli "$@"
  fi
}
DATA="$RUN/cosmos.h5"
BUNDLE="$RUN/prior/model.safetensors"

if [ "$STAGE" = all ] || [ "$STAGE" = data ]; then
  [ -f "$DATA" ] || cli make-dataset --source cosmos --catalog "$CATALOG" --dir "$COSMOS_DIR" \
      --pixel-scale "$PIXEL_SCALE" --stamp-size "$STAMP" --out "$DATA" $quiet \
      ${MAX_GALAXIES:+--max-galaxies "$MAX_GALAXIES"}
fi
if [ "$STAGE" = all ] || [ "$STAGE" = vqvae ]; then
  # --noise data: real stamps have no truth; each stamp's own noise model weighs the chi^2
  [ -f "$RUN/vqvae/checkpoint.pt" ] || train train-vqvae --data "$DATA" --out "$RUN/vqvae" \
      --steps "$VQ_STEPS" --batch-size "$VQ_BATCH" --lr "$VQ_LR" --lr-schedule cosine \
      --ae-warmup "$AE_WARMUP" --warmup "$WARMUP" --restart-every "$RESTART_EVERY" \
      --log-every "$LOG_EVERY" --checkpoint-every "$CHECKPOINT_EVERY" --seed "$SEED" \
      --noise data --device "$DEVICE" $quiet $VQ_MODEL
fi
if [ "$STAGE" = all ] || [ "$STAGE" = prior ]; then
  [ -f "$BUNDLE" ] || train train-prior --data "$DATA" --vqvae "$RUN/vqvae" --out "$RUN/prior" \
      --steps "$PRIOR_STEPS" --batch-size "$PRIOR_BATCH" --lr "$PRIOR_LR" --seed "$((SEED + 1))" \
      --conditions "$CONDITIONS" --log-every "$LOG_EVERY" \
      --checkpoint-every "$CHECKPOINT_EVERY" --device "$DEVICE" --resume $quiet $PRIOR_MODEL
fi
if [ "$STAGE" = all ] || [ "$STAGE" = evaluate ]; then
  # the real galaxies of the dataset (EVAL_SPLIT test: held out), through their own PSF and
  # noise: reduced chi^2, residual profile, samples beside them (Lanusse et al. 2021)
  cli evaluate --model "$BUNDLE" --n "$EVAL_N" --real "$DATA" --split "$EVAL_SPLIT" \
      --out "$RUN/evaluation" --seed "$SEED" --device "$DEVICE" $quiet
  "$PY" - "$RUN/evaluation/metrics.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"real galaxies: n {m['real.n']}, median reduced chi^2 {m['real.chi2_median']:.3f} "
      f"(correlated noise model: {bool(m['real.noise_correlated'])}), largest |mean residual| "
      f"{m['real.residual_profile_max_abs']:.2f} sigma; report: {sys.argv[1][:-12]}report.md")
EOF
fi
