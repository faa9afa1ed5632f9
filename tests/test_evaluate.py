"""The science report: its statistics against known answers, the ring test against parametric
galaxies of known shear, Richardson-Lucy, t-SNE, and `galsim-vqvae evaluate` end to end."""

import json
import math
from pathlib import Path

import galsim
import numpy as np
import pytest
from scipy.optimize import brentq

from galsim_vqvae import metrics
from galsim_vqvae.cli import main
from galsim_vqvae.validation import codebook, fidelity, realism, shear

pytestmark = pytest.mark.usefixtures("one_thread")
SHARED_HST = Path(__file__).resolve().parents[2] / "shared" / "data" / "hst"
AEGIS = SHARED_HST / "aegis" / "AEGIS_F814w_catalog.fits"


def draw(profile, size, scale=1.0):
    return profile.drawImage(nx=size, ny=size, scale=scale, method="no_pixel",
                             use_true_center=False).array


# ------------------------------------------------------------------------------------------------
# Morphology statistics
def test_gini_known_values():
    rng = np.random.default_rng(5)
    assert metrics.gini(np.full(50, 3.7)) == pytest.approx(0.0, abs=1e-12)
    assert metrics.gini(np.r_[np.zeros(99), 2.5]) == pytest.approx(1.0)
    assert metrics.gini([1, 2, 3, 4]) == pytest.approx(1 / 3)
    x = rng.lognormal(size=41)  # against the mean-absolute-difference form (Glasser 1962)
    expected = np.abs(x[:, None] - x[None]).sum() / (2 * len(x) * (len(x) - 1) * x.mean())
    assert metrics.gini(x) == pytest.approx(expected, rel=1e-12)
    image = np.zeros((9, 9))
    image[4, 4] = 1.0
    assert metrics.gini_coefficient(image, masks=np.ones((9, 9), bool))[0] == pytest.approx(1.0)


def test_concentration_of_gaussian_and_exponential_profiles():
    rng = np.random.default_rng(3)
    sigma = rng.uniform(6, 9)
    gauss = draw(galsim.Gaussian(sigma=sigma).shift(rng.uniform(-1, 1, 2)), 128)
    # r_f = sigma sqrt(-2 ln(1 - f))
    assert metrics.concentration(gauss)[0] == pytest.approx(
        5 * np.log10(np.sqrt(np.log(0.2) / np.log(0.8))), abs=0.01)
    rs = rng.uniform(4, 6)
    expo = draw(galsim.Exponential(scale_radius=rs), 256)
    # enclosed fraction of an exponential disk: 1 - (1 + x) exp(-x), x = r / r_s
    x20, x80 = (brentq(lambda x: 1 - (1 + x) * np.exp(-x) - f, 1e-6, 50) for f in (0.2, 0.8))
    assert metrics.concentration(expo)[0] == pytest.approx(5 * np.log10(x80 / x20), abs=0.02)
    # Petrosian radius (eta = 0.2): x^2 e^-x / (2 (1 - (1 + x) e^-x)) = 0.2
    xp = brentq(lambda x: x * x * np.exp(-x) / (2 * (1 - (1 + x) * np.exp(-x))) - 0.2, 0.5, 20)
    assert metrics.petrosian_radius(expo)[0] == pytest.approx(xp * rs, rel=0.01)


def test_m20_of_a_gaussian():
    sigma = np.random.default_rng(4).uniform(6, 9)
    image = draw(galsim.Gaussian(sigma=sigma), 128)
    # brightest 20% of the flux: r < r20 with exp(-r20^2 / 2 sigma^2) = 0.8;
    # M(<r20) / M_tot = 1 - (1 + U) e^-U, U = -ln 0.8
    u = -np.log(0.8)
    expected = np.log10(1 - (1 + u) * np.exp(-u))
    assert metrics.m20(image, masks=np.ones(image.shape, bool))[0] == pytest.approx(expected,
                                                                                   abs=0.01)
    # the default (Lotz et al.) segmentation keeps the centre and drops the far corners
    mask = metrics.segmentation(image)[0]
    assert mask[64, 64] and not mask[0, 0] and not mask[127, 127]


def test_asymmetry_known_values():
    rng = np.random.default_rng(8)
    on_pixel = draw(galsim.Exponential(half_light_radius=4).shear(e1=0.3, e2=-0.2), 64)
    half_pixel = draw(galsim.Gaussian(sigma=3).shear(e2=0.4).shift(0.5, -0.5), 64)
    # (float32 drawing leaves ~1e-6)
    assert metrics.asymmetry(np.stack([on_pixel, half_pixel])) == pytest.approx([0, 0], abs=2e-5)
    # two points of flux 1 and 3: least asymmetric about the brighter: 2 * 1 / 4
    two = np.zeros((20, 20))
    two[5, 5], two[5, 9] = 1.0, 3.0
    assert metrics.asymmetry(two)[0] == pytest.approx(0.5)
    lopsided = on_pixel + draw(galsim.Gaussian(sigma=1.5, flux=0.3).shift(6, 3), 64)
    assert 0.05 < metrics.asymmetry(lopsided)[0] < 1
    assert metrics.asymmetry(rng.random((32, 32)))[0] > 0.2


def test_edge_flux_known_values():
    rng = np.random.default_rng(11)
    s, w = 40, metrics.EDGE_WIDTH
    uniform = np.full((s, s), rng.uniform(0.5, 2.0))
    assert metrics.edge_flux(uniform)[0] == pytest.approx(1 - (s - 2 * w) ** 2 / s ** 2)
    # flux placed on random pixels: the frame's share, counted by hand
    image = np.zeros((s, s))
    ij = rng.integers(0, s, size=(50, 2))
    np.add.at(image, (ij[:, 0], ij[:, 1]), rng.uniform(1, 2, 50))
    frame = np.ones((s, s), bool)
    frame[w:-w, w:-w] = False
    assert metrics.edge_flux(image)[0] == pytest.approx(image[frame].sum() / image.sum())
    compact = draw(galsim.Gaussian(sigma=2.0), s)
    assert metrics.edge_flux(np.stack([compact, np.zeros((s, s))]))[0] < 1e-6
    assert np.isnan(metrics.edge_flux(np.zeros((s, s)))[0])


def test_hsm_shapes_of_a_sheared_gaussian():
    image = draw(galsim.Gaussian(sigma=0.3).shear(e1=0.3, e2=0.1), 64, scale=0.05)
    s = metrics.hsm_shapes(np.stack([image, np.zeros_like(image)]), 0.05)
    assert s["e1"][0] == pytest.approx(0.3, abs=1e-3)
    assert s["e2"][0] == pytest.approx(0.1, abs=1e-3)
    assert s["sigma"][0] == pytest.approx(0.3, rel=1e-3)  # GalSim shears preserve area
    assert np.isnan(s["sigma"][1]) and np.isnan(s["e"][1])


def test_half_light_radius_is_light_radius_at_one_half():
    image = draw(galsim.Exponential(half_light_radius=0.4), 64, scale=0.05)
    assert metrics.half_light_radius(image, 0.05)[0] == pytest.approx(
        metrics.light_radius(image, 0.5, 0.05)[0])
    with pytest.raises(ValueError, match="fraction"):
        metrics.light_radius(image, 1.5)


# ------------------------------------------------------------------------------------------------
# Ring test
def test_ring_test_is_exact_for_gaussians():
    # Re-Gaussianization is exact for a Gaussian galaxy through a Gaussian PSF: m and c vanish
    # for any intrinsic ellipticity when the ring cancels it.
    rng = np.random.default_rng(11)
    gals = [galsim.Gaussian(half_light_radius=rng.uniform(0.4, 0.7)).shear(
        e1=rng.uniform(-0.5, 0.5), e2=rng.uniform(-0.5, 0.5)) for _ in range(3)]
    r = shear.ring_test(gals, psf=galsim.Gaussian(fwhm=0.7))
    assert abs(r["m1"]) < 1e-4 and abs(r["m2"]) < 1e-4
    assert abs(r["c1"]) < 1e-6 and abs(r["c2"]) < 1e-6
    assert r["n"] == 3 and r["n_failed"] == 0
    # without the ring (one orientation), the intrinsic shape shows up as a huge c
    one = shear.ring_test(gals[:1], psf=galsim.Gaussian(fwhm=0.7), n_angles=1)
    assert abs(one["c1"]) > 0.05 or abs(one["c2"]) > 0.05


def test_ring_test_of_exponentials_through_kolmogorov():
    # A known-shear parametric galaxy through the test's PSF: what is left is HSM's own,
    # documented bias for non-Gaussian profiles (below 1%), and no additive bias.
    rng = np.random.default_rng(12)
    gals = [galsim.Exponential(half_light_radius=rng.uniform(0.4, 0.8)).shear(
        g1=rng.uniform(-0.3, 0.3), g2=rng.uniform(-0.3, 0.3)) for _ in range(3)]
    r = shear.ring_test(gals)
    assert abs(r["m"]) < 1e-2
    assert abs(r["m1"] - r["m2"]) < 1e-3
    assert abs(r["c1"]) < 1e-5 and abs(r["c2"]) < 1e-5


# ------------------------------------------------------------------------------------------------
# Fidelity pieces
def test_richardson_lucy_deconvolves_a_blurred_galaxy():
    import torch

    from galsim_vqvae.nn.forward import convolve_psf

    rng = np.random.default_rng(2)
    size, scale = 48, 0.06
    truth = galsim.Exponential(half_light_radius=0.2, flux=50).shear(e1=0.3).drawImage(
        nx=size, ny=size, scale=scale, use_true_center=False).array
    psf_image = galsim.Gaussian(fwhm=0.2).drawImage(nx=size, ny=size, scale=scale,
                                                    use_true_center=False).array
    psf_image /= psf_image.sum()
    sigma = 0.01
    observed = convolve_psf(torch.from_numpy(truth), torch.from_numpy(psf_image)).numpy()
    observed = observed + rng.normal(0, sigma, observed.shape)
    rec = fidelity.richardson_lucy(observed, psf_image, sigma, 10)
    assert fidelity.relative_l2(rec[None], truth[None])[0] < \
        0.5 * fidelity.relative_l2(observed[None], truth[None])[0]
    assert rec.sum() == pytest.approx(observed.sum(), rel=1e-3)  # RL conserves the flux
    # errors of the truth against itself are zero
    e = fidelity.stamp_errors(truth[None], truth[None], scale)
    assert all(abs(v[0]) < 1e-12 for v in e.values())


def test_snr_bins():
    masks = fidelity.bin_masks([5, 20, 49.9, 60, 1000])
    names = fidelity.bin_names()
    assert len(masks) == len(names) and names[-1] == "snr_gt50"
    assert [int(m.sum()) for m in masks] == [1, 2, 1, 1, 2]


def test_realism_comparison():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 0.1, 4000), rng.normal(1, 0.1, 4000)
    same = realism.compare(a, b)
    assert same["ks"] < same["ks_crit"] and abs(same["mean_rel"]) < 0.01
    shifted = realism.compare(a * 1.1, np.r_[b, np.nan])
    assert shifted["ks"] > 0.3 and shifted["mean_rel"] == pytest.approx(0.1, abs=0.01)
    assert shifted["n_truth"] == 4000


# ------------------------------------------------------------------------------------------------
# Codebook
def test_usage_perplexity_and_code_means():
    assert codebook.usage_and_perplexity(np.arange(16).reshape(1, 4, 4), 16) == \
        pytest.approx((1.0, 16.0))
    assert codebook.usage_and_perplexity(np.zeros((3, 4, 4)), 8) == pytest.approx((1 / 8, 1.0))
    codes = np.array([[[0, 0], [1, 1]], [[1, 1], [1, 2]]])
    means = codebook.code_means(codes, [1.0, 3.0], 4)
    np.testing.assert_allclose(means[:3], [1.0, (2 * 1 + 3 * 3) / 5, 3.0])
    assert np.isnan(means[3])


def test_tsne_keeps_clusters_apart():
    rng = np.random.default_rng(1)
    centres = rng.normal(0, 10, (3, 16))
    x = np.concatenate([c + rng.normal(0, 1, (20, 16)) for c in centres])
    labels = np.repeat(np.arange(3), 20)
    y = codebook.tsne(x, perplexity=10, iterations=500, seed=0)
    d = ((y[:, None] - y[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (labels[d.argmin(1)] == labels).all()
    np.testing.assert_array_equal(y, codebook.tsne(x, perplexity=10, iterations=500, seed=0))
    # each row's affinities have the requested perplexity
    sq = (x * x).sum(1)
    p = codebook._conditional_probabilities(sq[:, None] + sq[None] - 2 * x @ x.T, 10.0)
    entropy = -(p * np.log(np.where(p > 0, p, 1))).sum(1)
    np.testing.assert_allclose(np.exp(entropy), 10.0, rtol=1e-3)


# ------------------------------------------------------------------------------------------------
# The command, end to end
def toy_dataset(path, n, stamp=32, scale=0.03, seed=0, truth=True, zeropoint=25.94):
    """Exponential galaxies through a Gaussian PSF with noise, labels mag, hlr and snr."""
    from galsim_vqvae.data.dataset import DatasetWriter

    rng = np.random.default_rng(seed)
    psf = galsim.Gaussian(fwhm=0.12)
    psf_image = psf.drawImage(nx=stamp, ny=stamp, scale=scale, use_true_center=False).array
    with DatasetWriter(path, stamp, scale, "F814W", zeropoint, "synthetic" if truth else "fits",
                       seed=seed) as w:
        index = w.add_psfs(psf_image / psf_image.sum())
        for _ in range(n):
            hlr, mag = rng.uniform(0.08, 0.2), rng.uniform(21, 24)
            gal = galsim.Exponential(half_light_radius=hlr,
                                     flux=10 ** (-0.4 * (mag - zeropoint))).shear(
                e1=rng.uniform(-0.3, 0.3), e2=rng.uniform(-0.3, 0.3))
            noiseless = galsim.Convolve(gal, psf).drawImage(
                nx=stamp, ny=stamp, scale=scale, use_true_center=False).array
            sigma = 10 ** rng.uniform(-3, -1.5)
            w.append(observed=(noiseless + rng.normal(0, sigma, noiseless.shape))[None],
                     sigma=[sigma], psf_index=index,
                     truth=draw(gal, stamp, scale)[None] if truth else None,
                     params={"mag": [mag], "hlr": [hlr],
                             "snr": [np.sqrt((noiseless ** 2).sum()) / sigma]})


def plain_autoencoder(directory, stamp=32):
    """A (random-weight) VQ-VAE checkpoint as ``train-vqvae --no-psf-layers`` writes it."""
    import torch

    from galsim_vqvae.nn.vqvae import VQVAE
    from galsim_vqvae.train.checkpoint import save_checkpoint

    directory.mkdir()
    torch.manual_seed(0)
    net = VQVAE(stamp_size=stamp, hidden=16, res_blocks=1, res_hidden=8, embed_dim=8,
                num_codes=16, image_scale=0.05)
    save_checkpoint({"model": net.state_dict(), "config": net.config, "step": 1,
                     "train": {"psf_layers": False}}, directory / "checkpoint.pt")
    return directory


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("evaluate") / "toy.h5"
    toy_dataset(path, 60)
    return path


def test_parallel_chunks_do_not_depend_on_workers():
    from galsim_vqvae.validation.common import parallel_chunks

    rng = np.random.default_rng(21)
    data = rng.normal(size=(23, 5))

    def stats(a, b):
        return {"sum": data[a:b].sum(1), "first": data[a:b, 0] * np.arange(a, b)}

    one = parallel_chunks(stats, len(data), workers=1, chunk=5)
    three = parallel_chunks(stats, len(data), workers=3, chunk=5)
    assert np.array_equal(one["sum"], data.sum(1)) and np.array_equal(three["sum"], one["sum"])
    assert np.array_equal(three["first"], data[:, 0] * np.arange(23))
    assert np.array_equal(parallel_chunks(lambda a, b: data[a:b], 23, 2, chunk=4), data)


def test_ring_test_in_processes_equals_one_process():
    rng = np.random.default_rng(4)
    galaxies = [galsim.Exponential(half_light_radius=h).shear(e1=e1, e2=e2)
                for h, e1, e2 in zip(rng.uniform(0.3, 0.8, 20), rng.uniform(-0.3, 0.3, 20),
                                     rng.uniform(-0.3, 0.3, 20))]
    one = shear.ring_test(galaxies, n_angles=2)
    two = shear.ring_test(galaxies, n_angles=2, workers=2)
    for k in ("m1_each", "m2_each", "c1_each", "c2_each"):
        assert np.array_equal(one[k], two[k]), k
    assert one["m"] == two["m"] and one["n"] == 20


def test_evaluate_end_to_end(tiny_emulator, toy_data, tmp_path, capsys):
    out = tmp_path / "report"
    argv = ["evaluate", "--quiet", "--model", tiny_emulator.path, "--n", "6", "--data",
            str(toy_data), "--out", str(out), "--plain-ae",
            str(plain_autoencoder(tmp_path / "plain")), "--seed", "3"]
    if AEGIS.exists():
        argv += ["--real", str(AEGIS)]
    assert main(argv) == 0
    assert "report.md" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    for title in ("Deconvolution fidelity", "Realism", "Conditioning accuracy", "Shear response",
                  "Codebook", "Real galaxies", "## Goals"):
        assert title in report
    assert ("Skipped" in report) == (not AEGIS.exists())
    # Inputs named by file name (they lie outside the current folder), no absolute paths.
    assert str(tmp_path) not in report and "`plain`" in report and f"`{toy_data.name}`" in report
    assert f"`{Path(tiny_emulator.path).name}`, sha256 " in report
    if AEGIS.exists():
        assert str(AEGIS.parent) not in report and f"`{AEGIS.name}`" in report
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
               and math.isfinite(v) for k, v in metrics.items())
    for key in ("fidelity.vqvae.snr_gt50.flux_err", "fidelity.plain_ae.snr_gt50.rel_l2",
                "fidelity.richardson_lucy.snr_gt50.size_err", "realism.gini.ks",
                "realism.m20.mean_rel", "conditioning.mag_bias", "shear.vqvae.m",
                "shear.vqvae.m_err", "shear.control.m", "codebook.samples.perplexity",
                "codebook.data.usage", "goal.shear_m"):
        assert key in metrics, key
    assert metrics["fidelity.n"] == 6 and metrics["realism.n_truth"] == 6
    if AEGIS.exists():
        assert metrics["real.n"] == 5 and metrics["real.chi2_median"] > 0
    pngs = {p.name for p in out.glob("*.png")}
    assert {"fidelity.png", "realism.png", "conditioning.png", "codebook.png"} <= pngs
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left

    # Without --data the fidelity and realism checks are skipped, and a second report in the
    # same folder leaves none of the first one's figures behind.
    assert main(["evaluate", "--quiet", "--model", tiny_emulator.path, "--n", "3", "--out",
                 str(out)]) == 0
    report = (out / "report.md").read_text()
    assert report.count("*Skipped") == 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert not any(k.startswith(("fidelity.", "realism.", "real.")) for k in metrics)
    assert "codebook.samples.usage" in metrics and "shear.vqvae.m" in metrics
    assert {p.name for p in out.glob("*.png")} == {"conditioning.png", "codebook.png"}


@pytest.mark.parametrize("flag, value, words", [
    ("--model", "missing.safetensors", "model file not found"),
    ("--data", "missing.h5", "dataset file not found"),
    ("--plain-ae", "missing_run", "checkpoint not found"),
    ("--real", "missing.fits", "--real"),
])
def test_evaluate_bad_input_names_it(tiny_emulator, toy_data, tmp_path, capsys, flag, value,
                                     words):
    args = {"--model": tiny_emulator.path, "--data": str(toy_data)}
    args[flag] = str(tmp_path / value)
    out = tmp_path / "report"
    argv = ["evaluate", "--quiet", "--n", "2", "--out", str(out)]
    for k, v in args.items():
        argv += [k, v]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and value in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_evaluate_needs_truth_and_the_model_grid(tiny_emulator, tmp_path, capsys):
    no_truth = tmp_path / "no_truth.h5"
    toy_dataset(no_truth, 2, truth=False)
    wrong_grid = tmp_path / "grid.h5"
    toy_dataset(wrong_grid, 2, stamp=24)
    for data, words in ((no_truth, "no truth"), (wrong_grid, "24-pixel")):
        assert main(["evaluate", "--quiet", "--model", tiny_emulator.path, "--n", "2", "--data",
                     str(data), "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert words in err and str(data) in err
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(not (SHARED_HST / "cosmos_example").is_dir(), reason="shared HST data absent")
def test_evaluate_reads_the_real_galaxies_first(tiny_emulator, toy_data, tmp_path, capsys,
                                                monkeypatch):
    """The COSMOS example catalog lacks its galaxy images: the run fails before any check, not
    after the hours they take, and leaves nothing behind."""
    def not_reached(*args, **kwargs):
        raise AssertionError("a check ran before the real galaxies were read")

    monkeypatch.setattr(fidelity, "run", not_reached)
    catalog = SHARED_HST / "cosmos_example" / "real_galaxy_catalog_23.5_example.fits"
    out = tmp_path / "report"
    assert main(["evaluate", "--quiet", "--n", "2", "--out", str(out), "--model",
                 str(tiny_emulator.path), "--data", str(toy_data), "--real", str(catalog)]) == 2
    err = capsys.readouterr().err
    assert "real_galaxy_images.fits" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".report.*"))
