"""A dataset from a GalSim RealGalaxyCatalog (COSMOS 25.2 as ``galsim_download_cosmos`` fetches
it, or any catalog in that format, e.g. GalSim's AEGIS test catalogs).

For each galaxy: its HST image and its own PSF image (at the catalog's pixel scale, 0.03" for
COSMOS) are resampled to the model grid with the rules of `galsim_vqvae.data.fits` (same treatment
for galaxy and PSF; finer inputs get the model pixel's response), cropped or padded (centred) to
S x S, the PSF normalised to sum 1. The noise sigma on the model grid comes from the catalog's
noise: a realisation of the galaxy's own (correlated) noise model, ``RealGalaxyCatalog.getNoise``,
drawn on the input grid and resampled exactly like the galaxy; if the catalog has no noise
information, it is estimated from the resampled stamp's corners.
"""

import os

import numpy as np

from ..errors import VQVAEInputError
from .dataset import DatasetWriter
from .fits import fit_to_size, model_psf, resample, stamp_params
from .noise import estimate_sigma

_NOISE_SIDE = 128  # side (input pixels) of the noise realisation used to measure sigma


def open_catalog(catalog, directory=None):
    """``galsim.RealGalaxyCatalog(catalog, dir=directory)`` with errors naming the file."""
    import galsim

    catalog = os.fspath(catalog)
    path = catalog if directory is None else os.path.join(os.fspath(directory), catalog)
    if not os.path.isfile(path) and not os.path.isfile(catalog):
        raise VQVAEInputError(f"RealGalaxyCatalog file not found: {path}")
    try:
        return galsim.RealGalaxyCatalog(catalog, dir=None if directory is None
                                        else os.fspath(directory))
    except Exception as err:  # noqa: BLE001 - GalSim/astropy raise many types for foreign files
        raise VQVAEInputError(f"{path}: not a readable GalSim RealGalaxyCatalog "
                              f"({type(err).__name__}: {err})") from None


def _noise_sigma(rgc, i, in_scale, pixel_scale, stamp):
    """Per-pixel noise sigma on the model grid of galaxy ``i``."""
    import galsim

    try:
        noise = rgc.getNoise(i, rng=galsim.BaseDeviate(1000003 + i))
    except (OSError, KeyError, IndexError, AttributeError, ValueError):
        noise = None
    variance = float(np.asarray(getattr(rgc, "variance", [0] * (i + 1)))[i])
    if noise is None or not variance > 0:
        return estimate_sigma(stamp), "estimated from the stamp corners"
    field = galsim.Image(_NOISE_SIDE, _NOISE_SIDE, scale=in_scale)
    field.addNoise(noise)
    resampled = resample(field.array, in_scale, pixel_scale)
    edge = max(2, resampled.shape[0] // 8)  # ignore interpolation edge effects
    return float(np.std(resampled[edge:-edge, edge:-edge])), "catalog noise model"


def make_cosmos_dataset(out, catalog, directory=None, stamp_size=84, pixel_scale=0.06,
                        max_galaxies=None, progress=True, band=None, zeropoint=25.94):
    """Build a dataset from a GalSim RealGalaxyCatalog (e.g. COSMOS 25.2).

    Parameters:
        out:            Output dataset file (HDF5; nothing is written on error).
        catalog:        Catalog file name, e.g. ``real_galaxy_catalog_25.2.fits``.
        directory:      Folder of the catalog and its image/PSF/noise files (GalSim's ``dir``).
                        [default: None]
        stamp_size:     Model stamp side in pixels. [default: 84]
        pixel_scale:    Model pixel scale in arcsec. [default: 0.06]
        max_galaxies:   Use only the first this many galaxies. [default: None, all]
        progress:       Show a progress bar. [default: True]
        band:           Band name for the header; None takes the catalog's (e.g. "F814W").
                        [default: None]
        zeropoint:      AB zeropoint of the images' units (the COSMOS F814W stamps are in
                        e-/s with zeropoint 25.94). [default: 25.94]

    Returns:
        dict: ``n``, ``n_psf``, ``path``, ``noise`` (how sigma was obtained, per method count).
    """
    from tqdm import tqdm

    rgc = open_catalog(catalog, directory)
    n = rgc.getNObjects()
    if max_galaxies is not None:
        if int(max_galaxies) <= 0:
            raise VQVAEInputError(f"max_galaxies must be positive, got {max_galaxies}")
        n = min(n, int(max_galaxies))
    if n == 0:
        raise VQVAEInputError(f"{rgc.file_name}: the catalog has no galaxies")
    if band is None:
        bands = np.atleast_1d(getattr(rgc, "band", None) if getattr(rgc, "band", None) is not None
                              else ["unknown"])
        band = str(bands[0]).strip() or "unknown"
    methods = {}
    with DatasetWriter(out, stamp_size, pixel_scale, str(band), zeropoint, "cosmos",
                       description=f"GalSim RealGalaxyCatalog {os.path.basename(rgc.file_name)} "
                                   f"({n} galaxies)", seed=-1) as w:
        for i in tqdm(range(n), desc="catalog galaxies", disable=not progress):
            where = f"{rgc.file_name} galaxy {i} (ident {rgc.ident[i]})"
            try:
                gal = rgc.getGalImage(i)
                psf = rgc.getPSFImage(i)
            except (OSError, KeyError, IndexError) as err:
                raise VQVAEInputError(f"{where}: cannot read its image or PSF: {err}") from None
            in_scale = float(rgc.pixel_scale[i])
            array = gal.array.astype(np.float64)
            if not np.all(np.isfinite(array)):
                raise VQVAEInputError(f"{where}: image has NaN/inf pixels")
            image = resample(array, in_scale, pixel_scale)
            sigma, method = _noise_sigma(rgc, i, in_scale, pixel_scale, image)
            methods[method] = methods.get(method, 0) + 1
            rng = np.random.default_rng(np.random.SeedSequence([i, 0xC05]))
            stamp = fit_to_size(image, stamp_size, fill=lambda shape: rng.normal(0, sigma, shape))
            psf_index = w.add_psfs(model_psf(psf.array, in_scale, stamp_size, pixel_scale,
                                             f"{where} PSF"))
            params = stamp_params(stamp, zeropoint)
            params["catalog_mag"] = float(rgc.mag[i]) if hasattr(rgc, "mag") else np.nan
            w.append(observed=stamp[None], sigma=[sigma], psf_index=psf_index,
                     params={k: [v] for k, v in params.items()})
        n_psf = w.n_psf
    return dict(n=n, n_psf=n_psf, path=os.path.abspath(os.fspath(out)), noise=methods)
