"""Images and their pixel scale read from FITS files, for the dataset builder
(`galsim_vqvae.data.fits`) and the command's inputs (`galsim_vqvae.outputs`) alike.

Pixel scale of a header: its ``PIXSCALE`` / ``PIXSCAL`` / ``PIXEL_SCALE`` / ``GS_SCALE`` (arcsec),
else its WCS (``CD`` or ``CDELT``; degrees for celestial ``CTYPE``).
"""

import os

import numpy as np

from .errors import VQVAEInputError

_SCALE_KEYS = ("PIXSCALE", "PIXSCAL", "PIXEL_SCALE", "GS_SCALE")


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
