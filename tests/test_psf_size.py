"""PSF images of any size: padded or cropped about the centre pixel (GalSim's convention) to the
model's stamp, at every entry point that takes a PSF."""

import warnings

import galsim
import numpy as np
import pytest
from astropy.io import fits

from galsim_vqvae.emulator import fit_psf

pytestmark = pytest.mark.usefixtures("one_thread")


def drawn(profile, nx, ny, scale=0.03):
    """The PSF as GalSim draws it on an nx x ny image (centre pixel (ny//2, nx//2))."""
    return profile.drawImage(nx=nx, ny=ny, scale=scale, use_true_center=False,
                             method="no_pixel").array


@pytest.mark.parametrize("nx, ny", [(25, 25), (24, 24), (15, 20), (31, 8), (32, 32)])
def test_padding_agrees_with_galsim(nx, ny):
    """A small PSF padded to the stamp is GalSim's drawing of the same profile at the stamp's
    size, inside the small image's footprint, and zero outside."""
    rng = np.random.default_rng(nx * 100 + ny)
    psf = galsim.Moffat(beta=3, fwhm=0.1).shear(g1=rng.uniform(-.2, .2), g2=rng.uniform(-.2, .2))
    psf = psf.shift(rng.uniform(-0.01, 0.01, 2))  # off-centre: a wrong centre shows
    small, big = drawn(psf, nx, ny), drawn(psf, 32, 32)
    fitted = fit_psf(small, 32)
    x0, y0 = 16 - nx // 2, 16 - ny // 2
    footprint = np.zeros((32, 32), bool)
    footprint[y0:y0 + ny, x0:x0 + nx] = True
    np.testing.assert_allclose(fitted[footprint], big[footprint], rtol=1e-6, atol=1e-9)
    assert not fitted[~footprint].any()


@pytest.mark.parametrize("nx, ny", [(45, 45), (40, 52), (33, 33)])
def test_cropping_agrees_with_galsim(nx, ny):
    psf = galsim.Gaussian(fwhm=0.06).shear(g1=0.1, g2=-0.05).shift(0.007, -0.004)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a compact PSF loses no flux: no warning
        fitted = fit_psf(drawn(psf, nx, ny), 32)
    np.testing.assert_allclose(fitted, drawn(psf, 32, 32), rtol=1e-6, atol=1e-9)
    stack = fit_psf(np.stack([drawn(psf, nx, ny)] * 2), 32)
    assert stack.shape == (2, 32, 32) and np.array_equal(stack[1], fitted)
    wide = galsim.Moffat(beta=2, fwhm=0.4)  # much of its flux lies beyond 32 pixels
    with pytest.warns(UserWarning, match=r"cropped to the model's 32x32 stamp, losing \d"):
        fit_psf(drawn(wide, 64, 64), 32)


def test_reconstruct_takes_any_psf_size(tiny_emulator, tmp_path):
    """`Emulator.reconstruct` and ``reconstruct --psf`` give the same result for a 17x17, a
    20x26 and the stamp-size drawing of one PSF (compact: nothing lies outside 17 pixels)."""
    from galsim_vqvae.cli import main

    psf = galsim.Gaussian(fwhm=0.09)
    s = tiny_emulator.stamp_size
    rng = np.random.default_rng(2)
    truth = galsim.Exponential(half_light_radius=0.1, flux=50.0)
    observed = galsim.Convolve(truth, psf).drawImage(nx=s, ny=s, scale=0.03).array
    observed = (observed + rng.normal(0, 0.05, observed.shape)).astype(np.float32)
    full = drawn(psf, s, s)
    ref, chi = tiny_emulator.reconstruct(observed, full, 0.05, convolved=True)
    for nx, ny in ((17, 17), (20, 26)):
        out, chi2 = tiny_emulator.reconstruct(observed, drawn(psf, nx, ny), 0.05, convolved=True)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    fits.PrimaryHDU(observed).writeto(tmp_path / "obs.fits")
    fits.PrimaryHDU(drawn(psf, 17, 17).astype(np.float32)).writeto(tmp_path / "psf.fits")
    assert main(["reconstruct", "--model", str(tiny_emulator.path), "--input",
                 str(tmp_path / "obs.fits"), "--psf", str(tmp_path / "psf.fits"), "--sigma",
                 "0.05", "--convolved", "--out", str(tmp_path / "r.fits"), "--quiet"]) in (0, None)
    np.testing.assert_allclose(fits.getdata(tmp_path / "r.fits")[0], ref[0], rtol=1e-5,
                               atol=1e-6 * np.abs(ref).max())
