#!/usr/bin/env bash
# Issue 8 figures on one GPU, through the real `galsim-vqvae` commands (< 5 minutes on an H100):
#   1. a synthetic dataset (make-dataset --source synthetic, all cores);
#   2. train-vqvae images/s, 1 process, PSF/noise layers on, at each batch of $VQ_BATCHES (the
#      GPU is full where images/s stops growing; a batch that fails, e.g. out of memory, is
#      reported as failed, see vq_B.txt): the median of the log's images_per_s over the
#      quantized steps after the first quantized interval (k-means initialisation);
#   3. train-prior code maps/s, 1 process, on the codes of the best VQ-VAE run;
#   4. correctness: 2 processes on the one GPU through torchrun (gloo: NCCL refuses two ranks on
#      one GPU) for train-vqvae and train-prior. The trainers check at every checkpoint that the
#      ranks hold bit-identical weights and codebooks and fail otherwise; the 2 x B run's first
#      logged chi^2 values are compared with one process at 2B (equal up to rounding).
# Prints one SUMMARY line last; logs and results.json under $OUT (default /tmp/gpu_ddp).
#
# On the GPU machine, from the repository root (needs .whl/gpusite.tar.xz carried):
#   bash benchmarks/gpu_ddp.sh
# Its logic on a CPU, tiny sizes (about a minute on 2 cores):
#   GPU_DDP_DEVICE=cpu GPU_DDP_TINY=1 bash benchmarks/gpu_ddp.sh
# Sizes: GPU_DDP_N (stamps), VQ_BATCHES, VQ_STEPS, PRIOR_BATCH, PRIOR_STEPS, DDP_BATCH, DDP_STEPS;
# GPU_DDP_TIMEOUT: seconds allowed to each command (default 150).
set -uo pipefail
DEVICE=${GPU_DDP_DEVICE:-cuda}
OUT=${OUT:-/tmp/gpu_ddp}
WORK=${GPU_DDP_WORK:-/tmp/gpu_ddp_work}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore NCCL_NVLS_ENABLE=0
if [ -n "${GPU_DDP_TINY:-}" ]; then
  N=${GPU_DDP_N:-96}; VQ_BATCHES=${VQ_BATCHES:-"8 16"}; VQ_STEPS=${VQ_STEPS:-12}; LOG=2; AEW=4
  PRIOR_BATCH=${PRIOR_BATCH:-16}; PRIOR_STEPS=${PRIOR_STEPS:-8}; DDP_BATCH=${DDP_BATCH:-8}
  DDP_STEPS=${DDP_STEPS:-12}
  VQ_MODEL="--hidden 16 --embed-dim 8 --num-codes 32"; PRIOR_MODEL="--channels 8 --layers 2"
  export OMP_NUM_THREADS=1
else
  N=${GPU_DDP_N:-4096}; VQ_BATCHES=${VQ_BATCHES:-"512 1024 2048"}; VQ_STEPS=${VQ_STEPS:-80}
  LOG=10; AEW=20
  PRIOR_BATCH=${PRIOR_BATCH:-1024}; PRIOR_STEPS=${PRIOR_STEPS:-80}; DDP_BATCH=${DDP_BATCH:-256}
  DDP_STEPS=${DDP_STEPS:-40}
  VQ_MODEL=""; PRIOR_MODEL="--channels 64 --layers 10"   # the default-model recipe's sizes
fi
mkdir -p "$OUT" "$WORK"
T0=$(date +%s)
say() { echo "$*" | tee -a "$OUT/gpu_ddp.log"; }
TMO=${GPU_DDP_TIMEOUT:-150}   # seconds per command (a hung run is reported, rc 124)
cli() { timeout "$TMO" "$PY" -m galsim_vqvae.cli "$@"; }
: > "$OUT/gpu_ddp.log"

if [ "${DEVICE%%:*}" = cuda ]; then
  . benchmarks/gpu_site.sh  # GalSim and astropy for this machine's Python
  if ! "$PY" -c "import sys, galsim_vqvae.ops as o; sys.exit(o.backend() != 'cuda')" 2>/dev/null; then
    t=$(date +%s)
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
      "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || say "build failed: see build.log"
    say "build: $(( $(date +%s) - t )) s"
  fi
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/gpu_ddp.log" || true
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
BACKEND=$("$PY" -c "import galsim_vqvae.ops as o; print(o.backend())" 2>/dev/null | tail -1)
"$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available())" 2>&1 | tee -a "$OUT/gpu_ddp.log"
say "ops backend: ${BACKEND:-unknown}"

# 1. the dataset
DATA=$WORK/synthetic_$N.h5
if [ ! -f "$DATA" ]; then
  t=$(date +%s)
  cli make-dataset --source synthetic --n "$N" --seed 8 --workers "$(nproc)" --out "$DATA" --quiet \
      2>&1 | tee -a "$OUT/gpu_ddp.log"
  say "dataset: $N stamps in $(( $(date +%s) - t )) s"
fi

rm -rf "$WORK"/vq_* "$WORK/prior" "$WORK/ddp_vq" "$WORK/one_vq" "$WORK/ddp_prior"  # no stale runs

# 2. train-vqvae, one process, each batch
VQ_COMMON="--data $DATA --lr 3e-4 --warmup 5 --ae-warmup $AEW --restart-every 20 --log-every $LOG --checkpoint-every 100000 --seed 1 --device $DEVICE --quiet $VQ_MODEL"
for B in $VQ_BATCHES; do
  rm -rf "$WORK/vq_$B"
  t=$(date +%s)
  cli train-vqvae $VQ_COMMON --out "$WORK/vq_$B" --steps "$VQ_STEPS" --batch-size "$B" \
      > "$OUT/vq_$B.txt" 2>&1
  echo $? > "$WORK/vq_$B.rc"
  say "train-vqvae batch $B: rc $(cat "$WORK/vq_$B.rc") in $(( $(date +%s) - t )) s ($(tail -c 300 "$OUT/vq_$B.txt" | tr '\n' ' ' | tail -c 200))"
  cp "$WORK/vq_$B/log.jsonl" "$OUT/vq_$B.jsonl" 2>/dev/null || true
done

# 3. train-prior on the codes of the largest batch that ran
BEST=""; PRIOR_RC=skipped
for B in $VQ_BATCHES; do [ "$(cat "$WORK/vq_$B.rc")" = 0 ] && BEST=$B; done
if [ -n "$BEST" ]; then
  rm -rf "$WORK/prior"
  t=$(date +%s)
  cli train-prior --data "$DATA" --vqvae "$WORK/vq_$BEST" --out "$WORK/prior" --steps "$PRIOR_STEPS" \
      --batch-size "$PRIOR_BATCH" --lr 1e-3 $PRIOR_MODEL --log-every "$LOG" --checkpoint-every 100000 \
      --seed 1 --device "$DEVICE" --quiet > "$OUT/prior.txt" 2>&1
  PRIOR_RC=$?
  say "train-prior batch $PRIOR_BATCH: rc $PRIOR_RC in $(( $(date +%s) - t )) s"
  cp "$WORK/prior/log.jsonl" "$OUT/prior.jsonl" 2>/dev/null || true
fi

# 4. two processes on the one device (gloo), and one process at twice the batch
export GALSIM_VQVAE_DIST_BACKEND=gloo
DDP_COMMON="--data $DATA --lr 3e-4 --warmup 5 --ae-warmup $AEW --restart-every 5 --log-every $LOG --checkpoint-every $(( DDP_STEPS / 4 > 0 ? DDP_STEPS / 4 : 1 )) --seed 1 --device $DEVICE --quiet $VQ_MODEL --steps $DDP_STEPS"
t=$(date +%s)
OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} timeout "$TMO" "$PY" -m torch.distributed.run --standalone \
    --nproc_per_node 2 -m galsim_vqvae.cli train-vqvae $DDP_COMMON --out "$WORK/ddp_vq" --batch-size "$DDP_BATCH" \
    > "$OUT/ddp_vq.txt" 2>&1
DDP_VQ_RC=$?
DDP_PRIOR_RC=skipped
say "torchrun 2 x train-vqvae batch $DDP_BATCH: rc $DDP_VQ_RC in $(( $(date +%s) - t )) s"
cli train-vqvae $DDP_COMMON --out "$WORK/one_vq" --batch-size $(( 2 * DDP_BATCH )) > "$OUT/one_vq.txt" 2>&1
say "train-vqvae 1 x batch $(( 2 * DDP_BATCH )): rc $?"
if [ "$DDP_VQ_RC" = 0 ]; then
  t=$(date +%s)
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} timeout "$TMO" "$PY" -m torch.distributed.run --standalone \
      --nproc_per_node 2 -m galsim_vqvae.cli train-prior --data "$DATA" --vqvae "$WORK/ddp_vq" --out "$WORK/ddp_prior" \
      --steps "$DDP_STEPS" --batch-size "$PRIOR_BATCH" --lr 1e-3 $PRIOR_MODEL --log-every "$LOG" \
      --checkpoint-every $(( DDP_STEPS / 2 )) --seed 1 --device "$DEVICE" --quiet > "$OUT/ddp_prior.txt" 2>&1
  DDP_PRIOR_RC=$?
  say "torchrun 2 x train-prior batch $PRIOR_BATCH: rc $DDP_PRIOR_RC in $(( $(date +%s) - t )) s"
fi
cp "$WORK/ddp_vq/log.jsonl" "$OUT/ddp_vq.jsonl" 2>/dev/null || true
cp "$WORK/one_vq/log.jsonl" "$OUT/one_vq.jsonl" 2>/dev/null || true

# Summary
WORK=$WORK OUT=$OUT VQ_BATCHES="$VQ_BATCHES" AEW=$AEW LOG=$LOG DDP_BATCH=$DDP_BATCH \
PRIOR_BATCH=$PRIOR_BATCH DEVICE=$DEVICE DDP_STEPS=$DDP_STEPS DDP_VQ_RC=$DDP_VQ_RC \
DDP_PRIOR_RC=$DDP_PRIOR_RC PRIOR_RC=$PRIOR_RC BACKEND=${BACKEND:-unknown} ELAPSED=$(( $(date +%s) - T0 )) "$PY" - <<'PY' 2>&1 | tee -a "$OUT/gpu_ddp.log"
import json, os, statistics
import torch
from galsim_vqvae.train.checkpoint import load_checkpoint

env = os.environ
work, out = env["WORK"], env["OUT"]
aew, log_every = int(env["AEW"]), int(env["LOG"])


def rows(path):
    try:
        with open(path) as f:
            return [json.loads(line) for line in f]
    except OSError:
        return []


def rate(rs, key, after):
    vals = [r[key] for r in rs if r["step"] > after]
    return statistics.median(vals) if vals else None


device = torch.cuda.get_device_name(0) if env["DEVICE"].startswith("cuda") else "cpu"
res = {"device": device, "torch": torch.__version__, "ops_backend": env["BACKEND"], "vqvae": {},
       "elapsed_s": int(env["ELAPSED"])}
for b in env["VQ_BATCHES"].split():
    with open(f"{work}/vq_{b}.rc") as f:
        ran = f.read().strip() == "0"
    r = rate(rows(f"{work}/vq_{b}/log.jsonl"), "images_per_s", aew + log_every)
    res["vqvae"][b] = r if ran else None  # None: failed (e.g. out of memory: see vq_B.txt)
ran = {b: r for b, r in res["vqvae"].items() if r}
best = max(ran, key=lambda b: ran[b]) if ran else None
res["prior_maps_per_s"] = (rate(rows(f"{work}/prior/log.jsonl"), "maps_per_s", log_every)
                           if env["PRIOR_RC"] == "0" else None)
res["prior_batch"] = int(env["PRIOR_BATCH"])
two, one = rows(f"{work}/ddp_vq/log.jsonl"), rows(f"{work}/one_vq/log.jsonl")
ok = {}
for name in ("ddp_vq", "ddp_prior"):  # exit status 0 (the ranks' check passed), all steps done
    rc = env[name.upper() + "_RC"]
    try:
        ck = load_checkpoint(f"{work}/{name}/checkpoint.pt")
        ok[name] = rc == "0" and ck["step"] == int(env["DDP_STEPS"])
    except Exception as err:  # noqa: BLE001 - reported
        ok[name] = False
        res[name + "_error"] = f"rc {rc}: {err}"[:300]
res["ddp_identical"] = ok
# warm-up and the first two quantized intervals (later, rounding-flipped near-ties of the
# nearest-code search make two correct runs drift apart)
cmp = [abs(a["chi2"] - b["chi2"]) / abs(b["chi2"]) for a, b in zip(two, one)
       if a["step"] == b["step"] <= aew + 2 * log_every]
res["ddp_vs_one_chi2_rel_diff"] = max(cmp) if cmp else None
res["ddp_images_per_s"] = rate(two, "images_per_s", aew + log_every)
with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(res, f, indent=1)
fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
print("SUMMARY gpu_ddp: device=%s, ops %s; train-vqvae img/s %s (best batch %s); train-prior maps/s %s "
      "(batch %s); 2 ranks on one device (gloo): vqvae %s, prior %s (bit-identical ranks, checked "
      "by the trainers at each checkpoint), %s img/s, chi2 vs 1 process at 2x batch rel diff %s; %d s"
      % (device, env["BACKEND"], ", ".join(f"b{b}={fmt(r) if r else 'failed'}" for b, r in res["vqvae"].items()),
         best, fmt(res["prior_maps_per_s"]), res["prior_batch"],
         "ok" if ok.get("ddp_vq") else "FAILED", "ok" if ok.get("ddp_prior") else "FAILED",
         fmt(res["ddp_images_per_s"]),
         "-" if res["ddp_vs_one_chi2_rel_diff"] is None else f"{res['ddp_vs_one_chi2_rel_diff']:.2e}",
         res["elapsed_s"]))
PY
