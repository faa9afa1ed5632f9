"""Morphology statistics of galaxy images and the conditioning-accuracy check of a model.

Only the statistics the current checks need are here; the full validation report (concentration,
Gini, M20, asymmetry, HSM shapes) belongs to ``galsim-vqvae evaluate``.
"""

import numpy as np


def total_flux(images):
    """Sum of each image [n, S, S] -> [n] (the flux convention makes it the total flux)."""
    return np.asarray(images, dtype=np.float64).sum(axis=(-2, -1))


def magnitude(images, zeropoint):
    """AB magnitude of each image: ``-2.5 log10(flux) + zeropoint`` (NaN where flux <= 0)."""
    flux = total_flux(images)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(flux > 0, -2.5 * np.log10(flux) + zeropoint, np.nan)


def half_light_radius(images, pixel_scale, iterations=40):
    """Non-parametric half-light radius (arcsec) of each image [n, S, S].

    The curve of growth in circular apertures about the flux-weighted centroid (negative pixels
    clipped to zero), solved for half the total flux by bisection. A pixel at distance d from the
    centroid adds its flux linearly as the aperture radius grows from d - 1/2 to d + 1/2 pixels,
    which removes most of the bias of counting whole pixels at their centres.
    """
    images = np.clip(np.asarray(images, dtype=np.float64), 0, None)
    if images.ndim == 2:
        images = images[None]
    n, ny, nx = images.shape
    y, x = np.mgrid[:ny, :nx]
    flat = images.reshape(n, -1)
    total = flat.sum(1)
    safe = np.where(total > 0, total, 1.0)
    cx = (flat * x.ravel()).sum(1) / safe
    cy = (flat * y.ravel()).sum(1) / safe
    dist = np.hypot(x.ravel()[None] - cx[:, None], y.ravel()[None] - cy[:, None])
    lo, hi = np.zeros(n), np.full(n, float(np.hypot(nx, ny)))
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        enclosed = (flat * np.clip(mid[:, None] - dist + 0.5, 0, 1)).sum(1)
        below = enclosed < 0.5 * total
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return np.where(total > 0, 0.5 * (lo + hi) * pixel_scale, np.nan)


def draw_training_conditions(emulator, n, seed):
    """``n`` conditions drawn like the training set: normal(mean, std) per label, clipped to range."""
    info = emulator.metadata["conditions"]
    rng = np.random.default_rng(seed)
    draws = rng.normal(info["mean"], info["std"], size=(n, len(info["names"])))
    draws = np.clip(draws, info["min"], info["max"])
    return {name: draws[:, c] for c, name in enumerate(info["names"])}


def conditioning_accuracy(emulator, n=1000, seed=0, **sample_kwargs):
    """Measured against requested magnitude and half-light radius of ``n`` samples.

    Returns a dict with, for each of ``mag`` and ``hlr`` that the model is conditioned on, the
    bias (mean of measured - requested; for ``hlr`` relative: mean of measured/requested - 1) and
    the scatter (standard deviation of the same), plus the arrays themselves.
    """
    conditions = draw_training_conditions(emulator, n, seed)
    images = emulator.sample(n, conditions, seed=seed, **sample_kwargs)
    meta = emulator.metadata
    result = {"n": n}
    if "mag" in conditions:
        d = magnitude(images, meta["zeropoint"]) - conditions["mag"]
        result.update(mag_bias=float(np.nanmean(d)), mag_scatter=float(np.nanstd(d)),
                      mag_requested=conditions["mag"], mag_measured=conditions["mag"] + d)
    if "hlr" in conditions:
        measured = half_light_radius(images, meta["pixel_scale"])
        d = measured / conditions["hlr"] - 1
        result.update(hlr_rel_bias=float(np.nanmean(d)), hlr_rel_scatter=float(np.nanstd(d)),
                      hlr_requested=conditions["hlr"], hlr_measured=measured)
    return result
