"""A tiny GalSim RealGalaxyCatalog written with GalSim, in the format of COSMOS 25.2: what tests
use where ``../shared`` (the 100 real COSMOS galaxies) is absent, as in CI.

Galaxies are Sersic profiles through Gaussian-core PSFs drawn at 0.03"/pixel on stamps of several
sizes, with COSMOS correlated noise (GalSim's own ACS noise correlation file) of per-galaxy
variance, as in the real catalog.
"""

import os

import galsim
import numpy as np


def write_catalog(directory, n=24, seed=7):
    """Write ``catalog.fits`` and its image, PSF and noise files into ``directory``; return the
    catalog's file name."""
    from astropy.io import fits
    from astropy.table import Table

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    noise_file = "acs_I_unrot_sci_20_cf.fits"
    with fits.open(os.path.join(galsim.meta_data.share_dir, noise_file)) as f:
        f.writeto(os.path.join(directory, noise_file), overwrite=True)
    gals, psfs, rows = [], [], []
    for i in range(n):
        side = int(rng.choice([24, 40, 64, 96, 150]))
        variance = float(rng.uniform(3e-6, 7e-6))
        mag = float(rng.uniform(21.0, 24.0))
        psf = galsim.Convolve(galsim.Gaussian(fwhm=0.09), galsim.Airy(lam_over_diam=0.08))
        gal = galsim.Sersic(n=float(rng.uniform(0.8, 3.0)), half_light_radius=float(
            rng.uniform(0.1, 0.4)), flux=10 ** (-0.4 * (mag - 25.94)))
        gal = gal.shear(g1=float(rng.uniform(-0.3, 0.3)), g2=float(rng.uniform(-0.3, 0.3)))
        image = galsim.Convolve(gal, psf).drawImage(nx=side, ny=side, scale=0.03)
        noise = galsim.getCOSMOSNoise(rng=galsim.BaseDeviate(seed * 1000 + i), cosmos_scale=0.03,
                                      variance=variance)
        image.addNoise(noise)
        gals.append(image)
        psfs.append(psf.drawImage(nx=49, ny=49, scale=0.03))
        rows.append((i, mag, "F814W", 1.0, "images.fits", "psfs.fits", i, i, 0.03, 0.0,
                     variance, noise_file))
    galsim.fits.writeMulti(gals, os.path.join(directory, "images.fits"))
    galsim.fits.writeMulti(psfs, os.path.join(directory, "psfs.fits"))
    names = ("IDENT", "MAG", "BAND", "WEIGHT", "GAL_FILENAME", "PSF_FILENAME", "GAL_HDU",
             "PSF_HDU", "PIXEL_SCALE", "NOISE_MEAN", "NOISE_VARIANCE", "NOISE_FILENAME")
    Table(rows=rows, names=names).write(os.path.join(directory, "catalog.fits"), overwrite=True)
    return "catalog.fits"
