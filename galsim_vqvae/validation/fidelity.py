"""Deconvolution fidelity: how well the model recovers the pre-PSF galaxy of a noisy stamp.

On held-out synthetic stamps with known truth, three reconstructions of the PSF-free galaxy are
compared with the truth, by S/N bin:

- ``vqvae``: the model's `Emulator.reconstruct` (encoded, quantized, decoded: trained through the
  PSF and noise, so it is a deconvolution);
- ``plain_ae``: a VQ-VAE trained without the PSF and noise layers (``train-vqvae
  --no-psf-layers``), which learns to reproduce the observed, PSF-convolved stamp;
- ``richardson_lucy``: Richardson-Lucy deconvolution (``skimage.restoration.richardson_lucy``) of
  the stamp with its own PSF, its number of iterations chosen per S/N bin to minimise the median
  relative L2 error against the truth (an oracle choice, favourable to Richardson-Lucy).

S/N is the matched-filter S/N of the stamp, sqrt(sum(noiseless observed^2)) / sigma (the
dataset's ``params/snr``; computed from truth and PSF if absent). Per stamp: relative L2 error
||r - t|| / ||t||, flux error sum(r) / sum(t) - 1, HSM size error sigma_r / sigma_t - 1 and
ellipticity error |e_r - e_t| (the modulus of the difference of the HSM distortions). Per bin:
medians (of the absolute values for the errors; the signed medians are the biases).
"""

import numpy as np

from ..errors import VQVAEInputError
from ..metrics import hsm_shapes, total_flux
from .common import Goal, Section, fmt, load_heldout, parallel_chunks

TITLE = "1. Deconvolution fidelity"
METHODS = ("vqvae", "plain_ae", "richardson_lucy")
METHOD_NAMES = {"vqvae": "VQ-VAE (this model)", "plain_ae": "plain autoencoder",
                "richardson_lucy": "Richardson-Lucy"}
SNR_EDGES = (0.0, 20.0, 50.0, 100.0, np.inf)
GOAL_SNR = 50.0
RL_ITERATIONS = (5, 10, 20, 40, 80)
RL_TUNING_STAMPS = 16
GOALS = {"flux_err": 0.01, "size_err": 0.03, "e_err": 0.02}
COMPARED = ("rel_l2", "flux_err", "size_err", "e_err")


def bin_names():
    """Names of the S/N bins: one per interval of `SNR_EDGES`, then the goal bin S/N > 50."""
    names = [f"snr_{lo:g}_{hi:g}" for lo, hi in zip(SNR_EDGES[:-1], SNR_EDGES[1:])]
    return names + [f"snr_gt{GOAL_SNR:g}"]


def bin_masks(snr):
    """Boolean masks of the stamps in each bin of `bin_names` (same order)."""
    snr = np.asarray(snr, dtype=np.float64)
    masks = [(snr >= lo) & (snr < hi) for lo, hi in zip(SNR_EDGES[:-1], SNR_EDGES[1:])]
    return masks + [snr > GOAL_SNR]


# ------------------------------------------------------------------------------------------------
# The reconstructions
def load_plain_autoencoder(path, device="cpu"):
    """The VQ-VAE of a ``train-vqvae --no-psf-layers`` run (its directory or ``checkpoint.pt``).

    Raises `VQVAEInputError` naming the path if it is missing, not a VQ-VAE checkpoint, or was
    trained through the PSF layers.
    """
    import os

    from ..devices import resolve_device
    from ..nn.vqvae import VQVAE
    from ..checkpoints import CHECKPOINT_NAME, load_checkpoint

    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    state = load_checkpoint(path)
    if state.get("train", {}).get("psf_layers", False):
        raise VQVAEInputError(f"--plain-ae {path} was trained through the PSF layers; give a run "
                              "of 'train-vqvae --no-psf-layers'")
    try:
        net = VQVAE.from_config(state["config"])
        net.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError) as err:
        raise VQVAEInputError(f"--plain-ae {path} is not a VQ-VAE checkpoint: {err}") from None
    return net.eval().to(resolve_device(device))


def plain_autoencoder_images(net, observed, batch_size=256):
    """The plain autoencoder's reproduction of observed stamps [n, S, S] (numpy float32)."""
    import torch

    device = next(net.parameters()).device
    s = net.config["stamp_size"]
    if observed.shape[1:] != (s, s):
        raise VQVAEInputError(f"the plain autoencoder works on {s}-pixel stamps, the dataset's "
                              f"are {observed.shape[1]} pixels")
    out = []
    with torch.no_grad():
        for a in range(0, len(observed), batch_size):
            x = torch.as_tensor(observed[a:a + batch_size], dtype=torch.float32)[:, None]
            out.append(net.decode_codes(net.encode_codes(x.to(device)))[:, 0].float().cpu())
    return torch.cat(out).numpy()


def richardson_lucy(observed, psf, sigma, num_iter):
    """Richardson-Lucy deconvolution of one noisy stamp [S, S] by its PSF [S, S] (centred at
    pixel S//2, sum 1), with ``skimage.restoration.richardson_lucy``.

    Richardson-Lucy needs non-negative data: a pedestal b = 3 sigma is added to the stamp (what
    is still negative is clipped to 0), the stamp is padded with b by a quarter of its side (so
    that the pedestal deconvolves to itself near the edges), and b is subtracted from the result.
    The PSF is cut to the largest odd square centred on its centre pixel and renormalised.
    """
    from ..extras import require

    require("skimage")
    from skimage.restoration import richardson_lucy as rl

    s = observed.shape[-1]
    c = s // 2
    half = min(c, s - 1 - c)
    kernel = np.asarray(psf, dtype=np.float64)[c - half:c + half + 1, c - half:c + half + 1]
    kernel = kernel / kernel.sum()
    b = 3.0 * float(sigma)
    pad = s // 4
    data = np.pad(np.asarray(observed, dtype=np.float64) + b, pad, constant_values=b)
    out = rl(np.clip(data, 0, None), kernel, num_iter=int(num_iter), clip=False)
    return (out[pad:pad + s, pad:pad + s] - b).astype(np.float32)


def richardson_lucy_images(observed, psf, sigma, truth, snr, progress=False, workers=1):
    """`richardson_lucy` of every stamp, the iteration count of each S/N bin (of the first
    `SNR_EDGES` intervals) chosen from `RL_ITERATIONS` on up to `RL_TUNING_STAMPS` of its stamps
    to minimise the median relative L2 error, in ``workers`` processes. Returns (images, dict
    bin name -> iterations)."""
    from tqdm import tqdm

    out = np.zeros_like(observed, dtype=np.float32)
    chosen = {}
    masks = bin_masks(snr)[:len(SNR_EDGES) - 1]
    bar = tqdm(total=len(observed), desc="Richardson-Lucy", leave=False, disable=not progress)
    for name, mask in zip(bin_names(), masks):
        idx = np.flatnonzero(mask)
        if not len(idx):
            continue
        def deconvolve(rows, k):
            return parallel_chunks(lambda a, b: np.stack(
                [richardson_lucy(observed[i], psf[i], sigma[i], k) for i in rows[a:b]]),
                len(rows), workers, chunk=16)

        tune = idx[:RL_TUNING_STAMPS]
        scores = [np.median(relative_l2(deconvolve(tune, k), truth[tune])) for k in RL_ITERATIONS]
        chosen[name] = RL_ITERATIONS[int(np.argmin(scores))]
        out[idx] = deconvolve(idx, chosen[name])
        bar.update(len(idx))
    bar.close()
    return out, chosen


# ------------------------------------------------------------------------------------------------
# Errors against the truth
def relative_l2(images, truth):
    """||image - truth|| / ||truth|| per stamp."""
    d = (np.asarray(images, np.float64) - np.asarray(truth, np.float64)).reshape(len(truth), -1)
    t = np.asarray(truth, np.float64).reshape(len(truth), -1)
    return np.linalg.norm(d, axis=1) / np.maximum(np.linalg.norm(t, axis=1), 1e-300)


def stamp_errors(images, truth, pixel_scale, truth_shapes=None):
    """Per-stamp errors of reconstructions against the truth: dict of arrays ``rel_l2``,
    ``flux_rel`` (sum ratio - 1), ``size_rel`` (HSM sigma ratio - 1), ``e_err`` (|e_r - e_t|);
    NaN where HSM fails on either image."""
    t = hsm_shapes(truth, pixel_scale) if truth_shapes is None else truth_shapes
    r = hsm_shapes(images, pixel_scale)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"rel_l2": relative_l2(images, truth),
                "flux_rel": total_flux(images) / total_flux(truth) - 1,
                "size_rel": r["sigma"] / t["sigma"] - 1,
                "e_err": np.hypot(r["e1"] - t["e1"], r["e2"] - t["e2"])}


def bin_summary(errors, mask):
    """Medians of one bin: ``n``, ``rel_l2``, ``flux_err`` (median |flux_rel|), ``flux_bias``,
    ``size_err``, ``size_bias``, ``e_err``, ``hsm_failed`` (fraction)."""
    def med(a):
        a = a[mask]
        a = a[np.isfinite(a)]
        return float(np.median(a)) if len(a) else np.nan

    n = int(mask.sum())
    failed = ~np.isfinite(errors["size_rel"][mask]) | ~np.isfinite(errors["e_err"][mask])
    return {"n": n, "rel_l2": med(errors["rel_l2"]),
            "flux_err": med(np.abs(errors["flux_rel"])), "flux_bias": med(errors["flux_rel"]),
            "size_err": med(np.abs(errors["size_rel"])), "size_bias": med(errors["size_rel"]),
            "e_err": med(errors["e_err"]),
            "hsm_failed": float(failed.mean()) if n else np.nan}


def snr_of(arrays):
    """The stamps' matched-filter S/N: ``params/snr`` or sqrt(sum((truth * psf)^2)) / sigma."""
    if "params/snr" in arrays:
        return np.asarray(arrays["params/snr"], dtype=np.float64)
    import torch

    from ..nn.forward import convolve_psf

    noiseless = convolve_psf(torch.as_tensor(arrays["truth"], dtype=torch.float32),
                             torch.as_tensor(arrays["psf"], dtype=torch.float32)).double().numpy()
    return np.sqrt((noiseless ** 2).sum(axis=(1, 2))) / arrays["sigma"]


# ------------------------------------------------------------------------------------------------
def run(emulator, data, n, out_dir, split="test", plain_ae=None, progress=False, workers=1):
    """The deconvolution-fidelity section on up to ``n`` stamps of ``data``'s ``split``.

    Parameters:
        emulator:   The `Emulator`.
        data:       A dataset file with truth (synthetic).
        n:          At most this many stamps.
        out_dir:    Folder for the figures.
        split:      "test" (held out, i % 10 == 9) or "all". [default: "test"]
        plain_ae:   A plain autoencoder (`load_plain_autoencoder`) or None. [default: None]
        progress:   Show progress bars. [default: False]
        workers:    Processes for Richardson-Lucy and the HSM measurements. [default: 1]

    Returns:
        A `Section` (metrics ``fidelity.<method>.<bin>.<quantity>``).
    """
    import os

    from ..plots import save_gallery, save_lines

    arrays = load_heldout(data, emulator, n, split)
    observed, truth, psf, sigma = (arrays[k] for k in ("observed", "truth", "psf", "sigma"))
    scale = float(emulator.metadata["pixel_scale"])
    snr = snr_of(arrays)
    truth_shapes = parallel_chunks(lambda a, b: hsm_shapes(truth[a:b], scale), len(truth),
                                   workers)
    images = {"vqvae": _batched(lambda a, b: emulator.reconstruct(
        observed[a:b], psf[a:b], sigma[a:b])[0], len(observed), progress, "VQ-VAE")}
    if plain_ae is not None:
        images["plain_ae"] = plain_autoencoder_images(plain_ae, observed)
    images["richardson_lucy"], rl_iterations = richardson_lucy_images(
        observed, psf, sigma, truth, snr, progress, workers)

    names, masks = bin_names(), bin_masks(snr)
    sec = Section(TITLE)
    summary = {}
    for method, rec in images.items():
        errors = parallel_chunks(lambda a, b: stamp_errors(
            rec[a:b], truth[a:b], scale, {k: v[a:b] for k, v in truth_shapes.items()}),
            len(rec), workers)
        summary[method] = {b: bin_summary(errors, m) for b, m in zip(names, masks)}
        for b, values in summary[method].items():
            for q, v in values.items():
                sec.metrics[f"fidelity.{method}.{b}.{q}"] = v
    for b, k in rl_iterations.items():
        sec.metrics[f"fidelity.richardson_lucy.{b}.iterations"] = k
    sec.metrics["fidelity.n"] = len(observed)

    src = arrays["header"]
    sec.lines += [
        f"{len(observed)} stamps of `{os.path.basename(src['path'])}` ({src['source']}, split "
        f"`{split}`), S/N = sqrt(sum(noiseless^2)) / sigma (median {np.median(snr):.3g}). "
        "Medians per S/N bin; errors are medians of absolute values, biases signed medians; "
        "size and e from HSM adaptive moments of truth and reconstruction.", ""]
    if plain_ae is None:
        sec.lines += ["*Plain autoencoder: skipped (no `--plain-ae`; train one with "
                      "`galsim-vqvae train-vqvae --no-psf-layers`).*", ""]
    sec.lines += ["Richardson-Lucy iterations per S/N bin (chosen against the truth): "
                  + ", ".join(f"{b}: {k}" for b, k in rl_iterations.items()), ""]
    header = ["method", "S/N bin", "n", "rel. L2", "flux err", "flux bias", "size err",
              "size bias", "e err", "HSM failed"]
    sec.lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for method in images:
        for b in names:
            v = summary[method][b]
            sec.lines.append(f"| {METHOD_NAMES[method]} | {b} | {v['n']} | " + " | ".join(
                fmt(v[q], 3) for q in ("rel_l2", "flux_err", "flux_bias", "size_err",
                                       "size_bias", "e_err", "hsm_failed")) + " |")
    sec.lines.append("")

    goal_bin = names[-1]
    ours = summary["vqvae"][goal_bin]
    for q, threshold in GOALS.items():
        sec.goals.append(Goal(f"fidelity_{q}", f"{q.replace('_', ' ')} at S/N > {GOAL_SNR:g}",
                              ours[q], threshold))
    for method in images:
        if method == "vqvae":
            continue
        other = summary[method][goal_bin]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = [ours[q] / other[q] for q in COMPARED]
        worst = max(ratios) if all(np.isfinite(ratios)) else np.nan
        goal = Goal(f"fidelity_better_than_{method}",
                    f"every median error ({', '.join(COMPARED)}) below {METHOD_NAMES[method]}'s "
                    f"at S/N > {GOAL_SNR:g} (value: the largest ratio ours / theirs)",
                    worst, 1.0)
        sec.goals.append(goal)
    if plain_ae is None:
        sec.goals.append(Goal("fidelity_better_than_plain_ae", "better than the plain "
                              "autoencoder (not measured: no --plain-ae)", np.nan, 1.0))

    categories = [f"{lo:g}-{hi:g}" if np.isfinite(hi) else f">{lo:g}"
                  for lo, hi in zip(SNR_EDGES[:-1], SNR_EDGES[1:])] + [f">{GOAL_SNR:g} (goal)"]
    panels = {}
    for q, label in (("rel_l2", "relative L2"), ("flux_err", "|flux error|"),
                     ("size_err", "|size error|"), ("e_err", "|e error|")):
        panels[label] = {"series": {METHOD_NAMES[m]: [summary[m][b][q] for b in names]
                                    for m in images},
                         "threshold": GOALS.get(q), "log": True}
    save_lines(os.path.join(out_dir, "fidelity.png"), categories, panels,
               title="Deconvolution fidelity by S/N bin (medians)")
    sec.figures.append("fidelity.png")
    rows = _gallery_rows(snr, 6)
    columns = {"observed": observed[rows], "truth": truth[rows]}
    columns.update({METHOD_NAMES[m]: images[m][rows] for m in images})
    save_gallery(os.path.join(out_dir, "fidelity_gallery.png"), columns,
                 title="held-out stamps, S/N increasing downwards")
    sec.figures.append("fidelity_gallery.png")
    return sec


def _batched(function, n, progress, desc, batch_size=256):
    from tqdm import tqdm

    parts = []
    for a in tqdm(range(0, n, batch_size), desc=desc, leave=False, disable=not progress):
        parts.append(function(a, min(n, a + batch_size)))
    return np.concatenate(parts)


def _gallery_rows(snr, k):
    order = np.argsort(snr)
    return order[np.linspace(0, len(order) - 1, min(k, len(order))).astype(int)]
