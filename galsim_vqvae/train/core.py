"""What the two trainers (`galsim_vqvae.train.vqvae`, `galsim_vqvae.train.prior`) share: the
learning-rate schedule, the batch schedule, the checkpoint a run resumes from and the checks that
it may, the checkpoint of a step, and the run's log.

A run resumes exactly because everything a step does is a function of the step and of what the
checkpoint holds: the learning rate of step ``s`` depends on ``s`` (and the run's fixed
settings), its batch on ``(seed, s)``, and the weights, optimizer and codebook state are in the
checkpoint. So N steps straight and N/2 + N/2 resumed give the same weights on the CPU.
"""

import json
import math
import os

import torch

from ..errors import VQVAEInputError
from ..fileio import atomic_path
from . import distributed
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint

LOG_NAME = "log.jsonl"
SCHEDULES = ("constant", "cosine")
# How a checkpoint's entries are named in the refusal to resume it
_DIFFER = {"config": "model config differs", "train": "training settings differ",
           "classes": "class labels differ",
           "codes_fingerprint": "codes (the dataset's and the VQ-VAE's fingerprints) differ"}


def learning_rate(step, lr, warmup, schedule="constant", steps=None):
    """The learning rate of step ``step``: a linear warm-up over ``warmup`` steps, then constant
    (``schedule="constant"``) or a cosine decay to lr/10 at step ``steps`` (``"cosine"``)."""
    factor = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if schedule == "cosine":
        t = min(1.0, step / max(1, steps))
        factor *= 0.1 + 0.45 * (1.0 + math.cos(math.pi * t))
    return lr * factor


def epoch_permutation(seed, epoch, n):
    """The order [n] in which epoch ``epoch`` visits ``n`` items: a function of (seed, epoch)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)


class BatchSchedule:
    """Deterministic batches: step ``s`` takes global batch ``s mod E`` of the permutation of
    epoch ``s // E`` (``E = n // (batch_size * world_size)`` steps an epoch,
    `epoch_permutation`); rank ``r`` of ``world_size`` processes takes the ``r``-th
    ``batch_size`` rows of it (`galsim_vqvae.train.distributed.rank_slice`).

    Parameters:
        n:          Number of training items.
        batch_size: Items per step and process.
        seed:       Seed of the permutations.
        device:     Device of the returned indices.
        rank:       This process's rank. [default: 0]
        world_size: Number of processes. [default: 1]
        what:       What the items are, for the error when a batch exceeds them.
                    [default: "training stamps"]
    """

    def __init__(self, n, batch_size, seed, device, rank=0, world_size=1,
                 what="training stamps"):
        if batch_size * world_size > n:
            raise VQVAEInputError(
                f"batch_size {batch_size}" + (f" x {world_size} processes" if world_size > 1
                                              else "") + f" exceeds the {n} {what}")
        self.n, self.batch_size, self.seed, self.device = n, batch_size, seed, device
        self.rank, self.world_size = rank, world_size
        self.per_epoch = n // (batch_size * world_size)
        self._epoch, self._perm = None, None

    def indices(self, step):
        """Indices [batch_size] (int64, on the device) of this rank's items at step ``step``."""
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            perm = epoch_permutation(self.seed, epoch, self.n)
            if torch.device(self.device).type == "cuda":  # no wait on the queued steps
                perm = perm.pin_memory()
            self._perm = perm.to(self.device, non_blocking=True)
            self._epoch = epoch
        return self._perm[distributed.rank_slice(k, self.batch_size, self.rank, self.world_size)]


# ------------------------------------------------------------------------------------------------
# Checkpoints
def resume_state(out, resume, required):
    """The checkpoint of run directory ``out`` to continue, or None to start afresh.

    An existing checkpoint without ``resume`` is an error (never overwritten by accident); with
    ``resume`` and no checkpoint, the run starts afresh unless ``required``.
    """
    path = os.path.join(out, CHECKPOINT_NAME)
    if not os.path.exists(path):
        if resume and required:
            raise VQVAEInputError(f"cannot resume: no checkpoint in {out}")
        return None
    if not resume:
        raise VQVAEInputError(f"{path} exists; pass resume=True (--resume) to continue that run, "
                              "or choose another output directory")
    return load_checkpoint(path)


def check_resume(path, state, mine, defaults=None):
    """Refuse to resume checkpoint ``state`` (from ``path``) unless its entries match this run's.

    Parameters:
        path:       The checkpoint's path, for the message.
        state:      The loaded checkpoint.
        mine:       {entry: this run's value}, e.g. ``{"config": ..., "train": ...}``.
        defaults:   {entry: {key: value}}: what a checkpoint written before a key existed was
                    trained with. [default: None]

    Raises:
        VQVAEInputError naming the entry and what differs (checkpoint vs now).
    """
    for entry, value in mine.items():
        theirs = state.get(entry)
        if isinstance(value, dict) and isinstance(theirs, dict):
            theirs = {**(defaults or {}).get(entry, {}), **theirs}
            keys = list(value) + [k for k in theirs if k not in value]
            diff = {k: (theirs.get(k), value.get(k)) for k in keys
                    if theirs.get(k) != value.get(k)}
        else:
            diff = (theirs, value) if theirs != value else None
        if diff:
            raise VQVAEInputError(f"cannot resume from {path}: its "
                                  f"{_DIFFER.get(entry, entry + ' differ')} (checkpoint vs now): "
                                  f"{diff}")


def save_run(ctx, path, state, tensors, what):
    """Write the checkpoint ``state()`` to ``path`` (rank 0 alone, after checking that every
    rank holds the same ``tensors``, a dict name -> tensor, described as ``what``)."""
    ctx.check_identical(tensors, what)
    if ctx.is_main:
        save_checkpoint(state(), path)


# ------------------------------------------------------------------------------------------------
# The log
class RunLog:
    """``log.jsonl`` of a run: one JSON line per log step, written by rank 0 alone.

    A run starting at step ``start`` first drops the lines past it (written after the checkpoint
    it resumes from, or by an earlier attempt that never checkpointed), so that the log always
    tells the history of the weights.
    """

    def __init__(self, out, ctx, start):
        self.path = os.path.join(out, LOG_NAME)
        self.ctx = ctx
        if ctx.is_main and os.path.exists(self.path):
            with open(self.path) as f:
                lines = [ln for ln in f if ln.strip()]
            keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= start]
            if len(keep) != len(lines):
                with atomic_path(self.path) as tmp, open(tmp, "w") as f:
                    f.writelines(keep)

    def write(self, row):
        """Append ``row`` (a dict with ``step``)."""
        if self.ctx.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def check_finite(value, step, lr, what="loss"):
    """Stop a diverged run, saying what to do."""
    if not math.isfinite(value):
        raise FloatingPointError(f"training diverged at step {step}: {what} {value}; lower the "
                                 f"learning rate ({lr})")
