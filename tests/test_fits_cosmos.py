"""Real-data readers: a folder of FITS stamps + PSFs, and GalSim RealGalaxyCatalogs (AEGIS)."""

import os
from pathlib import Path

import galsim
import numpy as np
import pytest
from astropy.io import fits

from galsim_vqvae.data.cosmos import make_cosmos_dataset
from galsim_vqvae.data.dataset import load_arrays, read_header
from galsim_vqvae.data.fits import fit_to_size, image_scale, make_fits_dataset, resample
from galsim_vqvae.data.noise import estimate_sigma
from galsim_vqvae.errors import VQVAEInputError

SHARED_HST = Path(__file__).resolve().parents[2] / "shared" / "data" / "hst"
needs_hst = pytest.mark.skipif(not SHARED_HST.exists(), reason="shared HST data not present")
S = 84


def _galaxy(rng, size, scale, sigma, flux):
    gal = galsim.Exponential(half_light_radius=rng.uniform(0.2, 0.4), flux=flux).shear(
        e1=rng.uniform(-0.3, 0.3), e2=rng.uniform(-0.3, 0.3))
    psf = galsim.Gaussian(fwhm=0.15)
    image = galsim.Convolve(gal, psf).drawImage(nx=size, ny=size, scale=scale,
                                                use_true_center=False).array
    return image + rng.normal(0, sigma, image.shape)


def _write(path, data, **header):
    hdu = fits.PrimaryHDU(np.asarray(data, dtype=np.float32))
    for k, v in header.items():
        hdu.header[k] = v
    hdu.writeto(path)


def test_fit_to_size_centring():
    for n in (5, 6, 101, 100):
        for size in (8, 9, 84, 85):
            a = np.zeros((n, n))
            a[n // 2, n // 2] = 1.0
            out = fit_to_size(a, size)
            assert out[size // 2, size // 2] == 1.0 and out.sum() == 1.0


def test_resample_conserves_flux_and_centre():
    rng = np.random.default_rng()
    for in_scale, size in ((0.03, 200), (0.09, 61)):
        profile = galsim.Gaussian(sigma=rng.uniform(0.2, 0.3), flux=rng.uniform(10, 100))
        image = profile.drawImage(nx=size, ny=size, scale=in_scale, use_true_center=False).array
        out = resample(image, in_scale, 0.06, out_size=S)
        assert abs(out.sum() / image.sum() - 1) < 2e-3
        y, x = np.mgrid[:S, :S]
        assert abs((out * x).sum() / out.sum() - S // 2) < 0.02
        assert abs((out * y).sum() / out.sum() - S // 2) < 0.02


def test_pixel_scale_rules():
    assert image_scale(fits.Header({"PIXSCALE": 0.05}), None, "f") == 0.05
    assert image_scale(fits.Header({"PIXSCALE": 0.05}), 0.1, "f") == 0.1
    h = fits.Header({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CD1_1": -0.03 / 3600,
                     "CD2_2": 0.03 / 3600, "CD1_2": 0.0, "CD2_1": 0.0})
    assert abs(image_scale(h, None, "f") - 0.03) < 1e-9
    with pytest.raises(VQVAEInputError, match="stampX.fits: no pixel scale"):
        image_scale(fits.Header(), None, "stampX.fits")


def test_fits_folder(tmp_path):
    rng = np.random.default_rng()
    stamps, psfs = tmp_path / "stamps", tmp_path / "psfs"
    stamps.mkdir()
    psfs.mkdir()
    sigma = 0.01
    flux = rng.uniform(5, 20, 3)
    # same scale (odd size, PIXSCALE), finer (even size, GalSim header), coarser (WCS in degrees)
    _write(stamps / "a.fits", _galaxy(rng, 71, 0.06, sigma, flux[0]), PIXSCALE=0.06)
    galsim.Image(_galaxy(rng, 200, 0.03, sigma, flux[1]), scale=0.03).write(str(stamps / "b.fits"))
    _write(stamps / "c.fits", _galaxy(rng, 50, 0.09, sigma, flux[2]), CTYPE1="RA---TAN",
           CTYPE2="DEC--TAN", CD1_1=-0.09 / 3600, CD2_2=0.09 / 3600)
    for name, scale, size in (("a", 0.06, 25), ("b.psf", 0.03, 50), ("c_psf", 0.09, 16)):
        psf = galsim.Gaussian(fwhm=0.15).drawImage(nx=size, ny=size, scale=scale,
                                                   use_true_center=False).array
        _write(psfs / f"{name}.fits", 3.0 * psf, PIXSCALE=scale)
    out = tmp_path / "d.h5"
    summary = make_fits_dataset(out, stamps, psfs, progress=False)
    assert summary["n"] == 3 and summary["n_psf"] == 3
    header = read_header(out)
    assert header["source"] == "fits" and not header["has_truth"] and header["seed"] == -1
    a = load_arrays(out)
    np.testing.assert_allclose(a["psf_bank"].sum(axis=(1, 2)), 1, atol=1e-5)
    for psf in a["psf_bank"]:
        assert np.unravel_index(psf.argmax(), psf.shape) == (S // 2, S // 2)
    # noise: unchanged at the same scale; the flux is conserved through resampling
    assert abs(a["sigma"][0] / sigma - 1) < 0.08
    # (the stamp sum carries the noise of S*S pixels: sigma * S)
    assert np.all(np.abs(a["params/flux"] - flux) < 0.03 * flux + 4 * a["sigma"] * S)
    assert np.all(a["sigma"] > 0) and np.all(np.isfinite(a["params/mag"]))
    for i in range(3):
        assert abs(estimate_sigma(a["observed"][i]) / a["sigma"][i] - 1) < 0.08
    # one PSF file for all stamps
    single = tmp_path / "single.h5"
    make_fits_dataset(single, stamps, psfs / "a.fits", progress=False)
    s = load_arrays(single, keys=("psf_index", "psf_bank"))
    assert list(s["psf_index"]) == [0, 0, 0] and len(s["psf_bank"]) == 1


def test_fits_errors(tmp_path):
    rng = np.random.default_rng()
    good = tmp_path / "good"
    good.mkdir()
    _write(good / "g.fits", _galaxy(rng, 40, 0.06, 0.01, 10), PIXSCALE=0.06)
    psf = tmp_path / "psf.fits"
    _write(psf, galsim.Gaussian(fwhm=0.15).drawImage(nx=15, ny=15, scale=0.06).array,
           PIXSCALE=0.06)
    out = tmp_path / "out.h5"

    def fails(input_dir, psf_path, message, **kwargs):
        with pytest.raises(VQVAEInputError, match=message):
            make_fits_dataset(out, input_dir, psf_path, progress=False, **kwargs)
        assert not out.exists() and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())

    fails(tmp_path / "nowhere", psf, "not a folder")
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", psf, "empty holds no FITS")
    fails(good, tmp_path / "nopsf.fits", "psf not found")

    def folder(name, write):
        d = tmp_path / name
        d.mkdir()
        write(d / f"{name}.fits")
        return d

    nan = rng.normal(size=(30, 30))
    nan[3, 4] = np.nan
    fails(folder("nan", lambda p: _write(p, nan, PIXSCALE=0.06)), psf, r"nan.fits: 1 NaN/inf")
    fails(folder("cube", lambda p: _write(p, rng.normal(size=(2, 30, 30)), PIXSCALE=0.06)), psf,
          "cube.fits: image HDU holds 3-D")
    table = fits.BinTableHDU.from_columns([fits.Column(name="x", format="E", array=[1.0])])
    fits.HDUList([fits.PrimaryHDU(), table])
    fails(folder("table", lambda p: fits.HDUList([fits.PrimaryHDU(), table]).writeto(p)), psf,
          "table.fits: no image HDU")
    fails(folder("noscale", lambda p: _write(p, rng.normal(size=(30, 30)))), psf,
          "noscale.fits: no pixel scale")
    fails(folder("flat", lambda p: _write(p, np.full((30, 30), 2.0), PIXSCALE=0.06)), psf,
          "flat.fits: the noise sigma")
    bad_psf = tmp_path / "neg.fits"
    _write(bad_psf, -np.ones((9, 9)), PIXSCALE=0.06)
    fails(good, bad_psf, "neg.fits: PSF sums to")
    psf_dir = tmp_path / "psfdir"
    psf_dir.mkdir()
    _write(psf_dir / "other.fits", np.ones((9, 9)), PIXSCALE=0.06)
    fails(good, psf_dir, "no PSF for stamp .*g.fits")


@needs_hst
def test_real_cosmos_stamp(tmp_path):
    """The real COSMOS galaxy 147246 (543x543 at 0.03" from its WCS) and its PSF."""
    src = SHARED_HST / "cosmos_single"
    stamps = tmp_path / "stamps"
    stamps.mkdir()
    os.symlink(src / "147246.0_150.416558_1.998697_masknoise.fits", stamps / "gal.fits")
    out = tmp_path / "cosmos_single.h5"
    make_fits_dataset(out, stamps, src / "147246.0_150.416558_1.998697.psf.fits", band="F814W",
                      progress=False)
    a = load_arrays(out)
    raw = fits.getdata(src / "147246.0_150.416558_1.998697_masknoise.fits").astype(np.float64)
    assert a["observed"].shape == (1, S, S) and a["sigma"][0] > 0
    # the 0.03" noise sums over ~2x2 input pixels: sigma grows by ~2 (more: drizzle correlations)
    ratio = a["sigma"][0] / estimate_sigma(raw)
    assert 1.5 < ratio < 4
    assert np.unravel_index(a["psf_bank"][0].argmax(), (S, S)) == (S // 2, S // 2)


@needs_hst
@pytest.mark.parametrize("catalog", ["AEGIS_F814w_catalog.fits", "test_catalog.fits"])
def test_real_galaxy_catalog(tmp_path, catalog):
    out = tmp_path / "rgc.h5"
    summary = make_cosmos_dataset(out, catalog, SHARED_HST / "aegis", progress=False)
    rgc = galsim.RealGalaxyCatalog(catalog, dir=str(SHARED_HST / "aegis"))
    n = rgc.getNObjects()
    assert summary["n"] == n and summary["n_psf"] == n
    header = read_header(out)
    assert header["source"] == "cosmos" and header["pixel_scale"] == 0.06
    a = load_arrays(out)
    np.testing.assert_allclose(a["psf_bank"].sum(axis=(1, 2)), 1, atol=1e-5)
    assert list(a["psf_index"]) == list(range(n))
    for i in range(n):
        # flux conserved through resampling (the stamp is larger than the input here)
        raw = rgc.getGalImage(i).array.sum()
        assert abs(a["params/flux"][i] - raw) < 0.02 * abs(raw) + 5 * a["sigma"][i] * S
        # the catalog's noise model, resampled, agrees with the noise seen in the corners
        # (test_catalog's second object is a noiseless fake Gaussian: skipped)
        if catalog == "test_catalog.fits" and i == 1:
            continue
        assert 0.6 < estimate_sigma(a["observed"][i]) / a["sigma"][i] < 1.5
    small = make_cosmos_dataset(tmp_path / "two.h5", catalog, SHARED_HST / "aegis",
                                max_galaxies=1, progress=False)
    assert small["n"] == 1
    with pytest.raises(VQVAEInputError, match="nothere.fits"):
        make_cosmos_dataset(tmp_path / "x.h5", "nothere.fits", SHARED_HST / "aegis",
                            progress=False)
