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
MAX_LOST_FLUX = 0.03       # galaxies with more of their light beyond the stamp's interior
EDGE_MARGIN = 3            # (the stamp less this many edge pixels) are redrawn
MAX_KNOT_RADIUS = 2.5     # clumps lie within 2.5 disk half-light radii (pulled in if drawn further)
PARAM_NAMES = ("flux", "mag", "hlr", "sersic_n", "bulge_frac", "e1", "e2", "dx", "dy", "snr",
               "morph_class")
# Populations: the distributions that differ between versions of the population, by name (the
# dataset file's ``population`` attribute). Everything else (magnitudes, bulges, clumps, mergers,
# noise) is shared. A population's galaxies never change: a new choice gets a new name.
#   disk_size: (median half-light radius in arcsec at H = 22.5, d log10 / d mag, lognormal
#               scatter in dex, clip range in arcsec) of the disk.
#   disk_q:    the disk's projected axis ratio: ("uniform", low, high) or
#              ("beta", a, b, low, high), q = low + (high - low) Beta(a, b).
POPULATIONS = {
    # the population of the default model shipped on 2026-12-07
    "2026-11": dict(disk_size=(0.35, -0.08, 0.18, (0.08, 0.9)), disk_q=("uniform", 0.2, 1.0)),
    # matched to 100 real COSMOS galaxies (docs/data.md, "Synthetic against real galaxies"):
    # more elongated disks, sizes falling faster with magnitude
    "2026-12": dict(disk_size=(0.35, -0.14, 0.18, (0.08, 0.9)),
                    disk_q=("beta", 1.2, 2.0, 0.12, 1.0)),
}
DEFAULT_POPULATION = "2026-12"
# Morphology classes (the ``morph_class`` label, an index into CLASS_NAMES): the bulge-fraction
# class a galaxy is drawn from, or "irregular" for the merging/irregular systems.
CLASS_NAMES = ("disk", "intermediate", "bulge", "irregular")

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
    return profiles


# ------------------------------------------------------------------------------------------------
# One galaxy
def _lognormal(rng, median, dex):
    return median * 10 ** (dex * rng.normal())


class Galaxy:
    """One synthetic galaxy: ``smooth`` (a GalSim profile: bulge, disk, companion disk), ``clumps``
    (positions [M,2] in arcsec, flux of each [M], Gaussian sigma [M] in arcsec) and the Gaussian
    ``softening`` (arcsec) convolved with all of it. `profile` is the full GalSim profile; `render`
    draws it (and its convolution with a PSF) in one k-space pass that agrees with GalSim's
    ``drawImage(method='no_pixel')`` of `profile` (a test checks this)."""

    def __init__(self, smooth, clump_xy, clump_flux, clump_sigma, softening):
        self.smooth = smooth
        self.clump_xy = np.asarray(clump_xy, dtype=np.float64).reshape(-1, 2)
        self.clump_flux = np.asarray(clump_flux, dtype=np.float64).reshape(-1)
        self.clump_sigma = np.asarray(clump_sigma, dtype=np.float64).reshape(-1)
        self.softening = float(softening)

    @property
    def intrinsic(self):
        """The galaxy as one GalSim profile, without the resolution floor (for rendering at
        finer pixels than the stamp's)."""
        import galsim

        clumps = [galsim.Gaussian(sigma=s, flux=f).shift(x, y)
                  for (x, y), f, s in zip(self.clump_xy, self.clump_flux, self.clump_sigma)]
        return galsim.Add([self.smooth] + clumps)

    @property
    def profile(self):
        """The galaxy as one GalSim profile (`intrinsic` convolved with the resolution floor)."""
        import galsim

        return galsim.Convolve(self.intrinsic, galsim.Gaussian(sigma=self.softening))

    def kimage(self, grid):
        """Fourier transform of the galaxy on ``grid`` (a `KGrid`), complex [M,M]."""
        k = self.smooth.drawKImage(nx=grid.size, ny=grid.size, scale=grid.dk).array
        kx = grid.k  # 1-D wavenumbers, index 0 = most negative
        # clumps: sum_j f_j exp(-sigma_j^2 k^2 / 2) exp(-i k.x_j), separable in kx and ky, so one
        # matrix product per clump size (all clumps of a galaxy share it)
        for sig in np.unique(self.clump_sigma):
            sel = self.clump_sigma == sig
            g = np.exp(-0.5 * sig ** 2 * kx ** 2)
            ax = np.exp(-1j * np.outer(self.clump_xy[sel, 0], kx)) * (self.clump_flux[sel, None]
                                                                      * g[None, :])
            ay = np.exp(-1j * np.outer(kx, self.clump_xy[sel, 1])) * g[:, None]
            k += ay @ ax
        g = np.exp(-0.5 * self.softening ** 2 * kx ** 2)
        return k * np.outer(g, g)


class KGrid:
    """A Fourier grid for drawing S x S stamps at ``pixel_scale``: period ``period`` pixels (>= S,
    so wrapped light comes from far outside the stamp), sampled to twice the stamp's Nyquist
    frequency so that aliasing (GalSim's k-image wrapping) is reproduced on subsampling."""

    def __init__(self, stamp_size, pixel_scale, period=None):
        self.stamp_size = int(stamp_size)
        self.period = int(period or max(128, 2 * ((3 * stamp_size // 2 + 1) // 2)))
        self.size = 2 * self.period
        self.dk = 2 * np.pi / (self.period * pixel_scale)
        self.k = (np.arange(self.size) - self.size // 2) * self.dk

    def to_stamp(self, kimage):
        """Point samples (pixel value = surface brightness x pixel area) on the S x S stamp grid,
        the origin on pixel (S//2, S//2), of a k-image on this grid."""
        fine = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(kimage))).real
        c0 = self.period // 2 - self.stamp_size // 2
        return 4.0 * fine[::2, ::2][c0:c0 + self.stamp_size, c0:c0 + self.stamp_size]


def get_population(name):
    """The distributions of population ``name`` (a key of `POPULATIONS`)."""
    if name not in POPULATIONS:
        raise VQVAEInputError(f"population must be one of {sorted(POPULATIONS)}, got {name!r}")
    return POPULATIONS[name]


def _axis_ratio(rng, spec):
    if spec[0] == "uniform":
        return rng.uniform(spec[1], spec[2])
    a, b, low, high = spec[1:]
    return low + (high - low) * rng.beta(a, b)


def galaxy_profile(rng, pixel_scale, population=DEFAULT_POPULATION):
    """Draw one galaxy from ``rng`` (a numpy Generator): a `Galaxy` and a dict of its drawn
    parameters (``sersic_n``, ``bulge_frac``, ``dx``, ``dy``, the F160W ``flux`` of the profile,
    ``merger``, ``morph_class``, the disk's half-light radius ``disk_hlr`` and axis ratio
    ``disk_q``), from ``population`` (a name of `POPULATIONS`). See
    docs/data.md for the choices and their sources."""
    import galsim

    pop = get_population(population)
    u = rng.uniform()
    a = COUNT_SLOPE
    m1, m2 = MAG_RANGE
    mag = math.log10(10 ** (a * m1) + u * (10 ** (a * m2) - 10 ** (a * m1))) / a
    flux = 10 ** (-0.4 * (mag - ZEROPOINT))
    # Disk size: lognormal, brighter galaxies larger (van der Wel et al. 2014 size-mass relation,
    # seen in observed H-band magnitude at z~0.5-2).
    median, slope, dex, clip = pop["disk_size"]
    r_disk = float(np.clip(_lognormal(rng, median * 10 ** (slope * (mag - 22.5)), dex), *clip))
    kind = rng.choice(3, p=[0.45, 0.35, 0.20])  # disk-dominated, intermediate, bulge-dominated
    bulge_frac = float(rng.uniform(*[(0.0, 0.2), (0.2, 0.6), (0.6, 0.95)][kind]))
    n = float(np.clip(rng.normal(3.5, 1.0), 2.0, 6.0))
    n = round(n * 20) / 20  # 0.05 grid: GalSim caches its Sersic tables per n
    r_bulge = max(0.05, r_disk * rng.uniform(0.2, 0.5))
    q_disk = _axis_ratio(rng, pop["disk_q"])
    q_bulge = float(np.clip(rng.normal(0.75, 0.15), 0.4, 1.0))
    beta = rng.uniform(0, np.pi)
    beta_bulge = beta + np.deg2rad(rng.normal(0, 10))
    merger = rng.uniform() < MERGER_FRACTION
    clump_frac = rng.uniform(0.2, 0.5) if merger else rng.uniform(0.0, 0.25)
    n_clumps = int(rng.integers(5, 41))
    clump_sigma = rng.uniform(0.04, 0.08)
    knot_seed = int(rng.integers(1, 2 ** 31))
    dx, dy = rng.uniform(-0.5, 0.5, size=2)
    centre = np.array([dx, dy]) * pixel_scale

    # primary: bulge + disk + clumps following the disk; weights sum to 1 before the companion
    w_primary, shift_p, shift_c = 1.0, centre, centre
    if merger:
        ratio = rng.uniform(0.1, 0.6)
        sep = rng.uniform(0.3, 1.2)
        theta = rng.uniform(0, 2 * np.pi)
        q_comp = rng.uniform(0.3, 1.0)
        beta_comp = rng.uniform(0, np.pi)
        n_comp = int(rng.integers(3, 15))
        offset = sep * np.array([math.cos(theta), math.sin(theta)])
        # the pair's light centre sits at the stamp centre (+ sub-pixel offset)
        w_primary = 1 / (1 + ratio)
        shift_p = centre - offset * ratio / (1 + ratio)
        shift_c = centre + offset / (1 + ratio)
    disk_shear = galsim.Shear(q=q_disk, beta=beta * galsim.radians)
    disk_flux = (1.0 - bulge_frac) * w_primary * flux
    parts = [galsim.Exponential(half_light_radius=r_disk, flux=disk_flux * (1 - clump_frac))
             .shear(disk_shear).shift(*shift_p)]
    if bulge_frac > 0:
        bulge = galsim.Sersic(n, half_light_radius=r_bulge, flux=bulge_frac * w_primary * flux,
                              gsparams=_sersic_gsparams())
        parts.append(bulge.shear(q=q_bulge, beta=beta_bulge * galsim.radians).shift(*shift_p))
    xy = [_knot_positions(n_clumps, r_disk, disk_shear, knot_seed) + shift_p]
    fl = [np.full(n_clumps, disk_flux * clump_frac / n_clumps)]
    if merger:
        r_comp = max(0.1, r_disk * math.sqrt(ratio))
        comp_shear = galsim.Shear(q=q_comp, beta=beta_comp * galsim.radians)
        comp_flux = (1 - w_primary) * flux
        parts.append(galsim.Exponential(half_light_radius=r_comp, flux=0.7 * comp_flux)
                     .shear(comp_shear).shift(*shift_c))
        xy.append(_knot_positions(n_comp, r_comp, comp_shear, knot_seed + 1) + shift_c)
        fl.append(np.full(n_comp, 0.3 * comp_flux / n_comp))
    xy, fl = np.concatenate(xy), np.concatenate(fl)
    galaxy = Galaxy(galsim.Add(parts), xy, fl, np.full(len(fl), clump_sigma),
                    SOFTENING * pixel_scale)
    morph_class = CLASS_NAMES.index("irregular") if merger else int(kind)
    return galaxy, dict(sersic_n=n, bulge_frac=bulge_frac, dx=dx, dy=dy, flux=flux,
                        merger=bool(merger), morph_class=morph_class, disk_hlr=r_disk,
                        disk_q=float(q_disk))


def _sersic_gsparams():
    import galsim

    return galsim.GSParams(kvalue_accuracy=1e-4)  # 2-3x faster Sersic tables, still << noise


def _knot_positions(n, r_disk, shear, seed):
    """Positions [n,2] (arcsec) of star-forming clumps: GalSim's RandomKnots draws them from an
    exponential disk of half-light radius ``r_disk``, then the disk's ``shear`` applies."""
    import galsim

    points = galsim.RandomKnots(n, profile=galsim.Exponential(half_light_radius=r_disk),
                                rng=galsim.BaseDeviate(seed)).points
    points = np.asarray(points, dtype=np.float64)
    radius = np.hypot(points[:, 0], points[:, 1])
    points *= np.minimum(1.0, MAX_KNOT_RADIUS * r_disk / np.maximum(radius, 1e-12))[:, None]
    return points @ shear.getMatrix().T


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
    if "fine" in ctx:
        _CTX["grid"] = KGrid(ctx["stamp_size"], ctx["pixel_scale"])
        _CTX["psf_k"] = {}


def psf_kimage(k, ctx=None):
    """Fourier transform of bank PSF ``k`` (its `psf_interpolant`) on the worker's `KGrid`."""
    ctx = _CTX if ctx is None else ctx
    cache = ctx["psf_k"]
    if k not in cache:
        grid = ctx["grid"]
        cache[k] = psf_interpolant(ctx["fine"][k], ctx["pixel_scale"]).drawKImage(
            nx=grid.size, ny=grid.size, scale=grid.dk).array
    return cache[k]


def _bank_entry(k):
    import galsim

    ctx = _CTX
    if ctx["psf"] == "optical":
        profile = optical_psf(ctx["seed"], k)
    else:
        profile = ctx["profiles"][k]
    if ctx.get("detector_pixel"):
        profile = galsim.Convolve(profile, galsim.Pixel(ctx["detector_pixel"]))
    return effective_psf(profile, ctx["stamp_size"], ctx["pixel_scale"])


def draw_stamp(seed, i, ctx=None):
    """Draw stamp ``i`` of a synthetic dataset (randomness from ``SeedSequence([seed, i])``) of
    population ``ctx["population"]`` (default `DEFAULT_POPULATION`).

    Returns a dict: ``observed``, ``truth``, ``noiseless`` [S,S] float64, ``sigma``,
    ``psf_index``, ``galaxy`` (the `Galaxy`) and the parameters of `PARAM_NAMES`.
    """
    ctx = _CTX if ctx is None else ctx
    s, scale, grid = ctx["stamp_size"], ctx["pixel_scale"], ctx["grid"]
    rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
    for _ in range(100):  # redraw galaxies that do not fit the stamp (same random stream)
        galaxy, params = galaxy_profile(rng, scale, ctx.get("population", DEFAULT_POPULATION))
        kimage = galaxy.kimage(grid)
        truth = grid.to_stamp(kimage)
        m = EDGE_MARGIN
        if truth[m:-m, m:-m].sum() >= (1 - MAX_LOST_FLUX) * params["flux"]:
            break
    k = int(rng.integers(ctx["n_psf"]))
    sigma = float(math.exp(rng.uniform(math.log(SIGMA_RANGE[0]), math.log(SIGMA_RANGE[1]))))
    noise = rng.normal(size=(s, s))
    noiseless = grid.to_stamp(kimage * psf_kimage(k, ctx))
    flux = float(truth.sum())  # flux in the stamp (the profile's flux less light beyond it)
    hlr, e1, e2 = _measure(truth, scale, flux)
    for key in ("merger", "disk_hlr", "disk_q"):
        params.pop(key)
    params.update(flux=flux, mag=ZEROPOINT - 2.5 * math.log10(flux), hlr=hlr, e1=e1, e2=e2,
                  snr=float(np.sqrt(np.sum(noiseless ** 2)) / sigma))
    return dict(observed=noiseless + sigma * noise, truth=truth, noiseless=noiseless,
                sigma=sigma, psf_index=k, galaxy=galaxy, **params)


def _draw_chunk(bounds):
    start, stop = bounds
    stamps = [draw_stamp(_CTX["seed"], i) for i in range(start, stop)]
    out = {key: np.array([st[key] for st in stamps],
                         dtype=np.float32 if key != "psf_index" else np.int32)
           for key in ("observed", "truth", "sigma", "psf_index") + PARAM_NAMES}
    return out


_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _pool(workers, ctx):
    """A pool of fresh ("spawn") processes with one BLAS thread each: the per-stamp matrix
    products are small, and threaded BLAS in every worker oversubscribes the cores badly."""
    saved = {k: os.environ.get(k) for k in _THREAD_VARS}
    os.environ.update({k: "1" for k in _THREAD_VARS})
    try:
        return multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker,
                                                         initargs=(ctx,))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------------------------------------
def make_synthetic_dataset(out, n, seed, stamp_size=84, pixel_scale=0.06, psf="optical",
                           psf_file=None, n_psf=64, workers=2, chunk=256, progress=True,
                           compression=None, psf_pixel_scale=None, detector_pixel=None,
                           population=DEFAULT_POPULATION):
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
        detector_pixel: Side (arcsec) of a native detector pixel to convolve every PSF with
                        before the stamp pixel, e.g. 0.128 for WFC3/IR, whose drizzled F160W
                        PSF (FWHM ~0.18") is broader than the optics alone. [default: None]
        population:     Name of the galaxy population (a key of `POPULATIONS`: "2026-11", the
                        shipped 2026-12-07 model's training population, or "2026-12", matched to
                        real COSMOS galaxies), stored as the file's ``population`` attribute.
                        [default: DEFAULT_POPULATION]

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
    get_population(population)
    ctx = dict(seed=seed, stamp_size=int(stamp_size), pixel_scale=float(pixel_scale), psf=psf,
               detector_pixel=float(detector_pixel) if detector_pixel else None,
               population=population)
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
        bank_fine = list(tqdm(pool.imap(_bank_entry, range(n_psf)), total=n_psf,
                              desc="PSF bank", disable=not progress))
        pool.close()
        pool.join()
        ctx["fine"] = [fine for _, fine in bank_fine]
        pool = _pool(workers, ctx)
        snr = []
        with DatasetWriter(out, stamp_size, pixel_scale, BAND, ZEROPOINT, "synthetic",
                           description=description, seed=seed, compression=compression,
                           class_names=CLASS_NAMES, population=population) as w:
            w.add_psfs(np.stack([bank for bank, _ in bank_fine]))
            chunk = max(1, min(chunk, -(-n // (4 * workers))))  # keep every worker busy
            bounds = [(a, min(a + chunk, n)) for a in range(0, n, chunk)]
            with tqdm(total=n, desc="synthetic stamps", unit="stamp", disable=not progress) as bar:
                for part in pool.imap(_draw_chunk, bounds):
                    w.append(observed=part["observed"], sigma=part["sigma"],
                             psf_index=part["psf_index"], truth=part["truth"],
                             params={k: part[k] for k in PARAM_NAMES})
                    snr.append(part["snr"])
                    bar.update(len(part["sigma"]))
    finally:
        pool.terminate()
        pool.join()
    seconds = time.time() - t0
    snr = np.concatenate(snr)
    return dict(n=n, n_psf=n_psf, path=os.path.abspath(os.fspath(out)), seconds=seconds,
                stamps_per_second=n / seconds, workers=workers,
                snr_percentiles=[float(v) for v in np.percentile(snr, [5, 50, 95])])
