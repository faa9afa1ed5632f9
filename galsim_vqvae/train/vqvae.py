"""Training the VQ-VAE through the instrument: decode, convolve with each stamp's PSF, compare
with the noisy stamp under its own Gaussian noise (chi^2), plus the codebook commitment loss.

The training split is held in memory on the device; batches follow a deterministic schedule (the
permutation of epoch ``e`` comes from ``(seed, e)``), so a resumed run needs only the step counter
and the saved model, optimizer and codebook state to continue exactly as an uninterrupted one.
Under ``torchrun`` the run is data-parallel (`galsim_vqvae.train.distributed`): ``batch_size`` is
per process, each rank takes its slice of every global batch, and a run resumes with any number
of processes.
"""

import json
import math
import os
import time

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import VQVAEFormatError, VQVAEInputError
from ..fileio import atomic_path
from ..nn.forward import NoiseLookup, chi2, convolve_psf, padded_size, psf_transform
from ..nn.quantizer import QuantizerOutput
from ..nn.vqvae import VQVAE
from . import distributed
from .checkpoint import CHECKPOINT_NAME, RunLock, load_checkpoint, save_checkpoint

TRAIN_KEYS = ("observed", "sigma", "psf_index", "noise_index", "weight")
NOISE_MODES = ("data", "independent")
GRAD_CLIP = 1.0
HISTORY_KEYS = ("step", "loss", "chi2", "perplexity", "usage", "images_per_s")
PSF_FT_CACHE_BYTES = 1 << 30  # precompute PSF transforms of banks up to this size
GALLERY_ROWS = 8
EVAL_STAMPS = 1024


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def _plain(value):
    """A header value as a plain Python type (checkpoints load with weights_only=True)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def load_split(data, split, keys, limit=None):
    """Arrays of one split of a dataset, and its header.

    Parameters:
        data:   Path of a dataset file (see `galsim_vqvae.data.dataset`), or an in-memory dict with
                the dataset's arrays (``observed``, ``sigma``, ``psf_index``, ``psf_bank``,
                optionally ``truth``) and optionally a ``header`` dict.
        split:  ``"train"`` or ``"test"`` (stamp i is held out iff ``i % 10 == 9``).
        keys:   Per-stamp arrays to load; ``psf_bank`` is always returned whole.
        limit:  Load at most the first ``limit`` stamps of the split. [default: None]

    Returns:
        (dict of numpy arrays, header dict of plain Python values).
    """
    if isinstance(data, dict):
        missing = [k for k in ("observed", "sigma", "psf_index", "psf_bank") if k not in data]
        if missing:
            raise VQVAEInputError(f"in-memory dataset lacks arrays {missing}")
        n = len(data["observed"])
        index = np.arange(n, dtype=np.int64)
        index = index[(index % 10 == 9) == (split == "test")]
        index = index[:limit] if limit is not None else index
        arrays = {k: np.asarray(data[k])[index] for k in keys if k in data}
        for bank in ("psf_bank", "noise_bank"):
            if bank in data:
                arrays[bank] = np.asarray(data[bank], dtype=np.float32)
        header = dict(data.get("header", {}))
        header.setdefault("stamp_size", int(np.asarray(data["observed"]).shape[-1]))
        header.setdefault("source", "in-memory")
        header.setdefault("path", None)
        header["n"] = n
    else:
        from ..data import dataset

        path = os.fspath(data)
        header = dict(dataset.read_header(path))
        n = int(header["n"])
        index = np.asarray(dataset.split_indices(n, split), dtype=np.int64)
        index = index[:limit] if limit is not None else index
        keys = [k for k in keys if k != "truth" or header.get("has_truth", True)]
        arrays = dataset.load_arrays(path, indices=index,
                                     keys=tuple(keys) + ("psf_bank", "noise_bank"))
        header["path"] = os.path.abspath(path)
    header = {k: _plain(v) for k, v in header.items()}
    if len(index) and "psf_index" in arrays:
        bad = (arrays["psf_index"] < 0) | (arrays["psf_index"] >= len(arrays["psf_bank"]))
        if bad.any():
            raise VQVAEFormatError(f"dataset {header.get('path')}: psf_index has values outside "
                                   f"[0, {len(arrays['psf_bank'])})")
    return arrays, header


def pick_image_scale(observed):
    """The network's pixel unit: the median over stamps of the brightest pixel of each stamp."""
    peaks = np.asarray(observed, dtype=np.float64).reshape(len(observed), -1).max(1)
    scale = float(np.median(peaks))
    if not (math.isfinite(scale) and scale > 0):
        raise VQVAEInputError(f"cannot set image_scale: the median stamp peak is {scale}")
    return scale


class BatchSchedule:
    """Deterministic batches: step ``s`` takes global batch ``s mod E`` of the permutation of
    epoch ``s // E`` (``E = n // (batch_size * world_size)`` steps an epoch), drawn from
    ``(seed, epoch)``; rank ``r`` of ``world_size`` processes takes the ``r``-th ``batch_size``
    rows of it (`galsim_vqvae.train.distributed.rank_slice`)."""

    def __init__(self, n, batch_size, seed, device, rank=0, world_size=1):
        if batch_size * world_size > n:
            raise VQVAEInputError(
                f"batch_size {batch_size}" + (f" x {world_size} processes" if world_size > 1
                                              else "") + f" exceeds the {n} training stamps")
        self.n, self.batch_size, self.seed, self.device = n, batch_size, seed, device
        self.rank, self.world_size = rank, world_size
        self.per_epoch = n // (batch_size * world_size)
        self._epoch, self._perm = None, None

    def indices(self, step):
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g)
            if torch.device(self.device).type == "cuda":  # no wait on the queued steps
                perm = perm.pin_memory()
            self._perm = perm.to(self.device, non_blocking=True)
            self._epoch = epoch
        return self._perm[distributed.rank_slice(k, self.batch_size, self.rank, self.world_size)]


# ----------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------

def forward_losses(model, observed, sigma, psf_ft=None, psf_layers=True, amp=False,
                   quantize=True, target=None, noise=None):
    """Losses of one batch.

    Parameters:
        model:      The `VQVAE`.
        observed:   [B, 1, S, S] noisy stamps (pixel units).
        sigma:      [B] noise sigma of each stamp.
        psf_ft:     [B, n, n//2+1] `psf_transform` of each stamp's PSF (used if psf_layers).
        psf_layers: Compare ``convolve_psf(decoded)`` (True) or ``decoded`` (False) with the
                    stamps. [default: True]
        amp:        Run the conv nets under bf16 autocast (CUDA). [default: False]
        quantize:   False decodes the encoder output directly (the autoencoder warm-up), with
                    no commitment loss and no codebook update. [default: True]
        target:     [B, 1, S, S] stamps the chi^2 compares with. [default: None, i.e.
                    ``observed``; see `noisy_pair` for an independent realisation]
        noise:      The batch's noise model, keyword arguments of `chi2` (``noise_power``,
                    ``weight``) from a `NoiseLookup`. [default: None, white noise, weight 1]

    Returns:
        dict of tensors: ``loss`` (mean chi^2/pixel + commitment), ``chi2`` [B], ``decoded``,
        ``model`` (what was compared with the stamps), and the `QuantizerOutput` as ``quant``.
    """
    with torch.autocast(device_type=observed.device.type, dtype=torch.bfloat16, enabled=amp):
        decoded, quant = _autoencode(model, observed, quantize)
    predicted = convolve_psf(decoded, psf_ft=psf_ft[:, None]) if psf_layers else decoded
    c2 = chi2(predicted, observed if target is None else target, sigma, **(noise or {}))
    return {"loss": c2.mean() + quant.commitment_loss, "chi2": c2, "decoded": decoded,
            "model": predicted, "quant": quant}


def _autoencode(model, observed, quantize):
    """(decoded, `QuantizerOutput`) of ``observed``; ``model`` is a `VQVAE`, or a `_Autoencoder`
    wrapped in `DistributedDataParallel` (whose forward pass must be the module call)."""
    if not isinstance(model, VQVAE):
        return model(observed, quantize)
    if quantize:
        return model(observed)
    z_e = model.encode(observed)
    decoded = model.decode(z_e)
    zero = torch.zeros((), device=observed.device)
    return decoded, QuantizerOutput(z_e, None, zero, zero, zero)


class _Autoencoder(nn.Module):
    """The VQ-VAE's training forward pass, quantized or not, as one module call: what
    `DistributedDataParallel` wraps."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, observed, quantize=True):
        return _autoencode(self.net, observed, quantize)


def train_step(model, optimizer, observed, sigma, psf_ft=None, psf_layers=True, amp=False,
               quantize=True, grad_clip=GRAD_CLIP, target=None, noise=None):
    """One optimizer step; returns detached (loss, mean chi^2/pixel, perplexity, usage) tensors
    without synchronising with the device."""
    out = forward_losses(model, observed, sigma, psf_ft, psf_layers, amp, quantize, target, noise)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    if grad_clip:
        # Global-norm clipping (no host sync). Adam is scale-invariant, so this only damps the
        # gradient spikes that bright, high-S/N stamps give the chi^2 loss.
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    q = out["quant"]
    return torch.stack([out["loss"].detach(), out["chi2"].detach().mean(),
                        q.perplexity.detach(), q.usage.detach()])


def noisy_pair(convolved, sigma, seed, step, rank=0, world_size=1):
    """Two independent noisy realisations of the PSF-convolved truths ``convolved`` [B, 1, S, S]
    under Gaussian noise of per-stamp ``sigma`` [B], drawn from ``(seed, step)`` alone (so a
    resumed run draws what an uninterrupted one does): the encoder's input and the chi^2 target.
    Rank ``rank`` of ``world_size`` processes takes its rows of the noise of the global batch, as
    `BatchSchedule` does with the stamps, so N ranks draw what one process of N*B does.

    Compared with the very stamp it encodes, a VQ-VAE learns to reproduce the noise it can see;
    with a non-negative decoder it can only fit the positive fluctuations, which leaves spurious
    faint blobs over the sky (on the GPU run of 2026-11-24, 26% of the flux of high-S/N
    reconstructions). Against an independent realisation, fitting the noise cannot lower the
    expected chi^2 (Noise2Noise, Lehtinen et al. 2018): the decoder learns the noiseless galaxy.
    """
    gen = torch.Generator(device=convolved.device)
    gen.manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63 - 1))
    s = sigma.float().reshape(-1, 1, 1, 1)
    b = convolved.shape[0]
    noise = torch.randn((2, b * world_size) + tuple(convolved.shape[1:]), generator=gen,
                        device=convolved.device)[:, rank * b:(rank + 1) * b]
    return convolved + s * noise[0], convolved + s * noise[1]


def learning_rate(step, lr, warmup, schedule, steps):
    """Linear warm-up over ``warmup`` steps, then constant or cosine decay to lr/10 at ``steps``."""
    factor = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if schedule == "cosine":
        t = min(1.0, step / max(1, steps))
        factor *= 0.1 + 0.45 * (1.0 + math.cos(math.pi * t))
    return lr * factor


def _psf_lookup(psf_bank, psf_index, device):
    """A function batch indices -> PSF transforms, precomputing the bank's transforms if small."""
    bank = torch.as_tensor(psf_bank, dtype=torch.float32, device=device)
    idx = torch.as_tensor(psf_index, dtype=torch.int64, device=device)
    n = bank.shape[-1]
    m = padded_size(n)
    if len(bank) * m * (m // 2 + 1) * 8 <= PSF_FT_CACHE_BYTES:
        bank_ft = psf_transform(bank)
        return lambda i: bank_ft[idx[i]]
    return lambda i: psf_transform(bank[idx[i]])


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

def prepare_model(net, device, lr, channels_last=None, compile=False):
    """Put ``net`` on ``device`` for training: channels-last convolutions (default on CUDA),
    cuDNN autotuning and fused Adam on CUDA, optional ``torch.compile`` of encoder and decoder.

    Returns:
        (Adam optimizer, whether channels-last is used).
    """
    cuda = device.type == "cuda"
    net.to(device)
    channels_last = cuda if channels_last is None else bool(channels_last)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    if cuda:
        torch.backends.cudnn.benchmark = True
    if compile:
        net.encoder.compile()
        net.decoder.compile()
    return torch.optim.Adam(net.parameters(), lr=lr, fused=cuda or None), channels_last


def train_vqvae(data, out, steps, batch_size=32, lr=3e-4, seed=0, device="cpu", psf_layers=True,
                model=None, log_every=50, checkpoint_every=500, gallery_every=None, resume=False,
                progress=True, warmup=100, ae_warmup=200, lr_schedule="constant", compile=False,
                channels_last=None, noise="data"):
    """Train a `VQVAE` on the training split of a dataset; checkpoint, log and draw a gallery.

    Parameters:
        data:               Dataset file path, or an in-memory dict (see `load_split`).
        out:                Run directory (created): ``checkpoint.pt``, ``log.jsonl``,
                            ``gallery.png``.
        steps:              Total optimizer steps (a resumed run continues up to it).
        batch_size:         Stamps per step. [default: 32]
        lr:                 Adam learning rate; 3e-4 to 5e-4 is stable, 1e-3 diverged at small
                            batches after codebook restarts. [default: 3e-4]
        seed:               Seed of the initial weights and of the batch schedule. [default: 0]
        device:             Torch device, e.g. ``"cpu"`` or ``"cuda"``. [default: "cpu"]
        psf_layers:         Train through the PSF (decoded galaxy convolved with each stamp's PSF
                            against the stamp); False trains a plain autoencoder of the observed
                            stamps with the same chi^2 weighting. [default: True]
        model:              `VQVAE` keyword arguments; ``stamp_size`` defaults to the dataset's,
                            ``image_scale`` is set from the training stamps. [default: None]
        log_every:          Steps between log lines (the only host syncs). [default: 50]
        checkpoint_every:   Steps between checkpoints (one is always written at the end).
                            [default: 500]
        gallery_every:      Steps between gallery PNGs (always drawn at the end). [default: None]
        resume:             Continue from ``out/checkpoint.pt``. [default: False]
        progress:           Show a progress bar. [default: True]
        warmup:             Linear learning-rate warm-up steps. [default: 100]
        ae_warmup:          Steps of plain autoencoder (no quantization) before the codebook is
                            initialised by k-means on the encoder outputs: without it the
                            commitment loss collapses the encoder onto one code before the
                            decoder's (weak, mostly-empty-sky) gradient shapes it. [default: 200]
        lr_schedule:        ``"constant"`` or ``"cosine"`` (to lr/10 at ``steps``).
                            [default: "constant"]
        compile:            ``torch.compile`` the encoder and decoder. [default: False]
        channels_last:      Channels-last convolutions [default: None, i.e. True on CUDA]
        noise:              ``"data"``: encode each stamp and compare with that same stamp.
                            ``"independent"`` (datasets with truth, PSF layers on): each step
                            draws two fresh noise realisations of the PSF-convolved truth, one
                            encoded and one compared with (`noisy_pair`), so the decoder cannot
                            fit the noise. [default: "data"]

    Returns:
        dict: ``step``, the last logged ``loss``, ``chi2``, ``perplexity``, ``usage``,
        ``images_per_s``, and held-out ``test_chi2`` (and ``test_rel_l2_truth``, the median
        relative L2 distance of decoded images to the truth, for synthetic data).
    """
    if noise not in NOISE_MODES:
        raise VQVAEInputError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
    if noise == "independent" and not psf_layers:
        raise VQVAEInputError("noise='independent' trains through the PSF layers; it cannot be "
                              "combined with psf_layers=False (--no-psf-layers)")
    if lr_schedule not in ("constant", "cosine"):
        raise VQVAEInputError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
    for name, v in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every),
                    ("checkpoint_every", checkpoint_every)):
        if not isinstance(v, int) or v < 1:
            raise VQVAEInputError(f"{name} must be a positive integer, got {v!r}")
    ctx = distributed.setup(device)  # one process, or this rank of a torchrun job
    ckpt_path = os.path.join(out, CHECKPOINT_NAME)

    def claim():  # the run directory, created and locked by rank 0
        return RunLock(out)  # creates the directory; removes it if the run fails at once

    def inputs():
        if not resume and os.path.exists(ckpt_path):
            raise VQVAEInputError(f"{ckpt_path} exists; pass resume=True (--resume) to continue "
                                  "that run, or choose another output directory")
        state = None
        if resume:
            if not os.path.exists(ckpt_path):
                raise VQVAEInputError(f"cannot resume: no checkpoint in {out}")
            state = load_checkpoint(ckpt_path)  # every rank loads it
        keys = TRAIN_KEYS + (("truth",) if noise == "independent" else ())
        arrays, header = load_split(data, "train", keys)
        if noise == "independent" and "truth" not in arrays:
            raise VQVAEInputError(f"noise='independent' needs a dataset with truth images; "
                                  f"{header.get('path') or 'the in-memory dataset'} has none")
        return state, arrays, header

    try:
        with ctx.main_context(claim):
            state, arrays, header = ctx.main_first(inputs)
            summary = _run(arrays, header, data, out, ckpt_path, state, steps, batch_size, lr,
                           seed, ctx, psf_layers, dict(model or {}), log_every,
                           checkpoint_every, gallery_every, progress, warmup, ae_warmup,
                           lr_schedule, compile, channels_last, noise)
            ctx.barrier()  # the ranks end together, after rank 0's evaluation and gallery
            return summary
    finally:
        ctx.close()


def _run(arrays, header, data, out, ckpt_path, state, steps, batch_size, lr, seed, ctx,
         psf_layers, model_kwargs, log_every, checkpoint_every, gallery_every, progress, warmup,
         ae_warmup, lr_schedule, compile, channels_last, noise):
    observed = arrays["observed"]
    s = int(observed.shape[-1])
    if observed.ndim != 3 or observed.shape[1] != s:
        raise VQVAEFormatError(f"dataset {header.get('path')}: observed has shape "
                               f"{observed.shape}, expected [N, S, S]")
    if model_kwargs.setdefault("stamp_size", s) != s:
        raise VQVAEInputError(f"the model's stamp_size is {model_kwargs['stamp_size']} but the "
                              f"dataset {header.get('path')} has {s}x{s} stamps")
    if arrays["psf_bank"].shape[-2:] != (s, s):
        raise VQVAEFormatError(f"dataset {header.get('path')}: psf_bank stamps are "
                               f"{arrays['psf_bank'].shape[-2:]}, observed are {s}x{s}")
    sigma_np = np.asarray(arrays["sigma"], dtype=np.float32)
    if not (np.isfinite(sigma_np).all() and (sigma_np > 0).all()):
        raise VQVAEFormatError(f"dataset {header.get('path')}: sigma must be finite and > 0")
    model_kwargs.setdefault("image_scale", pick_image_scale(observed))
    model_kwargs.setdefault("seed", seed)
    train_cfg = {"batch_size": batch_size, "lr": lr, "seed": seed, "psf_layers": bool(psf_layers),
                 "warmup": warmup, "ae_warmup": ae_warmup, "lr_schedule": lr_schedule,
                 "horizon": steps if lr_schedule == "cosine" else None, "noise": noise}

    dev = ctx.device
    torch.manual_seed(seed)
    net = VQVAE(**model_kwargs)
    if state is not None:
        _check_resume(state, net.config, train_cfg, ckpt_path)
        net.load_state_dict(state["model"])
    amp = dev.type == "cuda"
    optimizer, channels_last = prepare_model(net, dev, lr, channels_last, compile)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    ctx.share_codebook(net.quantizer)  # codebook updates from the global batch
    model = ctx.wrap(_Autoencoder(net)) if ctx.active else net
    history = {k: list(v) for k, v in state["history"].items()} if state else \
        {k: [] for k in HISTORY_KEYS}
    start = int(state["step"]) if state else 0

    obs = torch.as_tensor(observed, dtype=torch.float32).to(dev)[:, None]
    sig = torch.as_tensor(sigma_np).to(dev)
    psf_for = _psf_lookup(arrays["psf_bank"], arrays["psf_index"], dev)
    noise_for = NoiseLookup(*(arrays.get(k) for k in ("noise_bank", "noise_index", "weight")),
                            dev, f"dataset {header.get('path')}")
    if noise == "independent" and noise_for.bank is not None:  # noisy_pair draws white noise
        raise VQVAEInputError(f"noise='independent' draws white noise; dataset "
                              f"{header.get('path')} has correlated noise (noise_bank)")
    truth = (torch.as_tensor(np.asarray(arrays["truth"]), dtype=torch.float32).to(dev)[:, None]
             if noise == "independent" else None)
    schedule = BatchSchedule(len(obs), batch_size, seed, dev, ctx.rank, ctx.world_size)
    log_path = os.path.join(out, "log.jsonl")
    if ctx.is_main:
        _rewrite_log(log_path, history)

    def checkpoint(step):
        ctx.check_identical(net.state_dict(), "VQ-VAE weights or codebooks")
        if ctx.is_main:
            save_checkpoint({"model": net.state_dict(), "config": net.config,
                             "optimizer": optimizer.state_dict(), "step": step, "seed": seed,
                             "history": history, "data": header, "train": train_cfg,
                             "kind": "vqvae", "world_size": ctx.world_size}, ckpt_path)

    net.train()
    acc = torch.zeros(4, device=dev)
    n_acc, t0 = 0, time.perf_counter()
    bar = tqdm(total=steps, initial=start, disable=not (progress and ctx.is_main),
               desc="train-vqvae", dynamic_ncols=True)
    try:
        for step in range(start, steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, lr, warmup, lr_schedule, steps)
            i = schedule.indices(step)
            x, target = obs[i], None
            if truth is not None:
                x, target = noisy_pair(convolve_psf(truth[i], psf_ft=psf_for(i)[:, None]),
                                       sig[i], seed, step, ctx.rank, ctx.world_size)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            quantize = step >= ae_warmup
            if quantize and ctx.active and not net.quantizer._initialized:
                _init_codebook(ctx, net, x, amp)
            acc += train_step(model, optimizer, x, sig[i], psf_for(i) if psf_layers else None,
                              psf_layers, amp, quantize=quantize, target=target,
                              noise=noise_for(i))
            n_acc += 1
            done = step + 1
            bar.update(1)
            if done % log_every == 0 or done == steps:
                values = ctx.mean(acc / n_acc).tolist()  # the one host sync of the interval
                elapsed = time.perf_counter() - t0
                row = {"step": done, "loss": values[0], "chi2": values[1],
                       "perplexity": values[2], "usage": values[3],
                       "images_per_s": n_acc * batch_size * ctx.world_size / max(elapsed, 1e-9)}
                if not math.isfinite(row["loss"]):
                    raise FloatingPointError(f"training diverged at step {done}: loss "
                                             f"{row['loss']}; lower the learning rate ({lr})")
                for k in HISTORY_KEYS:
                    history[k].append(row[k])
                if ctx.is_main:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{row['loss']:.4g}", chi2=f"{row['chi2']:.4g}",
                                ppl=f"{row['perplexity']:.1f}", img_s=f"{row['images_per_s']:.0f}")
                acc.zero_()
                n_acc, t0 = 0, time.perf_counter()
            if done % checkpoint_every == 0 and done != steps:
                checkpoint(done)
            if gallery_every and done % gallery_every == 0 and done != steps and ctx.is_main:
                draw_gallery(net, data, os.path.join(out, "gallery.png"), psf_layers)
                net.train()
    finally:
        bar.close()
    final = max(start, steps)
    checkpoint(final)
    summary = {"step": final}
    summary.update({k: history[k][-1] for k in HISTORY_KEYS[1:] if history[k]})
    if ctx.is_main:  # the other ranks hold the same weights
        summary.update(evaluate(net, data, psf_layers))
        draw_gallery(net, data, os.path.join(out, "gallery.png"), psf_layers)
    return summary


def _init_codebook(ctx, net, x, amp):
    """Data-parallel runs: k-means-initialise the codebook on the global batch before the first
    quantized step, identically on every rank (a single process initialises it in that step)."""
    with torch.no_grad(), torch.autocast(device_type=x.device.type, dtype=torch.bfloat16,
                                         enabled=amp):
        z = net.encode(x)
    z = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    ctx.init_codebook(net.quantizer, z)


def _check_resume(state, config, train_cfg, path):
    old = state.get("config", {})
    diff = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v}
    if diff:
        raise VQVAEInputError(f"cannot resume from {path}: its model config differs "
                              f"(checkpoint vs now): {diff}")
    old_train = state.get("train", {})
    diff = {k: (old_train.get(k), v) for k, v in train_cfg.items() if old_train.get(k) != v}
    if diff:
        raise VQVAEInputError(f"cannot resume from {path}: its training settings differ "
                              f"(checkpoint vs now): {diff}")


def _rewrite_log(path, history):
    """``log.jsonl`` as the checkpoint's history says (drops lines of a crashed run's tail)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for j in range(len(history["step"])):
            f.write(json.dumps({k: history[k][j] for k in HISTORY_KEYS}) + "\n")


# ----------------------------------------------------------------------------------------------
# Held-out evaluation and gallery
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def reconstruct_split(net, data, psf_layers, split="test", limit=EVAL_STAMPS, chunk=256):
    """Decoded and reconstructed (convolved if psf_layers) images of up to ``limit`` stamps of
    ``split`` (the training split when the test split is empty), as numpy arrays with the inputs."""
    keys = ("observed", "sigma", "psf_index", "truth", "noise_index", "weight")
    arrays, _ = load_split(data, split, keys, limit)
    if len(arrays["observed"]) == 0:
        arrays, _ = load_split(data, "train", keys, limit)
    dev = next(net.parameters()).device
    was_training = net.training
    net.eval()
    psf_for = _psf_lookup(arrays["psf_bank"], arrays["psf_index"], dev)
    noise_for = NoiseLookup(*(arrays.get(k) for k in ("noise_bank", "noise_index", "weight")),
                            dev)
    decoded, model, c2 = [], [], []
    obs = torch.as_tensor(arrays["observed"], dtype=torch.float32)
    for a in range(0, len(obs), chunk):
        i = torch.arange(a, min(a + chunk, len(obs)), device=dev)
        x = obs[a:a + chunk, None].to(dev)
        out = forward_losses(net, x, torch.as_tensor(arrays["sigma"][a:a + chunk]).to(dev),
                             psf_for(i) if psf_layers else None, psf_layers,
                             amp=dev.type == "cuda", noise=noise_for(i))
        decoded.append(out["decoded"][:, 0].float().cpu())
        model.append(out["model"][:, 0].float().cpu())
        c2.append(out["chi2"].cpu())
    net.train(was_training)
    arrays.update(decoded=torch.cat(decoded).numpy(), model=torch.cat(model).numpy(),
                  chi2=torch.cat(c2).numpy())
    return arrays


def evaluate(net, data, psf_layers):
    """Held-out ``test_chi2`` (mean chi^2/pixel) and, with truth, ``test_rel_l2_truth``."""
    r = reconstruct_split(net, data, psf_layers)
    result = {"test_chi2": float(np.mean(r["chi2"]))}
    if "truth" in r:
        t = r["truth"].reshape(len(r["truth"]), -1).astype(np.float64)
        d = r["decoded"].reshape(len(t), -1).astype(np.float64)
        rel = np.linalg.norm(d - t, axis=1) / np.maximum(np.linalg.norm(t, axis=1), 1e-30)
        result["test_rel_l2_truth"] = float(np.median(rel))
    return result


def draw_gallery(net, data, path, psf_layers, rows=GALLERY_ROWS):
    """PNG of held-out stamps: observed | reconstruction | deconvolved | truth (when known)."""
    from ..plots import save_gallery

    r = reconstruct_split(net, data, psf_layers, limit=rows)
    columns = {"observed": r["observed"]}
    if psf_layers:
        columns["reconstruction (convolved)"] = r["model"]
        columns["deconvolved"] = r["decoded"]
    else:
        columns["reconstruction (no PSF layers)"] = r["decoded"]
    if "truth" in r:
        columns["truth"] = r["truth"]
    save_gallery(path, columns, title="VQ-VAE reconstructions of held-out stamps")
