"""FITS files the CLI reads and writes: sampled galaxies, observed stamps, reconstructions.

Every output is written to a temporary file and renamed, so a failure leaves nothing behind.
"""

import os

import numpy as np

from .errors import VQVAEInputError
from .fileio import atomic_path


def write_samples(path, images, codes, emulator, conditions, n, seed=None):
    """Write sampled galaxies as a FITS file: the image cube, the code maps and the conditions.

    HDU 0 holds the pre-PSF images [n, stamp, stamp] with the model's pixel scale, band and flux
    convention in its header; HDU ``CODES`` the code maps; HDU ``CONDITIONS`` a table of the
    physical conditions of each sample (absent for an unconditional model).
    """
    from astropy.io import fits

    m = emulator.metadata
    primary = fits.PrimaryHDU(np.asarray(images, dtype=np.float32))
    h = primary.header
    h["PIXSCALE"] = (m["pixel_scale"], "arcsec/pixel")
    h["BAND"] = m["band"]
    h["ZEROPT"] = (m["zeropoint"], "AB mag of unit flux")
    h["NSAMPLE"] = n
    h["SEED"] = (-1 if seed is None else int(seed), "-1: fresh entropy")
    h["MODEL"] = os.path.basename(getattr(emulator, "path", "default"))[:68]
    h["COMMENT"] = "pre-PSF galaxy images; " + str(m["flux_convention"])
    hdus = [primary, fits.ImageHDU(np.asarray(codes, dtype=np.int32), name="CODES")]
    if conditions:
        cols = [fits.Column(name=k, format="D",
                            array=np.broadcast_to(np.asarray(v, float), (n,)).copy())
                for k, v in conditions.items()]
        hdus.append(fits.BinTableHDU.from_columns(cols, name="CONDITIONS"))
    _write(path, fits.HDUList(hdus))


def write_reconstruction(path, images, reduced_chi2):
    """Write reconstructed images and each stamp's reduced chi^2 as a FITS file."""
    from astropy.io import fits

    hdus = fits.HDUList([fits.PrimaryHDU(np.asarray(images, dtype=np.float32)),
                         fits.BinTableHDU.from_columns(
                             [fits.Column(name="reduced_chi2", format="D",
                                          array=np.asarray(reduced_chi2, float))], name="FIT")])
    _write(path, hdus)


def read_stamps(path, what):
    """Read a 2-D image or a 3-D cube of stamps from the first image HDU of a FITS file."""
    from astropy.io import fits

    if not os.path.isfile(path):
        raise VQVAEInputError(f"{what}: file not found: {path}")
    try:
        with fits.open(path) as hdus:
            data = next((h.data for h in hdus if h.data is not None and h.is_image), None)
            data = None if data is None else np.array(data, dtype=np.float32)
    except OSError as err:
        raise VQVAEInputError(f"{what}: {path} is not a readable FITS file: {err}") from None
    if data is None:
        raise VQVAEInputError(f"{what}: {path} has no image HDU with data")
    if data.ndim not in (2, 3):
        raise VQVAEInputError(f"{what}: {path} holds {data.ndim}-D data; expected a 2-D image "
                              "or a 3-D cube of stamps")
    if not np.all(np.isfinite(data)):
        raise VQVAEInputError(f"{what}: {path} has NaN or infinite pixels")
    return data


def _write(path, hdus):
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise VQVAEInputError(f"output directory does not exist: {directory}")
    with atomic_path(path) as tmp:
        hdus.writeto(tmp, overwrite=True)
