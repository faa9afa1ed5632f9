"""Synthetic CANDELS-like F160W galaxies rendered with GalSim, with their noiseless truth.

Each stamp holds one galaxy: a Sersic bulge, an exponential disk, star-forming clumps and, for a
fraction of systems, an offset companion (irregular / merging). The galaxy profile is convolved
with a small Gaussian "resolution floor" (sigma = 2/3 pixel) so that its point samples on the grid
represent it without aliasing: then ``truth`` (the galaxy drawn with ``method='no_pixel'``),
``psf_bank[psf_index]`` (the effective PSF with the pixel response, sum 1) and ``observed`` (the
galaxy convolved with that same effective PSF, plus Gaussian noise) agree: the discrete
convolution of truth with psf reproduces the noiseless observed image to well under 1%.
Population choices and their sources are in ``docs/data.md``.

Every stamp's randomness comes from ``np.random.SeedSequence([seed, i])`` alone, so a dataset is
identical for any number of worker processes.
"""

import math
import multiprocessing
import os

import numpy as np

from ..errors import VQVAEInputError
from .dataset import DatasetWriter

BAND = "F160W"
ZEROPOINT = 25.94          # HST WFC3/IR F160W AB zeropoint (1 e-/s)
MAG_RANGE = (20.0, 25.0)   # F160W magnitudes
COUNT_SLOPE = 0.27         # d log10 N / d mag of the H-band number counts at 20 < H < 25
SIGMA_RANGE = (0.0025, 0.02)  # per-pixel noise sigma (e-/s), log-uniform
SOFTENING = 2.0 / 3.0      # resolution floor: Gaussian sigma in pixels convolved with every galaxy
MERGER_FRACTION = 0.12
PARAM_NAMES = ("flux", "mag", "hlr", "sersic_n", "bulge_frac", "e1", "e2", "dx", "dy", "snr")

# Effective-PSF images are built on a grid 2x finer than the stamp (accurate interpolation); the
# stamp-grid bank image is every second sample of it.
_OVERSAMPLE = 2


# ------------------------------------------------------------------------------------------------
# PSF bank
def effective_psf(profile, stamp_size, pixel_scale):
    """The effective PSF (``profile`` convolved with the pixel) of one bank entry.

    Parameters:
        profile:        GalSim PSF profile (without the pixel response).
        stamp_size:     Stamp side S in pixels.
        pixel_scale:    Stamp pixel scale (arcsec).

    Returns:
        (bank image [S,S] float64 summing to 1 and centred at pixel (S//2, S//2), the same PSF
        sampled 2x finer on [2S,2S] with the same normalisation, ready for
        `psf_interpolant`). Both are truncated to the stamp: the stored PSF is exactly the one
        that observed images are convolved with.
    """
    import galsim

    m = _OVERSAMPLE
    fine = galsim.Convolve(profile, galsim.Pixel(pixel_scale)).drawImage(
        nx=m * stamp_size, ny=m * stamp_size, scale=pixel_scale / m, method="no_pixel",
        use_true_center=False).array.astype(np.float64)
    coarse_sum = fine[::m, ::m].sum()
    if not coarse_sum > 0:
        raise VQVAEInputError(f"PSF profile {profile!r} has non-positive flux on the stamp")
    fine /= m * m * coarse_sum
    return m * m * fine[::m, ::m], fine


def psf_interpolant(fine, pixel_scale):
    """GalSim profile of an effective PSF from its 2x-finer image (see `effective_psf`): drawing a
    galaxy convolved with it with ``method='no_pixel'`` gives the pixel-convolved observed image."""
    import galsim

    return galsim.InterpolatedImage(galsim.Image(fine, scale=pixel_scale / _OVERSAMPLE),
                                    use_true_center=False, flux=fine.sum())


def optical_psf(seed, k):
    """The ``k``-th HST WFC3/IR F160W-like optical PSF of a bank: OpticalPSF at 1600 nm, D=2.4 m,
    obscuration 0.33, 4 struts, with random aberrations (Noll 4-11, total rms 0.02-0.05 waves)
    and a random strut angle, all drawn from ``SeedSequence([seed, k, 1])``."""
    import galsim

    rng = np.random.default_rng(np.random.SeedSequence([seed, k, 1]))
    rms = rng.uniform(0.02, 0.05)
    coeffs = rng.normal(size=8)
    aberrations = np.zeros(12)
    aberrations[4:12] = coeffs * rms / np.sqrt(np.sum(coeffs ** 2))
    return galsim.OpticalPSF(lam=1600.0, diam=2.4, obscuration=0.33, nstruts=4,
                             strut_angle=rng.uniform(0, 90) * galsim.degrees,
                             aberrations=aberrations.tolist(), scale_unit=galsim.arcsec)


def read_psf_file(psf_file, n_psf, psf_pixel_scale=None):
    """The first ``n_psf`` PSF images of a multi-HDU FITS file (e.g. a RealGalaxyCatalog
    ``real_galaxy_PSF_images.fits``) as GalSim InterpolatedImages.

    Parameters:
        psf_file:           FITS file with one PSF image per HDU.
        n_psf:              Number of PSFs to read (all if fewer).
        psf_pixel_scale:    Pixel scale of the PSF images (arcsec); None reads it from each
                            header's WCS, else 0.03 (HST ACS drizzled, as in COSMOS).
                            [default: None]
    """
    import galsim
    from astropy.io import fits

    from .fits import image_scale, psf_profile

    if psf_file is None:
        raise VQVAEInputError("psf='cosmos' needs psf_file (a FITS file of PSF images, e.g. "
                              "real_galaxy_PSF_images.fits)")
    psf_file = os.fspath(psf_file)
    if not os.path.isfile(psf_file):
        raise VQVAEInputError(f"psf_file not found: {psf_file}")
    profiles = []
    with fits.open(psf_file) as hdus:
        for k, hdu in enumerate(hdus):
            if len(profiles) == n_psf:
                break
            if hdu.data is None:
                continue
            where = f"{psf_file}[{k}]"
            scale = image_scale(hdu.header, psf_pixel_scale, where, default=0.03)
            profiles.append(psf_profile(np.asarray(hdu.data, dtype=np.float64), scale, where))
    if not profiles:
        raise VQVAEInputError(f"{psf_file}: no PSF image HDU")
    del galsim
    return profiles


# ------------------------------------------------------------------------------------------------
# One galaxy
def _lognormal(rng, median, dex):
    return median * 10 ** (dex * rng.normal())


def galaxy_profile(rng, pixel_scale):
    """Draw one galaxy's GalSim profile and its parameters from ``rng`` (a numpy Generator).

    Returns (profile with flux set, dict of drawn parameters). See docs/data.md for the choices.
    """
    import galsim

    u = rng.uniform()
    a = COUNT_SLOPE
    m1, m2 = MAG_RANGE
    mag = math.log10(10 ** (a * m1) + u * (10 ** (a * m2) - 10 ** (a * m1))) / a
    flux = 10 ** (-0.4 * (mag - ZEROPOINT))
    # Disk size: lognormal, brighter galaxies larger (van der Wel et al. 2014 size-mass relation,
    # translated into observed H-band magnitude at z~0.5-2).
    r_disk = float(np.clip(_lognormal(rng, 0.45 * 10 ** (-0.08 * (mag - 22.5)), 0.2), 0.1, 1.2))
    kind = rng.choice(3, p=[0.45, 0.35, 0.20])  # disk-dominated, intermediate, bulge-dominated
    bulge_frac = float(rng.uniform(*[(0.0, 0.2), (0.2, 0.6), (0.6, 0.95)][kind]))
    n = float(np.clip(rng.normal(3.5, 1.0), 2.0, 6.0))
    n = round(n * 20) / 20  # 0.05 grid: GalSim caches its Sersic tables per n
    r_bulge = max(0.05, r_disk * rng.uniform(0.2, 0.5))
    q_disk = rng.uniform(0.2, 1.0)
    q_bulge = float(np.clip(rng.normal(0.75, 0.15), 0.4, 1.0))
    beta = rng.uniform(0, np.pi)
    beta_bulge = beta + np.deg2rad(rng.normal(0, 10))
    merger = rng.uniform() < MERGER_FRACTION
    clump_frac = rng.uniform(0.2, 0.5) if merger else rng.uniform(0.0, 0.25)
    n_clumps = int(rng.integers(5, 41))
    clump_sigma = rng.uniform(0.04, 0.08)
    knot_seed = int(rng.integers(1, 2 ** 31))
    if merger:
        ratio = rng.uniform(0.1, 0.6)
        sep = rng.uniform(0.3, 1.2)
        theta = rng.uniform(0, 2 * np.pi)
        q_comp = rng.uniform(0.3, 1.0)
        beta_comp = rng.uniform(0, np.pi)
    dx, dy = rng.uniform(-0.5, 0.5, size=2)

    disk_flux = 1.0 - bulge_frac
    disk_shape = dict(q=q_disk, beta=beta * galsim.radians)
    parts = []
    if bulge_frac > 0:
        parts.append(galsim.Sersic(n, half_light_radius=r_bulge, flux=bulge_frac)
                     .shear(q=q_bulge, beta=beta_bulge * galsim.radians))
    parts.append(galsim.Exponential(half_light_radius=r_disk, flux=disk_flux * (1 - clump_frac))
                 .shear(**disk_shape))
    parts.append(_clumps(n_clumps, r_disk, disk_flux * clump_frac, clump_sigma, knot_seed)
                 .shear(**disk_shape))
    primary = galsim.Add(parts)
    if merger:
        r_comp = max(0.1, r_disk * math.sqrt(ratio))
        companion = galsim.Add([
            galsim.Exponential(half_light_radius=r_comp, flux=0.7)
            .shear(q=q_comp, beta=beta_comp * galsim.radians),
            _clumps(int(rng.integers(3, 15)), r_comp, 0.3, clump_sigma, knot_seed + 1)
            .shear(q=q_comp, beta=beta_comp * galsim.radians)])
        # companion offset from the primary; the pair's light centre sits near the stamp centre
        ox, oy = sep * math.cos(theta), sep * math.sin(theta)
        galaxy = galsim.Add([primary.withFlux(1 / (1 + ratio)).shift(-ox * ratio / (1 + ratio),
                                                                      -oy * ratio / (1 + ratio)),
                             companion.withFlux(ratio / (1 + ratio)).shift(ox / (1 + ratio),
                                                                           oy / (1 + ratio))])
    else:
        galaxy = primary
    galaxy = galsim.Convolve(galaxy, galsim.Gaussian(sigma=SOFTENING * pixel_scale))
    galaxy = galaxy.withFlux(flux).shift(dx * pixel_scale, dy * pixel_scale)
    params = dict(sersic_n=n, bulge_frac=bulge_frac, dx=dx, dy=dy, merger=merger)
    return galaxy, params


def _clumps(n, r_disk, flux, sigma, seed):
    """Star-forming clumps: ``n`` Gaussians (sigma arcsec) at positions that GalSim's RandomKnots
    draws from an exponential disk of half-light radius ``r_disk``; total ``flux``."""
    import galsim

    points = galsim.RandomKnots(n, profile=galsim.Exponential(half_light_radius=r_disk),
                                rng=galsim.BaseDeviate(seed)).points
    return galsim.Add([galsim.Gaussian(sigma=sigma, flux=flux / n).shift(x, y) for x, y in points])


def _measure(truth, pixel_scale, flux):
    """Half-light radius (arcsec, circular aperture about the light centroid, curve of growth
    interpolated between pixel radii) and HSM adaptive-moment distortion (e1, e2) of a truth
    image; unweighted moments if HSM fails."""
    import galsim

    s = truth.shape[0]
    y, x = np.mgrid[:s, :s].astype(np.float64)
    w = truth.astype(np.float64)
    tot = w.sum()
    cx, cy = (w * x).sum() / tot, (w * y).sum() / tot
    r = np.hypot(x - cx, y - cy).ravel()
    order = np.argsort(r)
    cum = np.cumsum(w.ravel()[order])
    hlr = float(np.interp(0.5 * flux, cum, r[order])) * pixel_scale
    try:
        shape = galsim.hsm.FindAdaptiveMom(galsim.Image(w, scale=pixel_scale)).observed_shape
        e1, e2 = shape.e1, shape.e2
    except galsim.GalSimHSMError:
        mxx = (w * (x - cx) ** 2).sum() / tot
        myy = (w * (y - cy) ** 2).sum() / tot
        mxy = (w * (x - cx) * (y - cy)).sum() / tot
        e1, e2 = (mxx - myy) / (mxx + myy), 2 * mxy / (mxx + myy)
    return hlr, float(e1), float(e2)


# ------------------------------------------------------------------------------------------------
# Worker side
_CTX = {}


def _init_worker(ctx):
    _CTX.clear()
    _CTX.update(ctx)
    _CTX["interp"] = {}


def _interp(k):
    cache = _CTX["interp"]
    if k not in cache:
        cache[k] = psf_interpolant(_CTX["fine"][k], _CTX["pixel_scale"])
    return cache[k]


def _bank_entry(k):
    ctx = _CTX
    if ctx["psf"] == "optical":
        profile = optical_psf(ctx["seed"], k)
    else:
        profile = ctx["profiles"][k]
    return effective_psf(profile, ctx["stamp_size"], ctx["pixel_scale"])


def draw_stamp(seed, i, ctx=None):
    """Draw stamp ``i`` of a synthetic dataset (randomness from ``SeedSequence([seed, i])``).

    Returns a dict: ``observed``, ``truth``, ``noiseless`` [S,S] float32/64, ``sigma``,
    ``psf_index`` and the parameters of `PARAM_NAMES`.
    """
    ctx = _CTX if ctx is None else ctx
    s, scale = ctx["stamp_size"], ctx["pixel_scale"]
    rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
    galaxy, params = galaxy_profile(rng, scale)
    k = int(rng.integers(ctx["n_psf"]))
    sigma = float(math.exp(rng.uniform(math.log(SIGMA_RANGE[0]), math.log(SIGMA_RANGE[1]))))
    noise = rng.normal(size=(s, s))
    draw = dict(nx=s, ny=s, scale=scale, method="no_pixel", use_true_center=False)
    truth = galaxy.drawImage(**draw).array.astype(np.float64)
    import galsim

    noiseless = galsim.Convolve(galaxy, _interp(k)).drawImage(**draw).array.astype(np.float64)
    flux = float(truth.sum())
    hlr, e1, e2 = _measure(truth, scale, flux)
    params.pop("merger")
    params.update(flux=flux, mag=ZEROPOINT - 2.5 * math.log10(flux), hlr=hlr, e1=e1, e2=e2,
                  snr=float(np.sqrt(np.sum(noiseless ** 2)) / sigma))
    return dict(observed=noiseless + sigma * noise, truth=truth, noiseless=noiseless,
                sigma=sigma, psf_index=k, **params)


def _draw_chunk(bounds):
    start, stop = bounds
    stamps = [draw_stamp(_CTX["seed"], i) for i in range(start, stop)]
    out = {key: np.array([st[key] for st in stamps],
                         dtype=np.float32 if key != "psf_index" else np.int32)
           for key in ("observed", "truth", "sigma", "psf_index") + PARAM_NAMES}
    return out


def _pool(workers, ctx):
    if workers <= 1:
        _init_worker(ctx)
        return None
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method).Pool(workers, initializer=_init_worker,
                                                    initargs=(ctx,))


def _map(pool, func, items):
    return map(func, items) if pool is None else pool.imap(func, items)


# ------------------------------------------------------------------------------------------------
def make_synthetic_dataset(out, n, seed, stamp_size=84, pixel_scale=0.06, psf="optical",
                           psf_file=None, n_psf=64, workers=2, chunk=256, progress=True,
                           compression=None, psf_pixel_scale=None):
    """Render a synthetic CANDELS-like F160W galaxy dataset with noiseless truth.

    Parameters:
        out:            Output dataset file (HDF5; written atomically).
        n:              Number of stamps.
        seed:           Integer seed: stamp i depends on (seed, i) only, whatever ``workers``.
        stamp_size:     Stamp side in pixels. [default: 84]
        pixel_scale:    Pixel scale in arcsec. [default: 0.06]
        psf:            "optical" (a bank of ``n_psf`` WFC3/IR F160W-like OpticalPSFs with random
                        aberrations) or "cosmos" (the PSF images of ``psf_file``).
                        [default: "optical"]
        psf_file:       FITS file with one PSF per HDU, e.g. a RealGalaxyCatalog's
                        ``real_galaxy_PSF_images.fits``; needed for psf="cosmos". [default: None]
        n_psf:          Number of PSFs in the bank (at most those in ``psf_file``). [default: 64]
        workers:        Processes to render with. [default: 2]
        chunk:          Stamps per task and per write. [default: 256]
        progress:       Show a progress bar. [default: True]
        compression:    HDF5 compression: None, "lzf" or "gzip". [default: None]
        psf_pixel_scale: Pixel scale of ``psf_file``'s images if their headers lack one.
                        [default: None, i.e. 0.03]

    Returns:
        dict: ``n``, ``n_psf``, ``path``, ``seconds``, ``stamps_per_second``, ``snr_percentiles``
        (5, 50, 95), ``workers``.
    """
    import time

    from tqdm import tqdm

    n, n_psf, workers, chunk = int(n), int(n_psf), int(workers), int(chunk)
    for name, value in (("n", n), ("n_psf", n_psf), ("workers", workers), ("chunk", chunk),
                        ("stamp_size", stamp_size)):
        if value <= 0:
            raise VQVAEInputError(f"{name} must be a positive integer, got {value}")
    if not pixel_scale > 0:
        raise VQVAEInputError(f"pixel_scale must be > 0, got {pixel_scale}")
    if seed is None or int(seed) < 0:
        raise VQVAEInputError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    ctx = dict(seed=seed, stamp_size=int(stamp_size), pixel_scale=float(pixel_scale), psf=psf)
    if psf == "optical":
        description = (f"synthetic CANDELS-like F160W galaxies (bulge+disk+clumps, "
                       f"{MERGER_FRACTION:.0%} mergers) through {n_psf} OpticalPSFs")
    elif psf == "cosmos":
        ctx["profiles"] = read_psf_file(psf_file, n_psf, psf_pixel_scale)
        n_psf = len(ctx["profiles"])
        description = (f"synthetic CANDELS-like F160W galaxies (bulge+disk+clumps) through "
                       f"{n_psf} PSFs of {os.path.basename(os.fspath(psf_file))}")
    else:
        raise VQVAEInputError(f"psf must be 'optical' or 'cosmos', got {psf!r}")
    ctx["n_psf"] = n_psf
    t0 = time.time()
    pool = _pool(workers, ctx)
    try:
        bank_fine = list(tqdm(_map(pool, _bank_entry, range(n_psf)), total=n_psf,
                              desc="PSF bank", disable=not progress))
        ctx["fine"] = [fine for _, fine in bank_fine]
        if pool is None:
            _init_worker(ctx)
        else:
            pool.close()
            pool.join()
            pool = _pool(workers, ctx)
        snr = []
        with DatasetWriter(out, stamp_size, pixel_scale, BAND, ZEROPOINT, "synthetic",
                           description=description, seed=seed, compression=compression) as w:
            w.add_psfs(np.stack([bank for bank, _ in bank_fine]))
            bounds = [(a, min(a + chunk, n)) for a in range(0, n, chunk)]
            with tqdm(total=n, desc="synthetic stamps", unit="stamp", disable=not progress) as bar:
                for part in _map(pool, _draw_chunk, bounds):
                    w.append(observed=part["observed"], sigma=part["sigma"],
                             psf_index=part["psf_index"], truth=part["truth"],
                             params={k: part[k] for k in PARAM_NAMES})
                    snr.append(part["snr"])
                    bar.update(len(part["sigma"]))
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    seconds = time.time() - t0
    snr = np.concatenate(snr)
    return dict(n=n, n_psf=n_psf, path=os.path.abspath(os.fspath(out)), seconds=seconds,
                stamps_per_second=n / seconds, workers=workers,
                snr_percentiles=[float(v) for v in np.percentile(snr, [5, 50, 95])])
