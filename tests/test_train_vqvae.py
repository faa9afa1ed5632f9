"""The VQ-VAE training loop: it learns, resumes exactly, checkpoints, and refuses bad input."""

import json
import os

import numpy as np
import pytest
import torch

from galsim_vqvae.errors import VQVAEInputError
from galsim_vqvae.nn.forward import convolve_psf
from galsim_vqvae.train.checkpoint import load_checkpoint
from galsim_vqvae.train.core import BatchSchedule
from galsim_vqvae.train.vqvae import noisy_pair, pick_image_scale, train_vqvae

TINY = dict(hidden=16, res_blocks=1, res_hidden=8, embed_dim=8, num_codes=32, restart_every=7)



pytestmark = pytest.mark.usefixtures("one_thread")

def toy_dataset(n=64, size=32, seed=0, n_psf=3):
    """Elliptical exponential galaxies convolved with Gaussian PSFs (pixel units) plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] - size // 2
    truth = []
    for _ in range(n):
        r0, q, th = rng.uniform(1.0, 2.5), rng.uniform(0.4, 1.0), rng.uniform(0, np.pi)
        dx, dy = rng.uniform(-1, 1, 2)
        xr = (x - dx) * np.cos(th) + (y - dy) * np.sin(th)
        yr = -(x - dx) * np.sin(th) + (y - dy) * np.cos(th)
        img = np.exp(-np.hypot(xr, yr / q) / r0)
        truth.append(img / img.sum() * rng.uniform(300, 1500))
    truth = np.array(truth, np.float32)
    bank = []
    for k in range(n_psf):
        p = np.exp(-(x ** 2 + y ** 2) / (2 * (1.0 + 0.3 * k) ** 2))
        bank.append(p / p.sum())
    psf_bank = np.array(bank, np.float32)
    psf_index = rng.integers(0, n_psf, n).astype(np.int32)
    clean = convolve_psf(torch.tensor(truth)[:, None],
                         torch.tensor(psf_bank[psf_index])[:, None])[:, 0].numpy()
    sigma = rng.uniform(0.5, 1.0, n).astype(np.float32)
    observed = (clean + sigma[:, None, None] * rng.standard_normal(clean.shape)).astype(np.float32)
    return dict(observed=observed, truth=truth, psf_bank=psf_bank, psf_index=psf_index,
                sigma=sigma, header={"pixel_scale": 0.1, "band": "toy", "source": "synthetic"})


@pytest.fixture(scope="module")
def toy():
    return toy_dataset()


def _run(data, out, steps, **kw):
    kw.setdefault("model", TINY)
    kw.setdefault("batch_size", 16)
    kw.setdefault("lr", 1e-3)
    kw.setdefault("warmup", 10)
    kw.setdefault("ae_warmup", 5)
    kw.setdefault("progress", False)
    return train_vqvae(data, os.fspath(out), steps, **kw)


def test_training_lowers_the_loss(toy, tmp_path):
    summary = _run(toy, tmp_path, 240, log_every=20, ae_warmup=60)
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in log] == list(range(20, 241, 20))
    first, last = log[0]["chi2"], np.mean([r["chi2"] for r in log[-3:]])
    assert last < 0.25 * first, (first, last)
    assert last < 3.0  # close to the noise (chi^2/pixel = 1) for a 32-code model
    assert summary["step"] == 240 and np.isfinite(summary["test_chi2"])
    assert summary["perplexity"] > 4 and 0 < summary["usage"] <= 1
    assert "test_rel_l2_truth" in summary
    assert (tmp_path / "gallery.png").stat().st_size > 1000
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    for key in ("model", "config", "optimizer", "step", "seed", "history", "data"):
        assert key in state
    assert state["step"] == 240 and state["config"]["stamp_size"] == 32
    assert state["config"]["image_scale"] == pytest.approx(pick_image_scale(
        toy["observed"][[i for i in range(64) if i % 10 != 9]]))
    assert state["data"]["pixel_scale"] == 0.1
    assert state["history"]["chi2"] == [r["chi2"] for r in log]
    assert not (tmp_path / ".lock").exists()


@pytest.mark.parametrize("psf_layers,noise,extra", [
    (True, "data", {}), (False, "data", {}), (True, "independent", {}),
    (True, "data", dict(truth_weight=0.5, augment=True)),
    (True, "independent", dict(truth_weight=2.0, augment=True)),
    (True, "independent", dict(truth_weight=1.0, truth_norm="l1")),
    (True, "independent", dict(truth_weight=1.0, truth_norm="hybrid"))])
def test_resume_is_bit_identical(toy, tmp_path, psf_layers, noise, extra):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    kw = dict(log_every=4, checkpoint_every=100, psf_layers=psf_layers, seed=3, noise=noise,
              model=dict(TINY, restart_every=2, restart_threshold=40.0), **extra)
    _run(toy, straight, 16, **kw)
    # k-means at step 5 (after the autoencoder warm-up), then codebook restarts of the codes
    # used fewer than 40 times in each window of 2 updates, at steps 6, 8, 10, ...: on either
    # side of the break at 8; an epoch is 3 steps
    _run(toy, halves, 8, **kw)
    first = load_checkpoint(halves / "checkpoint.pt")
    assert first["model"]["quantizer.initialized"].item()
    assert first["model"]["quantizer.restarted"].item() > 0  # codes restarted before the break
    _run(toy, halves, 16, resume=True, **kw)
    a = load_checkpoint(straight / "checkpoint.pt")
    b = load_checkpoint(halves / "checkpoint.pt")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["model"]["quantizer.restarted"] > first["model"]["quantizer.restarted"]
    assert a["history"]["loss"] == b["history"]["loss"]
    assert a["model"]["quantizer.updates"].item() == 16 - 5  # quantized steps only
    log = [json.loads(line) for line in open(halves / "log.jsonl")]
    assert [r["step"] for r in log] == [4, 8, 12, 16]
    for key, value in {"truth_weight": 0.0, "augment": False, "truth_norm": "l2",
                       **extra}.items():
        assert a["train"][key] == value
    if extra.get("truth_weight"):  # the truth term is logged under its own key
        assert a["history"]["truth_chi2"] == [r["truth_chi2"] for r in log]
        assert all(r["truth_chi2"] > 0 for r in log)
    else:
        assert "truth_chi2" not in log[0]


def test_noisy_pair_is_two_independent_realisations_of_the_stated_sigma():
    clean = torch.rand(64, 1, 32, 32, generator=torch.Generator().manual_seed(11)) * 50
    sigma = torch.linspace(0.5, 4.0, 64)
    a, b = noisy_pair(clean, sigma, seed=5, step=17)
    na, nb = (a - clean) / sigma[:, None, None, None], (b - clean) / sigma[:, None, None, None]
    assert abs(na.std().item() - 1) < 0.01 and abs(nb.std().item() - 1) < 0.01
    assert abs(na.mean().item()) < 0.01
    assert abs(np.corrcoef(na.flatten(), nb.flatten())[0, 1]) < 0.01  # independent
    a2, b2 = noisy_pair(clean, sigma, seed=5, step=17)
    assert torch.equal(a, a2) and torch.equal(b, b2)  # a function of (seed, step) alone
    assert not torch.equal(noisy_pair(clean, sigma, seed=5, step=18)[0], a)
    # 4 ranks of 16 stamps draw, between them, the noise of one process of 64
    parts = [noisy_pair(clean[16 * r:16 * (r + 1)], sigma[16 * r:16 * (r + 1)], 5, 17, r, 4)
             for r in range(4)]
    assert torch.equal(torch.cat([p[0] for p in parts]), a)
    assert torch.equal(torch.cat([p[1] for p in parts]), b)


def test_independent_noise_learns_and_needs_truth(toy, tmp_path):
    summary = _run(toy, tmp_path / "n2n", 120, log_every=20, ae_warmup=40, noise="independent")
    log = [json.loads(line) for line in open(tmp_path / "n2n" / "log.jsonl")]
    assert np.mean([r["chi2"] for r in log[-2:]]) < 0.5 * log[0]["chi2"]
    assert np.isfinite(summary["test_chi2"])
    assert load_checkpoint(tmp_path / "n2n" / "checkpoint.pt")["train"]["noise"] == "independent"
    no_truth = {k: v for k, v in toy.items() if k != "truth"}
    with pytest.raises(VQVAEInputError, match="truth"):
        _run(no_truth, tmp_path / "a", 2, noise="independent")
    with pytest.raises(VQVAEInputError, match="psf_layers"):
        _run(toy, tmp_path / "b", 2, noise="independent", psf_layers=False)
    with pytest.raises(VQVAEInputError, match="noise"):
        _run(toy, tmp_path / "c", 2, noise="fresh")


def test_batch_schedule_is_a_deterministic_permutation():
    s = BatchSchedule(50, 16, seed=4, device="cpu")
    epoch0 = torch.cat([s.indices(i) for i in range(3)])
    assert len(set(epoch0.tolist())) == 48
    again = BatchSchedule(50, 16, seed=4, device="cpu")
    assert torch.equal(again.indices(4), s.indices(4))  # no history needed
    assert not torch.equal(BatchSchedule(50, 16, seed=5, device="cpu").indices(0), s.indices(0))


def test_clear_errors(toy, tmp_path):
    with pytest.raises(VQVAEInputError, match="no checkpoint"):
        _run(toy, tmp_path / "a", 4, resume=True)
    _run(toy, tmp_path / "b", 2, log_every=1)
    with pytest.raises(VQVAEInputError, match="exists"):
        _run(toy, tmp_path / "b", 4)
    with pytest.raises(VQVAEInputError, match="model config differs.*hidden"):
        _run(toy, tmp_path / "b", 4, resume=True, model=dict(TINY, hidden=8))
    with pytest.raises(VQVAEInputError, match="training settings differ.*batch_size"):
        _run(toy, tmp_path / "b", 4, resume=True, batch_size=8)
    with pytest.raises(VQVAEInputError, match="stamp_size is 64.*32x32"):
        _run(toy, tmp_path / "c", 4, model=dict(TINY, stamp_size=64))
    with pytest.raises(VQVAEInputError, match="batch_size 100 exceeds"):
        _run(toy, tmp_path / "d", 4, batch_size=100)
    with pytest.raises(VQVAEInputError, match="CUDA"):
        if torch.cuda.is_available():
            raise VQVAEInputError("CUDA present; nothing to check")
        _run(toy, tmp_path / "e", 4, device="cuda")


def _write_dataset_file(path, d):
    """A dataset file following the contract exactly (format_version 1)."""
    import h5py

    n, s = d["observed"].shape[:2]
    with h5py.File(path, "w") as f:
        f.attrs.update(format="galsim_vqvae.dataset", format_version=1, pixel_scale=0.1,
                       stamp_size=s, band="toy", zeropoint=25.0, source="synthetic",
                       description="test_train_vqvae toy set", seed=0,
                       flux_convention="pixel value = flux in the pixel (counts/s); "
                                       "stamp sum = total flux")
        for k in ("observed", "truth", "psf_bank", "psf_index", "sigma"):
            f.create_dataset(k, data=d[k])
        g = f.create_group("params")
        flux = d["truth"].reshape(n, -1).sum(1).astype(np.float32)
        g.create_dataset("flux", data=flux)
        g.create_dataset("mag", data=(25.0 - 2.5 * np.log10(flux)).astype(np.float32))
        for k in ("hlr", "sersic_n", "bulge_frac", "e1", "e2"):
            g.create_dataset(k, data=np.zeros(n, np.float32))


def test_trains_from_a_dataset_file(toy, tmp_path):
    from galsim_vqvae.errors import VQVAEFormatError

    path = tmp_path / "toy.h5"
    _write_dataset_file(path, toy)
    summary = _run(os.fspath(path), tmp_path / "run", 6, log_every=3)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["data"]["path"] == os.path.abspath(path)
    assert state["data"]["stamp_size"] == 32 and state["data"]["band"] == "toy"
    assert "test_rel_l2_truth" in summary
    # the same run from memory gives the same weights: the file path adds nothing
    mem = _run(toy, tmp_path / "mem", 6, log_every=3)
    assert mem["loss"] == summary["loss"]
    # a missing or truncated file is the dataset module's clear error
    with pytest.raises((VQVAEFormatError, FileNotFoundError)):
        _run(os.fspath(tmp_path / "missing.h5"), tmp_path / "x", 2)
    cut = tmp_path / "cut.h5"
    cut.write_bytes(path.read_bytes()[:4096])
    with pytest.raises(VQVAEFormatError):
        _run(os.fspath(cut), tmp_path / "y", 2)


def test_save_gallery(tmp_path):
    from galsim_vqvae.plots import save_gallery

    rng = np.random.default_rng(9)
    cols = {"a": rng.random((3, 16, 16)), "b": rng.random((3, 24, 24))}
    save_gallery(tmp_path / "g.png", cols, title="t", stretch="linear")
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(VQVAEInputError, match="one n"):
        save_gallery(tmp_path / "h.png", {"a": cols["a"], "b": cols["b"][:2]})
    assert not (tmp_path / "h.png").exists()


def test_training_curves_from_the_run_logs(toy, tmp_path):
    from galsim_vqvae.plots import save_training_curves

    _run(toy, tmp_path / "run", 12, log_every=4, ae_warmup=4)
    out = tmp_path / "curves.png"
    save_training_curves(out, tmp_path / "run" / "log.jsonl")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(VQVAEInputError, match="empty.jsonl: the training log is empty"):
        save_training_curves(tmp_path / "x.png", tmp_path / "empty.jsonl")
    with pytest.raises(VQVAEInputError, match="nothing.jsonl: not a readable training log"):
        save_training_curves(tmp_path / "x.png", tmp_path / "nothing.jsonl")
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------------------------
# Augmentation by the 8 rotations/flips, and the truth term
@pytest.mark.parametrize("size", [31, 32])
def test_dihedral_transforms_commute_with_the_psf_convolution(size):
    from galsim_vqvae.train import augment

    g = torch.Generator().manual_seed(size)
    truth = torch.rand(3, 1, size, size, generator=g) * 10
    psf = torch.rand(3, 1, size, size, generator=g)
    if size % 2 == 0:  # row and column 0 have no mirror image about the centre pixel S//2
        truth[..., 0, :] = truth[..., :, 0] = psf[..., 0, :] = psf[..., :, 0] = 0
    psf /= psf.sum((-1, -2), keepdim=True)
    convolved = convolve_psf(truth, psf)
    scale = convolved.abs().max().item()
    seen = set()
    for k in range(8):
        turned = augment.transform(truth, k)
        lhs = convolve_psf(turned, augment.transform(psf, k))
        rhs = augment.transform(convolved, k)
        if size % 2 == 0:  # output row and column 0 of the turned stamp lie off the original
            lhs, rhs = lhs[..., 1:, 1:], rhs[..., 1:, 1:]
        torch.testing.assert_close(lhs, rhs, rtol=0, atol=2e-6 * scale)
        seen.add(turned.numpy().tobytes())
        delta = torch.zeros(size, size)
        delta[size // 2, size // 2] = 1
        assert torch.equal(augment.transform(delta, k), delta)  # the centre stays put
    assert len(seen) == 8  # 8 distinct transforms
    if size % 2 == 0:  # a plain flip moves the centre by a pixel: the identity would fail
        flip = convolve_psf(torch.flip(truth, (-1,)), torch.flip(psf, (-1,)))
        assert not torch.allclose(flip[..., 1:, 1:], torch.flip(convolved, (-1,))[..., 1:, 1:],
                                  atol=1e-3 * scale)
    # per-stamp transforms of a batch in one gather
    k = torch.tensor([5, 0, 3])
    batch = augment.Dihedral(size, "cpu").apply(truth, k)
    for b in range(3):
        assert torch.equal(batch[b], augment.transform(truth[b], int(k[b])))


def test_dihedral_draws_are_a_function_of_seed_and_step():
    from galsim_vqvae.train import augment

    k = augment.draw(7, 11, 4000, "cpu")
    assert torch.equal(k, augment.draw(7, 11, 4000, "cpu"))
    assert not torch.equal(k, augment.draw(7, 12, 4000, "cpu"))
    assert not torch.equal(k, augment.draw(8, 11, 4000, "cpu"))
    counts = torch.bincount(k, minlength=8)
    assert counts.numel() == 8 and (counts > 400).all()
    parts = [augment.draw(7, 11, 1000, "cpu", r, 4) for r in range(4)]
    assert torch.equal(torch.cat(parts), k)  # ranks share the global draw


def test_augment_turns_stamp_truth_and_psf_alike(toy, tmp_path, monkeypatch):
    """What the training step receives at each step: the batch's stamps, truths and PSF
    transforms, each stamp turned by the transform drawn for it."""
    from galsim_vqvae.nn.forward import psf_transform
    from galsim_vqvae.train import augment
    from galsim_vqvae.train import vqvae as trainer

    seen = []

    def spy(model, optimizer, observed, sigma, psf_ft=None, *args, **kw):
        seen.append((observed.clone(), sigma.clone(), psf_ft.clone(), kw["truth"].clone()))
        return real(model, optimizer, observed, sigma, psf_ft, *args, **kw)

    real = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", spy)
    _run(toy, tmp_path / "run", 4, augment=True, truth_weight=1.0, seed=9)
    train = np.arange(64)[np.arange(64) % 10 != 9]
    schedule = BatchSchedule(len(train), 16, 9, "cpu")
    for step, (x, sigma, psf_ft, truth) in enumerate(seen):
        rows = train[schedule.indices(step).numpy()]
        k = augment.draw(9, step, 16, "cpu")
        assert len(set(k.tolist())) > 1
        for b in range(16):
            t = int(k[b])
            j = rows[b]
            assert torch.equal(x[b, 0], augment.transform(torch.tensor(toy["observed"][j]), t))
            assert torch.equal(truth[b, 0], augment.transform(torch.tensor(toy["truth"][j]), t))
            psf = augment.transform(torch.tensor(toy["psf_bank"][toy["psf_index"][j]]), t)
            torch.testing.assert_close(psf_ft[b], psf_transform(psf), rtol=0, atol=1e-6)
            assert sigma[b] == toy["sigma"][j]


def test_truth_term_of_the_loss(toy, tmp_path):
    from galsim_vqvae.nn.forward import chi2, psf_transform
    from galsim_vqvae.nn.vqvae import VQVAE
    from galsim_vqvae.train.vqvae import forward_losses

    torch.manual_seed(0)
    net = VQVAE(stamp_size=32, image_scale=20.0, **TINY).train()
    x = torch.tensor(toy["observed"][:8])[:, None]
    truth = torch.tensor(toy["truth"][:8])[:, None]
    sigma = torch.tensor(toy["sigma"][:8])
    psf_ft = psf_transform(torch.tensor(toy["psf_bank"][toy["psf_index"][:8]]))
    plain = forward_losses(net, x, sigma, psf_ft, quantize=False)
    weighted = forward_losses(net, x, sigma, psf_ft, quantize=False, truth=truth,
                              truth_weight=0.7)
    d = weighted["decoded"].double()
    expected = (((d - truth.double()) / sigma.double()[:, None, None, None]) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(weighted["truth_chi2"].double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(weighted["loss"].double(),
                               plain["loss"].double() + 0.7 * expected.mean(), rtol=1e-5, atol=0)
    assert torch.equal(weighted["truth_chi2"], chi2(weighted["decoded"], truth, sigma))
    # the l1 truth term: mean |decoded - truth| / sigma, and its pull on faint light does not
    # fade with the light's amplitude (the l2 term's does)
    l1 = forward_losses(net, x, sigma, psf_ft, quantize=False, truth=truth, truth_weight=0.7,
                        truth_norm="l1")
    expected = ((d - truth.double()).abs() / sigma.double()[:, None, None, None]).mean((1, 2, 3))
    torch.testing.assert_close(l1["truth_chi2"].double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(l1["loss"].double(), plain["loss"].double() + 0.7 * expected.mean(),
                               rtol=1e-5, atol=0)
    from galsim_vqvae.nn.forward import abs_deviation

    faint = torch.full((1, 1, 4, 4), 1e-3, requires_grad=True)
    abs_deviation(faint, torch.zeros_like(faint), torch.ones(1)).sum().backward()
    assert torch.allclose(faint.grad, torch.full_like(faint, 1 / 16))
    with pytest.raises(VQVAEInputError, match="truth_norm must be"):
        _run(toy, tmp_path / "e", 2, truth_weight=1.0, truth_norm="l3")
    no_truth = {k: v for k, v in toy.items() if k != "truth"}
    with pytest.raises(VQVAEInputError, match="truth_weight=1 need.*truth"):
        _run(no_truth, tmp_path / "a", 2, truth_weight=1.0)
    with pytest.raises(VQVAEInputError, match="PSF layers"):
        _run(toy, tmp_path / "b", 2, truth_weight=1.0, psf_layers=False)
    with pytest.raises(VQVAEInputError, match="truth_weight must be"):
        _run(toy, tmp_path / "c", 2, truth_weight=-1.0)
    with pytest.raises(VQVAEInputError, match="augment must be"):
        _run(toy, tmp_path / "d", 2, augment="yes")
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_hybrid_truth_term(toy):
    """chi^2 over every pixel plus |d - t| / sigma over the truth's sky (t < SKY_THRESHOLD
    sigma), both means over all pixels: against a float64 reference on fresh random inputs."""
    from galsim_vqvae.nn.forward import (SKY_THRESHOLD, chi2, hybrid_deviation, psf_transform,
                                         sky_mask)
    from galsim_vqvae.nn.vqvae import VQVAE
    from galsim_vqvae.train.vqvae import TRUTH_NORMS, forward_losses

    assert 0 < SKY_THRESHOLD < 0.1 and "hybrid" in TRUTH_NORMS
    g = torch.Generator().manual_seed(2024)
    sigma = 0.5 + torch.rand(5, generator=g)
    s4 = sigma[:, None, None, None]
    # truths spanning the threshold: exact zeros, faint sky, just either side, the galaxy
    truth = torch.rand(5, 1, 24, 24, generator=g) * 3 * SKY_THRESHOLD * s4
    truth[..., 8:16, 8:16] = torch.rand(5, 1, 8, 8, generator=g) * 5 * s4
    truth[:, :, :4] = 0.0
    decoded = truth + 0.3 * s4 * torch.randn(truth.shape, generator=g)
    d, t, sd = decoded.double(), truth.double(), sigma.double()[:, None, None, None]
    sky = t < SKY_THRESHOLD * sd
    assert 0.2 < sky.double().mean() < 0.9  # both kinds of pixel present
    assert torch.equal(sky_mask(truth, sigma), sky)
    r = (d - t) / sd
    expected = (r ** 2).mean((1, 2, 3)) + (r.abs() * sky).mean((1, 2, 3))
    torch.testing.assert_close(hybrid_deviation(decoded, truth, sigma).double(), expected,
                               rtol=1e-5, atol=0)
    # decoded equal to the truth over the sky: the squared distance alone
    exact_sky = torch.where(sky, truth, decoded)
    torch.testing.assert_close(hybrid_deviation(exact_sky, truth, sigma),
                               chi2(exact_sky, truth, sigma), rtol=1e-6, atol=0)
    # a tiny positive value on an empty-sky pixel: the l1 gradient 1 / (sigma N), where the
    # squared distance alone gives next to nothing
    dec = truth.clone()
    dec[:, 0, 0, 0] = 1e-6 * sigma
    dec.requires_grad_(True)
    hybrid_deviation(dec, truth, sigma).sum().backward()
    n = 24 * 24
    torch.testing.assert_close(dec.grad[:, 0, 0, 0], 1 / (sigma * n), rtol=1e-4, atol=0)
    dec.grad = None
    chi2(dec, truth, sigma).sum().backward()
    assert (dec.grad[:, 0, 0, 0].abs() < 1e-4 / (sigma * n)).all()
    # the training loss: W times the batch mean of the term, logged as truth_chi2
    torch.manual_seed(0)
    net = VQVAE(stamp_size=32, image_scale=20.0, **TINY).train()
    x = torch.tensor(toy["observed"][:8])[:, None]
    tru = torch.tensor(toy["truth"][:8])[:, None]
    sig = torch.tensor(toy["sigma"][:8])
    psf_ft = psf_transform(torch.tensor(toy["psf_bank"][toy["psf_index"][:8]]))
    plain = forward_losses(net, x, sig, psf_ft, quantize=False)
    hyb = forward_losses(net, x, sig, psf_ft, quantize=False, truth=tru, truth_weight=0.7,
                         truth_norm="hybrid")
    assert torch.equal(hyb["truth_chi2"], hybrid_deviation(hyb["decoded"], tru, sig))
    torch.testing.assert_close(hyb["loss"].double(),
                               plain["loss"].double() + 0.7 * hyb["truth_chi2"].double().mean(),
                               rtol=1e-5, atol=0)


def test_resume_keeps_the_decoder_padding(toy, tmp_path):
    """A resumed run takes the checkpoint's model keys it is not given: a replicate-padded run
    stays replicate-padded, and a checkpoint older than the key resumes as zero-padded."""
    from galsim_vqvae.train.checkpoint import save_checkpoint

    kw = dict(log_every=2, checkpoint_every=100)
    _run(toy, tmp_path / "r", 6, model=dict(TINY, decoder_padding="replicate"), **kw)
    _run(toy, tmp_path / "r", 8, resume=True, **kw)  # no model keys given
    assert load_checkpoint(tmp_path / "r" / "checkpoint.pt")["config"]["decoder_padding"] \
        == "replicate"
    with pytest.raises(VQVAEInputError, match="model config differs.*decoder_padding"):
        _run(toy, tmp_path / "r", 10, resume=True, model=dict(TINY, decoder_padding="zeros"),
             **kw)
    # a checkpoint written before the key existed
    old = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    del old["config"]["decoder_padding"]
    save_checkpoint(old, tmp_path / "r" / "checkpoint.pt")
    with pytest.raises(VQVAEInputError, match="model config differs.*decoder_padding"):
        _run(toy, tmp_path / "r", 10, resume=True, model=dict(TINY, decoder_padding="replicate"),
             **kw)
    _run(toy, tmp_path / "r", 10, resume=True, model=TINY, **kw)
    state = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert state["config"]["decoder_padding"] == "zeros" and state["step"] == 10
    # a new run gets the constructor's default
    _run(toy, tmp_path / "n", 2, **kw)
    assert load_checkpoint(tmp_path / "n" / "checkpoint.pt")["config"]["decoder_padding"] \
        == "zeros"


def test_resume_keeps_the_decoder_refine_layer(toy, tmp_path):
    """A run with ``decoder_refine`` resumes with it when not given, and refuses another value;
    the resumed weights are the checkpoint's (the refine layer included)."""
    kw = dict(log_every=2, checkpoint_every=100)
    _run(toy, tmp_path / "r", 4, model=dict(TINY, decoder_refine=4), **kw)
    before = load_checkpoint(tmp_path / "r" / "checkpoint.pt")["model"]
    assert before["decoder.net.6.weight"].shape == (1, 4, 3, 3)
    with pytest.raises(VQVAEInputError, match="model config differs.*decoder_refine"):
        _run(toy, tmp_path / "r", 6, resume=True, model=dict(TINY, decoder_refine=0), **kw)
    _run(toy, tmp_path / "r", 6, resume=True, **kw)
    state = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert state["config"]["decoder_refine"] == 4 and state["step"] == 6
    assert not torch.equal(state["model"]["decoder.net.6.weight"], before["decoder.net.6.weight"])
