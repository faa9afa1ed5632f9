"""A dataset from a GalSim RealGalaxyCatalog (COSMOS 25.2 as ``galsim_download_cosmos`` fetches
it, or any catalog in that format, e.g. GalSim's AEGIS test catalogs).

For each galaxy: its HST image and its own PSF image (at the catalog's pixel scale, 0.03" for
COSMOS) are resampled to the model grid with the rules of `galsim_vqvae.data.fits` (same treatment
for galaxy and PSF; finer inputs get the model pixel's response), cropped or padded (centred) to
S x S, the PSF normalised to sum 1.

Noise model (`noise_model`): each galaxy's noise is the catalog's, ``RealGalaxyCatalog.getNoise``
(a GalSim ``CorrelatedNoise`` made from the galaxy's noise file, the correlation function of the
drizzled ACS noise for COSMOS, scaled to the galaxy's ``VARIANCE``). Its correlation function on
the model grid is exact when the model keeps the catalog's pixels (GalSim draws it at the catalog
scale); otherwise it is measured on unit-variance noise fields drawn by GalSim at the catalog scale
and resampled exactly like the galaxies (4 fields of 512 x 512 model pixels, once per noise file:
about 8 s). The dataset stores its S x S power spectrum (`galsim_vqvae.data.noise.
power_from_correlation`) once per noise file in ``noise_bank``, and sigma = sqrt(VARIANCE x the
resampled variance of unit noise) per galaxy. A catalog without noise information gives white
noise of the sigma estimated from the resampled stamp's corners.

Weight: 1 on the galaxy's own image, 0 on the padding (stamps smaller than S x S; when resampled,
the image's outer model pixel on each side, which the interpolation sees only partly, is left out
too) and, for correlated noise, within the whitening kernel's reach of the stamp's edge
(`noise.whitening_reach`: 3 pixels for COSMOS noise at 0.03", where the chi^2's periodic
whitening mixes opposite edges). The padding holds correlated noise of the galaxy's noise model
(`noise.draw_correlated`), so that the whitening of the chi^2 sees stationary noise across the
image's edge. Neighbours are already replaced by noise in COSMOS stamps: there is no other mask.
"""

import os

import numpy as np

from ..errors import VQVAEInputError
from .dataset import DatasetWriter
from .fits import fit_to_size, model_psf, resample, stamp_params
from .noise import (correlation_function, draw_correlated, estimate_sigma,
                    power_from_correlation, whitening_reach)

_NOISE_FIELD = 512  # side (model pixels) of each noise field measured when resampling
_NOISE_FIELDS = 4   # fields per noise model: a chi^2 bias below 1e-3 on COSMOS noise (a test)
_NOISE_SEED = 20261207


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


def noise_model(noise, in_scale, pixel_scale, stamp_size):
    """The power spectrum on the model grid of a catalog's noise, and its variance there.

    Parameters:
        noise:          A GalSim ``BaseCorrelatedNoise`` of unit variance at the catalog scale
                        (``RealGalaxyCatalog.getNoise(i).withVariance(1)``).
        in_scale:       The catalog's pixel scale (arcsec).
        pixel_scale:    The model's pixel scale (arcsec).
        stamp_size:     The model's stamp side S.

    Returns:
        (power [S, S] of mean 1, variance on the model grid of noise of unit catalog variance).
    """
    import galsim

    s = int(stamp_size)
    same = abs(in_scale - pixel_scale) <= 1e-6 * pixel_scale
    # the correlation function's reach at the catalog scale, over the lags a stamp holds
    reach = int(np.ceil((s - 1) * pixel_scale / in_scale))
    cf = noise.drawImage(galsim.Image(2 * reach + 1, 2 * reach + 1, scale=in_scale)).array
    if same:
        return power_from_correlation(cf, s)
    nonzero = np.argwhere(np.abs(cf) > 1e-6 * np.abs(cf).max()) - reach
    extent = int(np.abs(nonzero).max()) if nonzero.size else 0
    max_lag = min(s - 1, int(np.ceil(extent * in_scale / pixel_scale)) + 3)
    side = int(np.ceil(_NOISE_FIELD * pixel_scale / in_scale))
    rng = galsim.BaseDeviate(_NOISE_SEED)
    fields = []
    for _ in range(_NOISE_FIELDS):
        field = galsim.Image(side, side, scale=in_scale)
        field.addNoise(noise.copy(rng=rng))
        fields.append(resample(field.array, in_scale, pixel_scale)[4:-4, 4:-4])  # interior
    return power_from_correlation(correlation_function(fields, max_lag), s)


class _CatalogNoise:
    """Per galaxy of a RealGalaxyCatalog: its noise's bank entry and sigma on the model grid
    (one `noise_model` per noise file, added to the writer's noise bank when first met)."""

    def __init__(self, rgc, writer, pixel_scale, stamp_size):
        self.rgc, self.writer = rgc, writer
        self.pixel_scale, self.stamp_size = pixel_scale, stamp_size
        self.models = {}  # (noise file, catalog scale) -> (bank index, unit variance)
        self.white = None
        self.methods = {}

    def __call__(self, i, image, where):
        """(noise bank index, sigma, power spectrum) of galaxy ``i``, whose resampled image is
        ``image``."""
        rgc = self.rgc
        variance = float(np.asarray(getattr(rgc, "variance", [0.0] * (i + 1)))[i])
        files = getattr(rgc, "noise_file_name", None)
        if not np.isfinite(variance) or variance < 0:
            raise VQVAEInputError(f"{where}: field NOISE_VARIANCE is {variance}; a noise "
                                  f"variance must be finite and >= 0")
        if not variance > 0:
            if files is not None:
                raise VQVAEInputError(f"{where}: field NOISE_VARIANCE is 0 but it has a noise file "
                                      f"{files[i]}; give its variance")
            sigma = estimate_sigma(image)
            self._count("estimated from the stamp corners (white)")
            if self.white is None:
                s = self.stamp_size
                self.white = (int(self.writer.add_noise_power(np.ones((s, s)))[0]),
                              np.ones((s, s)))
            return self.white[0], sigma, self.white[1]
        in_scale = float(rgc.pixel_scale[i])
        key = (None if files is None else str(files[i]), in_scale)
        if key not in self.models:
            what = "its noise" if files is None else \
                f"its noise file {files[i]} (field NOISE_FILENAME)"
            try:
                _check_correlation_image(rgc.getNoiseProperties(i)[0])
                noise = rgc.getNoise(i).withVariance(1.0)
                power, unit = noise_model(noise, in_scale, self.pixel_scale, self.stamp_size)
            except VQVAEInputError as err:
                raise VQVAEInputError(f"{where}: {what} is not a noise correlation function: "
                                      f"{err}") from None
            except Exception as err:  # noqa: BLE001 - astropy/GalSim raise many types
                raise VQVAEInputError(f"{where}: cannot use {what}: {type(err).__name__}: "
                                      f"{err}") from None
            if not (np.isfinite(power).all() and power.min() > 0 and unit > 0):
                raise VQVAEInputError(f"{where}: {what} is not a noise correlation function "
                                      f"(its power spectrum on the model grid is not positive)")
            self.models[key] = (int(self.writer.add_noise_power(power)[0]), unit, power)
        index, unit, power = self.models[key]
        self._count("catalog noise model" + (" (white)" if files is None else " (correlated)"))
        return index, float(np.sqrt(variance * unit)), power

    def _count(self, method):
        self.methods[method] = self.methods.get(method, 0) + 1


def _check_correlation_image(image):
    """A noise file's image (a GalSim ``Image`` or None) must look like a correlation function:
    square, finite, peaked at its centre, well below the peak at its edge."""
    if image is None:
        return
    a = image.array
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 3:
        raise VQVAEInputError(f"its image has shape {a.shape}; a correlation function image is "
                              f"square")
    if not np.isfinite(a).all():
        raise VQVAEInputError("its image has NaN/inf pixels")
    c = a.shape[0] // 2
    centre = a[c - 1:c + 1, c - 1:c + 1].max() if a.shape[0] % 2 == 0 else a[c, c]
    edge = np.abs(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])).max()
    if not (centre > 0 and centre >= a.max() and edge < 0.5 * centre):
        raise VQVAEInputError(f"its image does not peak at its centre (centre {centre:.4g}, "
                              f"maximum {a.max():.4g}, largest edge value {edge:.4g})")


def _read(method, i, where, field):
    """``method(i)`` (the galaxy or PSF image of galaxy ``i``), errors naming the field."""
    try:
        return method(i)
    except Exception as err:  # noqa: BLE001 - astropy/GalSim raise many types
        raise VQVAEInputError(f"{where}: cannot read its image (field {field}): "
                              f"{type(err).__name__}: {err}") from None


def _footprint(shape, in_scale, pixel_scale, stamp_size, border):
    """Weight map of an image of ``shape`` (model pixels) placed on the stamp: 1 on the image
    (less its outer pixel when resampled), 0 on the padding and within ``border`` pixels of
    the stamp's edge."""
    ones = np.ones(shape)
    if abs(in_scale - pixel_scale) > 1e-6 * pixel_scale and min(shape) > 2:
        ones[[0, -1], :] = 0
        ones[:, [0, -1]] = 0
    weight = fit_to_size(ones, stamp_size)
    if border:
        weight[:border], weight[-border:], weight[:, :border], weight[:, -border:] = 0, 0, 0, 0
    return weight


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
        dict: ``n``, ``n_psf``, ``n_noise`` (noise bank entries), ``path``, ``noise`` (how the
        noise model was obtained, per method count).
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
    with DatasetWriter(out, stamp_size, pixel_scale, str(band), zeropoint, "cosmos",
                       description=f"GalSim RealGalaxyCatalog {os.path.basename(rgc.file_name)} "
                                   f"({n} galaxies)", seed=-1) as w:
        noise = _CatalogNoise(rgc, w, pixel_scale, stamp_size)
        for i in tqdm(range(n), desc="catalog galaxies", disable=not progress):
            where = f"{rgc.file_name} galaxy {i} (ident {rgc.ident[i]})"
            gal = _read(rgc.getGalImage, i, where, "GAL_FILENAME")
            psf = _read(rgc.getPSFImage, i, where, "PSF_FILENAME")
            in_scale = float(rgc.pixel_scale[i])
            array = gal.array.astype(np.float64)
            if not np.all(np.isfinite(array)):
                raise VQVAEInputError(f"{where}: image has NaN/inf pixels")
            image = resample(array, in_scale, pixel_scale)
            noise_index, sigma, power = noise(i, image, where)
            rng = np.random.default_rng(np.random.SeedSequence([i, 0xC05]))
            stamp = fit_to_size(image, stamp_size,
                                fill=lambda shape: draw_correlated(power, sigma, rng))
            weight = _footprint(image.shape, in_scale, pixel_scale, stamp_size,
                                whitening_reach(power))
            psf_index = w.add_psfs(model_psf(psf.array, in_scale, stamp_size, pixel_scale,
                                             f"{where} PSF"))
            params = stamp_params(fit_to_size(image, stamp_size), zeropoint)  # no padding
            params["catalog_mag"] = float(rgc.mag[i]) if hasattr(rgc, "mag") else np.nan
            w.append(observed=stamp[None], sigma=[sigma], psf_index=psf_index,
                     params={k: [v] for k, v in params.items()}, noise_index=[noise_index],
                     weight=weight[None])
        n_psf, n_noise = w.n_psf, w.n_noise
    return dict(n=n, n_psf=n_psf, n_noise=n_noise, path=os.path.abspath(os.fspath(out)),
                noise=noise.methods)
