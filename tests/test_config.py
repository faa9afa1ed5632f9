"""The GalSim config types: input ``vqvae_model`` and object ``VQVAEGalaxy``.

Reproducibility is checked byte for byte on the FITS files GalSim writes, across image.nproc,
output.nproc and ``galsim -n/-j`` job splits (through `galsim.config.Process(njobs, job)`, which
is what the ``galsim`` command calls).
"""

import copy
import logging
import warnings

import galsim
import numpy as np
import pytest
from astropy.io import fits

import galsim_vqvae  # (registers the config types)
from galsim_vqvae import VQVAEGalaxy
from galsim_vqvae.profile import ResolutionWarning


pytestmark = pytest.mark.usefixtures("one_thread")


def survey_config(model_path, out_dir, nobj=10, nfiles=2, batch_size=4):
    return {
        "modules": ["galsim_vqvae"],
        "input": {"vqvae_model": {"file_name": str(model_path), "batch_size": batch_size}},
        "psf": {"type": "Kolmogorov", "fwhm": 0.7},
        "gal": {
            "type": "VQVAEGalaxy",
            "conditions": {"mag": {"type": "Random", "min": 21, "max": 24},
                           "hlr": {"type": "Random", "min": 0.3, "max": 1.2}},
            "flux": {"type": "Random", "min": 500, "max": 3000},
            "shear": {"type": "G1G2", "g1": 0.02, "g2": -0.01},
            "rotate": {"type": "Random"},
        },
        "image": {"type": "Scattered", "size": 80, "pixel_scale": 0.2, "nobjects": nobj,
                  "random_seed": 31415,
                  "noise": {"type": "CCD", "sky_level": 50, "gain": 1.5, "read_noise": 4}},
        "output": {"type": "Fits", "dir": str(out_dir), "nfiles": nfiles,
                   "file_name": {"type": "FormattedStr", "format": "img%d.fits",
                                 "items": [{"type": "Sequence", "first": 0}]},
                   "vqvae_provenance": {},
                   "truth": {"file_name": {"type": "FormattedStr", "format": "truth%d.fits",
                                           "items": [{"type": "Sequence", "first": 0}]},
                             "columns": {"id": "obj_num", "mag": "gal.conditions.mag",
                                         "hlr": "gal.conditions.hlr",
                                         "flux": "gal.flux", "pos": "image_pos"}}},
    }


def run(config, **kwargs):
    config = copy.deepcopy(config)
    galsim.config.Process(config, except_abort=True, **kwargs)
    return config


def file_bytes(out_dir, nfiles=2):
    return [(out_dir / f"{kind}{i}.fits").read_bytes() for i in range(nfiles)
            for kind in ("img", "truth")]


@pytest.fixture(scope="module")
def reference_run(tiny_emulator, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    config = survey_config(tiny_emulator.path, out)
    run(config)
    return config, out, file_bytes(out)


def test_same_output_whatever_nproc(tiny_emulator, reference_run, tmp_path):
    config, _, ref = reference_run
    for where, key in (("image", "nproc"), ("output", "nproc")):
        out = tmp_path / f"{where}_{key}"
        out.mkdir()
        cfg = survey_config(tiny_emulator.path, out)
        cfg[where][key] = 2
        run(cfg)
        assert file_bytes(out) == ref, f"{where}.{key}=2 differs from nproc=1"


def test_skip_and_reject_same_output_whatever_nproc(tiny_emulator, tmp_path):
    """Skipped stamps drop out of their block's dry run; a rejected, rebuilt galaxy (new seed)
    is generated alone: either way the output does not depend on image.nproc."""
    outputs = []
    for nproc in (1, 2):
        out = tmp_path / str(nproc)
        out.mkdir()
        cfg = survey_config(tiny_emulator.path, out, nfiles=1)
        cfg["stamp"] = {"type": "Basic", "skip": "$obj_num % 5 == 2",
                        "reject": "$obj_num % 3 == 0 and galsim.UniformDeviate(rng)() < 0.5"}
        cfg["image"]["nproc"] = nproc
        run(cfg)
        outputs.append(file_bytes(out, nfiles=1))
    assert outputs[0] == outputs[1]


def test_same_output_whatever_job_split(tiny_emulator, reference_run, tmp_path):
    """``galsim -n 2 -j 1`` then ``-j 2`` writes the files a single job writes."""
    _, _, ref = reference_run
    cfg = survey_config(tiny_emulator.path, tmp_path)
    run(cfg, njobs=2, job=1)
    assert (tmp_path / "img0.fits").exists() and not (tmp_path / "img1.fits").exists()
    run(cfg, njobs=2, job=2)
    assert file_bytes(tmp_path) == ref


def test_images_and_truth(reference_run):
    config, out, _ = reference_run
    for i in range(2):
        image = fits.getdata(out / f"img{i}.fits")
        truth = fits.getdata(out / f"truth{i}.fits")
        assert image.shape == (80, 80) and np.all(np.isfinite(image))
        assert len(truth) == 10
        assert np.all((truth["mag"] >= 21) & (truth["mag"] <= 24))
        assert np.all((truth["hlr"] >= 0.3) & (truth["hlr"] <= 1.2))
        assert np.all((truth["flux"] >= 500) & (truth["flux"] <= 3000))
        assert len(set(truth["mag"])) == 10
        # The galaxies are there: the image minus the sky holds their total flux (CCD noise).
        assert image.sum() > 0.5 * truth["flux"].sum()
    a, b = (fits.getdata(out / f"img{i}.fits") for i in range(2))
    assert not np.array_equal(a, b)


def single_config(model_path, **gal):
    return {
        "modules": ["galsim_vqvae"],
        "input": {"vqvae_model": {"file_name": str(model_path)}},
        "psf": {"type": "Kolmogorov", "fwhm": 0.7},
        "gal": dict({"type": "VQVAEGalaxy", "conditions": {"mag": 22.0, "hlr": 0.5},
                     "flux": 1500.0, "shear": {"type": "G1G2", "g1": 0.03, "g2": 0.01}}, **gal),
        "image": {"type": "Single", "size": 32, "pixel_scale": 0.2, "random_seed": 2718},
    }


def test_provenance_and_truth_ids(tiny_emulator, reference_run):
    """``output.vqvae_provenance`` records the model, its sha256, the package version and the
    image's seed in each image's header; the truth catalog has an ID per galaxy."""
    import hashlib
    from pathlib import Path

    config, out, _ = reference_run
    seeds = set()
    for i in range(2):
        header = fits.getheader(out / f"img{i}.fits")
        assert header["MODEL"] == Path(tiny_emulator.path).name
        assert header["MODELSHA"] == hashlib.sha256(
            Path(tiny_emulator.path).read_bytes()).hexdigest()
        assert header["VQVAEVER"] == galsim_vqvae.__version__
        seeds.add(header["SEED"])
        ids = fits.getdata(out / f"truth{i}.fits")["id"]
        np.testing.assert_array_equal(ids, np.arange(10 * i, 10 * (i + 1)))
    assert len(seeds) == 2 and 0 not in seeds


def test_config_build_equals_python_build(tiny_emulator):
    config = single_config(tiny_emulator.path)
    image = galsim.config.BuildImage(config)
    seed = config["obj_num_seed"]  # the per-object seed GalSim used for this object
    gal = VQVAEGalaxy(tiny_emulator.path, conditions={"mag": 22.0, "hlr": 0.5}, flux=1500.0,
                      rng=galsim.BaseDeviate(seed))
    ref = galsim.Convolve(gal.shear(g1=0.03, g2=0.01), galsim.Kolmogorov(fwhm=0.7)).drawImage(
        nx=32, ny=32, scale=0.2)
    np.testing.assert_array_equal(image.array, ref.array)
    # with index: independent of the rng and of the seed
    config = single_config(tiny_emulator.path, index=17)
    image = galsim.config.BuildImage(config)
    gal = VQVAEGalaxy(tiny_emulator, index=17, conditions={"mag": 22.0, "hlr": 0.5}, flux=1500.)
    ref = galsim.Convolve(gal.shear(g1=0.03, g2=0.01), galsim.Kolmogorov(fwhm=0.7)).drawImage(
        nx=32, ny=32, scale=0.2)
    np.testing.assert_array_equal(image.array, ref.array)


def test_batched_generation(tiny_emulator, tmp_path):
    """10 objects in blocks of 4: 3 network calls; each galaxy is its own seed's galaxy."""
    records = []

    class Handler(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("test_vqvae_batching")
    logger.setLevel(logging.INFO)
    logger.addHandler(Handler())
    config = survey_config(tiny_emulator.path, tmp_path, nfiles=1)
    galsim.config.Process(copy.deepcopy(config), logger=logger, except_abort=True)
    batches = [m for m in records if "in one batch" in m]
    expected = ["VQVAEGalaxy: generated 4 galaxies in one batch (objects 0..3)",
                "VQVAEGalaxy: generated 4 galaxies in one batch (objects 4..7)",
                "VQVAEGalaxy: generated 2 galaxies in one batch (objects 8..9)"]
    assert batches == expected


def test_image_nproc_generates_each_block_once(tiny_emulator, reference_run, tmp_path,
                                               monkeypatch):
    """With image.nproc=2 the two worker processes share the blocks: every block is generated
    once (by one of them), and the image is the nproc=1 image."""
    import os

    import galsim_vqvae.config as gconfig

    log = tmp_path / "calls.txt"
    real = gconfig.generate

    def counting(emulator, seeds, conditions=None):
        with open(log, "a") as f:
            f.write("%d %d\n" % (os.getpid(), len(seeds)))
        return real(emulator, seeds, conditions)

    monkeypatch.setattr(gconfig, "generate", counting)
    out = tmp_path / "out"
    out.mkdir()
    cfg = survey_config(tiny_emulator.path, out, nfiles=1)
    cfg["image"]["nproc"] = 2
    run(cfg)
    calls = [line.split() for line in log.read_text().splitlines()]
    assert sorted(int(n) for _, n in calls) == [2, 4, 4]  # blocks 0..3, 4..7, 8..9
    assert (out / "img0.fits").read_bytes() == reference_run[2][0]


def test_batch_matches_alone(tiny_emulator):
    """A galaxy generated in a block equals (to float precision) the same seed generated alone."""
    cfg = single_config(tiny_emulator.path)
    cfg["image"] = {"type": "Tiled", "nx_tiles": 3, "ny_tiles": 1, "stamp_size": 24,
                    "pixel_scale": 0.2, "random_seed": 99}
    cfg["input"]["vqvae_model"]["batch_size"] = 3
    cfg["gal"]["conditions"]["mag"] = {"type": "Sequence", "first": 21, "step": 1}
    cfg["gal"]["index"] = "$obj_num + 100"
    image = galsim.config.BuildImage(cfg)
    for k in range(3):
        gal = VQVAEGalaxy(tiny_emulator, index=100 + k, conditions={"mag": 21. + k, "hlr": 0.5},
                          flux=1500.)
        ref = galsim.Convolve(gal.shear(g1=0.03, g2=0.01), galsim.Kolmogorov(fwhm=0.7))
        ref = ref.drawImage(nx=24, ny=24, scale=0.2)
        stamp = image[galsim.BoundsI(1 + 24 * k, 24 * (k + 1), 1, 24)].array
        np.testing.assert_allclose(stamp, ref.array, rtol=1e-5, atol=1e-5 * ref.array.max())


def test_config_errors(tiny_emulator, tmp_path):
    def build(cfg):
        return galsim.config.BuildImage(cfg)

    cfg = single_config(tiny_emulator.path, fluxx=3.0)
    with pytest.raises(galsim.GalSimConfigError, match="fluxx"):
        build(cfg)
    cfg = single_config(tiny_emulator.path)
    cfg["gal"]["conditions"] = {"mag": 22.0, "size": 0.5}
    with pytest.raises(galsim.GalSimConfigError, match=r"unknown label\(s\) \['size'\].*"
                                                       r"\['mag', 'hlr'\]"):
        build(cfg)
    cfg = single_config(tiny_emulator.path)
    cfg["gal"]["conditions"] = {"mag": 30.0, "hlr": 0.5}
    with pytest.raises(galsim.GalSimRangeError, match="'mag' = 30"):
        build(cfg)
    cfg = single_config(tiny_emulator.path)
    cfg["gal"]["conditions"] = {"mag": 30.0, "hlr": 0.5}
    cfg["input"]["vqvae_model"]["out_of_range"] = "clip"  # now mag 30 is clipped to 25.5
    with pytest.warns(UserWarning, match="'mag' = 30 is outside the training range"):
        clipped = build(cfg)
    cfg = single_config(tiny_emulator.path)
    cfg["gal"]["conditions"] = {"mag": 25.5, "hlr": 0.5}
    np.testing.assert_array_equal(clipped.array, build(cfg).array)
    for field, value, match in (("file_name", str(tmp_path / "nope.safetensors"), "no such"),
                                ("out_of_range", "wrap", "out_of_range"),
                                ("batch_size", 0, "batch_size"), ("device", "gpu", "device"),
                                ("resolution_policy", "loud", "resolution_policy"),
                                ("file_nam", "default", "file_nam")):
        cfg = single_config(tiny_emulator.path)
        cfg["input"]["vqvae_model"][field] = value
        with pytest.raises(galsim.GalSimConfigError, match=match):
            build(cfg)
    cfg = single_config(tiny_emulator.path)
    del cfg["input"]
    with pytest.raises(galsim.GalSimConfigError, match="vqvae_model"):
        build(cfg)


def test_config_resolution_rule(tiny_emulator):
    cfg = single_config(tiny_emulator.path)
    cfg["psf"] = {"type": "Gaussian", "fwhm": 0.05}
    cfg["image"]["pixel_scale"] = 0.01
    with pytest.warns(ResolutionWarning, match="narrower"):
        galsim.config.BuildImage(copy.deepcopy(cfg))
    cfg["input"]["vqvae_model"]["resolution_policy"] = "raise"
    with pytest.raises(galsim.GalSimRangeError, match="narrower"):
        galsim.config.BuildImage(copy.deepcopy(cfg))
    cfg["input"]["vqvae_model"]["resolution_policy"] = "ignore"
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResolutionWarning)
        galsim.config.BuildImage(copy.deepcopy(cfg))


def test_mock_survey_example_runs(tiny_emulator, tmp_path):
    """examples/mock_survey.yaml (the main job) runs, here with the tiny model and 6 galaxies,
    and its preview script writes a PNG."""
    import importlib.util
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "examples"
    config = galsim.config.ReadConfig(str(examples / "mock_survey.yaml"))[0]
    galsim.config.Process(config, except_abort=True, new_params={
        "input.vqvae_model.file_name": str(tiny_emulator.path), "image.nobjects": 6,
        "image.size": 96, "output.dir": str(tmp_path)})
    image = fits.getdata(tmp_path / "mock_survey.fits")
    truth = fits.getdata(tmp_path / "mock_survey_truth.fits")
    assert image.shape == (96, 96) and len(truth) == 6
    np.testing.assert_array_equal(truth["id"], np.arange(6))
    header = fits.getheader(tmp_path / "mock_survey.fits")
    assert header["MODEL"] == Path(tiny_emulator.path).name and len(header["MODELSHA"]) == 64
    assert header["VQVAEVER"] == galsim_vqvae.__version__ and header["SEED"] > 0
    np.testing.assert_allclose(truth["flux"], 10 ** (-0.4 * (truth["mag"] - 30.0)), rtol=1e-12)
    spec = importlib.util.spec_from_file_location("preview", examples / "preview.py")
    preview = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(preview)
    preview.main([str(tmp_path / "mock_survey.fits"), str(tmp_path / "preview.png")])
    assert (tmp_path / "preview.png").read_bytes()[:4] == b"\x89PNG"


def test_worker_device():
    from galsim_vqvae.config import _worker_device

    assert _worker_device("cuda", "Process-1", 4) == "cuda:0"
    assert _worker_device("cuda", "Process-6", 4) == "cuda:1"
    assert _worker_device("cuda", "MainProcess", 4) == "cuda"
    assert _worker_device("cuda", "Process-3", 1) == "cuda"
    assert _worker_device("cuda:2", "Process-1", 4) == "cuda:2"
    assert _worker_device("cpu", "Process-2", 4) == "cpu"


def test_cuda_in_a_child_forked_after_cuda_was_used(tiny_emulator, monkeypatch):
    """GalSim forks its workers; a child of a process that had initialised CUDA cannot use it:
    a clear error says so (instead of torch's 'Cannot re-initialize CUDA in forked subprocess'
    from deep inside a worker)."""
    import torch

    from galsim_vqvae.config import VQVAEModel

    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: True)
    with pytest.raises(galsim.GalSimConfigError, match="CUDA was already initialised in the "
                       "process that forked it.*fresh process"):
        VQVAEModel(str(tiny_emulator.path), device="cuda").emulator
    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: False)
    assert VQVAEModel(str(tiny_emulator.path), device="cpu").emulator.device.type == "cpu"


def test_model_loaded_lazily_once_per_worker(tiny_emulator, reference_run, tmp_path,
                                             monkeypatch):
    """image.nproc or output.nproc = 2: the main process never loads the model (so no CUDA
    context can cross GalSim's fork); each worker process loads it once, on first use."""
    import os

    import galsim_vqvae.emulator as gemulator
    import galsim_vqvae.profile as gprofile

    real = gemulator.Emulator.load.__func__

    def load(cls, file_name="default", device="cpu"):
        with open(tmp_path / "loads.txt", "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(cls, file_name, device)

    monkeypatch.setattr(gemulator.Emulator, "load", classmethod(load))
    for where in ("image", "output"):
        monkeypatch.setattr(gprofile, "_emulators", {})
        (tmp_path / "loads.txt").write_text("")
        out = tmp_path / where
        out.mkdir()
        cfg = survey_config(tiny_emulator.path, out)
        cfg[where]["nproc"] = 2
        run(cfg)
        pids = (tmp_path / "loads.txt").read_text().split()
        assert pids and str(os.getpid()) not in pids, where
        assert len(pids) == len(set(pids)), f"{where}.nproc=2: a worker loaded the model twice"
        assert file_bytes(out) == reference_run[2]


def test_conditions_from_an_input_catalog(tiny_emulator, tmp_path):
    """Conditions read from catalog columns (the usual survey use), one row per object."""
    rows = np.array([[21.0, 0.3], [22.5, 0.8], [24.0, 1.2], [23.0, 0.5]])
    np.savetxt(tmp_path / "cat.txt", rows, header="mag hlr")
    cfg = single_config(tiny_emulator.path)
    cfg["input"]["catalog"] = {"file_name": str(tmp_path / "cat.txt")}
    cfg["gal"]["conditions"] = {"mag": {"type": "Catalog", "col": 0},
                                "hlr": {"type": "Catalog", "col": 1}}
    cfg["gal"]["index"] = "$obj_num"
    cfg["image"] = {"type": "Tiled", "nx_tiles": 4, "ny_tiles": 1, "stamp_size": 24,
                    "pixel_scale": 0.2, "random_seed": 5}
    image = galsim.config.BuildImage(cfg)
    for k, (mag, hlr) in enumerate(rows):
        gal = VQVAEGalaxy(tiny_emulator, index=k, conditions={"mag": mag, "hlr": hlr},
                          flux=1500.)
        ref = galsim.Convolve(gal.shear(g1=0.03, g2=0.01), galsim.Kolmogorov(fwhm=0.7))
        ref = ref.drawImage(nx=24, ny=24, scale=0.2)
        stamp = image[galsim.BoundsI(1 + 24 * k, 24 * (k + 1), 1, 24)].array
        np.testing.assert_allclose(stamp, ref.array, rtol=1e-5, atol=1e-5 * ref.array.max())


def test_example_without_the_shipped_model(tmp_path):
    """examples/README.md's "Without the shipped model": the tiny model is written without
    pytest, and the survey it runs does not overwrite the shipped model's output files."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import sys, runpy; sys.modules['pytest'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    subprocess.run([sys.executable, "-c", code, str(root / "tests" / "tiny_model.py"),
                    str(tmp_path / "tiny.safetensors")], check=True, capture_output=True)
    assert galsim_vqvae.Emulator.load(tmp_path / "tiny.safetensors").stamp_size == 32
    text = (root / "examples" / "README.md").read_text()
    section = text[text.index("## Without the shipped model"):]
    command = next(line for line in section.splitlines() if line.startswith("galsim "))
    names = re.findall(r"output\.(?:truth\.)?file_name=(\S+)", command)
    assert len(names) == 2 and not {"mock_survey.fits", "mock_survey_truth.fits"} & set(names)


def test_block_size_follows_the_device(tiny_emulator):
    """Blocks fill a GPU (512 galaxies a call) and stay small on the CPU (32); a batch_size given
    is kept. (The device is only used on first generation, so no GPU is needed here.)"""
    from galsim_vqvae.config import CPU_BATCH_SIZE, GPU_BATCH_SIZE, VQVAEModel

    path = str(tiny_emulator.path)
    assert VQVAEModel(path).batch_size == CPU_BATCH_SIZE == 32
    assert VQVAEModel(path, device="cuda").batch_size == GPU_BATCH_SIZE == 512
    assert VQVAEModel(path, device="cuda:1", batch_size=64).batch_size == 64
