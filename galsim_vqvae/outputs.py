"""FITS files the CLI reads and writes: sampled galaxies, observed stamps, reconstructions.

Every output is written to a temporary file and renamed, so a failure leaves nothing behind.
"""

import os

import numpy as np

from .errors import VQVAEInputError
from .fileio import atomic_path
from .nn.sampling import SAMPLER_NOISE_VERSION
from .provenance import provenance_cards


def write_samples(path, images, codes, emulator, conditions, n, seed=None):
    """Write sampled galaxies as a FITS file: the image cube, the code maps and the conditions.

    HDU 0 holds the pre-PSF images [n, stamp, stamp] with the model's pixel scale, band and flux
    convention in its header; HDU ``CODES`` the code maps; HDU ``CONDITIONS`` a table of the
    labels of each sample, given or drawn (absent for a model without labels; a class label is
    an integer column).
    """
    _write(path, sample_hdus(images, codes, emulator, conditions, n, seed))


def sample_hdus(images, codes, emulator, conditions, n, seed=None):
    """The `astropy.io.fits.HDUList` that `write_samples` writes."""
    from astropy.io import fits

    m = emulator.metadata
    primary = fits.PrimaryHDU(np.asarray(images, dtype=np.float32))
    h = primary.header
    h["PIXSCALE"] = (m["pixel_scale"], "arcsec/pixel")
    h["BAND"] = m["band"]
    h["ZEROPT"] = (m["zeropoint"], "AB mag of unit flux")
    h["NSAMPLE"] = n
    h["SEED"] = (-1 if seed is None else int(seed), "sampling seed (-1: fresh entropy)")
    h["NOISEVER"] = (SAMPLER_NOISE_VERSION, "sampler noise version (docs/sampling.md)")
    for key, card in provenance_cards(getattr(emulator, "path", None)).items():
        h[key] = card
    h["COMMENT"] = "pre-PSF galaxy images; " + str(m["flux_convention"])
    hdus = [primary, fits.ImageHDU(np.asarray(codes, dtype=np.int32), name="CODES")]
    if conditions:
        cols = [fits.Column(name=k, format="K" if np.asarray(v).dtype.kind in "iu" else "D",
                            array=np.broadcast_to(np.asarray(v), (n,)).copy())
                for k, v in conditions.items()]
        hdus.append(fits.BinTableHDU.from_columns(cols, name="CONDITIONS"))
    return fits.HDUList(hdus)


def write_reconstruction(path, images, reduced_chi2):
    """Write reconstructed images and each stamp's reduced chi^2 as a FITS file."""
    from astropy.io import fits

    hdus = fits.HDUList([fits.PrimaryHDU(np.asarray(images, dtype=np.float32)),
                         fits.BinTableHDU.from_columns(
                             [fits.Column(name="reduced_chi2", format="D",
                                          array=np.asarray(reduced_chi2, float))], name="FIT")])
    _write(path, hdus)


def read_stamps(path, what, stamp_size=None, pixel_scale=None, psf=False):
    """Stamps [n, S, S] (float32) from the first image HDU of a FITS file: a 2-D image (n = 1)
    or a 3-D cube.

    Parameters:
        path:           The FITS file.
        what:           How it was given (e.g. ``"--input"``), named in every error.
        stamp_size:     If given, the stamps must be ``stamp_size`` pixels square. [default: None]
        pixel_scale:    If given, a pixel scale in the header (``PIXSCALE``... or the WCS, see
                        `galsim_vqvae.data.fits`) must equal it (to 0.1%); a header without one
                        is taken to be at this scale. [default: None]
        psf:            Each stamp is a PSF: its sum must be positive. [default: False]
    """
    from .data.fits import header_scale, read_image

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VQVAEInputError(f"{what}: file not found: {path}")
    data, header = read_image(path, ndims=(2, 3), what=what)
    stamps = data if data.ndim == 3 else data[None]
    where = f"{what}: {path}"
    if stamp_size is not None and stamps.shape[1:] != (stamp_size, stamp_size):
        raise VQVAEInputError(f"{where} holds {stamps.shape[2]}x{stamps.shape[1]}-pixel images; "
                              f"the model takes {stamp_size}x{stamp_size} stamps")
    if pixel_scale is not None:
        scale = header_scale(header, where)
        if scale is not None and abs(scale - pixel_scale) > 1e-3 * pixel_scale:
            raise VQVAEInputError(f"{where} has a pixel scale of {scale:.6g}\"/pixel (from its "
                                  f"header) but the model's is {pixel_scale:.6g}\"/pixel; resample "
                                  "the stamps to the model's grid first")
    if psf:
        sums = stamps.sum(axis=(1, 2))
        bad = np.flatnonzero(~(sums > 0))
        if bad.size:
            raise VQVAEInputError(f"{where}: PSF image {bad[0]} sums to {sums[bad[0]]:.4g}; a PSF "
                                  "must have a positive sum")
    return stamps.astype(np.float32)


def _write(path, hdus):
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise VQVAEInputError(f"output directory does not exist: {directory}")
    with atomic_path(path) as tmp:
        hdus.writeto(tmp, overwrite=True)
