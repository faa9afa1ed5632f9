"""A dataset from a folder of FITS galaxy stamps and their PSF(s).

Rules:

- Every ``*.fits``/``*.fit``/``*.fits.gz`` file of ``input_dir`` (sorted by name) is one stamp: the
  first HDU that holds a 2-D image.
- ``psf`` is either one FITS file (the PSF of every stamp) or a folder holding, for each stamp
  ``NAME.fits``, a PSF file named ``NAME.fits`` or ``NAME.psf.fits`` or ``NAME_psf.fits``.
- Pixel scale: the ``input_pixel_scale`` argument if given, else the header's ``PIXSCALE`` /
  ``PIXSCAL`` / ``PIXEL_SCALE`` / ``GS_SCALE`` (arcsec), else its WCS (``CD`` or ``CDELT``; degrees
  for celestial ``CTYPE``), else an error. The same rule applies to PSF files.
- Centring: the centre of an image of side n is its pixel n//2 (0-based; GalSim's
  ``Image.center``), for odd and even sides alike; it lands on pixel (S//2, S//2) of the stamp.
- Resampling (when the input scale differs from the model's): through GalSim's InterpolatedImage,
  flux conserved. An input finer than the model grid is drawn with the model pixel's response
  (``method='auto'``), a coarser one is only interpolated (``method='no_pixel'``); galaxy and PSF
  get the same treatment, so they stay consistent. Then stamps are cropped or padded (centred) to
  S x S; padding is filled with Gaussian noise of the stamp's sigma, drawn from the stamp's index.
- Noise sigma per stamp: `galsim_vqvae.data.noise.estimate_sigma` on the resampled stamp before
  padding (its pixels of weight > 0). PSFs are normalised to sum 1 after resampling.
- Weight maps (optional, ``weight``: a folder holding, for stamp ``NAME.fits``, ``NAME.fits``,
  ``NAME.weight.fits``, ``NAME_weight.fits``, ``NAME.mask.fits`` or ``NAME_mask.fits``, of the
  stamp's shape): relative inverse variances, >= 0, 0 where there is no data (a mask of 1 for good
  pixels and 0 for bad ones is one). Resampled like the stamp, divided by the area ratio, and
  set to 0 wherever a model pixel sees less than 99% good input pixels; normalised to a median of
  1 over the pixels with data (sigma is the noise there); 0 on the padding. Without weight maps
  the dataset has no ``weight`` (every weight 1). The noise is taken as white.
"""

import os

import numpy as np

from ..errors import VQVAEInputError
from .dataset import DatasetWriter
from .noise import estimate_sigma

FITS_SUFFIXES = (".fits", ".fit", ".fits.gz", ".fit.gz")
_SCALE_KEYS = ("PIXSCALE", "PIXSCAL", "PIXEL_SCALE", "GS_SCALE")


def _stem(name):
    for suffix in FITS_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return None


def list_fits(directory, what="input_dir"):
    """Sorted paths of the FITS files in ``directory``; error if missing or empty."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise VQVAEInputError(f"{what} is not a folder: {directory}")
    names = sorted(n for n in os.listdir(directory) if _stem(n) is not None)
    if not names:
        raise VQVAEInputError(f"{what} {directory} holds no FITS files ({', '.join(FITS_SUFFIXES)})")
    return [os.path.join(directory, n) for n in names]


def read_image(path, ndims=(2,), what=None):
    """(float64 array, header) of the first HDU of a FITS file that holds an image.

    Parameters:
        path:   The FITS file.
        ndims:  The numbers of dimensions accepted: ``(2,)`` for one image (length-1 axes are
                dropped), ``(2, 3)`` also for a cube of stamps. [default: (2,)]
        what:   How the file was given (e.g. ``"--input"``), to prefix errors. [default: None]

    Raises:
        VQVAEInputError naming the file: unreadable or not FITS, no image HDU, the wrong number
        of dimensions, NaN or infinite pixels.
    """
    from astropy.io import fits

    path = os.fspath(path)
    where = f"{what}: {path}" if what else path
    expected = " or ".join(f"{n}-D" for n in ndims)
    try:
        with fits.open(path) as hdus:
            for hdu in hdus:
                if not hdu.is_image or hdu.data is None or not getattr(hdu.data, "size", 0):
                    continue
                data = np.asarray(hdu.data, dtype=np.float64)
                if data.ndim not in ndims:
                    data = np.squeeze(data)
                if data.ndim not in ndims or min(data.shape) < 1:
                    raise VQVAEInputError(f"{where}: image HDU holds {hdu.data.ndim}-D data of "
                                          f"shape {hdu.data.shape}; expected a {expected} image")
                header = hdu.header.copy()
                break
            else:
                raise VQVAEInputError(f"{where}: no image HDU (no HDU with {expected} data)")
    except VQVAEInputError:
        raise
    except Exception as err:  # noqa: BLE001 - astropy raises many types for damaged files
        raise VQVAEInputError(f"{where}: not a readable FITS file: {type(err).__name__}: "
                              f"{err}") from None
    for bad, what in ((~np.isfinite(data), "NaN/inf pixels"),
                      (np.abs(data) > np.finfo(np.float32).max, "pixels beyond the float32 range")):
        if bad.any():
            first = np.argwhere(bad)[0]
            at = (f"stamp {first[0]}, " if data.ndim == 3 else "") + \
                f"x={first[-1]}, y={first[-2]}"
            raise VQVAEInputError(f"{where}: {bad.sum()} {what} (first at {at})")
    return data, header


def header_scale(header, where):
    """Pixel scale (arcsec) from a FITS header (see the module docstring), or None if it has none.
    A keyword that is present but not a positive number, or cannot be parsed, is an error naming
    ``where``."""
    from astropy.io.fits.verify import VerifyError

    try:
        return _header_scale(header, where)
    except VerifyError as err:  # a damaged card, parsed only when read
        raise VQVAEInputError(f"{where}: a header card of the pixel scale cannot be parsed: "
                              f"{err}") from None


def _header_scale(header, where):
    for key in _SCALE_KEYS:
        if key in header:
            value = _number(header[key], key, where)
            if not value > 0:
                raise VQVAEInputError(f"{where}: header keyword {key} = {header[key]!r} is not a "
                                      "positive pixel scale")
            return value
    celestial = any(str(header.get(f"CTYPE{a}", "")).upper().startswith(("RA", "DEC", "GLON",
                                                                           "GLAT", "ELON", "ELAT"))
                    for a in (1, 2))
    unit = str(header.get("CUNIT1", "deg" if celestial else "arcsec")).strip().lower()
    factor = {"deg": 3600.0, "arcmin": 60.0, "arcsec": 1.0}.get(unit)
    cd = None
    if "CD1_1" in header or "CD2_2" in header:
        cd = np.array([[_number(header.get(k, 0.0), k, where) for k in ("CD1_1", "CD1_2")],
                       [_number(header.get(k, 0.0), k, where) for k in ("CD2_1", "CD2_2")]])
    elif "CDELT1" in header and "CDELT2" in header:
        cd = np.diag([_number(header[k], k, where) for k in ("CDELT1", "CDELT2")])
    if cd is not None and factor is not None:
        scale = np.sqrt(abs(np.linalg.det(cd))) * factor
        if np.isfinite(scale) and scale > 0:
            return float(scale)
    return None


def _number(value, key, where):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise VQVAEInputError(f"{where}: header keyword {key} = {value!r} is not a number") \
            from None
    if not np.isfinite(value):
        raise VQVAEInputError(f"{where}: header keyword {key} = {value!r} is not finite")
    return value


def image_scale(header, override, where, default=None):
    """Pixel scale (arcsec) of an image: ``override`` if given, else from its FITS header (see the
    module docstring), else ``default``; error naming ``where`` if none."""
    if override is not None:
        if not float(override) > 0:
            raise VQVAEInputError(f"{where}: pixel scale must be > 0, got {override}")
        return float(override)
    scale = header_scale(header, where)
    if scale is not None:
        return scale
    if default is not None:
        return float(default)
    raise VQVAEInputError(f"{where}: no pixel scale (no {'/'.join(_SCALE_KEYS)}, CD or CDELT "
                          f"keyword); pass input_pixel_scale (--input-pixel-scale)")


def _interpolated(array, scale, **kwargs):
    import galsim

    return galsim.InterpolatedImage(galsim.Image(np.ascontiguousarray(array), scale=scale),
                                    use_true_center=False, **kwargs)


def psf_profile(array, scale, where):
    """GalSim profile of a PSF image (centre at pixel n//2, normalised to flux 1); error naming
    ``where`` if it is not 2-D or its sum is not positive."""
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2:
        raise VQVAEInputError(f"{where}: PSF must be a 2-D image, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise VQVAEInputError(f"{where}: PSF has NaN/inf pixels")
    total = array.sum()
    if not total > 0:
        raise VQVAEInputError(f"{where}: PSF sums to {total:.4g}; it must be positive")
    return _interpolated(array / total, scale)


def resample(array, in_scale, out_scale, out_size=None):
    """Resample an image from ``in_scale`` to ``out_scale`` (arcsec) with GalSim, conserving flux.

    Finer inputs are drawn with the output pixel response, coarser ones interpolated; the centre
    (pixel n//2) maps to pixel m//2 of the output. ``out_size`` None covers the input's extent
    (each axis separately), else the output is ``out_size`` x ``out_size``.
    """
    array = np.asarray(array, dtype=np.float64)
    if abs(in_scale - out_scale) <= 1e-6 * out_scale:
        return array if out_size is None else fit_to_size(array, out_size)
    if out_size is None:
        ny, nx = (max(1, int(np.ceil(n * in_scale / out_scale))) for n in array.shape)
    else:
        ny = nx = int(out_size)
    method = "auto" if in_scale < out_scale else "no_pixel"
    image = _interpolated(array, in_scale, flux=array.sum()).drawImage(
        nx=nx, ny=ny, scale=out_scale, method=method, use_true_center=False)
    return image.array.astype(np.float64)


def fit_to_size(array, size, fill=None):
    """Crop or pad a 2-D array to ``size`` x ``size`` keeping pixel n//2 at size//2. Padding is
    zeros, or ``fill(shape)`` values (e.g. noise) where given."""
    array = np.asarray(array, dtype=np.float64)
    out = np.zeros((size, size)) if fill is None else np.array(fill((size, size)), dtype=np.float64)
    placed = []
    for n in array.shape:
        lo = size // 2 - n // 2            # output index of input pixel 0
        a0, a1 = max(0, -lo), min(n, size - lo)
        placed.append((slice(lo + a0, lo + a1), slice(a0, a1)))
    (oy, iy), (ox, ix) = placed
    out[oy, ox] = array[iy, ix]
    return out


def model_psf(array, in_scale, stamp_size, pixel_scale, where):
    """A PSF image resampled to the model grid, cropped/padded to S x S, normalised to sum 1."""
    psf_profile(array, in_scale, where)  # validates
    out = fit_to_size(resample(array / np.sum(array), in_scale, pixel_scale), stamp_size)
    total = out.sum()
    if not total > 0:
        raise VQVAEInputError(f"{where}: PSF sums to {total:.4g} after resampling to the stamp")
    return out / total


def model_stamp(array, in_scale, stamp_size, pixel_scale, index, weight=None):
    """A galaxy stamp on the model grid and its noise sigma: resampled, sigma estimated from the
    corners (pixels of positive ``weight``, the stamp's weight on the model grid), then cropped
    or padded (padding filled with noise seeded by ``index``)."""
    image = resample(array, in_scale, pixel_scale)
    sigma = estimate_sigma(image if weight is None else np.where(weight > 0, image, np.nan))
    rng = np.random.default_rng(np.random.SeedSequence([index, 0x5EED]))
    return fit_to_size(image, stamp_size, fill=lambda shape: rng.normal(0, sigma, shape)), sigma


def model_weight(array, shape, in_scale, stamp_size, pixel_scale, where):
    """A weight map on the model grid (see the module docstring), before and after cropping or
    padding to the stamp: (resampled [like the stamp], [S, S]). Errors name ``where``."""
    array = np.asarray(array, dtype=np.float64)
    if array.shape != tuple(shape):
        raise VQVAEInputError(f"{where}: weight map has shape {array.shape}, its stamp "
                              f"{tuple(shape)}")
    if (array < 0).any():
        raise VQVAEInputError(f"{where}: weight map has {(array < 0).sum()} negative pixels")
    if not (array > 0).any():
        raise VQVAEInputError(f"{where}: weight map is 0 everywhere (no pixel with data)")
    area = (pixel_scale / in_scale) ** 2
    good = resample((array > 0).astype(np.float64), in_scale, pixel_scale) / area
    weight = np.where(good > 0.99, resample(array, in_scale, pixel_scale) / area, 0.0)
    if not (weight > 0).any():
        raise VQVAEInputError(f"{where}: weight map leaves no pixel with data on the model grid")
    weight /= np.median(weight[weight > 0])
    return weight, fit_to_size(weight, stamp_size)


def stamp_params(stamp, zeropoint):
    """What a real stamp tells: ``flux`` (stamp sum), ``mag``."""
    flux = float(np.sum(stamp))
    mag = zeropoint - 2.5 * np.log10(flux) if flux > 0 else np.nan
    return {"flux": flux, "mag": float(mag)}


def _companion(stamp_path, folder, what, suffixes):
    """The file of ``folder`` that goes with a stamp: ``NAME.fits`` or ``NAME<suffix>.fits``."""
    stem = _stem(os.path.basename(stamp_path))
    for name in sorted(os.listdir(folder)):
        if _stem(name) in (stem,) + tuple(stem + x for x in suffixes):
            return os.path.join(folder, name)
    names = ", ".join(f"{stem}{x}.fits" for x in ("",) + tuple(suffixes))
    raise VQVAEInputError(f"no {what} for stamp {stamp_path} in {folder} (expected {names})")


def _psf_for(stamp_path, psf, psf_dir):
    if not psf_dir:
        return psf
    return _companion(stamp_path, psf, "PSF", (".psf", "_psf"))


def make_fits_dataset(out, input_dir, psf, stamp_size=84, pixel_scale=0.06,
                      input_pixel_scale=None, band="F160W", zeropoint=25.94, progress=True,
                      psf_pixel_scale=None, description=None, weight=None):
    """Build a dataset from a folder of FITS galaxy stamps and their PSF(s).

    See the module docstring for the file-matching, pixel-scale, centring and resampling rules.

    Parameters:
        out:                Output dataset file (HDF5; nothing is written on error).
        input_dir:          Folder of FITS stamps (one galaxy each).
        psf:                One FITS PSF file for all stamps, or a folder with one PSF per stamp.
        stamp_size:         Model stamp side in pixels. [default: 84]
        pixel_scale:        Model pixel scale in arcsec. [default: 0.06]
        input_pixel_scale:  Pixel scale of the input stamps (arcsec); None reads each header.
                            [default: None]
        band:               Band name stored in the header. [default: "F160W"]
        zeropoint:          AB zeropoint of the stamps' units. [default: 25.94]
        progress:           Show a progress bar. [default: True]
        psf_pixel_scale:    Pixel scale of the PSF images; None reads their headers, else uses
                            the stamps' scale. [default: None]
        description:        Header description. [default: None, i.e. names the folder]
        weight:             Folder of weight (or mask) maps, one per stamp (see the module
                            docstring). [default: None, every weight 1]

    Returns:
        dict: ``n``, ``n_psf``, ``path``.
    """
    from tqdm import tqdm

    stamps = list_fits(input_dir)
    psf = os.fspath(psf)
    if not os.path.exists(psf):
        raise VQVAEInputError(f"psf not found: {psf}")
    psf_dir = os.path.isdir(psf)
    if psf_dir:
        list_fits(psf, what="psf folder")
    if weight is not None:
        list_fits(weight, what="weight folder")
    with DatasetWriter(out, stamp_size, pixel_scale, band, zeropoint, "fits",
                       description=description or f"FITS stamps of {os.path.abspath(input_dir)}",
                       seed=-1) as w:
        psf_index = {}
        for i, path in enumerate(tqdm(stamps, desc="FITS stamps", disable=not progress)):
            data, header = read_image(path)
            scale = image_scale(header, input_pixel_scale, path)
            wgt = None
            if weight is not None:
                w_path = _companion(path, weight, "weight map", (".weight", "_weight", ".mask",
                                                                 "_mask"))
                wgt = model_weight(read_image(w_path)[0], data.shape, scale, stamp_size,
                                   pixel_scale, w_path)
            stamp, sigma = model_stamp(data, scale, stamp_size, pixel_scale, i,
                                       None if wgt is None else wgt[0])
            psf_path = _psf_for(path, psf, psf_dir)
            if psf_path not in psf_index:
                psf_data, psf_header = read_image(psf_path)
                p_scale = image_scale(psf_header, psf_pixel_scale, psf_path, default=scale)
                psf_index[psf_path] = int(w.add_psfs(
                    model_psf(psf_data, p_scale, stamp_size, pixel_scale, psf_path))[0])
            if not sigma > 0:
                raise VQVAEInputError(f"{path}: the noise sigma estimated from the corners is "
                                      f"{sigma}; a noiseless image cannot be used for training")
            params = stamp_params(stamp, zeropoint)
            w.append(observed=stamp[None], sigma=[sigma], psf_index=[psf_index[psf_path]],
                     params={k: [v] for k, v in params.items()},
                     weight=None if wgt is None else wgt[1][None])
        n, n_psf = w.n, w.n_psf
    return dict(n=n, n_psf=n_psf, path=os.path.abspath(os.fspath(out)))
