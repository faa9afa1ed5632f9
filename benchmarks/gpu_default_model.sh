#!/usr/bin/env bash
# On the lent GPU machine (device tool): train the default model and measure it, end to end.
#   bash benchmarks/gpu_default_model.sh start     # the whole chain, in the background (setsid)
#   bash benchmarks/gpu_default_model.sh wait S    # follow it for up to S seconds
#   bash benchmarks/gpu_default_model.sh collect   # copy the results to $OUT (bundle split in
#                                                  # parts of 15 MB: the device tool's file limit)
# A device command lasts at most 10 minutes, the chain longer: `start` then `wait 560`, and more
# `wait` calls issued at once (the machine stays held between calls that follow each other).
# The chain (each step logged to $RUN/chain.log, timed, skipped if its output exists):
#   1. GalSim/astropy for Python 3.12 from .whl/gpusite.tar.xz (benchmarks/make_gpu_site.sh);
#      the training set and the held-out set rendered (examples/train_default_model.sh dataset)
#      while the compiled ops build, then (BENCH=1) the generation benchmarks;
#   2. the VQ-VAE: each of VQ_VARIANTS ("NAME=train-vqvae loss options;NAME=...") trained side
#      by side, the one whose reconstructions of held-out stamps are the most realistic kept
#      (examples/select_vqvae.py); or, without VQ_VARIANTS, the recipe's own; beside it the
#      CUDA tests and (COSMOS=1) the overfit check on the 100 COSMOS galaxies
#      (examples/train_cosmos.sh, issue 18);
#   3. the prior (examples/train_default_model.sh prior), which writes the bundle;
#   4. the checks: the 64-sample gallery beside held-out truth and `galsim-vqvae evaluate` on
#      the held-out set (EVAL_N stamps and samples, all cores). examples/diagnose_model.py is
#      run on the CPU afterwards (one process).
# Needs carried: .whl (gpusite.tar.xz); optional .gpu_data/cosmos_btk for `evaluate --real`
# and the COSMOS overfit check.
# Across machines (a device call may get a fresh one): STOP_AFTER=vqvae ends the chain once the
# VQ-VAE is trained and chosen, and `collect` brings back its checkpoint (in parts) and log
# under vqvae/; put that folder, as it came back, at .gpu_carry/vqvae and carry .gpu_carry:
# the next chain renders the same stamps again, takes that VQ-VAE (resuming it up to VQ_STEPS)
# and goes on with the prior.
set -uo pipefail
ACTION=${1:-start}
export RUN=${RUN:-/tmp/runs/default}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore NCCL_NVLS_ENABLE=0
export WORKERS=${WORKERS:-$(nproc)}
EVAL_N=${EVAL_N:-10000}
export DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then export PYTHONPATH=$PWD; else . benchmarks/gpu_site.sh; fi
mkdir -p "$RUN"
LOG=$RUN/chain.log

step() {  # step NAME COMMAND...: run, time and log one step
  local name=$1; shift
  local t=$(date +%s)
  echo "[$(date +%T)] $name: start" >> "$LOG"
  "$@" > "$RUN/$name.log" 2>&1
  local rc=$?
  echo "[$(date +%T)] $name: rc $rc, $(( $(date +%s) - t )) s" >> "$LOG"
  return $rc
}

chain() {
  python3 -c "import torch, galsim; print('torch', torch.__version__, 'galsim', galsim.__version__, torch.cuda.get_device_name(0))" >> "$LOG" 2>&1
  # The compiled ops build while the training and held-out sets render (on all but 4 cores);
  # then, with BENCH=1, the generation benchmark of benchmarks/gpu_generation.sh (and with
  # BENCH_CONFIG=1 its config-path one) on the GPU while the CPU renders. The CUDA tests run later,
  # beside the VQ-VAE training.
  # (a local dry run: DEVICE=cpu N=300 N_HELDOUT=60 VQ_STEPS=6 AE_WARMUP=2 VQ_BATCH=16
  #  PRIOR_STEPS=4 PRIOR_BATCH=16 EVAL_N=20 bash benchmarks/gpu_default_model.sh chain)
  (export WORKERS=$(( WORKERS > 8 ? WORKERS - 4 : WORKERS ))
   step dataset bash examples/train_default_model.sh dataset) &
  local dataset=$!
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=4 step build python3 setup.py build_ext --inplace
  if [ "$DEVICE" != cpu ] && [ -n "${BENCH:-}" ]; then
    step bench_generation timeout 150 python3 benchmarks/gpu_generation.py --out "$RUN"
    [ -n "${BENCH_CONFIG:-}" ] && step bench_config timeout 150 \
        python3 benchmarks/gpu_config_path.py --device cuda --nobjects 2048 --nprocs 1 8 \
        --batch-size 256
  fi
  wait $dataset || return 1
  python3 -c "import galsim_vqvae.ops as o; print('ops backend', o.backend())" >> "$LOG" 2>&1
  # Beside the VQ-VAE training, on the same GPU: the COSMOS overfit check (issue 18:
  # examples/train_cosmos.sh on the 100 real galaxies, if carried in .gpu_data) and the CUDA
  # tests (done after the benchmarks, which want a quiet GPU).
  local side=()
  if [ -n "${COSMOS:-}" ] && [ -d .gpu_data/cosmos_btk ]; then
    (step cosmos_overfit env COSMOS_DIR=.gpu_data/cosmos_btk \
     CATALOG=real_galaxy_catalog_26_extension_example.fits RUN="$RUN/cosmos_overfit" \
     VQ_STEPS="${COSMOS_VQ_STEPS:-3000}" VQ_BATCH=64 AE_WARMUP=300 \
     PRIOR_STEPS="${COSMOS_PRIOR_STEPS:-1500}" PRIOR_BATCH=64 EVAL_N=100 EVAL_SPLIT=all QUIET=1 \
     bash examples/train_cosmos.sh) & side+=($!)
  fi
  if [ "$DEVICE" != cpu ]; then
    (cd tests && step cuda_tests timeout 400 python3 -m pytest -q -p no:cacheprovider -x \
        -m cuda test_compiled_sampling.py test_sampling.py test_emulator.py test_ops.py) & side+=($!)
  fi
  # The VQ-VAE variants (VQ_VARIANTS: NAME=train-vqvae loss options, ';'-separated), trained
  # side by side; examples/select_vqvae.py keeps the one whose reconstructions of held-out
  # stamps are the most realistic (lowest sum of KS statistics) as $RUN/vqvae.
  local pids=() dirs=() v
  IFS=';' read -ra variants <<< "${VQ_VARIANTS:-}"
  if [ -f .gpu_carry/vqvae/checkpoint.pt.part00 ] && [ ! -e "$RUN/vqvae" ]; then
    # a VQ-VAE trained by an earlier call (collect's vqvae/)
    if [ ! -f .gpu_carry/vqvae/options ]; then
      echo "[$(date +%T)] vqvae: rc 1, .gpu_carry/vqvae/options is missing (its loss and" \
           "padding options, written by collect): carry the whole vqvae/ folder" >> "$LOG"
      return 1
    fi
    mkdir -p "$RUN/vqvae_carried"
    cat .gpu_carry/vqvae/checkpoint.pt.part* > "$RUN/vqvae_carried/checkpoint.pt"
    cp .gpu_carry/vqvae/log.jsonl "$RUN/vqvae_carried/" 2>/dev/null
    cp .gpu_carry/vqvae/options "$RUN/vqvae_carried.options"
    export VQ_LOSS=$(cat "$RUN/vqvae_carried.options")
    local carried  # its step, or why the reassembled checkpoint does not load
    carried=$(python3 -c "import sys, torch; print('step', torch.load(sys.argv[1],
        map_location='cpu', weights_only=False)['step'])" "$RUN/vqvae_carried/checkpoint.pt" \
        2>&1 | tail -n 1) || {
      echo "[$(date +%T)] vqvae: rc 1, .gpu_carry/vqvae/checkpoint.pt.part* do not make a" \
           "checkpoint (a part missing?): $carried" >> "$LOG"
      rm -rf "$RUN/vqvae_carried" "$RUN/vqvae_carried.options"; return 1; }
    ln -s vqvae_carried "$RUN/vqvae"
    echo "[$(date +%T)] vqvae: carried in ($carried)" >> "$LOG"
    variants=()
  fi
  for v in "${variants[@]}"; do
    echo "${v#*=}" > "$RUN/vqvae_${v%%=*}.options"
    (VQ_DIR=$RUN/vqvae_${v%%=*} VQ_LOSS=${v#*=} step vqvae_${v%%=*} \
     bash examples/train_default_model.sh vqvae) & pids+=($!); dirs+=("$RUN/vqvae_${v%%=*}")
  done
  for v in "${pids[@]}"; do wait "$v" || return 1; done
  if [ ${#dirs[@]} -gt 0 ]; then
    step select python3 examples/select_vqvae.py --runs "${dirs[@]}" --data "$RUN/val.h5" \
        --n 1000 --workers "$WORKERS" --device "$DEVICE" --out "$RUN/selection.json" \
        --link "$RUN/vqvae" || return 1
  else
    [ -e "$RUN/vqvae" ] || echo "${VQ_LOSS:-}" > "$RUN/vqvae.options"
    step vqvae bash examples/train_default_model.sh vqvae || return 1
  fi
  if [ "${STOP_AFTER:-}" = vqvae ]; then echo "[$(date +%T)] chain done (STOP_AFTER=vqvae)" >> "$LOG"
    for v in "${side[@]}"; do wait "$v"; done; return 0; fi
  step prior bash examples/train_default_model.sh prior || return 1
  local model=$RUN/prior/model.safetensors
  step gallery python3 -m galsim_vqvae.cli gallery --model "$model" --data "$RUN/val.h5" \
      --n 64 --seed 1 --out "$RUN/gallery.png" --device "$DEVICE"
  local real=()
  [ -f .gpu_data/cosmos_btk/real_galaxy_catalog_26_extension_example.fits ] && \
      real=(--real .gpu_data/cosmos_btk/real_galaxy_catalog_26_extension_example.fits)
  step evaluate python3 -m galsim_vqvae.cli evaluate --model "$model" --n "$EVAL_N" \
      --data "$RUN/val.h5" --split all --seed 7 --device "$DEVICE" --workers "$WORKERS" --quiet \
      --out "$RUN/evaluate" "${real[@]}"
  for v in "${side[@]}"; do wait "$v"; done
  echo "[$(date +%T)] chain done" >> "$LOG"
}

case "$ACTION" in
  start)
    setsid nohup bash "$0" chain > "$RUN/chain.out" 2>&1 < /dev/null &
    sleep 5; cat "$LOG" ;;
  chain) chain ;;
  wait)
    end=$(( $(date +%s) + ${2:-560} ))
    while [ "$(date +%s)" -lt "$end" ] && ! grep -q "chain done\|: rc [1-9]" "$LOG" 2>/dev/null; do
      sleep 10
    done
    cat "$LOG"; tail -n 3 "$RUN"/*.log 2>/dev/null | tail -n 40 ;;
  collect)
    OUT=${OUT:-/tmp/out}
    mkdir -p "$OUT"
    split -b 15M -d "$RUN/prior/model.safetensors" "$OUT/model.safetensors.part" 2>/dev/null
    if [ -f "$RUN/vqvae/checkpoint.pt" ]; then  # the chosen VQ-VAE, for .gpu_carry/vqvae
      mkdir -p "$OUT/vqvae"
      split -b 15M -d "$RUN/vqvae/checkpoint.pt" "$OUT/vqvae/checkpoint.pt.part"
      cp "$RUN/vqvae/log.jsonl" "$OUT/vqvae/" 2>/dev/null
      cp "$RUN/$(basename "$(readlink -f "$RUN/vqvae")").options" "$OUT/vqvae/options"
    fi
    tar czf "$OUT/results.tgz" -C "$RUN" $(cd "$RUN" && ls -d chain.log evaluate gallery.png \
        training_curves.png vqvae*/log.jsonl vqvae*/gallery.png prior/log.jsonl *.log *.json \
        cosmos_overfit.log cosmos_overfit/evaluation cosmos_overfit/*/log.jsonl 2>/dev/null)
    ls -la "$OUT" ;;
esac
