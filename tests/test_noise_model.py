"""The noise model: power spectra of correlated noise on the stamp grid, and the chi^2 that whitens
with them and masks with the weights (`galsim_vqvae.data.noise`, `galsim_vqvae.nn.forward`).

The COSMOS noise here is GalSim's own: ``galsim.getCOSMOSNoise`` reads the ACS correlation file
that GalSim ships (no shared data needed).
"""

import galsim
import numpy as np
import pytest
import torch

from galsim_vqvae.data.cosmos import noise_model
from galsim_vqvae.data.fits import fit_to_size, resample
from galsim_vqvae.data.noise import (correlation_function, draw_correlated,
                                    power_from_correlation, whitening_reach)
from galsim_vqvae.nn.forward import NoiseLookup, chi2, whiten

pytestmark = pytest.mark.usefixtures("one_thread")


def cosmos_noise(rng=None):
    """GalSim's COSMOS F814W noise (drizzled ACS, 0.03"/pixel), unit variance."""
    return galsim.getCOSMOSNoise(rng=rng, cosmos_scale=0.03, variance=1.0)


def random_power(s, rng):
    """A smooth, positive, symmetric power spectrum shape on the s x s grid (mean 1)."""
    cf = rng.normal(size=(5, 5))
    cf = cf + cf[::-1, ::-1]  # C(l) = C(-l)
    cf[2, 2] = np.abs(cf).sum() + 1.0  # diagonally dominant: positive definite
    power, _ = power_from_correlation(cf, s)
    return power


def test_power_is_the_sampled_spectrum():
    """P(k) = sum_l C(l) exp(-2 pi i k.l / S) / C(0) at the DFT frequencies, summed directly over
    the lags (float64), for a random correlation function reaching beyond half the stamp (lags
    that fold onto others)."""
    rng = np.random.default_rng(1)
    s, L = 8, 6
    cf = rng.normal(size=(2 * L + 1, 2 * L + 1))
    cf = cf + cf[::-1, ::-1]
    cf[L, L] = np.abs(cf).sum()
    power, variance = power_from_correlation(cf, s)
    assert variance == cf[L, L]
    ly, lx = np.mgrid[-L:L + 1, -L:L + 1]
    k = np.fft.fftfreq(s)
    for a in range(s):
        for b in range(s):
            ref = (cf * np.cos(2 * np.pi * (k[a] * ly + k[b] * lx))).sum() / variance
            assert power[a, b] == pytest.approx(ref, rel=1e-10, abs=1e-12)
    assert power.mean() == pytest.approx(1.0)
    assert whitening_reach(np.ones((s, s))) == 0


def test_correlation_function_of_known_fields():
    """The estimated correlation function of noise filtered with a known kernel matches the
    kernel's autocorrelation (many pixels: errors ~1e-3)."""
    rng = np.random.default_rng(2)
    kernel = np.array([[0.0, 0.5, 0.0], [0.5, 1.0, 0.5], [0.0, 0.5, 0.0]])
    fields = []
    for _ in range(4):
        white = rng.standard_normal((400, 400))
        f = sum(kernel[dy, dx] * np.roll(white, (dy - 1, dx - 1), (0, 1))
                for dy in range(3) for dx in range(3))
        fields.append(f)
    est = correlation_function(fields, 3)
    true = np.zeros((7, 7))
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            a = np.pad(kernel, 2)
            true[3 + dy, 3 + dx] = (a * np.roll(a, (dy, dx), (0, 1))).sum()
    np.testing.assert_allclose(est, true, atol=0.01)


def test_white_noise_chi2_is_todays_exactly():
    """A white power spectrum (all ones) and no weight give today's mean((m - o)^2 / sigma^2):
    through the FFT to float rounding, through a `NoiseLookup` of a white bank exactly."""
    torch.manual_seed(3)
    b, s = 5, 20
    model, observed = torch.randn(b, 1, s, s), torch.randn(b, 1, s, s)
    sigma = torch.rand(b) + 0.5
    today = ((model.double() - observed.double()) / sigma.double().reshape(-1, 1, 1, 1)) ** 2
    today = today.flatten(1).mean(1)
    plain = chi2(model, observed, sigma)
    np.testing.assert_allclose(plain.double(), today, rtol=1e-6)
    fft = chi2(model, observed, sigma, noise_power=torch.ones(b, s, s))
    np.testing.assert_allclose(fft.double(), today, rtol=1e-5)
    lookup = NoiseLookup(np.ones((2, s, s)), np.zeros(b, int), np.ones((b, s, s)), "cpu")
    kwargs = lookup(torch.arange(b))
    assert kwargs == {}
    assert torch.equal(chi2(model, observed, sigma, **kwargs), plain)


def test_correlated_chi2_against_dense_covariance():
    """With every weight 1 the chi^2 is r^T C^-1 r / S^2 for the circulant covariance C whose
    spectrum is sigma^2 P (float64 reference, dense inverse)."""
    rng = np.random.default_rng(4)
    s, b = 8, 3
    power = np.stack([random_power(s, rng) for _ in range(b)])
    r = rng.normal(size=(b, s, s))
    sigma = rng.uniform(0.5, 2.0, b)
    got = chi2(torch.tensor(r, dtype=torch.float32)[:, None], torch.zeros(b, 1, s, s),
               torch.tensor(sigma, dtype=torch.float32),
               noise_power=torch.tensor(power, dtype=torch.float32))
    for j in range(b):
        # circulant covariance: C[x, x'] = sigma^2 * c(x - x' mod S), c = IDFT(P)
        c = np.fft.ifft2(power[j]).real * sigma[j] ** 2
        y, x = np.mgrid[:s, :s]
        y, x = y.ravel(), x.ravel()
        cov = c[(y[:, None] - y[None, :]) % s, (x[:, None] - x[None, :]) % s]
        ref = r[j].ravel() @ np.linalg.solve(cov, r[j].ravel()) / s**2
        assert float(got[j]) == pytest.approx(ref, rel=1e-4)


def test_weighted_chi2_whitens_then_masks():
    """Weights: sum_x w(x) r_w(x)^2 / #{w > 0} of the whitened residual (float64 reference)."""
    rng = np.random.default_rng(5)
    s, b = 12, 4
    power = np.stack([random_power(s, rng) for _ in range(b)])
    r = rng.normal(size=(b, s, s))
    sigma = rng.uniform(0.5, 2.0, b)
    weight = rng.uniform(0.2, 3.0, (b, s, s)) * (rng.uniform(size=(b, s, s)) > 0.3)
    rw = np.fft.ifft2(np.fft.fft2(r) / np.sqrt(power)).real / sigma[:, None, None]
    ref = (weight * rw**2).sum(axis=(1, 2)) / (weight > 0).sum(axis=(1, 2))
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    got = chi2(t(r)[:, None], torch.zeros(b, 1, s, s), t(sigma), noise_power=t(power),
               weight=t(weight)[:, None])
    np.testing.assert_allclose(got.double(), ref, rtol=1e-4)
    np.testing.assert_allclose(whiten(t(r), t(power)).double(), rw * sigma[:, None, None],
                               rtol=1e-4, atol=1e-5)
    white = chi2(t(r)[:, None], torch.zeros(b, 1, s, s), t(sigma), weight=t(weight)[:, None])
    ref_white = (weight * (r / sigma[:, None, None]) ** 2).sum(axis=(1, 2)) / \
        (weight > 0).sum(axis=(1, 2))
    np.testing.assert_allclose(white.double(), ref_white, rtol=1e-5)


def _reduced_chi2_of_cosmos_noise(power, sigma, draw, n, weight):
    """chi^2 of ``n`` pure-noise stamps from ``draw(rng)`` (model 0) under (power, sigma, weight),
    and the chi^2 that assumes white noise."""
    rng = galsim.BaseDeviate(12345)
    stamps = torch.tensor(np.stack([draw(rng) for _ in range(n)]), dtype=torch.float32)[:, None]
    s = stamps.shape[-1]
    weight = torch.tensor(weight, dtype=torch.float32).expand(n, 1, s, s)
    zeros, sig = torch.zeros_like(stamps), torch.full((n,), sigma)
    corr = chi2(zeros, stamps, sig, weight=weight,
                noise_power=torch.tensor(power, dtype=torch.float32).expand(n, s, s))
    return corr.numpy(), chi2(zeros, stamps, sig, weight=weight).numpy()


def _border(s, b):
    return fit_to_size(np.ones((s - 2 * b, s - 2 * b)), s)


def test_cosmos_noise_native_pixels_reduced_chi2_is_one():
    """Pure COSMOS noise drawn by GalSim at its native 0.03" pixels, 200 stamps of 64 x 64 cut
    from larger fields: reduced chi^2 under the noise model is 1 within its expected scatter
    (sqrt(2 / n_pixels) per stamp, that of a chi^2 with one degree of freedom per pixel: the
    whitened pixels are independent), over the stamp less the whitening reach at its edge, and
    over a 40 x 40 footprint. Ignoring the correlation scatters the chi^2 more (fewer
    independent pixels). Without the edge border the periodic whitening biases it high."""
    s, n, sigma = 64, 200, 0.01
    power, unit = noise_model(cosmos_noise(), 0.03, 0.03, s)
    assert unit == pytest.approx(1.0)
    b = whitening_reach(power)
    assert b == 3

    def draw(rng):  # a cut-out of a larger field, as real stamps are (GalSim's noise is
        image = galsim.Image(3 * s, 3 * s, scale=0.03)  # periodic on the image it fills)
        image.addNoise(cosmos_noise(rng).withVariance(sigma**2))
        return image.array[s:2 * s, s:2 * s]

    for weight in (_border(s, b), _border(s, 12)):
        corr, white = _reduced_chi2_of_cosmos_noise(power, sigma, draw, n, weight)
        expected = np.sqrt(2.0 / (weight > 0).sum())
        assert abs(corr.mean() - 1) < 4 * expected / np.sqrt(n) + 0.002
        assert 0.8 * expected < corr.std() < 1.25 * expected
        assert white.std() > 1.2 * corr.std()
    corr, _ = _reduced_chi2_of_cosmos_noise(power, sigma, draw, n, np.ones((s, s)))
    assert corr.mean() > 1.02


def test_cosmos_noise_resampled_reduced_chi2_is_one():
    """COSMOS noise drawn by GalSim at 0.03", resampled to 0.06" exactly as the COSMOS reader
    resamples galaxies, 100 stamps of 48 x 48: the measured noise model gives reduced chi^2
    1.00 within its expected scatter (the goal: 1.00 +/- 0.02), and sigma is the pixel
    standard deviation of the resampled noise."""
    s, n, sigma = 48, 100, 0.01
    power, unit = noise_model(cosmos_noise(), 0.03, 0.06, s)
    side = 2 * s + 16

    def draw(rng):
        image = galsim.Image(side, side, scale=0.03)
        image.addNoise(cosmos_noise(rng).withVariance((sigma**2) / unit))
        return fit_to_size(resample(image.array, 0.03, 0.06), s)

    weight = _border(s, whitening_reach(power))
    corr, white = _reduced_chi2_of_cosmos_noise(power, sigma, draw, n, weight)
    expected = np.sqrt(2.0 / (weight > 0).sum())
    assert abs(corr.mean() - 1) < 4 * expected / np.sqrt(n) + 0.003
    assert 0.8 * expected < corr.std() < 1.25 * expected
    assert abs(white.mean() - 1) < 0.1


def test_draw_correlated_has_the_power_spectrum():
    """`draw_correlated` draws noise whose mean periodogram is sigma^2 P (400 draws, 5%)."""
    rng = np.random.default_rng(6)
    s = 16
    power = random_power(s, rng)
    draws = np.stack([draw_correlated(power, 0.3, rng) for _ in range(400)])
    periodogram = (np.abs(np.fft.fft2(draws)) ** 2).mean(0) / s**2
    np.testing.assert_allclose(periodogram / 0.09, power, rtol=0.25)
    assert (periodogram / 0.09 / power).mean() == pytest.approx(1.0, abs=0.02)


# ----------------------------------------------------------------------------------------------
# The dataset file's noise model

def _write_noise_dataset(path, rng, n=12, s=16, weight=True):
    from galsim_vqvae.data.dataset import DatasetWriter

    psf = np.zeros((s, s), np.float32)
    psf[s // 2, s // 2] = 1
    with DatasetWriter(path, s, 0.03, "F814W", 25.94, "cosmos") as w:
        w.add_psfs(psf)
        bank = np.stack([random_power(s, rng), np.ones((s, s))])
        w.add_noise_power(bank)
        idx = rng.integers(0, 2, n)
        wgt = rng.uniform(0, 2, (n, s, s)).astype(np.float32) if weight else None
        w.append(observed=rng.normal(size=(n, s, s)), sigma=np.full(n, 0.1), psf_index=[0] * n,
                 noise_index=idx, weight=wgt)
    return bank.astype(np.float32), idx, wgt


def test_dataset_noise_model_round_trip(tmp_path):
    """Version 2 holds noise_bank, noise_index and weight; `load_arrays`, `GalaxyDataset` and a
    `NoiseLookup` give them back. A file without a noise model is still written as version 1
    and reads as white noise with every weight 1."""
    from galsim_vqvae.data.dataset import GalaxyDataset, load_arrays, read_header

    rng = np.random.default_rng(8)
    bank, idx, wgt = _write_noise_dataset(tmp_path / "v2.h5", rng)
    header = read_header(tmp_path / "v2.h5")
    assert header["format_version"] == 2
    assert header["noise"] == ["noise_bank", "noise_index", "weight"]
    a = load_arrays(tmp_path / "v2.h5", indices=[5, 1])
    np.testing.assert_array_equal(a["noise_bank"], bank)
    np.testing.assert_array_equal(a["noise_index"], idx[[5, 1]])
    np.testing.assert_array_equal(a["weight"], wgt[[5, 1]])
    item = GalaxyDataset(tmp_path / "v2.h5")[3]
    np.testing.assert_array_equal(item["noise_power"].numpy(), bank[idx[3]])
    np.testing.assert_array_equal(item["weight"][0].numpy(), wgt[3])
    got = NoiseLookup(a["noise_bank"], a["noise_index"], a["weight"], "cpu")(torch.tensor([1]))
    np.testing.assert_array_equal(got["noise_power"][0].numpy(), bank[idx[1]])
    np.testing.assert_array_equal(got["weight"][0, 0].numpy(), wgt[1])

    from galsim_vqvae.data.dataset import DatasetWriter
    with DatasetWriter(tmp_path / "v1.h5", 16, 0.03, "F814W", 25.94, "fits") as w:
        w.add_psfs(np.pad(np.ones((1, 1)), 8)[:16, :16])
        w.append(observed=rng.normal(size=(3, 16, 16)), sigma=[1, 1, 1], psf_index=[0, 0, 0])
    header = read_header(tmp_path / "v1.h5")
    assert header["format_version"] == 1 and header["noise"] == []
    a = load_arrays(tmp_path / "v1.h5", keys=["observed", "noise_bank", "noise_index", "weight"])
    assert sorted(a) == ["observed"]
    item = GalaxyDataset(tmp_path / "v1.h5")[0]
    assert torch.equal(item["noise_power"], torch.ones(16, 16))
    assert torch.equal(item["weight"], torch.ones(1, 16, 16))


@pytest.mark.parametrize("edit, words", [
    (lambda kw: kw.update(weight=np.ones((12, 15, 16))), "weight chunk has shape"),
    (lambda kw: kw["weight"].__setitem__((2, 3, 3), -1.0), "negative or non-finite"),
    (lambda kw: kw["weight"].__setitem__(4, 0.0), "stamp 4 has no pixel of positive weight"),
    (lambda kw: kw.update(noise_index=np.full(12, 2)), "noise_index value outside [0, 1)"),
    (lambda kw: kw.update(bank=np.full((16, 16), 2.0)), "has mean 2, expected 1"),
    (lambda kw: kw.update(bank=np.zeros((16, 16))), "non-positive or non-finite"),
])
def test_writer_refuses_bad_noise_model(tmp_path, edit, words):
    """Bad weights or noise spectra: one error naming the file and field; no file written."""
    from galsim_vqvae.data.dataset import DatasetWriter
    from galsim_vqvae.errors import VQVAEInputError

    s, n = 16, 12
    kw = {"weight": np.ones((n, s, s)), "noise_index": np.zeros(n, int),
          "bank": np.ones((s, s))}
    edit(kw)
    path = tmp_path / "bad.h5"
    with pytest.raises(VQVAEInputError) as err:
        with DatasetWriter(path, s, 0.03, "F814W", 25.94, "cosmos") as w:
            w.add_psfs(np.pad(np.ones((1, 1)), 8)[:16, :16])
            w.add_noise_power(kw["bank"])
            w.append(observed=np.random.default_rng(0).normal(size=(n, s, s)), sigma=[1] * n,
                     psf_index=[0] * n, noise_index=kw["noise_index"], weight=kw["weight"])
    assert words in str(err.value) and "bad.h5" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_cosmos_reader_noise_model(tmp_path):
    """The COSMOS reader on a RealGalaxyCatalog with COSMOS noise (written by GalSim): one noise
    bank entry for the one noise file, sigma = sqrt(VARIANCE x the resampled unit variance),
    weight 1 on each galaxy's image less the edge border, 0 on the padding, which holds noise
    of the model's spectrum; at native pixels the spectrum is the file's exactly."""
    import realcat
    from astropy.table import Table

    from galsim_vqvae.data.cosmos import make_cosmos_dataset
    from galsim_vqvae.data.dataset import load_arrays

    name = realcat.write_catalog(tmp_path / "cat", n=6)
    cat = Table.read(tmp_path / "cat" / name)
    out = make_cosmos_dataset(tmp_path / "d.h5", name, tmp_path / "cat", stamp_size=64,
                              pixel_scale=0.03, progress=False)
    assert out["n_noise"] == 1
    a = load_arrays(tmp_path / "d.h5")
    power, unit = noise_model(cosmos_noise(), 0.03, 0.03, 64)
    np.testing.assert_allclose(a["noise_bank"][0], power, rtol=1e-6)
    np.testing.assert_allclose(a["sigma"], np.sqrt(cat["NOISE_VARIANCE"]), rtol=1e-6)
    b = whitening_reach(power)
    for i, side in enumerate(realcat_sides(tmp_path / "cat", len(cat))):
        expected = fit_to_size(np.ones((side, side)), 64)
        expected[:b], expected[-b:], expected[:, :b], expected[:, -b:] = 0, 0, 0, 0
        np.testing.assert_array_equal(a["weight"][i], expected)
        if side < 64:  # the padding holds noise of the stamp's sigma
            pad = a["observed"][i][expected == 0]
            assert 0.5 < pad.std() / a["sigma"][i] < 1.5


def realcat_sides(directory, n):
    from astropy.io import fits

    with fits.open(directory / "images.fits") as f:
        return [f[i].data.shape[0] for i in range(n)]


def test_training_loss_uses_the_noise_model(tmp_path):
    """train-vqvae on a dataset with correlated noise and weights: its chi^2 of the held-out
    stamps is `chi2` with each stamp's noise power spectrum and weight (float64 reference of
    the whitening), not the white-noise one."""
    import realcat

    from galsim_vqvae.data.cosmos import make_cosmos_dataset
    from galsim_vqvae.data.dataset import load_arrays
    from galsim_vqvae.nn.vqvae import VQVAE
    from galsim_vqvae.train.checkpoint import load_checkpoint
    from galsim_vqvae.train.vqvae import reconstruct_split, train_vqvae

    name = realcat.write_catalog(tmp_path / "cat", n=12)
    data = tmp_path / "d.h5"
    make_cosmos_dataset(data, name, tmp_path / "cat", stamp_size=32, pixel_scale=0.03,
                        progress=False)
    train_vqvae(str(data), str(tmp_path / "run"), steps=3, batch_size=4, ae_warmup=1, warmup=1,
                model={"hidden": 8, "embed_dim": 4, "num_codes": 8}, progress=False,
                log_every=1)
    state = load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))
    net = VQVAE(**state["config"])
    net.load_state_dict(state["model"])
    r = reconstruct_split(net, str(data), True, split="all")
    a = load_arrays(data)
    power = a["noise_bank"][a["noise_index"]].astype(np.float64)
    resid = r["model"].astype(np.float64) - a["observed"]
    rw = np.fft.ifft2(np.fft.fft2(resid) / np.sqrt(power)).real / a["sigma"][:, None, None]
    ref = (a["weight"] * rw**2).sum(axis=(1, 2)) / (a["weight"] > 0).sum(axis=(1, 2))
    np.testing.assert_allclose(r["chi2"], ref, rtol=2e-4)
    white = ((resid / a["sigma"][:, None, None]) ** 2).mean(axis=(1, 2))
    assert np.abs(r["chi2"] / white - 1).max() > 0.05


def test_fits_weight_maps(tmp_path):
    """FITS stamps with mask maps: the dataset's weight is the mask (normalised, padding 0), a
    masked bright neighbour in a corner does not reach sigma, and at another pixel scale a model
    pixel keeps weight only where all its input pixels are good."""
    from astropy.io import fits

    from galsim_vqvae.data.dataset import load_arrays
    from galsim_vqvae.data.fits import make_fits_dataset

    rng = np.random.default_rng(9)
    for d in ("in", "wt"):
        (tmp_path / d).mkdir()
    image = rng.normal(0, 0.5, (28, 28))
    image[:6, :6] += 1000.0  # a neighbour in a corner, masked
    mask = np.ones((28, 28))
    mask[:6, :6] = 0
    fits.PrimaryHDU(image).writeto(tmp_path / "in" / "a.fits")
    fits.PrimaryHDU(mask * 2.0).writeto(tmp_path / "wt" / "a_mask.fits")  # median -> 1
    psf = np.zeros((9, 9))
    psf[4, 4] = 1
    fits.PrimaryHDU(psf).writeto(tmp_path / "psf.fits")
    for scale, out in ((0.06, "same.h5"), (0.03, "coarser.h5")):
        make_fits_dataset(tmp_path / out, tmp_path / "in", tmp_path / "psf.fits", stamp_size=32,
                          pixel_scale=0.06, input_pixel_scale=scale, progress=False,
                          weight=tmp_path / "wt")
    a = load_arrays(tmp_path / "same.h5")
    np.testing.assert_array_equal(a["weight"][0], fit_to_size(mask, 32))
    assert 0.4 < a["sigma"][0] < 0.6
    b = load_arrays(tmp_path / "coarser.h5")
    w = b["weight"][0]
    assert w.max() == pytest.approx(1.0, rel=0.05) and (w[w > 0] > 0.9).all()
    assert w[16 - 7:16 - 4, 16 - 7:16 - 4].max() == 0  # the masked corner, 3 x 3 model pixels
    assert (w > 0).sum() < 14 * 14 - 9 and (w > 0).sum() > 100
