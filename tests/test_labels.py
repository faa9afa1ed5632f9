"""Labels without labels: missing labels drawn from the training population stored in the bundle,
partial labels honoured, class labels by name, and every draw a function of the galaxy's seed."""

import copy
import json

import galsim
import numpy as np
import pytest
import torch
from astropy.io import fits

import galsim_vqvae  # noqa: F401  (registers the config types)
from galsim_vqvae import VQVAEGalaxy
from galsim_vqvae.emulator import Emulator
from galsim_vqvae.errors import VQVAEFormatError, VQVAEInputError
from galsim_vqvae.nn.pixelcnn import GatedPixelCNN
from galsim_vqvae.nn.sampling import per_sample_seeds, sample_naive

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["disk", "intermediate", "bulge", "irregular"]


def class_table(n=400, seed=3):
    """(mag, hlr, morph_class) rows: the class follows mag (bright galaxies bulges)."""
    rng = np.random.default_rng(seed)
    mag = np.clip(rng.normal(23.0, 1.0, n), 20.0, 25.5)
    hlr = np.clip(0.5 - 0.15 * (mag - 23.0) + rng.normal(0.0, 0.05, n), 0.1, 1.5)
    klass = np.where(mag < 22.0, 2, np.where(mag < 23.5, 1, 0))
    klass[rng.uniform(size=n) < 0.05] = 3
    return np.stack([mag, hlr, klass], axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def class_emulator(tiny_emulator, tmp_path_factory):
    """The tiny emulator's VQ-VAE with a random class-conditional prior (4 classes), saved and
    loaded back."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(99)
        prior = GatedPixelCNN(num_codes=32, channels=16, layers=3, kernel_size=3, cond_dim=2,
                              num_classes=len(CLASSES))
        with torch.no_grad():  # class embeddings strong enough to change the draws
            prior.class_embedding.weight.mul_(30.0)
    metadata = copy.deepcopy(tiny_emulator.metadata)
    metadata["conditions"]["class_label"] = {"name": "morph_class", "class_names": CLASSES}
    metadata["prior_config"] = prior.config
    path = tmp_path_factory.mktemp("class_model") / "model.safetensors"
    Emulator(copy.deepcopy(tiny_emulator.vqvae), prior, metadata, tiny_emulator.psf_image,
             label_table=class_table()).save(path)
    return Emulator.load(path)


def test_table_round_trip(tiny_emulator, class_emulator):
    from conftest import tiny_label_table

    np.testing.assert_array_equal(tiny_emulator.label_table, tiny_label_table())
    assert tiny_emulator.metadata["conditions"]["table"]["columns"] == ["mag", "hlr"]
    np.testing.assert_array_equal(class_emulator.label_table, class_table())
    assert class_emulator.label_names == ["mag", "hlr", "morph_class"]
    assert class_emulator.class_names == CLASSES


def test_sample_without_labels(tiny_emulator):
    """No labels: each galaxy takes the labels of one training row, picked by its own seed."""
    codes = tiny_emulator.sample_codes(4, seed=1)
    labels = tiny_emulator.draw_conditions(4, seed=1)
    np.testing.assert_array_equal(codes, tiny_emulator.sample_codes(4, labels, seed=1))
    rows = {tuple(r) for r in tiny_emulator.label_table.astype(np.float64)}
    assert all((m, h) in rows for m, h in zip(labels["mag"], labels["hlr"]))
    # whatever the batch: galaxy i is its seed's galaxy
    seeds = per_sample_seeds(1, 4)
    np.testing.assert_array_equal(codes, tiny_emulator.sample_codes(4, seed=1, batch_size=1))
    for i in (3, 0):
        np.testing.assert_array_equal(codes[i], tiny_emulator.sample_codes(1, seed=[seeds[i]])[0])
    # the population itself: over many draws the labels follow the table
    many = tiny_emulator.draw_conditions(3000, seed=5)
    table = tiny_emulator.label_table
    assert abs(many["mag"].mean() - table[:, 0].mean()) < 0.1
    assert abs(np.median(many["hlr"]) - np.median(table[:, 1])) < 0.03


def test_partial_labels_are_conditioned(tiny_emulator):
    """Only mag given: hlr comes from training rows of about that magnitude (the table's hlr
    falls by 0.15 per magnitude)."""
    bright = tiny_emulator.draw_conditions(400, {"mag": 22.0}, seed=2)
    faint = tiny_emulator.draw_conditions(400, {"mag": 24.0}, seed=2)
    np.testing.assert_array_equal(bright["mag"], 22.0)
    table = tiny_emulator.label_table.astype(np.float64)
    for drawn, mag in ((bright, 22.0), (faint, 24.0)):
        near = table[np.abs(table[:, 0] - mag) < 0.3, 1]
        assert abs(np.median(drawn["hlr"]) - np.median(near)) < 0.05
    assert np.median(bright["hlr"]) - np.median(faint["hlr"]) > 0.2
    # each galaxy's draw depends on its seed and its given labels alone
    seeds = per_sample_seeds(7, 5)
    mags = [21.0, 22.0, 23.0, 24.0, 22.0]
    together = tiny_emulator.draw_conditions(5, {"mag": mags}, seed=seeds)
    for i in range(5):
        alone = tiny_emulator.draw_conditions(1, {"mag": mags[i]}, seed=[seeds[i]])
        assert alone["hlr"][0] == together["hlr"][i]
    # per-galaxy dicts, each giving what it likes
    mixed = tiny_emulator.draw_conditions(3, [{"mag": 21.0}, {"hlr": 0.4}, None], seed=seeds[:3])
    assert mixed["mag"][0] == 21.0 and mixed["hlr"][1] == 0.4
    assert mixed["mag"][2] == tiny_emulator.draw_conditions(1, seed=[seeds[2]])["mag"][0]


def test_model_without_table(tiny_emulator):
    bare = Emulator(tiny_emulator.vqvae, tiny_emulator.prior, tiny_emulator.metadata,
                    tiny_emulator.psf_image)
    assert bare.label_table is None and "table" not in bare.metadata["conditions"]
    bare.sample_codes(1, {"mag": 22.0, "hlr": 0.5}, seed=1)  # all given: fine
    with pytest.raises(VQVAEInputError, match=r"no table of training labels.*\['hlr'\].*"
                                              r"--conditions.*gal.conditions.*mag in \[20, 25.5\]"
                                              r", hlr in \[0.1, 1.5\]"):
        bare.sample_codes(1, {"mag": 22.0}, seed=1)


def test_bad_label_tables(tiny_emulator):
    args = (tiny_emulator.vqvae, tiny_emulator.prior, tiny_emulator.metadata,
            tiny_emulator.psf_image)
    table = tiny_emulator.label_table.copy()
    table[3, 0] = 30.0
    with pytest.raises(VQVAEFormatError, match="'mag' leaves the training range"):
        Emulator(*args, label_table=table)
    with pytest.raises(VQVAEFormatError, match=r"shape \(500, 1\)"):
        Emulator(*args, label_table=table[:, :1])
    table[3, 0] = np.nan
    with pytest.raises(VQVAEFormatError, match="NaN"):
        Emulator(*args, label_table=table)


def test_class_by_name(class_emulator):
    emu = class_emulator
    seeds = per_sample_seeds(4, 3)
    by_name = emu.sample_codes(3, {"mag": 22.0, "hlr": 0.5, "morph_class": "bulge"}, seed=seeds)
    by_number = emu.sample_codes(3, {"mag": 22.0, "hlr": 0.5, "morph_class": 2}, seed=seeds)
    np.testing.assert_array_equal(by_name, by_number)
    # the class reaches the prior as its class_label: the reference sampler agrees
    info = emu.metadata["conditions"]
    cond = torch.tensor([[(22.0 - info["mean"][0]) / info["std"][0],
                          (0.5 - info["mean"][1]) / info["std"][1]]] * 3, dtype=torch.float32)
    ref = sample_naive(emu.prior, 3, (8, 8), cond=cond, class_label=torch.tensor([2, 2, 2]),
                       seeds=seeds)
    np.testing.assert_array_equal(by_name, ref.numpy())
    disk = emu.sample_codes(3, {"mag": 22.0, "hlr": 0.5, "morph_class": "disk"}, seed=seeds)
    assert not np.array_equal(disk, by_name)
    with pytest.raises(VQVAEInputError, match=r"'spiral' is not a class.*'disk'"):
        emu.sample_codes(1, {"morph_class": "spiral"}, seed=1)
    with pytest.raises(VQVAEInputError, match="number from 0 to 3"):
        emu.sample_codes(1, {"morph_class": 7}, seed=1)


def test_class_drawn_and_conditioning(class_emulator):
    """A missing class is drawn like any label; a given class restricts the rows."""
    emu = class_emulator
    bright = emu.draw_conditions(300, {"mag": 20.5}, seed=1)["morph_class"]
    faint = emu.draw_conditions(300, {"mag": 25.0}, seed=1)["morph_class"]
    assert bright.dtype == np.int64
    assert np.mean(bright == 2) > 0.8 and np.mean(faint == 0) > 0.8
    disks = emu.draw_conditions(300, {"morph_class": "disk"}, seed=1)
    table = emu.label_table
    assert disks["mag"].min() >= table[table[:, 2] == 0, 0].min()
    np.testing.assert_array_equal(disks["morph_class"], 0)
    # all drawn: the codes are those of the drawn labels
    labels = emu.draw_conditions(3, seed=8)
    np.testing.assert_array_equal(emu.sample_codes(3, seed=8), emu.sample_codes(3, labels, seed=8))


def test_galaxy_and_config_without_labels(tiny_emulator, class_emulator, tmp_path):
    """`VQVAEGalaxy` and a config with no or partial labels; flux still rescales; the truth
    catalog records the drawn labels."""
    gal = VQVAEGalaxy(tiny_emulator, index=3, flux=1000.0)
    assert sorted(gal.conditions) == ["hlr", "mag"] and gal.flux == pytest.approx(1000.0)
    same = VQVAEGalaxy(tiny_emulator, index=3, conditions=gal.conditions, flux=1000.0)
    np.testing.assert_array_equal(gal.image.array, same.image.array)
    part = VQVAEGalaxy(class_emulator, index=3, conditions={"morph_class": "irregular"})
    assert part.conditions["morph_class"] == 3
    batch = VQVAEGalaxy.makeGalaxies(2, class_emulator, index=[3, 4],
                                     conditions={"morph_class": "irregular"})
    assert batch[0].conditions == part.conditions
    np.testing.assert_allclose(batch[0].image.array, part.image.array, rtol=1e-5, atol=1e-7)

    def config(nproc, model, gal):
        return {
            "modules": ["galsim_vqvae"],
            "input": {"vqvae_model": {"file_name": str(model), "batch_size": 3}},
            "psf": {"type": "Kolmogorov", "fwhm": 0.7},
            "gal": gal,
            "image": {"type": "Scattered", "size": 64, "pixel_scale": 0.2, "nobjects": 6,
                      "random_seed": 77, "nproc": nproc},
            "output": {"type": "Fits", "dir": str(tmp_path), "file_name": f"img{nproc}.fits",
                       "truth": {"file_name": f"truth{nproc}.fits",
                                 "columns": {"mag": "$(@gal).conditions['mag']",
                                             "hlr": "$(@gal).conditions['hlr']",
                                             "flux": "gal.flux"}}},
        }

    for nproc in (1, 2):
        galsim.config.Process(config(nproc, tiny_emulator.path,
                                     {"type": "VQVAEGalaxy", "flux": 1000}), except_abort=True)
    assert (tmp_path / "img1.fits").read_bytes() == (tmp_path / "img2.fits").read_bytes()
    truth = fits.getdata(tmp_path / "truth1.fits")
    np.testing.assert_array_equal(truth["flux"], 1000.0)
    rows = {tuple(r) for r in tiny_emulator.label_table.astype(np.float64)}
    assert all((m, h) in rows for m, h in zip(truth["mag"], truth["hlr"]))
    assert len(set(truth["mag"])) > 1
    # partial labels and a class by name in a config
    cfg = config(1, class_emulator.path, {"type": "VQVAEGalaxy", "flux": 500,
                                          "conditions": {"mag": 21.0, "morph_class": "bulge"}})
    cfg["output"]["truth"]["columns"]["morph_class"] = "$(@gal).conditions['morph_class']"
    galsim.config.Process(cfg, except_abort=True)
    truth = fits.getdata(tmp_path / "truth1.fits")
    np.testing.assert_array_equal(truth["mag"], 21.0)
    np.testing.assert_array_equal(truth["morph_class"], 2)


def test_cli_sample_without_labels(tiny_emulator, class_emulator, tmp_path):
    from galsim_vqvae.cli import main

    out = tmp_path / "s.fits"
    assert main(["sample", "--model", str(tiny_emulator.path), "--n", "4", "--seed", "1",
                 "--out", str(out), "--quiet"]) in (0, None)
    with fits.open(out) as f:
        table = f["CONDITIONS"].data
        np.testing.assert_array_equal(f["CODES"].data, tiny_emulator.sample_codes(4, seed=1))
        labels = tiny_emulator.draw_conditions(4, seed=1)
        np.testing.assert_array_equal(table["mag"], labels["mag"])
    out2 = tmp_path / "c.fits"
    assert main(["sample", "--model", str(class_emulator.path), "--n", "3", "--seed", "2",
                 "--conditions", "mag=23,morph_class=disk", "--out", str(out2),
                 "--quiet"]) in (0, None)
    with fits.open(out2) as f:
        table = f["CONDITIONS"].data
        np.testing.assert_array_equal(table["morph_class"], 0)
        np.testing.assert_array_equal(table["mag"], 23.0)
        np.testing.assert_array_equal(
            f["CODES"].data, class_emulator.sample_codes(3, {"mag": 23.0, "morph_class": 0},
                                                         seed=2))


def test_bundle_from_checkpoints_holds_the_training_labels(tmp_path):
    """`Emulator.from_checkpoints` (what ``train-prior`` calls) stores the labels of the prior's
    training split (read by its caller), and the class label's names from the prior's checkpoint."""
    import h5py

    from galsim_vqvae.data.dataset import DatasetWriter, median_sigma, split_indices
    from galsim_vqvae.emulator import MAX_LABEL_ROWS
    from galsim_vqvae.nn.vqvae import VQVAE
    from galsim_vqvae.train.checkpoint import save_checkpoint
    from galsim_vqvae.train.prior import label_normalisation, label_table

    rng = np.random.default_rng(0)
    n, s = 50, 16
    mag = rng.uniform(21, 25, n)
    hlr = rng.uniform(0.1, 0.5, n)
    klass = rng.integers(0, 3, n)
    psf = np.exp(-((np.mgrid[:s, :s] - s // 2) ** 2).sum(0) / 2.0)
    data = tmp_path / "data.h5"
    with DatasetWriter(data, stamp_size=s, pixel_scale=0.1, band="F814W", zeropoint=25.0,
                       source="synthetic", seed=1) as w:
        w.add_psfs(psf / psf.sum())
        w.append(observed=rng.normal(0, 1, (n, s, s)), sigma=np.ones(n),
                 psf_index=np.zeros(n, np.int32),
                 params={"mag": mag, "hlr": hlr, "morph_class": klass})
    with h5py.File(data, "r+") as f:
        f.attrs["class_names"] = json.dumps(["disk", "intermediate", "bulge"])
    vqvae = VQVAE(stamp_size=s, hidden=8, res_blocks=1, res_hidden=4, embed_dim=4, num_codes=12)
    data_info = {"path": str(data), "pixel_scale": 0.1, "stamp_size": s, "band": "F814W"}
    save_checkpoint({"model": vqvae.state_dict(), "config": vqvae.config, "step": 1,
                     "data": data_info}, tmp_path / "vq.pt")
    train = split_indices(n, "train")
    labels = np.stack([mag, hlr], 1).astype(np.float32).astype(np.float64)
    norm = label_normalisation(labels[train], ["mag", "hlr"])
    for num_classes, class_label in ((0, None), (3, "morph_class")):
        prior = GatedPixelCNN(num_codes=12, channels=8, layers=2, kernel_size=3, cond_dim=2,
                              num_classes=num_classes)
        state = {"model": prior.state_dict(), "config": prior.config, "step": 1,
                 "conditions": norm, "data": data_info}
        if class_label:  # as train-prior --class-label writes it
            state["classes"] = {"label": class_label, "names": ["disk", "intermediate", "bulge"]}
        save_checkpoint(state, tmp_path / "prior.pt")
        names = ["mag", "hlr"] + ([class_label] if class_label else [])
        emu = Emulator.from_checkpoints(tmp_path / "vq.pt", tmp_path / "prior.pt", psf,
                                        label_table=label_table(data, names, MAX_LABEL_ROWS),
                                        noise_sigma=median_sigma(data))
        assert emu.metadata["noise_sigma_median"] == 1.0
        expected = [mag[train], hlr[train]] + ([klass[train]] if class_label else [])
        np.testing.assert_array_equal(emu.label_table,
                                      np.stack(expected, 1).astype(np.float32))
        emu.save(tmp_path / "model.safetensors")
        back = Emulator.load(tmp_path / "model.safetensors")
        np.testing.assert_array_equal(back.label_table, emu.label_table)
    assert back.class_names == ["disk", "intermediate", "bulge"]
    state.pop("classes")  # a class-conditional prior whose checkpoint names no class label
    save_checkpoint(state, tmp_path / "prior.pt")
    with pytest.raises(VQVAEInputError, match="names no class label"):
        Emulator.from_checkpoints(tmp_path / "vq.pt", tmp_path / "prior.pt", psf)
    assert back.draw_conditions(2, {"morph_class": "bulge"}, seed=1)["morph_class"].tolist() \
        == [2, 2]
    # a larger training split is subsampled, seeded, in dataset order
    small = label_table(data, ["mag"], max_rows=10)
    assert small.shape == (10, 1) and np.isin(small[:, 0], mag[train].astype(np.float32)).all()
    np.testing.assert_array_equal(small, label_table(data, ["mag"], max_rows=10))


@pytest.mark.slow
def test_default_model_honours_a_partial_label():
    """Only ``mag=21`` given: the shipped model's galaxies have a median measured magnitude
    within 0.1 of 21 (their hlr drawn from training galaxies of about that magnitude).
    Measured on the default model shipped 2026-12-07 (20,000-row label table): 21.020 over 300
    galaxies (seed 11)."""
    from galsim_vqvae.metrics import magnitude

    emu = Emulator.load("default")
    assert emu.label_table is not None, "the shipped default model has no table of labels"
    images = emu.sample(100, {"mag": 21.0}, seed=11)
    assert abs(np.median(magnitude(images, emu.metadata["zeropoint"])) - 21.0) < 0.1


def test_realism_conditions_carry_the_class(tiny_emulator, class_emulator):
    """The realism checks condition samples on the held-out stamps' class where the model has a
    class label and the dataset records it, else leave it to be drawn."""
    from galsim_vqvae.validation.realism import conditions_like

    rng = np.random.default_rng()
    n = int(rng.integers(5, 20))
    params = {"params/mag": rng.uniform(21, 25, n), "params/hlr": rng.uniform(0.2, 0.8, n),
              "params/morph_class": rng.integers(0, 4, n)}
    got = conditions_like(class_emulator, params, n + 3)
    np.testing.assert_array_equal(got["morph_class"][:n], params["params/morph_class"])
    assert got["morph_class"].dtype == np.int64 and len(got["morph_class"]) == n + 3
    assert "morph_class" not in conditions_like(tiny_emulator, params, n)
    del params["params/morph_class"]
    assert set(conditions_like(class_emulator, params, n)) == {"mag", "hlr"}
