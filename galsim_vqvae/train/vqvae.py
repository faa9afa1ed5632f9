"""Training the VQ-VAE through the instrument: decode, convolve with each stamp's PSF, compare
with the noisy stamp under its own Gaussian noise (chi^2), plus the codebook commitment loss.

The training split is held in memory on the device; batches, learning rate, checkpoints and log
follow `galsim_vqvae.train.core`, so a resumed run needs only the step counter and the saved
model, optimizer and codebook state to continue exactly as an uninterrupted one.
Under ``torchrun`` the run is data-parallel (`galsim_vqvae.train.distributed`): ``batch_size`` is
per process, each rank takes its slice of every global batch, and a run resumes with any number
of processes.
"""

import math
import os
import time
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import dataset
from ..errors import VQVAEFormatError, VQVAEInputError
from ..nn.forward import (NoiseLookup, abs_deviation, chi2, convolve_psf, hybrid_deviation,
                          padded_size, psf_transform)
from ..nn.quantizer import QuantizerOutput
from ..nn.vqvae import LEGACY_CONFIG, VQVAE, legacy_config
from . import augment as dihedral
from . import core, distributed
from .augment import all_transforms
from .checkpoint import CHECKPOINT_NAME, RunLock
from .core import BatchSchedule, learning_rate

TRAIN_KEYS = ("observed", "sigma", "psf_index", "noise_index", "weight")
NOISE_MODES = ("data", "independent")
GRAD_CLIP = 1.0
HISTORY_KEYS = ("step", "loss", "chi2", "perplexity", "usage", "images_per_s")
TRUTH_KEY = "truth_chi2"  # history key of the truth term (runs with truth_weight > 0)
# Training settings added later, with the value that older checkpoints were trained with
SETTING_DEFAULTS = {"truth_weight": 0.0, "augment": False, "truth_norm": "l2"}
TRUTH_TERMS = {"l2": chi2, "l1": abs_deviation, "hybrid": hybrid_deviation}  # by truth_norm
TRUTH_NORMS = tuple(TRUTH_TERMS)
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
        index = dataset.split_indices(n, split)
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


# ----------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------

def forward_losses(model, observed, sigma, psf_ft=None, psf_layers=True, amp=False,
                   quantize=True, target=None, truth=None, truth_weight=0.0, noise=None,
                   truth_norm="l2"):
    """Losses of one batch: the one place where the training loss is put together.

    Parameters:
        model:          The `VQVAE`.
        observed:       [B, 1, S, S] noisy stamps (pixel units).
        sigma:          [B] noise sigma of each stamp.
        psf_ft:         [B, n, n//2+1] `psf_transform` of each stamp's PSF (used if psf_layers).
        psf_layers:     Compare ``convolve_psf(decoded)`` (True) or ``decoded`` (False) with the
                        stamps. [default: True]
        amp:            Run the conv nets under bf16 autocast (CUDA). [default: False]
        quantize:       False decodes the encoder output directly (the autoencoder warm-up), with
                        no commitment loss and no codebook update. [default: True]
        target:         [B, 1, S, S] stamps the chi^2 compares with. [default: None, i.e.
                        ``observed``; see `noisy_pair` for an independent realisation]
        truth:          [B, 1, S, S] pre-PSF truth of the stamps, for the truth term.
                        [default: None]
        truth_weight:   Weight W of the truth term: the loss gains ``W * mean over stamps of
                        chi2(decoded, truth, sigma)``, the decoded image's squared distance to
                        the truth per pixel in units of the stamp's noise sigma. [default: 0]
        noise:          The batch's noise model, keyword arguments of `chi2` (``noise_power``,
                        ``weight``) from a `NoiseLookup`. [default: None, white noise, weight 1]
        truth_norm:     ``"l2"``: the truth term is the squared distance above; ``"l1"``: the
                        mean absolute distance per pixel in units of sigma (`abs_deviation`),
                        whose pull on faint light does not fade with its amplitude, so that a
                        faint frame or halo is driven to exactly zero (and faint wings are
                        pulled down with it); ``"hybrid"``: the squared distance plus the l1
                        one over the truth's sky alone (`hybrid_deviation`). [default: "l2"]

    Returns:
        dict of tensors: ``loss`` (mean chi^2/pixel + commitment [+ W * truth term]), ``chi2``
        [B], ``truth_chi2`` [B] (zeros without truth), ``decoded``, ``model`` (what was compared
        with the stamps), and the `QuantizerOutput` as ``quant``.
    """
    with torch.autocast(device_type=observed.device.type, dtype=torch.bfloat16, enabled=amp):
        decoded, quant = _autoencode(model, observed, quantize)
    predicted = convolve_psf(decoded, psf_ft=psf_ft[:, None]) if psf_layers else decoded
    c2 = chi2(predicted, observed if target is None else target, sigma, **(noise or {}))
    loss = c2.mean() + quant.commitment_loss
    truth_c2 = torch.zeros_like(c2)
    if truth is not None:
        truth_c2 = TRUTH_TERMS[truth_norm](decoded, truth, sigma)
        if truth_weight:
            loss = loss + truth_weight * truth_c2.mean()
    return {"loss": loss, "chi2": c2, "truth_chi2": truth_c2, "decoded": decoded,
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
               quantize=True, grad_clip=GRAD_CLIP, target=None, truth=None, truth_weight=0.0,
               noise=None, truth_norm="l2"):
    """One optimizer step (the arguments are `forward_losses`'s); returns detached (loss, mean
    chi^2/pixel, perplexity, usage, mean truth chi^2/pixel) tensors without synchronising with
    the device."""
    out = forward_losses(model, observed, sigma, psf_ft, psf_layers, amp, quantize, target,
                         truth, truth_weight, noise, truth_norm)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    if grad_clip:
        # Global-norm clipping (no host sync). Adam is scale-invariant, so this only damps the
        # gradient spikes that bright, high-S/N stamps give the chi^2 loss.
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    q = out["quant"]
    return torch.stack([out["loss"].detach(), out["chi2"].detach().mean(),
                        q.perplexity.detach(), q.usage.detach(),
                        out["truth_chi2"].detach().mean()])


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


def _psf_lookup(psf_bank, psf_index, device, augment=False):
    """A function (batch indices, transforms) -> PSF transforms [B, n, n//2+1] of those stamps'
    PSFs, each turned by its `augment` transform (None: as they are; ``augment=True`` prepares
    the bank's 8 variants). The bank's transforms are precomputed if small."""
    bank = torch.as_tensor(psf_bank, dtype=torch.float32, device=device)
    if augment:
        bank = all_transforms(bank)  # [8, P, S, S]
    idx = torch.as_tensor(psf_index, dtype=torch.int64, device=device)
    m = padded_size(bank.shape[-1])
    pick = (lambda b, i, k: b[idx[i]]) if not augment else (lambda b, i, k: b[k, idx[i]])
    if bank.shape[:-2].numel() * m * (m // 2 + 1) * 8 <= PSF_FT_CACHE_BYTES:
        bank_ft = psf_transform(bank)
        return lambda i, k=None: pick(bank_ft, i, k)
    return lambda i, k=None: psf_transform(pick(bank, i, k))


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
                channels_last=None, noise="data", truth_weight=0.0, augment=False,
                truth_norm="l2"):
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
                            ``image_scale`` is set from the training stamps; a resumed run takes
                            the checkpoint's value of each key not given (a given one must
                            match it). [default: None]
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
        truth_weight:       Weight W of a term that compares the decoded (pre-PSF) image with
                            the truth (datasets with truth, PSF layers on): the loss gains
                            ``W * mean over the batch of mean over pixels of ((decoded - truth)
                            / sigma)^2``, sigma the stamp's noise sigma; logged as
                            ``truth_chi2``. It constrains what the PSF leaves free (light at the
                            stamp's edge, deconvolution ringing). [default: 0]
        truth_norm:         ``"l2"`` (the squared distance above), ``"l1"`` (mean absolute
                            distance in units of sigma: drives faint light to exactly zero, the
                            galaxy's faint wings included) or ``"hybrid"`` (the squared distance
                            plus the l1 one over the pixels where the truth is below
                            `SKY_THRESHOLD` sigma: faint junk off the galaxy to zero, the
                            galaxy's light unbiased; `hybrid_deviation`). [default: "l2"]
        augment:            Give each stamp of a batch one of the 8 rotations/flips about its
                            centre pixel (`galsim_vqvae.train.augment`), the same for its
                            observed stamp, truth and PSF, drawn from (seed, step). [default: False]

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
    if isinstance(truth_weight, bool) or not isinstance(truth_weight, (int, float)) \
            or not (math.isfinite(truth_weight) and truth_weight >= 0):
        raise VQVAEInputError(f"truth_weight must be a finite number >= 0, got {truth_weight!r}")
    if truth_weight and not psf_layers:
        raise VQVAEInputError("truth_weight compares the pre-PSF decoded image with the truth; it "
                              "needs the PSF layers (not psf_layers=False, --no-psf-layers)")
    if truth_norm not in TRUTH_NORMS:
        raise VQVAEInputError(f"truth_norm must be one of {TRUTH_NORMS}, got {truth_norm!r}")
    if not isinstance(augment, bool):
        raise VQVAEInputError(f"augment must be True or False, got {augment!r}")
    needs_truth = {"noise='independent'": noise == "independent",
                   f"truth_weight={truth_weight:g}": truth_weight > 0}
    needs_truth = [k for k, v in needs_truth.items() if v]
    if lr_schedule not in core.SCHEDULES:
        raise VQVAEInputError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
    for name, v in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every),
                    ("checkpoint_every", checkpoint_every)):
        if not isinstance(v, int) or v < 1:
            raise VQVAEInputError(f"{name} must be a positive integer, got {v!r}")
    # What a resumed run must share with the checkpoint (`core.check_resume`) ...
    settings = {"batch_size": batch_size, "lr": lr, "seed": seed, "psf_layers": bool(psf_layers),
                "warmup": warmup, "ae_warmup": ae_warmup, "lr_schedule": lr_schedule,
                "horizon": steps if lr_schedule == "cosine" else None, "noise": noise,
                "truth_weight": float(truth_weight), "augment": augment, "truth_norm": truth_norm}
    # ... and what it may change
    run = SimpleNamespace(data=data, out=out, steps=steps, model=dict(model or {}),
                          log_every=log_every, checkpoint_every=checkpoint_every,
                          gallery_every=gallery_every, progress=progress, compile=compile,
                          channels_last=channels_last)
    ctx = distributed.setup(device)  # one process, or this rank of a torchrun job

    def claim():  # the run directory, created and locked by rank 0
        return RunLock(out)  # creates the directory; removes it if the run fails at once

    def inputs():
        state = core.resume_state(out, resume, required=True)  # every rank loads it
        keys = TRAIN_KEYS + (("truth",) if needs_truth else ())
        arrays, header = load_split(data, "train", keys)
        if needs_truth and "truth" not in arrays:
            raise VQVAEInputError(f"{' and '.join(needs_truth)} "
                                  f"need{'s' if len(needs_truth) == 1 else ''} a dataset with "
                                  f"truth images; {header.get('path') or 'the in-memory dataset'}"
                                  " has none")
        return state, arrays, header

    try:
        with ctx.main_context(claim):
            state, arrays, header = ctx.main_first(inputs)
            summary = _run(arrays, header, state, ctx, settings, run)
            ctx.barrier()  # the ranks end together, after rank 0's evaluation and gallery
            return summary
    finally:
        ctx.close()


def _check_inputs(arrays, header, model_kwargs):
    """The training arrays agree with each other and with the model's stamp size; returns the
    stamp size."""
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
    sigma = np.asarray(arrays["sigma"], dtype=np.float32)
    if not (np.isfinite(sigma).all() and (sigma > 0).all()):
        raise VQVAEFormatError(f"dataset {header.get('path')}: sigma must be finite and > 0")
    return s


def _run(arrays, header, state, ctx, settings, run):
    """The training loop of `train_vqvae` on the loaded training split: ``state`` is the
    checkpoint to resume (or None), ``settings`` what the checkpoint records and a resumed run
    must match, ``run`` the other arguments of `train_vqvae`."""
    cfg = SimpleNamespace(**settings)
    seed, steps, noise, truth_weight = cfg.seed, run.steps, cfg.noise, cfg.truth_weight
    truth_norm = cfg.truth_norm
    model_kwargs = run.model
    if state is not None:  # the checkpoint's model, but for the keys the caller sets (checked)
        model_kwargs = {**legacy_config(state["config"]), **model_kwargs}
    s = _check_inputs(arrays, header, model_kwargs)
    model_kwargs.setdefault("image_scale", pick_image_scale(arrays["observed"]))
    model_kwargs.setdefault("seed", seed)
    ckpt_path = os.path.join(run.out, CHECKPOINT_NAME)

    dev = ctx.device
    torch.manual_seed(seed)
    net = VQVAE(**model_kwargs)
    if state is not None:
        core.check_resume(ckpt_path, state, {"config": net.config, "train": settings},
                          defaults={"train": SETTING_DEFAULTS, "config": LEGACY_CONFIG})
        net.load_state_dict(state["model"])
    amp = dev.type == "cuda"
    optimizer, channels_last = prepare_model(net, dev, cfg.lr, run.channels_last, run.compile)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    ctx.share_codebook(net.quantizer)  # codebook updates from the global batch
    model = ctx.wrap(_Autoencoder(net)) if ctx.active else net
    history_keys = HISTORY_KEYS + ((TRUTH_KEY,) if truth_weight else ())
    history = {k: list(v) for k, v in state["history"].items()} if state else \
        {k: [] for k in history_keys}
    start = int(state["step"]) if state else 0

    obs = torch.as_tensor(arrays["observed"], dtype=torch.float32).to(dev)[:, None]
    sig = torch.as_tensor(np.asarray(arrays["sigma"], dtype=np.float32)).to(dev)
    psf_for = _psf_lookup(arrays["psf_bank"], arrays["psf_index"], dev, cfg.augment)
    noise_for = NoiseLookup(*(arrays.get(k) for k in ("noise_bank", "noise_index", "weight")),
                            dev, f"dataset {header.get('path')}")
    if cfg.augment and (noise_for.bank is not None or noise_for.weight is not None):
        raise VQVAEInputError(f"dataset {header.get('path')}: --augment turns the stamps but not "
                              "their correlated-noise spectra or weight maps; train this dataset "
                              "without --augment")
    if noise == "independent" and noise_for.bank is not None:  # noisy_pair draws white noise
        raise VQVAEInputError(f"noise='independent' draws white noise; dataset "
                              f"{header.get('path')} has correlated noise (noise_bank)")
    truth = (torch.as_tensor(np.asarray(arrays["truth"]), dtype=torch.float32).to(dev)[:, None]
             if "truth" in arrays else None)
    turn = dihedral.Dihedral(s, dev) if cfg.augment else None
    schedule = BatchSchedule(len(obs), cfg.batch_size, seed, dev, ctx.rank, ctx.world_size)
    log = core.RunLog(run.out, ctx, start)

    def checkpoint(step):
        core.save_run(ctx, ckpt_path, lambda: {
            "model": net.state_dict(), "config": net.config, "optimizer": optimizer.state_dict(),
            "step": step, "seed": seed, "history": history, "data": header, "train": settings,
            "kind": "vqvae", "world_size": ctx.world_size},
            net.state_dict(), "VQ-VAE weights or codebooks")

    net.train()
    acc = torch.zeros(5, device=dev)
    n_acc, t0 = 0, time.perf_counter()
    bar = tqdm(total=steps, initial=start, disable=not (run.progress and ctx.is_main),
               desc="train-vqvae", dynamic_ncols=True)
    try:
        for step in range(start, steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, cfg.lr, cfg.warmup, cfg.lr_schedule, steps)
            i = schedule.indices(step)
            k = (dihedral.draw(seed, step, len(i), dev, ctx.rank, ctx.world_size)
                 if cfg.augment else None)
            psf_ft = psf_for(i, k) if cfg.psf_layers else None
            tru = None if truth is None else truth[i] if k is None else turn.apply(truth[i], k)
            x, target = (obs[i] if k is None else turn.apply(obs[i], k)), None
            if noise == "independent":
                x, target = noisy_pair(convolve_psf(tru, psf_ft=psf_ft[:, None]), sig[i], seed,
                                       step, ctx.rank, ctx.world_size)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            quantize = step >= cfg.ae_warmup
            if quantize and ctx.active and not net.quantizer.is_initialized:
                _init_codebook(ctx, net, x, amp)
            acc += train_step(model, optimizer, x, sig[i], psf_ft, cfg.psf_layers, amp,
                              quantize=quantize, target=target,
                              truth=tru if truth_weight else None, truth_weight=truth_weight,
                              noise=noise_for(i), truth_norm=truth_norm)
            n_acc += 1
            done = step + 1
            bar.update(1)
            if done % run.log_every == 0 or done == steps:
                values = ctx.mean(acc / n_acc).tolist()  # the one host sync of the interval
                elapsed = time.perf_counter() - t0
                row = dict(zip(("step", "loss", "chi2", "perplexity", "usage", TRUTH_KEY),
                               [done] + values))
                row["images_per_s"] = (n_acc * cfg.batch_size * ctx.world_size
                                       / max(elapsed, 1e-9))
                core.check_finite(row["loss"], done, cfg.lr)
                row = {key: row[key] for key in history_keys}
                for key in history_keys:
                    history[key].append(row[key])
                log.write(row)
                bar.set_postfix(loss=f"{row['loss']:.4g}", chi2=f"{row['chi2']:.4g}",
                                ppl=f"{row['perplexity']:.1f}", img_s=f"{row['images_per_s']:.0f}")
                acc.zero_()
                n_acc, t0 = 0, time.perf_counter()
            if done % run.checkpoint_every == 0 and done != steps:
                checkpoint(done)
            if (run.gallery_every and done % run.gallery_every == 0 and done != steps
                    and ctx.is_main):
                draw_gallery(net, run.data, os.path.join(run.out, "gallery.png"), cfg.psf_layers)
                net.train()
    finally:
        bar.close()
    final = max(start, steps)
    checkpoint(final)
    summary = {"step": final}
    summary.update({k: history[k][-1] for k in history_keys[1:] if history[k]})
    if ctx.is_main:  # the other ranks hold the same weights
        summary.update(evaluate(net, run.data, cfg.psf_layers))
        draw_gallery(net, run.data, os.path.join(run.out, "gallery.png"), cfg.psf_layers)
    return summary


def _init_codebook(ctx, net, x, amp):
    """Data-parallel runs: k-means-initialise the codebook on the global batch before the first
    quantized step, identically on every rank (a single process initialises it in that step)."""
    with torch.no_grad(), torch.autocast(device_type=x.device.type, dtype=torch.bfloat16,
                                         enabled=amp):
        z = net.encode(x)
    z = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    ctx.init_codebook(net.quantizer, z)


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
