"""Realism: galaxies sampled from the prior against held-out truth, statistic by statistic.

The samples are conditioned on the labels of the held-out truth stamps (clipped to the model's
training range; cycled when more samples than stamps are asked for), so that both sets describe
the same population. For each statistic of `galsim_vqvae.metrics.morphology` (flux, HSM size,
HSM |e|, concentration, asymmetry, Gini, M20, and the edge flux, the fraction of the flux in the
outer 6 pixels of the stamp): the two-sample Kolmogorov-Smirnov statistic
(``scipy.stats.ks_2samp``) with its p-value, the 5% critical value of the KS statistic for these
sample sizes, 1.358 sqrt((n + m) / (n m)), and the relative mean difference
mean(samples) / mean(truth) - 1.
"""

import numpy as np

from ..metrics import MORPHOLOGY, morphology
from .common import Goal, Section, cell, fmt, load_heldout, parallel_chunks

TITLE = "2. Realism: prior samples against held-out truth"
KS_GOAL = 0.05
MEAN_GOAL = 0.02
MEAN_GOAL_STATISTICS = ("size", "e")
LABELS = {"flux": "flux", "size": "HSM size (arcsec)", "e": "HSM |e|",
          "concentration": "concentration C", "asymmetry": "asymmetry A", "gini": "Gini",
          "m20": "M20", "edge": "edge flux (outer 6 px)"}


def conditions_like(emulator, params, n):
    """``n`` conditions for the prior from a dataset's labels (dict ``params/NAME`` -> array),
    clipped to the training range and cycled, with the class label where the model has one and
    the dataset records it; None for an unconditional model."""
    names = emulator.condition_names
    label = emulator.class_label
    if not names and not label:
        return None
    info = emulator.metadata["conditions"]
    missing = [k for k in names if f"params/{k}" not in params]
    if missing:
        from ..errors import VQVAEInputError

        raise VQVAEInputError(f"the dataset has no labels {missing} for the model's conditions "
                              f"{names}")
    out = {}
    for c, name in enumerate(names):
        values = np.asarray(params[f"params/{name}"], dtype=np.float64)
        out[name] = np.clip(np.resize(values, n), info["min"][c], info["max"][c])
    if label and f"params/{label}" in params:  # else drawn from the bundle's label table
        out[label] = np.resize(np.asarray(params[f"params/{label}"]).astype(np.int64), n)
    return out or None


def compare(samples, truth):
    """KS statistic, p-value, 5% critical value and relative mean difference of two samples
    (NaNs dropped), as a dict."""
    from scipy.stats import ks_2samp

    a = np.asarray(samples, dtype=np.float64)
    b = np.asarray(truth, dtype=np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) < 2 or len(b) < 2:
        return {"ks": np.nan, "ks_p": np.nan, "ks_crit": np.nan, "mean_rel": np.nan,
                "n_samples": len(a), "n_truth": len(b)}
    result = ks_2samp(a, b)
    mean_b = b.mean()
    return {"ks": float(result.statistic), "ks_p": float(result.pvalue),
            "ks_crit": float(1.358 * np.sqrt((len(a) + len(b)) / (len(a) * len(b)))),
            "mean_rel": float(a.mean() / mean_b - 1) if mean_b != 0 else np.nan,
            "n_samples": len(a), "n_truth": len(b)}


def run(emulator, data, n, out_dir, split="test", seed=0, progress=False, workers=1):
    """The realism section: ``n`` prior samples against up to ``n`` stamps of ``data``'s
    ``split`` (statistics measured in ``workers`` processes). Returns (`Section`, the sampled
    code maps, their conditions)."""
    import os

    from ..plots import save_gallery, save_histograms

    arrays = load_heldout(data, emulator, n, split, keys=("truth", "params"))
    truth = arrays["truth"]
    conditions = conditions_like(emulator, arrays, n)
    codes = emulator.sample_codes(n, conditions, seed=seed, progress=progress)
    samples = emulator.decode(codes)
    scale = float(emulator.metadata["pixel_scale"])
    stats_s = parallel_chunks(lambda a, b: morphology(samples[a:b], scale), len(samples), workers)
    stats_t = parallel_chunks(lambda a, b: morphology(truth[a:b], scale), len(truth), workers)

    sec = Section(TITLE)
    sec.metrics.update({"realism.n_samples": n, "realism.n_truth": len(truth)})
    sec.lines += [
        f"{n} prior samples (seed {seed}) conditioned on the labels "
        f"{list(conditions) if conditions else '(none: unconditional model)'} of "
        f"{len(truth)} truth stamps (split `{split}`); statistics of the noiseless pre-PSF images "
        "(`galsim_vqvae.metrics`, see docs/evaluate.md for definitions and sources).", "",
        "| statistic | mean (samples) | mean (truth) | rel. mean diff | KS | KS 5% critical "
        "| KS p |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in MORPHOLOGY:
        c = compare(stats_s[name], stats_t[name])
        for k, v in c.items():
            sec.metrics[f"realism.{name}.{k}"] = v
        sec.lines.append(f"| {cell(LABELS[name])} | {fmt(np.nanmean(stats_s[name]))} | "
                         f"{fmt(np.nanmean(stats_t[name]))} | {fmt(c['mean_rel'], 3)} | "
                         f"{fmt(c['ks'], 3)} | {fmt(c['ks_crit'], 3)} | {fmt(c['ks_p'], 3)} |")
        sec.goals.append(Goal(f"realism_ks_{name}", f"KS of {LABELS[name]}", c["ks"], KS_GOAL))
    for name in MEAN_GOAL_STATISTICS:
        value = abs(sec.metrics[f"realism.{name}.mean_rel"])
        sec.goals.append(Goal(f"realism_mean_{name}", f"|relative mean difference| of "
                              f"{LABELS[name]}", value, MEAN_GOAL))
    sec.lines.append("")
    if n < 10000 or len(truth) < 10000:
        sec.lines += [f"The KS goal is set for 10,000 samples; with these sample sizes the KS "
                      f"statistic of two draws of one population exceeds "
                      f"{sec.metrics['realism.flux.ks_crit']:.3g} 5% of the time.", ""]
    save_histograms(os.path.join(out_dir, "realism.png"),
                    {LABELS[k]: (stats_s[k], stats_t[k]) for k in MORPHOLOGY},
                    labels=("prior samples", "held-out truth"),
                    title="Realism: prior samples against held-out truth")
    sec.figures.append("realism.png")
    k = min(8, len(truth))
    save_gallery(os.path.join(out_dir, "realism_gallery.png"),
                 {"held-out truth": truth[:k], "sample, same labels": samples[:k]})
    sec.figures.append("realism_gallery.png")
    return sec, codes, conditions
