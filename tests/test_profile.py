"""VQVAEGalaxy conformance, in the manner of GalSim's own tests (galsim_test_helpers.py).

The reference is GalSim itself: a plain `galsim.InterpolatedImage` of the same decoded image with
the same stepk/maxk caps must draw exactly like the VQVAEGalaxy, by every method.
"""

import copy
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import galsim
import numpy as np
import pytest

import galsim_vqvae
from galsim_vqvae import VQVAEGalaxy
from galsim_vqvae.profile import ResolutionWarning, index_seed

COND = {"mag": 22.5, "hlr": 0.6}


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------
# Helpers (after galsim_test_helpers: check_pickle, do_shoot, check_basic)
def check_pickle(obj):
    """pickle, copy and repr round trips preserve equality, hash and drawing."""
    ref = obj.drawImage(nx=24, ny=24, scale=0.05, method="no_pixel").array
    for other in (pickle.loads(pickle.dumps(obj)), copy.copy(obj), copy.deepcopy(obj),
                  eval(repr(obj), {"galsim_vqvae": galsim_vqvae, "galsim": galsim,
                                   "array": np.array, "float32": np.float32,
                                   "int64": np.int64})):
        assert other == obj and hash(other) == hash(obj)
        np.testing.assert_array_equal(
            other.drawImage(nx=24, ny=24, scale=0.05, method="no_pixel").array, ref)


def reference_ii(gal):
    """A plain InterpolatedImage of the galaxy's decoded image, maxk capped by the training PSF
    (GalSim's cap is in 1/pixel)."""
    cap = gal.training_psf.maxk * gal.pixel_scale
    return galsim.InterpolatedImage(gal.image, calculate_maxk=cap, use_true_center=False,
                                    flux=gal.flux)


@pytest.fixture(scope="module")
def gal(tiny_emulator):
    return VQVAEGalaxy(tiny_emulator, conditions=COND, rng=galsim.BaseDeviate(1234))


# ------------------------------------------------------------------------------------------------
def test_same_rng_same_galaxy_different_rng_different(tiny_emulator):
    g1 = VQVAEGalaxy(tiny_emulator, conditions=COND, rng=galsim.BaseDeviate(7))
    g2 = VQVAEGalaxy(tiny_emulator, conditions=COND, rng=galsim.BaseDeviate(7))
    g3 = VQVAEGalaxy(tiny_emulator, conditions=COND, rng=galsim.BaseDeviate(8))
    assert g1 == g2 and g1.seed == g2.seed
    np.testing.assert_array_equal(g1.image.array, g2.image.array)
    assert g1 != g3 and not np.array_equal(g1.image.array, g3.image.array)
    # The rng advances: two galaxies from one rng differ; and they equal the sequence again.
    rng = galsim.BaseDeviate(7)
    a, b = (VQVAEGalaxy(tiny_emulator, conditions=COND, rng=rng) for _ in range(2))
    assert a == g1 and b != a
    # The galaxy is the emulator's sample for that seed.
    ref = tiny_emulator.sample(1, {k: [v] for k, v in COND.items()}, seed=[g1.seed])[0]
    np.testing.assert_array_equal(g1.image.array, ref)


def test_make_galaxies_in_one_batch(tiny_emulator):
    mags = [21., 22.5, 24.]
    gals = VQVAEGalaxy.makeGalaxies(3, tiny_emulator, index=[7, 8, 9],
                                    conditions={"mag": mags, "hlr": 0.6}, flux=[1., 2., 3.])
    for k, g in enumerate(gals):
        one = VQVAEGalaxy(tiny_emulator, index=7 + k, conditions={"mag": mags[k], "hlr": 0.6},
                          flux=1. + k)
        assert g.seed == one.seed and g.conditions == one.conditions and g.flux == one.flux
        np.testing.assert_allclose(g.image.array, one.image.array, rtol=1e-5, atol=1e-7)
    rng = galsim.BaseDeviate(11)
    batch = VQVAEGalaxy.makeGalaxies(2, tiny_emulator, conditions=COND, rng=rng)
    rng2 = galsim.BaseDeviate(11)
    seq = [VQVAEGalaxy(tiny_emulator, conditions=COND, rng=rng2) for _ in range(2)]
    assert [g.seed for g in batch] == [g.seed for g in seq]
    assert rng.raw() == rng2.raw()  # both advanced alike
    with pytest.raises(galsim.GalSimValueError, match="array of 2 values"):
        VQVAEGalaxy.makeGalaxies(2, tiny_emulator, conditions={"mag": [21., 22., 23.],
                                                               "hlr": 0.5})
    with pytest.raises(galsim.GalSimRangeError, match="'mag' = 26"):
        VQVAEGalaxy.makeGalaxies(2, tiny_emulator, conditions={"mag": [21., 26.], "hlr": 0.5})


def test_index_and_code_map(tiny_emulator):
    g1 = VQVAEGalaxy(tiny_emulator, index=5, conditions=COND, rng=galsim.BaseDeviate(1))
    g2 = VQVAEGalaxy(tiny_emulator, index=5, conditions=COND, rng=galsim.BaseDeviate(2))
    assert g1 == g2 and g1.seed == index_seed(5) and g1.index == 5
    assert VQVAEGalaxy(tiny_emulator, index=6, conditions=COND) != g1
    # Conditions change the galaxy (same seed).
    g4 = VQVAEGalaxy(tiny_emulator, index=5, conditions={"mag": 20.5, "hlr": 1.4})
    assert not np.array_equal(g4.image.array, g1.image.array)
    # A code map decodes exactly as the emulator does.
    codes = np.random.default_rng(3).integers(0, 32, size=(8, 8))
    gc = VQVAEGalaxy(tiny_emulator, code_map=codes)
    np.testing.assert_array_equal(gc.image.array, tiny_emulator.decode(codes[None])[0])
    np.testing.assert_array_equal(gc.code_map, codes)
    assert gc.seed is None and gc.conditions is None
    check_pickle(gc)


def test_draw_methods_match_interpolated_image(gal):
    """Every draw method gives exactly what the InterpolatedImage reference gives."""
    ref = reference_ii(gal)
    assert gal.stepk == ref.stepk and gal.maxk == ref.maxk
    assert gal.flux == pytest.approx(float(gal.image.array.sum(dtype=np.float64)), rel=1e-12)
    psf = galsim.Kolmogorov(fwhm=0.7)
    for method in ("auto", "fft", "real_space", "no_pixel", "sb"):
        a = gal.drawImage(nx=40, ny=40, scale=0.02, method=method)
        b = ref.drawImage(nx=40, ny=40, scale=0.02, method=method)
        np.testing.assert_array_equal(a.array, b.array, err_msg=method)
    a = galsim.Convolve(gal, psf).drawImage(nx=48, ny=48, scale=0.2)
    b = galsim.Convolve(ref, psf).drawImage(nx=48, ny=48, scale=0.2)
    np.testing.assert_array_equal(a.array, b.array)
    a = gal.drawImage(nx=40, ny=40, scale=0.02, method="phot", rng=galsim.BaseDeviate(5))
    b = ref.drawImage(nx=40, ny=40, scale=0.02, method="phot", rng=galsim.BaseDeviate(5))
    np.testing.assert_array_equal(a.array, b.array)
    ka = gal.drawKImage(nx=32, ny=32, scale=2.0)
    kb = ref.drawKImage(nx=32, ny=32, scale=2.0)
    np.testing.assert_array_equal(ka.array, kb.array)


def test_flux_of_every_draw_method(gal):
    flux = gal.flux
    big = dict(nx=128, ny=128, scale=0.03)
    for method in ("auto", "fft", "real_space", "no_pixel"):
        total = gal.drawImage(method=method, **big).array.sum(dtype=np.float64)
        assert total == pytest.approx(flux, rel=2e-3), method
    sb = gal.drawImage(method="sb", **big).array.sum(dtype=np.float64) * 0.03 ** 2
    assert sb == pytest.approx(flux, rel=2e-3)
    phot = gal.drawImage(method="phot", n_photons=200_000, rng=galsim.BaseDeviate(2), **big)
    assert phot.array.sum(dtype=np.float64) == pytest.approx(flux, rel=5e-3)  # shot noise
    assert gal.kValue(0, 0).real == pytest.approx(flux, rel=1e-12)
    assert gal.drawKImage(nx=16, ny=16, scale=1.0)(0, 0).real == pytest.approx(flux, rel=1e-9)
    # flux and flux_rescale
    assert VQVAEGalaxy(gal.model, index=1, conditions=COND, flux=123.).flux == pytest.approx(123.)
    base = VQVAEGalaxy(gal.model, index=1, conditions=COND)
    scaled = VQVAEGalaxy(gal.model, index=1, conditions=COND, flux_rescale=2.5)
    assert scaled.flux == pytest.approx(2.5 * base.flux, rel=1e-12)
    want = 2.5 * base.drawImage(nx=20, ny=20, scale=0.05).array
    # float32 images: near-zero pixels (FFT ringing around exact zeros) agree to float32 rounding
    # of the peak, not to 1e-6 of themselves.
    np.testing.assert_allclose(scaled.drawImage(nx=20, ny=20, scale=0.05).array, want,
                               rtol=1e-6, atol=1e-6 * np.abs(want).max())
    assert gal.withFlux(7.).flux == pytest.approx(7.)


def test_x_space_vs_k_space(gal):
    """Real-space and Fourier-space drawing agree: convolved with a PSF broader than the training
    PSF (the band limit of a VQVAEGalaxy), a real-space convolution equals the FFT one."""
    psf = galsim.Gaussian(fwhm=0.15)
    im_f = galsim.Convolve(gal, psf, real_space=False).drawImage(
        nx=36, ny=36, scale=0.04, method="no_pixel", use_true_center=False)
    assert im_f.array.sum() == pytest.approx(gal.flux, rel=5e-3)
    real = galsim.Convolve(gal, psf, real_space=True)  # real-space integration: a few points
    peak = float(im_f.array.max())
    for i, j in ((19, 19), (16, 22), (25, 14), (10, 30)):
        pos = im_f.wcs.toWorld(galsim.PositionD(i, j) - im_f.center)
        assert real.xValue(pos) * 0.04 ** 2 == pytest.approx(im_f(i, j), abs=2e-3 * peak)
    im_x = galsim.Image(64, 64, scale=0.03)
    im_x.setCenter(0, 0)
    gal.drawReal(im_x)
    # the no_pixel draw is the real-space one
    np.testing.assert_array_equal(
        gal.drawImage(nx=64, ny=64, scale=0.03, method="no_pixel", use_true_center=False).array,
        im_x.array)
    # drawReal samples the surface brightness at pixel centres (times the pixel area)
    for i, j in ((0, 0), (-2, 3), (8, -4)):
        pos = galsim.PositionD(i * 0.03, j * 0.03)
        assert im_x(i, j) == pytest.approx(gal.xValue(pos) * 0.03 ** 2, rel=1e-6)
    # kValue equals the drawn k image on its grid
    kim = gal.drawKImage(nx=16, ny=16, scale=3.0)
    for i, j in ((1, 0), (0, 2), (3, -2)):
        assert gal.kValue(i * 3.0, j * 3.0) == pytest.approx(kim(i, j), rel=1e-6, abs=1e-9)
    # centroid from x-space moments vs the profile's own
    arr = im_x.array.astype(np.float64)
    yy, xx = (np.mgrid[0:64, 0:64] - 32.) * 0.03
    cx, cy = (arr * xx).sum() / arr.sum(), (arr * yy).sum() / arr.sum()
    assert gal.centroid.x == pytest.approx(cx, abs=0.01)
    assert gal.centroid.y == pytest.approx(cy, abs=0.01)


def test_transformations(gal):
    ref = reference_ii(gal)
    kw = dict(nx=40, ny=40, scale=0.03, method="no_pixel")
    for f in (lambda g: g.shear(g1=0.1, g2=-0.05), lambda g: g.rotate(30 * galsim.degrees),
              lambda g: g.dilate(1.7), lambda g: g.shift(0.05, -0.02),
              lambda g: g.lens(0.02, 0.01, 1.1), lambda g: g.magnify(1.2),
              lambda g: g.transform(1.1, 0.1, -0.05, 0.9), lambda g: g * 3.):
        np.testing.assert_array_equal(f(gal).drawImage(**kw).array, f(ref).drawImage(**kw).array)
    # invariants
    assert gal.shear(g1=0.2).flux == pytest.approx(gal.flux)
    assert gal.dilate(2.).flux == pytest.approx(gal.flux)
    assert gal.lens(0.01, 0.02, 1.3).flux == pytest.approx(1.3 * gal.flux)
    r1 = gal.calculateMomentRadius(scale=0.01)
    assert gal.dilate(2.).calculateMomentRadius(scale=0.02) == pytest.approx(2 * r1, rel=1e-3)
    a = gal.drawImage(nx=41, ny=41, scale=0.03, method="no_pixel").array
    b = gal.rotate(90 * galsim.degrees).drawImage(nx=41, ny=41, scale=0.03,
                                                  method="no_pixel").array
    np.testing.assert_allclose(b, np.rot90(a, -1), rtol=0, atol=1e-6 * a.max())
    c = gal.shift(0.1, -0.05).centroid - gal.centroid
    assert (c.x, c.y) == pytest.approx((0.1, -0.05), abs=1e-9)


def test_pickle_copy_repr(gal, tiny_emulator):
    check_pickle(gal)
    check_pickle(VQVAEGalaxy(tiny_emulator, index=3, conditions=COND, flux_rescale=2.,
                             x_interpolant="lanczos5", pad_factor=6,
                             gsparams=galsim.GSParams(folding_threshold=2e-3)))
    check_pickle(gal.shear(g1=0.1).dilate(1.3))  # inside GalSim's wrappers
    assert "_ii" not in gal.__getstate__()
    assert len(pickle.dumps(gal)) < 40_000


def test_eq_hash_str(tiny_emulator, gal):
    a = VQVAEGalaxy(tiny_emulator, index=4, conditions=COND, flux=2.)
    variants = [VQVAEGalaxy(tiny_emulator, index=4, conditions=COND, flux=3.),
                VQVAEGalaxy(tiny_emulator, index=4, conditions=COND, flux_rescale=2.),
                VQVAEGalaxy(tiny_emulator, index=5, conditions=COND, flux=2.),
                VQVAEGalaxy(tiny_emulator, index=4, conditions={"mag": 22., "hlr": 0.6}, flux=2.),
                VQVAEGalaxy(tiny_emulator, index=4, conditions=COND, flux=2., pad_factor=6),
                VQVAEGalaxy(tiny_emulator, index=4, conditions=COND, flux=2.,
                            x_interpolant="lanczos3"),
                a.withGSParams(folding_threshold=1e-3)]
    assert a == VQVAEGalaxy(tiny_emulator, index=4, conditions=COND, flux=2.)
    assert len({hash(v) for v in variants} | {hash(a)}) == len(variants) + 1
    assert all(v != a for v in variants)
    assert str(a) == "galsim_vqvae.VQVAEGalaxy(index=4, conditions=%s, flux=2.0)" % COND


def test_unpickles_without_the_network(gal):
    """A pickled galaxy draws in a fresh process that never imports torch."""
    code = ("import pickle, sys; g = pickle.loads(sys.stdin.buffer.read()); "
            "im = g.drawImage(nx=20, ny=20, scale=0.05); "
            "assert 'torch' not in sys.modules, 'torch was imported'; print(repr(im.array.sum()))")
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(gal),
                         capture_output=True, check=True)
    ref = gal.drawImage(nx=20, ny=20, scale=0.05).array.sum()
    assert float(out.stdout.decode().strip().split("(")[-1].rstrip(")")) == pytest.approx(ref)


def test_gsparams(gal):
    gsp = galsim.GSParams(folding_threshold=1e-3, maxk_threshold=1e-4)
    g2 = gal.withGSParams(gsp)
    assert g2.gsparams == gsp and g2 != gal and gal.gsparams == galsim.GSParams()
    assert g2.stepk <= gal.stepk and g2.maxk > gal.maxk
    assert gal.withGSParams(galsim.GSParams()) is gal
    assert gal.withGSParams(maxk_threshold=1e-4).gsparams.maxk_threshold == 1e-4
    np.testing.assert_array_equal(g2.withGSParams(galsim.GSParams()).image.array,
                                  gal.image.array)
    with pytest.raises(TypeError):
        VQVAEGalaxy(gal.model, index=1, conditions=COND, gsparams={"folding_threshold": 1e-3})


def test_stepk_maxk_capped_by_training_psf(tiny_emulator, gal):
    psf_maxk = gal.training_psf.maxk
    free = galsim.InterpolatedImage(gal.image, use_true_center=False)
    assert free.maxk > 1.2 * psf_maxk  # so that the cap matters here
    # GalSim's maxk search steps by ~5%: capped means at most one step above the PSF's maxk.
    assert psf_maxk <= gal.maxk <= 1.1 * psf_maxk
    assert gal.stepk == free.stepk <= gal.training_psf.stepk  # an extended galaxy: no cap
    assert gal.training_psf_fwhm == pytest.approx(tiny_emulator.metadata["psf_fwhm"])
    assert gal.pixel_scale == tiny_emulator.metadata["pixel_scale"]


def test_compact_galaxy_stepk_capped(tiny_emulator):
    """A (decoded) galaxy more compact than the training PSF gets the PSF's stepk."""
    md = tiny_emulator.metadata
    point = galsim.Gaussian(sigma=0.01).drawImage(nx=32, ny=32, scale=md["pixel_scale"],
                                                  method="no_pixel", use_true_center=False)
    gal = VQVAEGalaxy._rebuild(point.array, md["pixel_scale"], tiny_emulator.psf_image,
                               md["psf_fwhm"], "test")
    psf_stepk = gal.training_psf.stepk
    assert galsim.InterpolatedImage(point, use_true_center=False).stepk > psf_stepk
    assert gal.stepk == pytest.approx(psf_stepk, rel=1e-12)
    ref = galsim.InterpolatedImage(point, use_true_center=False, _force_stepk=psf_stepk,
                                   _force_maxk=gal.maxk)
    np.testing.assert_array_equal(gal.drawImage(nx=20, ny=20, scale=0.02).array,
                                  ref.drawImage(nx=20, ny=20, scale=0.02).array)
    check_pickle(gal)


def test_errors(tiny_emulator):
    emu = tiny_emulator
    with pytest.raises(galsim.GalSimIncompatibleValuesError):
        VQVAEGalaxy(emu, index=1, conditions=COND, flux=1., flux_rescale=2.)
    with pytest.raises(galsim.GalSimIncompatibleValuesError):
        VQVAEGalaxy(emu, index=1, code_map=np.zeros((8, 8), int))
    with pytest.raises(galsim.GalSimRangeError, match=r"'mag' = 27 .*\[20, 25.5\]"):
        VQVAEGalaxy(emu, index=1, conditions={"mag": 27., "hlr": 0.5})
    with pytest.raises(galsim.GalSimValueError, match="'hlr' has non-finite"):
        VQVAEGalaxy(emu, index=1, conditions={"mag": 22., "hlr": float("nan")})
    with pytest.raises(galsim.GalSimValueError, match="unknown label\\(s\\) \\['size'\\]"):
        VQVAEGalaxy(emu, index=1, conditions={"mag": 22., "hlr": 0.5, "size": 1.})
    with pytest.raises(galsim.GalSimRangeError):
        VQVAEGalaxy(emu, index=-1, conditions=COND)
    with pytest.raises(galsim.GalSimValueError):
        VQVAEGalaxy(emu, index=1.5, conditions=COND)
    with pytest.raises(galsim.GalSimValueError, match="shape"):
        VQVAEGalaxy(emu, code_map=np.zeros((4, 4), int))
    with pytest.raises(galsim.GalSimRangeError):
        VQVAEGalaxy(emu, code_map=np.full((8, 8), 32))
    with pytest.raises(TypeError):
        VQVAEGalaxy(emu, index=1, conditions=COND, rng=np.random.default_rng(1))
    with pytest.raises(galsim.GalSimValueError, match="model file not found"):
        VQVAEGalaxy("/nonexistent/model.safetensors", index=1)


def test_emulator_by_path_is_loaded_once(tiny_emulator):
    g1 = VQVAEGalaxy(tiny_emulator.path, index=2, conditions=COND)
    g2 = VQVAEGalaxy(tiny_emulator, index=2, conditions=COND)
    np.testing.assert_array_equal(g1.image.array, g2.image.array)
    assert galsim_vqvae.profile.get_emulator(tiny_emulator.path) is \
        galsim_vqvae.profile.get_emulator(tiny_emulator.path)


def test_resolution_rule(gal):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gal.check_target_psf(galsim.Kolmogorov(fwhm=0.7), pixel_scale=0.2)
    narrow = galsim.Gaussian(fwhm=0.05)
    fwhm = gal.training_psf_fwhm
    with pytest.warns(ResolutionWarning, match=r"0\.05\b.*%.4g" % fwhm):
        assert not gal.check_target_psf(narrow)
    with pytest.raises(galsim.GalSimRangeError, match="narrower"):
        gal.check_target_psf(narrow, policy="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gal.check_target_psf(narrow, policy="ignore")
    # The target pixel counts: a narrow PSF on coarse pixels is broad enough.
    assert gal.check_target_psf(narrow, pixel_scale=0.2, policy="raise")
    with pytest.raises(galsim.GalSimValueError):
        gal.check_target_psf(narrow, policy="maybe")


def _example(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_emulate_surveys_example_runs(tiny_emulator, tmp_path, capsys):
    out = tmp_path / "surveys.png"
    _example("emulate_surveys").main(["--model", str(tiny_emulator.path), "--n", "1",
                                      "--out", str(out)])
    assert out.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out  # the HST-like PSF is sharper than the training PSF
    assert "HST-like ACS F814W: the target PSF FWHM" in printed and "Rubin-like" not in printed


_COSMOS_SINGLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "hst" / "cosmos_single"


@pytest.mark.skipif(not _COSMOS_SINGLE.is_dir(), reason=f"no shared HST data at {_COSMOS_SINGLE}")
def test_real_galaxy_example_runs(tiny_emulator, tmp_path):
    data = _COSMOS_SINGLE
    out = tmp_path / "real.png"
    _example("real_galaxy").main([
        str(data / "147246.0_150.416558_1.998697_masknoise.fits"),
        "--psf", str(data / "147246.0_150.416558_1.998697.psf.fits"), "--input-scale", "0.03",
        "--model", str(tiny_emulator.path), "--out", str(out)])
    assert out.read_bytes()[:4] == b"\x89PNG"
