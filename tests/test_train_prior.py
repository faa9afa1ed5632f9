"""Training the prior: learning, exact resume, checkpoint contents, labels, batch schedule."""

import json
import math

import numpy as np
import pytest
import torch

from galsim_vqvae.errors import VQVAEInputError
from galsim_vqvae.nn.pixelcnn import GatedPixelCNN
from galsim_vqvae.train import prior as trainer
from galsim_vqvae.train.checkpoint import load_checkpoint

K = 8
TINY = dict(channels=8, layers=2, kernel_size=3)


pytestmark = pytest.mark.usefixtures("one_thread")


def toy_inputs(n=200, size=5, seed=0):
    """Structured code maps with one label: code(0,0) = floor(label*K); then each code is the sum
    of its left and upper neighbours plus a 0/1 coin, mod K. A prior can learn most of it."""
    rng = np.random.default_rng(seed)
    label = rng.uniform(0, 1, n)
    codes = np.zeros((n, size, size), np.int64)
    codes[:, 0, 0] = np.floor(label * K)
    for i in range(size):
        for j in range(size):
            if i == j == 0:
                continue
            left = codes[:, i, j - 1] if j else 0
            up = codes[:, i - 1, j] if i else 0
            codes[:, i, j] = (left + up + (rng.uniform(size=n) < 0.2)) % K
    labels = np.stack([label, rng.normal(size=n)], axis=1)  # a useful label and a useless one
    return {"codes": codes, "num_codes": K, "labels": labels,
            "fingerprint": {"dataset": {"n": n}, "vqvae_sha256": "toy"},
            "data": {"path": "toy.h5", "n": n, "pixel_scale": 0.03}, "vqvae_checkpoint": "toy.pt"}


def fit(inputs, out, steps, resume=False, **kwargs):
    """Run the real training loop on prepared inputs (what train_prior does after encoding)."""
    out.mkdir(exist_ok=True)
    settings = dict(batch_size=16, lr=3e-3, seed=3, device=torch.device("cpu"),
                    conditions=("a", "b"), model=TINY, log_every=4, checkpoint_every=5,
                    progress=False)
    settings.update(kwargs)
    state = trainer._existing_checkpoint(str(out), resume)
    return trainer._fit(inputs, str(out), state, steps, **settings)


def read_log(out):
    with open(out / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def test_training_learns_the_toy_distribution(tmp_path):
    inputs = toy_inputs()
    summary = fit(inputs, tmp_path / "run", 160, lr=1e-2)
    log = read_log(tmp_path / "run")
    assert [e["step"] for e in log] == list(range(4, 161, 4))
    first, final = log[0]["test_bits_per_code"], summary["test_bits_per_code"]
    assert final == log[-1]["test_bits_per_code"]
    assert first > 2.5  # close to log2(8) = 3 bits at the start
    assert final < 0.75 * first  # and well below it after training
    # the held-out figure is the real NLL of the saved model on the i % 10 == 9 maps
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    prior = GatedPixelCNN(**ckpt["config"])
    prior.load_state_dict(ckpt["model"])
    test = np.arange(200) % 10 == 9
    norm = ckpt["conditions"]
    cond = (inputs["labels"][test] - norm["mean"]) / norm["std"]
    with torch.no_grad():
        logits = prior(torch.from_numpy(inputs["codes"][test]), torch.tensor(cond).float())
        nll = torch.nn.functional.cross_entropy(logits, torch.from_numpy(inputs["codes"][test]))
    assert math.isclose(nll.item() / math.log(2), final, rel_tol=1e-5)


def test_checkpoint_contents_and_normalisation(tmp_path):
    inputs = toy_inputs()
    summary = fit(inputs, tmp_path / "run", 6)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    for key in ("model", "config", "optimizer", "step", "seed", "history", "data", "conditions",
                "vqvae_checkpoint", "test_bits_per_code"):
        assert key in ckpt
    assert ckpt["step"] == 6 == summary["step"] and ckpt["seed"] == 3
    assert ckpt["config"] == dict(num_codes=K, cond_dim=2, num_classes=0, dropout=0.0, **TINY)
    assert ckpt["data"]["path"] == "toy.h5" and ckpt["vqvae_checkpoint"] == "toy.pt"
    train = inputs["labels"][np.arange(200) % 10 != 9]
    norm = ckpt["conditions"]
    assert norm["names"] == ["a", "b"]
    np.testing.assert_allclose(norm["mean"], train.mean(0), rtol=1e-12)
    np.testing.assert_allclose(norm["std"], train.std(0), rtol=1e-12)
    np.testing.assert_array_equal(norm["min"], train.min(0))
    np.testing.assert_array_equal(norm["max"], train.max(0))
    assert ckpt["history"]["step"] == [4, 6]
    assert ckpt["test_bits_per_code"] == ckpt["history"]["test_bits_per_code"][-1]
    # an existing checkpoint is not overwritten without resume
    with pytest.raises(VQVAEInputError, match="resume=True"):
        fit(inputs, tmp_path / "run", 6)


def with_classes(inputs):
    """``inputs`` with a class label of 4 classes: the class of a map is its code (0, 0) // 2."""
    inputs = dict(inputs)
    inputs["classes"] = {"label": "kind", "names": ["w", "x", "y", "z"],
                         "values": inputs["codes"][:, 0, 0] // 2}
    return inputs


@pytest.mark.parametrize("classes,extra", [
    (False, {}), (True, dict(model=dict(TINY, dropout=0.3), ema=0.9))])
def test_resume_is_exact(tmp_path, classes, extra):
    inputs = with_classes(toy_inputs()) if classes else toy_inputs()
    # 14 steps with 180 training maps / batch 16 = 11 batches per epoch: crosses an epoch
    fit(inputs, tmp_path / "straight", 14, **extra)
    fit(inputs, tmp_path / "halves", 7, **extra)
    torch.manual_seed(99)  # the caller's random state plays no part
    before = torch.random.get_rng_state()
    fit(inputs, tmp_path / "halves", 14, resume=True, **extra)
    assert torch.equal(torch.random.get_rng_state(), before)  # nor is it changed
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "halves" / "checkpoint.pt")
    assert a["train"]["ema"] == extra.get("ema", trainer.EMA_DECAY)
    assert a["config"]["dropout"] == extra.get("model", {}).get("dropout", 0.0)
    assert a["config"]["num_classes"] == (4 if classes else 0)
    assert a["classes"] == ({"label": "kind", "names": ["w", "x", "y", "z"]} if classes
                            else None)
    assert a["train"]["class_label"] == ("kind" if classes else None)
    assert a["step"] == b["step"] == 14
    for key in ("model", "model_raw"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert not torch.equal(a["model"]["embedding.weight"], a["model_raw"]["embedding.weight"])
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for key in pa:
            assert torch.equal(torch.as_tensor(pa[key]), torch.as_tensor(pb[key]))
    assert a["history"]["step"] == [4, 8, 12, 14]
    assert b["history"]["step"] == [4, 7, 8, 12, 14]  # the first half also logged its end
    bits_a = dict(zip(a["history"]["step"], a["history"]["test_bits_per_code"]))
    bits_b = dict(zip(b["history"]["step"], b["history"]["test_bits_per_code"]))
    assert all(bits_a[s] == bits_b[s] for s in bits_a)
    assert [e["step"] for e in read_log(tmp_path / "halves")] == [4, 7, 8, 12, 14]
    # resuming with other settings is refused, naming what differs
    with pytest.raises(VQVAEInputError, match="training settings"):
        fit(inputs, tmp_path / "halves", 20, resume=True, **dict(extra, seed=4))
    with pytest.raises(VQVAEInputError, match="training settings.*'ema'"):
        fit(inputs, tmp_path / "halves", 20, resume=True, **dict(extra, ema=0.5))
    with pytest.raises(VQVAEInputError, match="config"):
        fit(inputs, tmp_path / "halves", 20, resume=True, **dict(extra, model=dict(TINY, channels=4)))
    with pytest.raises(VQVAEInputError, match="config.*dropout"):
        fit(inputs, tmp_path / "halves", 20, resume=True, **dict(extra, model=dict(TINY, dropout=0.1)))
    other = toy_inputs() if classes else with_classes(inputs)
    with pytest.raises(VQVAEInputError, match="config.*num_classes"):
        fit(other, tmp_path / "halves", 20, resume=True, **extra)
    # a run already at its step count just reports
    again = fit(inputs, tmp_path / "halves", 14, resume=True, **extra)
    assert again["step"] == 14
    assert math.isclose(again["test_bits_per_code"], b["test_bits_per_code"], rel_tol=1e-6)


def test_dropout_and_ema_change_training(tmp_path):
    inputs = toy_inputs()
    fit(inputs, tmp_path / "plain", 8)
    fit(inputs, tmp_path / "dropout", 8, model=dict(TINY, dropout=0.3))
    fit(inputs, tmp_path / "raw", 8, ema=0.0)
    plain, dropped, raw = (load_checkpoint(tmp_path / n / "checkpoint.pt")
                           for n in ("plain", "dropout", "raw"))
    assert not torch.equal(plain["model_raw"]["head.3.weight"],
                           dropped["model_raw"]["head.3.weight"])
    for name in raw["model"]:  # ema 0: the average is the optimizer's weights
        assert torch.equal(raw["model"][name], raw["model_raw"][name]), name
        assert torch.equal(raw["model_raw"][name], plain["model_raw"][name]), name
    assert trainer.ema_decay(10 ** 6, 0.9) == 0.9 and trainer.ema_decay(0, 0.9) == 0.1
    assert trainer.ema_decay(10 ** 6, 0.0) == 0.0
    # sampling a prior trained with dropout: the compiled samplers still match the naive one
    from galsim_vqvae.nn.fast_sampling import sample_fast
    from galsim_vqvae.nn.sampling import sample_naive

    prior = GatedPixelCNN(**dropped["config"])
    prior.load_state_dict(dropped["model"])
    prior.train()  # the samplers switch dropout off themselves
    cond = torch.randn(6, 2)
    naive = sample_naive(prior, 6, shape=(5, 5), cond=cond, seeds=list(range(6)))
    fast = sample_fast(prior, 6, shape=(5, 5), cond=cond, seeds=list(range(6)))
    assert torch.equal(torch.as_tensor(naive), torch.as_tensor(fast))
    assert prior.training


def test_class_conditional_prior(tmp_path):
    """A map of class c is one code, 2c or 2c+1: a prior that takes the class needs 1 bit per
    code where one without it needs 3 (on larger maps, the first codes would reveal the class)."""
    rng = np.random.default_rng(5)
    n = 200
    kind = rng.integers(0, 4, n)
    codes = 2 * kind[:, None, None] + rng.integers(0, 2, (n, 1, 1))
    inputs = {"codes": codes, "num_codes": K, "labels": np.zeros((n, 0)),
              "classes": {"label": "kind", "names": ["a", "b", "c", "d"], "values": kind},
              "fingerprint": {"dataset": {"n": n}, "vqvae_sha256": "toy"},
              "data": {"path": "toy.h5", "n": n}, "vqvae_checkpoint": "toy.pt"}
    with_class = fit(inputs, tmp_path / "class", 120, lr=1e-2, conditions=(), log_every=40)
    without = fit(dict(inputs, classes=None), tmp_path / "none", 120, lr=1e-2, conditions=(),
                  log_every=40)
    assert with_class["test_bits_per_code"] < 1.3 < 2.7 < without["test_bits_per_code"]
    ckpt = load_checkpoint(tmp_path / "class" / "checkpoint.pt")
    assert ckpt["config"]["num_classes"] == 4
    assert ckpt["classes"] == {"label": "kind", "names": ["a", "b", "c", "d"]}
    prior = GatedPixelCNN(**ckpt["config"]).eval()
    prior.load_state_dict(ckpt["model"])
    test = np.arange(n) % 10 == 9
    x = torch.from_numpy(codes[test])
    with torch.no_grad():  # the reported figure is the NLL given each map's own class
        nll = torch.nn.functional.cross_entropy(prior(x, None, torch.from_numpy(kind[test])), x)
        wrong = torch.nn.functional.cross_entropy(
            prior(x, None, torch.from_numpy((kind[test] + 1) % 4)), x)
    assert math.isclose(nll.item() / math.log(2), with_class["test_bits_per_code"], rel_tol=1e-5)
    assert wrong > 3 * nll
    with pytest.raises(VQVAEInputError, match="num_classes follows the class label"):
        fit(inputs, tmp_path / "x", 4, conditions=(), model=dict(TINY, num_classes=4))


def test_resume_drops_log_lines_past_the_checkpoint(tmp_path):
    inputs = toy_inputs()
    fit(inputs, tmp_path / "run", 8, checkpoint_every=4)  # log at 4, 8; checkpoint at 4, 8
    run = tmp_path / "run"
    # simulate a crash after the log at step 8 but before its checkpoint: put step 4 back
    ckpt4 = tmp_path / "ckpt4"
    fit(inputs, ckpt4, 4)
    (run / "checkpoint.pt").write_bytes((ckpt4 / "checkpoint.pt").read_bytes())
    fit(inputs, run, 8, resume=True, checkpoint_every=4)
    assert [e["step"] for e in read_log(run)] == [4, 8]


def test_epoch_permutation_schedule():
    a = trainer.epoch_permutation(5, 0, 180)
    assert torch.equal(a, trainer.epoch_permutation(5, 0, 180))
    assert sorted(a.tolist()) == list(range(180))
    assert not torch.equal(a, trainer.epoch_permutation(5, 1, 180))
    assert not torch.equal(a, trainer.epoch_permutation(6, 0, 180))
    assert trainer.learning_rate(0, 1.0) == pytest.approx(1 / trainer.WARMUP_STEPS)
    assert trainer.learning_rate(10 ** 6, 1.0) == 1.0
    assert trainer.ema_decay(0) == pytest.approx(0.1)
    assert trainer.ema_decay(10 ** 6) == trainer.EMA_DECAY


def test_training_batches_never_touch_held_out_maps(tmp_path):
    """Put garbage codes in the held-out maps: training must not change with them."""
    inputs = toy_inputs()
    other = toy_inputs()
    test = np.arange(200) % 10 == 9
    other["codes"][test] = (other["codes"][test] + 3) % K
    fit(inputs, tmp_path / "a", 12, log_every=100)
    fit(other, tmp_path / "b", 12, log_every=100)
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["model"]
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_unconditional_and_bad_settings(tmp_path):
    inputs = toy_inputs()
    inputs["labels"] = inputs["labels"][:, :0]
    summary = fit(inputs, tmp_path / "u", 4, conditions=())
    ckpt = load_checkpoint(tmp_path / "u" / "checkpoint.pt")
    assert ckpt["config"]["cond_dim"] == 0 and ckpt["conditions"]["names"] == []
    assert summary["test_bits_per_code"] is not None
    with pytest.raises(VQVAEInputError, match="batch_size 500 exceeds"):
        fit(toy_inputs(), tmp_path / "x", 4, batch_size=500)
    with pytest.raises(VQVAEInputError, match="unknown model option"):
        fit(toy_inputs(), tmp_path / "y", 4, model=dict(TINY, depth=3))
    constant = toy_inputs()
    constant["labels"][:, 1] = 2.0
    with pytest.raises(VQVAEInputError, match="'b' is constant"):
        fit(constant, tmp_path / "z", 4)


def test_train_prior_argument_checks(tmp_path):
    data = tmp_path / "d.h5"
    data.write_bytes(b"")
    ckpt = tmp_path / "v.pt"
    ckpt.write_bytes(b"")
    with pytest.raises(VQVAEInputError, match="lr"):
        trainer.train_prior(data, ckpt, tmp_path / "o", 10, lr=-1)
    with pytest.raises(VQVAEInputError, match="steps"):
        trainer.train_prior(data, ckpt, tmp_path / "o", -1)
    with pytest.raises(VQVAEInputError, match="num_codes"):
        trainer.train_prior(data, ckpt, tmp_path / "o", 10, model=dict(num_codes=5))
    with pytest.raises(VQVAEInputError, match="VQ-VAE checkpoint not found"):
        trainer.train_prior(data, tmp_path / "missing.pt", tmp_path / "o", 10)


# ------------------------------------------------------------------------------------------------
# End to end: a dataset file and a VQ-VAE checkpoint
STAMP = 16


@pytest.fixture
def dataset_and_vqvae(tmp_path):
    from galsim_vqvae.data.dataset import DatasetWriter
    from galsim_vqvae.nn.vqvae import VQVAE
    from galsim_vqvae.train.checkpoint import save_checkpoint

    rng = np.random.default_rng(4)
    n = 60
    y, x = np.mgrid[:STAMP, :STAMP] - STAMP // 2
    size = rng.uniform(1.0, 3.0, n)
    flux = rng.uniform(50, 500, n)
    observed = (flux[:, None, None] * np.exp(-(x ** 2 + y ** 2) / (2 * size[:, None, None] ** 2))
                / (2 * np.pi * size[:, None, None] ** 2) + rng.normal(0, 0.5, (n, STAMP, STAMP)))
    psf = np.exp(-(x ** 2 + y ** 2) / 2.0)
    data = tmp_path / "data.h5"
    with DatasetWriter(data, stamp_size=STAMP, pixel_scale=0.1, band="F814W", zeropoint=25.0,
                       source="synthetic", seed=1) as w:
        w.add_psfs(psf / psf.sum())
        w.append(observed=observed, sigma=np.full(n, 0.5), psf_index=np.zeros(n, np.int32),
                 params={"mag": 25.0 - 2.5 * np.log10(flux), "hlr": 0.1 * 1.18 * size,
                         "sersic_n": np.full(n, 1.0)})
    torch.manual_seed(0)
    vqvae = VQVAE(stamp_size=STAMP, hidden=8, res_blocks=1, res_hidden=4, embed_dim=4,
                  num_codes=12, image_scale=10.0)
    with torch.no_grad():
        vqvae.quantizer.codebook.normal_()
    ckpt = tmp_path / "vqvae.pt"
    save_checkpoint({"model": vqvae.state_dict(), "config": vqvae.config}, ckpt)
    return data, ckpt, vqvae, observed


def test_train_prior_end_to_end(dataset_and_vqvae, tmp_path):
    data, ckpt, vqvae, observed = dataset_and_vqvae
    out = tmp_path / "prior"
    summary = trainer.train_prior(data, ckpt, out, 6, batch_size=8, lr=1e-3, seed=1,
                                  model=TINY, log_every=3, checkpoint_every=100, progress=False)
    assert summary["step"] == 6 and summary["test_bits_per_code"] > 0
    # the cached codes are the VQ-VAE's codes of every stamp
    with torch.no_grad():
        expected = vqvae.eval().encode_codes(torch.from_numpy(observed).float()[:, None])
    with np.load(out / "codes.npz") as cache:
        np.testing.assert_array_equal(cache["codes"], expected.numpy())
        assert int(cache["num_codes"]) == 12
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["config"]["num_codes"] == 12 and state["config"]["cond_dim"] == 2
    assert state["conditions"]["names"] == ["mag", "hlr"]
    assert state["data"]["band"] == "F814W" and state["data"]["n"] == 60
    assert state["vqvae_checkpoint"] == str(ckpt.resolve())
    assert [e["step"] for e in read_log(out)] == [3, 6]
    # resuming reuses the cache (not rewritten) and continues
    mtime = (out / "codes.npz").stat().st_mtime_ns
    trainer.train_prior(data, ckpt, out, 9, batch_size=8, lr=1e-3, seed=1, model=TINY,
                        log_every=3, resume=True, progress=False)
    assert (out / "codes.npz").stat().st_mtime_ns == mtime
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 9
    # a different VQ-VAE: resuming is refused; a fresh run re-encodes
    from galsim_vqvae.train.checkpoint import save_checkpoint
    with torch.no_grad():
        vqvae.quantizer.codebook.mul_(-1.0)
    save_checkpoint({"model": vqvae.state_dict(), "config": vqvae.config}, ckpt)
    with pytest.raises(VQVAEInputError, match="cannot resume.*codes"):
        trainer.train_prior(data, ckpt, out, 12, batch_size=8, seed=1, model=TINY,
                            resume=True, progress=False)
    (out / "checkpoint.pt").unlink()
    trainer.train_prior(data, ckpt, out, 3, batch_size=8, seed=1, model=TINY, progress=False)
    with torch.no_grad():
        expected = vqvae.encode_codes(torch.from_numpy(observed).float()[:, None])
    with np.load(out / "codes.npz") as cache:
        np.testing.assert_array_equal(cache["codes"], expected.numpy())


def test_train_prior_labels(dataset_and_vqvae, tmp_path):
    data, ckpt, _, _ = dataset_and_vqvae
    with pytest.raises(VQVAEInputError,
                       match=r"\['size'\].*available: \['hlr', 'mag', 'sersic_n'\]"):
        trainer.train_prior(data, ckpt, tmp_path / "a", 3, batch_size=8, conditions=("mag", "size"),
                            model=TINY, progress=False)
    with pytest.raises(VQVAEInputError, match="'sersic_n' is constant"):
        trainer.train_prior(data, ckpt, tmp_path / "b", 3, batch_size=8, conditions="sersic_n",
                            model=TINY, progress=False)
    labels = trainer.read_labels(data, ("hlr", "mag"))
    from galsim_vqvae.data.dataset import load_arrays
    arrays = load_arrays(data, keys=("params/hlr", "params/mag"))
    np.testing.assert_array_equal(labels[:, 0], arrays["params/hlr"])
    np.testing.assert_array_equal(labels[:, 1], arrays["params/mag"])
    # the run directory is locked while a run lasts
    from galsim_vqvae.train.checkpoint import RunLock
    (tmp_path / "c").mkdir()
    with RunLock(tmp_path / "c"):
        with pytest.raises(VQVAEInputError, match="in use by another run"):
            trainer.train_prior(data, ckpt, tmp_path / "c", 3, batch_size=8, model=TINY,
                                progress=False)


def _add_classes(path, values, names='["disk", "intermediate", "bulge"]'):
    """Add ``params/morph_class`` and the ``class_names`` attribute to a dataset file."""
    import h5py

    with h5py.File(path, "a") as f:
        f["params"].create_dataset("morph_class", data=np.asarray(values, np.float32))
        if names is not None:
            f.attrs["class_names"] = names


def test_train_prior_class_label_from_the_dataset(dataset_and_vqvae, tmp_path):
    data, ckpt, _, _ = dataset_and_vqvae
    kind = np.arange(60) % 3
    _add_classes(data, kind)
    values, names = trainer.read_classes(data, "morph_class")
    np.testing.assert_array_equal(values, kind)
    assert names == ["disk", "intermediate", "bulge"]
    out = tmp_path / "prior"
    trainer.train_prior(data, ckpt, out, 4, batch_size=8, seed=1, model=dict(TINY, dropout=0.2),
                        class_label="morph_class", ema=0.99, progress=False)
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["classes"] == {"label": "morph_class", "names": names}
    assert state["config"]["num_classes"] == 3 and state["config"]["dropout"] == 0.2
    assert state["train"]["ema"] == 0.99 and state["conditions"]["names"] == ["mag", "hlr"]
    with pytest.raises(VQVAEInputError, match="class label; do not also list it"):
        trainer.train_prior(data, ckpt, tmp_path / "a", 4, class_label="mag", progress=False)
    with pytest.raises(VQVAEInputError, match=r"class label 'kind' not in .*'morph_class'"):
        trainer.train_prior(data, ckpt, tmp_path / "b", 4, class_label="kind", model=TINY,
                            batch_size=8, progress=False)
    with pytest.raises(VQVAEInputError, match="ema must be a decay"):
        trainer.train_prior(data, ckpt, tmp_path / "c", 4, ema=1.0, progress=False)
    assert not any((tmp_path / n).exists() for n in "abc")


@pytest.mark.parametrize("values,names,match", [
    (np.arange(60) % 4, '["disk", "intermediate", "bulge"]',
     r"params/morph_class must hold class indices 0..2 .*stamp 3 has 3.0 \(15 stamps\)"),
    (np.where(np.arange(60) == 7, 0.5, 1.0), '["disk", "bulge"]', r"stamp 7 has 0.5"),
    (np.zeros(60), None, "class_names"),
    (np.zeros(60), '["disk", "disk"]', "distinct class names"),
])
def test_train_prior_bad_class_labels(dataset_and_vqvae, tmp_path, values, names, match):
    data, ckpt, _, _ = dataset_and_vqvae
    _add_classes(data, values, names)
    with pytest.raises(VQVAEInputError, match=match):
        trainer.train_prior(data, ckpt, tmp_path / "p", 4, class_label="morph_class",
                            model=TINY, batch_size=8, progress=False)
    assert not (tmp_path / "p").exists()
