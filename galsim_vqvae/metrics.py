"""Morphology statistics of galaxy images and the conditioning-accuracy check of a model.

Every statistic takes a stack of images [n, S, S] (or one [S, S]) of noiseless, PSF-free galaxies
and returns one value per image (NaN where it cannot be measured). Definitions and sources:

- ``half_light_radius``, ``light_radius``: curve of growth in circular apertures about the
  flux-weighted centroid.
- ``concentration``: C = 5 log10(r80 / r20) (Bershady, Jangren & Conselice 2000; Conselice 2003),
  r20 and r80 the circular apertures holding 20% and 80% of the stamp's flux.
- ``asymmetry``: A = min over centres of sum|I - I_180| / sum|I| (Conselice, Bershady & Jangren
  2000; Conselice 2003), without a background term (the images are noiseless).
- ``petrosian_radius``: where the surface brightness in an annulus is eta = 0.2 times the mean
  surface brightness inside it (Petrosian 1976; as used by Lotz, Primack & Madau 2004).
- ``segmentation``: the galaxy's pixels as Lotz, Primack & Madau (2004) define them for Gini and
  M20: the image smoothed by a Gaussian of sigma r_p / 5, thresholded at the surface brightness
  at the Petrosian radius r_p, the connected region holding the brightest smoothed pixel.
- ``gini``: G = sum_i (2i - n - 1) |X_i| / (mean|X| n (n - 1)), |X_i| sorted increasingly
  (Glasser 1962; Abraham, van den Bergh & Nair 2003; Lotz, Primack & Madau 2004), over the
  segmentation's pixels.
- ``m20``: log10 of the second moment of the brightest pixels holding 20% of the flux over the
  total second moment about the centre that minimises it (Lotz, Primack & Madau 2004), over the
  segmentation's pixels.
- ``edge_flux``: the fraction of the stamp's flux in its outer ``EDGE_WIDTH`` = 6 pixels (a frame
  along the stamp edges); isolated galaxies put almost none there.
- ``hsm_shapes``: GalSim's adaptive moments (Bernstein & Jarvis 2002; Hirata & Seljak 2003):
  size sigma and distortion (e1, e2).
"""

import numpy as np

from .errors import VQVAEInputError


def total_flux(images):
    """Sum of each image [n, S, S] -> [n] (the flux convention makes it the total flux)."""
    return np.asarray(images, dtype=np.float64).sum(axis=(-2, -1))


def magnitude(images, zeropoint):
    """AB magnitude of each image: ``-2.5 log10(flux) + zeropoint`` (NaN where flux <= 0)."""
    flux = total_flux(images)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(flux > 0, -2.5 * np.log10(flux) + zeropoint, np.nan)


def _centred(images):
    """Clipped images as float64 [n, P], their totals [n] and each pixel's distance (pixels)
    from its image's flux-weighted centroid [n, P]."""
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
    return flat, total, dist


def _enclosed(flat, dist, radius):
    """Flux inside circular apertures of ``radius`` [n] pixels: a pixel at distance d adds its
    flux linearly as the radius grows from d - 1/2 to d + 1/2."""
    return (flat * np.clip(radius[:, None] - dist + 0.5, 0, 1)).sum(1)


def light_radius(images, fraction, pixel_scale=1.0, iterations=40):
    """Radius (arcsec, or pixels with the default ``pixel_scale``) of the circular aperture about
    the flux-weighted centroid that holds ``fraction`` of each image's flux.

    Negative pixels are clipped to zero; the curve of growth counts a pixel at distance d from
    the centroid linearly as the aperture radius grows from d - 1/2 to d + 1/2 pixels (which
    removes most of the bias of counting whole pixels at their centres), and is solved by
    bisection. NaN for an image without positive flux.
    """
    if not 0 < fraction < 1:
        raise VQVAEInputError(f"fraction must lie in (0, 1), got {fraction!r}")
    flat, total, dist = _centred(images)
    n = len(flat)
    lo, hi = np.zeros(n), np.full(n, float(dist.max(initial=0.0)) + 1.0)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        below = _enclosed(flat, dist, mid) < fraction * total
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return np.where(total > 0, 0.5 * (lo + hi) * pixel_scale, np.nan)


def half_light_radius(images, pixel_scale, iterations=40):
    """Non-parametric half-light radius (arcsec) of each image [n, S, S]: `light_radius` at 0.5."""
    return light_radius(images, 0.5, pixel_scale, iterations)


def concentration(images):
    """Concentration C = 5 log10(r80 / r20) of each image (Conselice 2003)."""
    r20 = light_radius(images, 0.2)
    r80 = light_radius(images, 0.8)
    with np.errstate(divide="ignore", invalid="ignore"):
        return 5.0 * np.log10(r80 / r20)


def petrosian_radius(images, eta=0.2, step=0.25):
    """Circular Petrosian radius (pixels) of each image: the smallest radius r at which the mean
    surface brightness in the annulus [r - 1/2, r + 1/2] is ``eta`` times the mean surface
    brightness inside r (interpolated linearly between radii ``step`` apart, from 1.5 pixels).
    NaN where the ratio never falls to ``eta`` inside the stamp."""
    flat, total, dist = _centred(images)
    n = len(flat)
    rmax = float(dist.max(initial=0.0))
    radii = np.arange(1.5, max(rmax, 2.0), step)
    out = np.full(n, np.nan)
    previous = None
    for r in radii:
        inner = _enclosed(flat, dist, np.full(n, r - 0.5))
        mid = _enclosed(flat, dist, np.full(n, r))
        outer = _enclosed(flat, dist, np.full(n, r + 0.5))
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = ((outer - inner) / (2.0 * np.pi * r)) / (mid / (np.pi * r * r))
        if previous is not None:
            crossed = np.isnan(out) & (previous >= eta) & (ratio < eta)
            frac = (previous - eta) / np.where(crossed, previous - ratio, 1.0)
            out = np.where(crossed, r - step + frac * step, out)
        previous = ratio
    return np.where(total > 0, out, np.nan)


def segmentation(images, eta=0.2):
    """Boolean masks [n, S, S] of each galaxy's pixels for `gini` and `m20` (Lotz, Primack &
    Madau 2004): the image smoothed by a Gaussian of sigma r_p / 5 and thresholded at the mean
    surface brightness in the annulus at the Petrosian radius r_p, keeping the connected region
    that holds the brightest smoothed pixel. Where r_p cannot be measured, the positive pixels."""
    from scipy import ndimage

    images = np.asarray(images, dtype=np.float64)
    if images.ndim == 2:
        images = images[None]
    rp = petrosian_radius(images, eta)
    flat, _, dist = _centred(images)
    masks = images > 0
    for i, image in enumerate(images):
        if not np.isfinite(rp[i]):
            continue
        ring = _enclosed(flat[i:i + 1], dist[i:i + 1], np.array([rp[i] + 0.5]))[0] - \
            _enclosed(flat[i:i + 1], dist[i:i + 1], np.array([rp[i] - 0.5]))[0]
        level = ring / (2.0 * np.pi * rp[i])
        smooth = ndimage.gaussian_filter(image, sigma=max(rp[i] / 5.0, 1e-3), mode="constant")
        above = smooth >= level
        labels, _ = ndimage.label(above)
        peak = labels.flat[np.argmax(smooth)]
        if peak > 0:
            masks[i] = labels == peak
    return masks


def gini(values):
    """Gini coefficient of a set of values (Glasser 1962 estimator, as Lotz, Primack & Madau
    2004): 0 when all |values| are equal, 1 when one value holds everything."""
    x = np.sort(np.abs(np.asarray(values, dtype=np.float64).ravel()))
    n = x.size
    if n < 2 or not x.sum() > 0:
        return np.nan
    i = np.arange(1, n + 1)
    return float(np.sum((2 * i - n - 1) * x) / (x.mean() * n * (n - 1)))


def gini_coefficient(images, masks=None):
    """`gini` of each image's pixels inside its mask (default: `segmentation`)."""
    images = np.asarray(images, dtype=np.float64)
    if images.ndim == 2:
        images = images[None]
    masks = segmentation(images) if masks is None else np.broadcast_to(masks, images.shape)
    return np.array([gini(image[mask]) for image, mask in zip(images, masks)])


def m20(images, masks=None, fraction=0.2):
    """M20 of each image (Lotz, Primack & Madau 2004): log10(sum_{brightest} M_i / M_tot), with
    M_i = f_i r_i^2 about the flux-weighted centroid of the mask's pixels (the centre that
    minimises M_tot) and the brightest pixels holding ``fraction`` of the flux; the pixel that
    crosses ``fraction`` counts in proportion to the part of its flux below it (a continuous
    form that stays finite when one pixel holds more than 20% of the flux). Default masks:
    `segmentation`."""
    images = np.asarray(images, dtype=np.float64)
    if images.ndim == 2:
        images = images[None]
    masks = segmentation(images) if masks is None else np.broadcast_to(masks, images.shape)
    ny, nx = images.shape[1:]
    y, x = np.mgrid[:ny, :nx]
    out = np.full(len(images), np.nan)
    for k, (image, mask) in enumerate(zip(images, masks)):
        f = np.clip(image[mask], 0, None)
        total = f.sum()
        if not total > 0:
            continue
        xs, ys = x[mask], y[mask]
        cx, cy = (f * xs).sum() / total, (f * ys).sum() / total
        moment = f * ((xs - cx) ** 2 + (ys - cy) ** 2)
        if not moment.sum() > 0:
            continue
        order = np.argsort(-f, kind="stable")
        before = np.concatenate([[0.0], np.cumsum(f[order])[:-1]])
        weight = np.clip((fraction * total - before) / np.where(f[order] > 0, f[order], 1.0),
                         0, 1)
        out[k] = np.log10((weight * moment[order]).sum() / moment.sum())
    return out


def asymmetry(images, search=2.0):
    """Rotational asymmetry A of each image (Conselice 2003): sum|I - I_180| / sum|I|, minimised
    over centres of rotation on the half-pixel grid within ``search`` pixels of the flux-weighted
    centroid (a rotation by 180 degrees about such a centre moves pixels onto pixels exactly;
    pixels rotated from outside the stamp count as zero). No background term: the images are
    noiseless."""
    images = np.asarray(images, dtype=np.float64)
    if images.ndim == 2:
        images = images[None]
    n, ny, nx = images.shape
    y, x = np.mgrid[:ny, :nx]
    steps = int(round(2 * search))
    out = np.full(n, np.nan)
    for k, image in enumerate(images):
        norm = np.abs(image).sum()
        w = np.clip(image, 0, None)
        if not (norm > 0 and w.sum() > 0):
            continue
        # 2 * centre, in pixels: rotation maps pixel p to 2c - p
        tx = int(round(2 * (w * x).sum() / w.sum()))
        ty = int(round(2 * (w * y).sum() / w.sum()))
        flipped = image[::-1, ::-1]  # flipped[p] = image[(n - 1) - p]
        best = np.inf
        for sy in range(ty - steps, ty + steps + 1):
            for sx in range(tx - steps, tx + steps + 1):
                rotated = _shifted(flipped, sy - (ny - 1), sx - (nx - 1))
                best = min(best, np.abs(image - rotated).sum())
        out[k] = best / norm
    return out


def _shifted(array, dy, dx):
    """``array`` moved by integer (dy, dx) pixels, zeros moved in: out[p] = array[p - d]."""
    out = np.zeros_like(array)
    ny, nx = array.shape
    if abs(dy) >= ny or abs(dx) >= nx:
        return out
    out[max(dy, 0):ny + min(dy, 0), max(dx, 0):nx + min(dx, 0)] = \
        array[max(-dy, 0):ny + min(-dy, 0), max(-dx, 0):nx + min(-dx, 0)]
    return out


def hsm_shapes(images, pixel_scale):
    """GalSim adaptive moments (``galsim.hsm.FindAdaptiveMom``) of each image.

    Returns:
        dict of arrays [n]: ``sigma`` (the adaptive-moments size, arcsec), ``e1``, ``e2`` (the
        distortion (a^2 - b^2) / (a^2 + b^2) of the weighted moments), ``e`` (its modulus); NaN
        where HSM fails.
    """
    import galsim

    images = np.asarray(images, dtype=np.float64)
    if images.ndim == 2:
        images = images[None]
    out = {k: np.full(len(images), np.nan) for k in ("sigma", "e1", "e2")}
    for i, image in enumerate(images):
        if not (np.all(np.isfinite(image)) and image.sum() > 0):
            continue
        result = galsim.hsm.FindAdaptiveMom(galsim.Image(image, scale=pixel_scale),
                                            strict=False)
        if result.moments_status != 0 or not result.moments_sigma > 0:
            continue
        out["sigma"][i] = result.moments_sigma * pixel_scale
        out["e1"][i] = result.observed_shape.e1
        out["e2"][i] = result.observed_shape.e2
    out["e"] = np.hypot(out["e1"], out["e2"])
    return out


EDGE_WIDTH = 6


def edge_flux(images, width=EDGE_WIDTH):
    """Fraction of each image's flux in the frame of its outer ``width`` pixels [n]."""
    images = np.asarray(images, dtype=np.float64)
    if images.ndim == 2:
        images = images[None]
    total = images.sum(axis=(1, 2))
    inner = images[:, width:-width, width:-width].sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total != 0, (total - inner) / total, np.nan)


MORPHOLOGY = ("flux", "size", "e", "concentration", "asymmetry", "gini", "m20", "edge")


def morphology(images, pixel_scale):
    """The realism statistics of each image: dict of arrays [n] named as `MORPHOLOGY`: total
    flux, HSM size (arcsec), HSM |e|, concentration, asymmetry, Gini and M20 (the last two over
    the `segmentation`) and the `edge_flux` fraction."""
    images = np.asarray(images, dtype=np.float64)
    if images.ndim == 2:
        images = images[None]
    shapes = hsm_shapes(images, pixel_scale)
    masks = segmentation(images)
    return {"flux": total_flux(images), "size": shapes["sigma"], "e": shapes["e"],
            "concentration": concentration(images), "asymmetry": asymmetry(images),
            "gini": gini_coefficient(images, masks), "m20": m20(images, masks),
            "edge": edge_flux(images)}


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
