"""The galsim-vqvae command: outputs, one-line errors, exit codes, nothing half-written."""

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from galsim_vqvae.cli import EXIT_BAD_INPUT, build_parser, main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_sample_writes_images_codes_and_conditions(tiny_emulator, tmp_path, capsys):
    out = tmp_path / "samples.fits"
    code, stdout, _ = run(capsys, "sample", "--model", tiny_emulator.path, "--n", 3, "--seed", 4,
                          "--conditions", "mag=22.5,hlr=0.4", "--out", out, "--quiet")
    assert code == 0 and "wrote 3 galaxies" in stdout
    with fits.open(out) as hdus:
        images = hdus[0].data
        codes = hdus["CODES"].data
        table = hdus["CONDITIONS"].data
        assert hdus[0].header["PIXSCALE"] == pytest.approx(tiny_emulator.metadata["pixel_scale"])
    expected = tiny_emulator.sample(3, {"mag": 22.5, "hlr": 0.4}, seed=4)
    np.testing.assert_array_equal(images, expected)
    np.testing.assert_array_equal(tiny_emulator.decode(codes), expected)
    np.testing.assert_array_equal(table["mag"], [22.5] * 3)


def test_sample_records_its_provenance(tiny_emulator, tmp_path, capsys):
    """The header names the model (file name and sha256 of the bundle), the package version and
    the seed actually used: without --seed, a drawn one, which makes the same file again."""
    import hashlib

    import galsim_vqvae

    first, again = tmp_path / "a.fits", tmp_path / "b.fits"
    argv = ["sample", "--model", tiny_emulator.path, "--n", 2, "--conditions", "mag=22,hlr=0.4",
            "--quiet"]
    assert run(capsys, *argv, "--out", first)[0] == 0
    header = fits.getheader(first)
    assert header["MODEL"] == Path(tiny_emulator.path).name
    assert header["MODELSHA"] == hashlib.sha256(Path(tiny_emulator.path).read_bytes()).hexdigest()
    assert header["VQVAEVER"] == galsim_vqvae.__version__
    assert header["SEED"] >= 0
    assert run(capsys, *argv, "--seed", header["SEED"], "--out", again)[0] == 0
    np.testing.assert_array_equal(fits.getdata(first), fits.getdata(again))


@pytest.mark.parametrize("argv, message", [
    (["--conditions", "mag=40,hlr=0.4"], "'mag' = 40 is outside the training range"),
    (["--conditions", "mag=22,size=0.4"], "unknown label(s) ['size']"),
    (["--device", "cuda:7"], "cuda"),
])
def test_sample_bad_input_is_one_line_and_writes_nothing(tiny_emulator, tmp_path, capsys, argv,
                                                         message):
    out = tmp_path / "samples.fits"
    code, stdout, err = run(capsys, "sample", "--model", tiny_emulator.path, "--n", 2,
                            "--out", out, "--quiet", *argv)
    assert code == EXIT_BAD_INPUT
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_missing_model_and_bad_counts(tmp_path, capsys):
    code, _, err = run(capsys, "sample", "--model", tmp_path / "none.safetensors", "--n", 1,
                       "--out", tmp_path / "x.fits")
    assert code == EXIT_BAD_INPUT and "model file not found" in err
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--n", "0", "--out", str(tmp_path / "x.fits")])
    assert exc.value.code == 2
    assert "expected a positive integer, got 0" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="model file not found"):
        main(["--debug", "sample", "--model", str(tmp_path / "none"), "--n", "1",
              "--out", str(tmp_path / "x.fits")])


def test_every_option_has_help():
    """Every option of every subcommand says what it is in ``--help``."""
    import argparse

    missing, seen = [], 0

    def walk(parser, where):
        nonlocal seen
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{where} {name}")
            elif action.option_strings and action.help is not argparse.SUPPRESS:
                seen += 1
                if not (action.help or "").strip():
                    missing.append(f"{where} {action.option_strings[0]}")

    walk(build_parser(), "galsim-vqvae")
    assert seen > 60 and not missing, missing


def test_a_bug_keeps_its_traceback(monkeypatch, capsys):
    """A bare ValueError inside a command is a bug, not bad input: exit 1, 'internal error', and
    the traceback with --debug (bad input raises the package's error classes: exit 2)."""
    import galsim_vqvae.cli as cli
    from galsim_vqvae.errors import VQVAEInputError

    def broken(args):
        raise ValueError("zero-size array to reduction operation")

    monkeypatch.setattr(cli, "cmd_bench", broken)
    code, _, err = run(capsys, "bench")
    assert code == 1 and "internal error" in err and "ValueError" in err
    with pytest.raises(ValueError, match="zero-size array"):
        main(["--debug", "bench"])

    def bad_input(args):
        raise VQVAEInputError("--repeats: no")

    monkeypatch.setattr(cli, "cmd_bench", bad_input)
    code, _, err = run(capsys, "bench")
    assert code == EXIT_BAD_INPUT and err.strip() == "galsim-vqvae bench: error: --repeats: no"


def test_network_input_errors_are_the_packages():
    """The networks' checks of their arguments raise VQVAEInputError (bad input), not a bare
    ValueError (which the command treats as a bug)."""
    import torch

    from galsim_vqvae.errors import VQVAEInputError
    from galsim_vqvae.nn.forward import convolve_psf
    from galsim_vqvae.nn.quantizer import VectorQuantizer
    from galsim_vqvae.nn.vqvae import VQVAE

    image = torch.rand(2, 1, 16, 16)
    for bad in (lambda: VQVAE(stamp_size=30), lambda: VQVAE(stamp_size=16, hidden=3),
                lambda: VectorQuantizer(num_codes=1, embed_dim=4),
                lambda: convolve_psf(image), lambda: convolve_psf(image, torch.rand(2, 1, 8, 8)),
                lambda: VQVAE(stamp_size=16, hidden=8, num_codes=8).encode(torch.rand(1, 1, 12, 12))):
        with pytest.raises(VQVAEInputError):
            bad()


def test_reconstruct_round_trip(tiny_emulator, tmp_path, capsys):
    s = tiny_emulator.stamp_size
    rng = np.random.default_rng(3)
    observed = rng.normal(0, 0.05, (2, s, s)).astype(np.float32) + tiny_emulator.sample(
        2, {"mag": 22.0, "hlr": 0.4}, seed=1)
    fits.writeto(tmp_path / "obs.fits", observed)
    fits.writeto(tmp_path / "psf.fits", tiny_emulator.psf_image)
    code, stdout, err = run(capsys, "reconstruct", "--model", tiny_emulator.path,
                            "--input", tmp_path / "obs.fits", "--psf", tmp_path / "psf.fits",
                            "--sigma", 0.05, "--out", tmp_path / "rec.fits")
    assert code == 0, err
    with fits.open(tmp_path / "rec.fits") as hdus:
        np.testing.assert_allclose(hdus[0].data, tiny_emulator.reconstruct(
            observed, tiny_emulator.psf_image, 0.05)[0], rtol=1e-6)
        assert len(hdus["FIT"].data["reduced_chi2"]) == 2
    bad = tmp_path / "nan.fits"
    fits.writeto(bad, np.full((s, s), np.nan, np.float32))
    code, _, err = run(capsys, "reconstruct", "--model", tiny_emulator.path, "--input", bad,
                       "--psf", tmp_path / "psf.fits", "--sigma", 0.05,
                       "--out", tmp_path / "rec2.fits")
    assert code == EXIT_BAD_INPUT and "NaN" in err and str(bad) in err
    assert not (tmp_path / "rec2.fits").exists()


def test_gallery_png(tiny_emulator, tmp_path, capsys):
    """A grid about as wide as tall (16 galaxies: 4 x 4), each panel over 100 pixels wide."""
    out = tmp_path / "gallery.png"
    code, stdout, err = run(capsys, "gallery", "--model", tiny_emulator.path, "--n", 16,
                            "--out", out, "--quiet")
    assert code == 0, err
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert 0.7 < width / height < 1.4, (width, height)
    assert width > 4 * 100, width


def test_bench_prints_a_ratio(capsys):
    code, stdout, _ = run(capsys, "bench", "--repeats", 2)
    assert code == 0 and "speed-up" in stdout and stdout.count("x\n") >= 1


_AEGIS = Path(__file__).resolve().parents[2] / "shared" / "data" / "hst" / "aegis"


def test_make_dataset_synthetic_population(tmp_path, capsys):
    """--population reaches the stamps (the same seed, other galaxies) and the file's header."""
    from galsim_vqvae.data import synthetic as sy
    from galsim_vqvae.data.dataset import load_arrays, read_header

    truth = {}
    for population in (None, "2026-11"):
        out = tmp_path / f"{population}.h5"
        more = ["--population", population] if population else []
        code, _, err = run(capsys, "make-dataset", "--source", "synthetic", "--n", 2, "--n-psf", 1,
                           "--workers", 1, "--seed", 3, "--out", out, "--quiet", *more)
        assert code == 0, err
        assert read_header(out)["population"] == (population or sy.DEFAULT_POPULATION)
        truth[population] = load_arrays(out, keys=["truth"])["truth"]
    assert not np.array_equal(truth[None], truth["2026-11"])


@pytest.mark.skipif(not _AEGIS.is_dir(), reason=f"no shared HST data at {_AEGIS}")
def test_make_dataset_cosmos_band_and_zeropoint(tmp_path, capsys):
    from galsim_vqvae.data.dataset import load_arrays, read_header

    aegis = _AEGIS
    outs = {}
    for zp in (25.0, 26.5):
        out = tmp_path / f"aegis{zp}.h5"
        code, _, err = run(capsys, "make-dataset", "--source", "cosmos", "--catalog",
                           "AEGIS_F606w_catalog.fits", "--dir", aegis, "--band", "F606W",
                           "--zeropoint", zp, "--max-galaxies", 3, "--out", out, "--quiet")
        assert code == 0, err
        header = read_header(out)
        assert header["band"] == "F606W" and header["zeropoint"] == zp
        outs[zp] = load_arrays(out, keys=["params"])["params/mag"]
    np.testing.assert_allclose(outs[26.5] - outs[25.0], 1.5, atol=1e-4)


@pytest.mark.usefixtures("one_thread")
def test_training_flags_reach_the_checkpoints(tmp_path, capsys):
    """--truth-weight, --augment (train-vqvae) and --dropout, --ema, --class-label (train-prior)
    are recorded in the checkpoints (their defaults: tests/test_train_vqvae.py and
    tests/test_train_prior.py)."""
    import json

    import h5py

    from galsim_vqvae.data.dataset import DatasetWriter
    from galsim_vqvae.train.checkpoint import load_checkpoint

    rng = np.random.default_rng(2)
    n, s = 40, 16
    y, x = np.mgrid[:s, :s] - s // 2
    size = rng.uniform(1.0, 2.0, n)
    truth = np.exp(-(x ** 2 + y ** 2) / (2 * size[:, None, None] ** 2)) * 50
    psf = np.exp(-(x ** 2 + y ** 2) / 2.0)
    data = tmp_path / "d.h5"
    with DatasetWriter(data, stamp_size=s, pixel_scale=0.1, band="b", zeropoint=25.0,
                       source="synthetic") as w:
        w.add_psfs(psf / psf.sum())
        w.append(observed=truth + rng.normal(0, 1, truth.shape), sigma=np.ones(n),
                 psf_index=np.zeros(n, np.int32), truth=truth,
                 params={"mag": rng.uniform(20, 24, n), "hlr": size / 10,
                         "morph_class": np.arange(n) % 2})
    with h5py.File(data, "a") as f:
        f.attrs["class_names"] = json.dumps(["disk", "bulge"])
    tiny = ["--hidden", "8", "--embed-dim", "4", "--num-codes", "8", "--steps", "2",
            "--batch-size", "8", "--ae-warmup", "1", "--quiet"]
    code, _, err = run(capsys, "train-vqvae", "--data", data, "--out", tmp_path / "vq", *tiny,
                       "--truth-weight", "0.25", "--augment")
    assert code == 0, err
    state = load_checkpoint(tmp_path / "vq" / "checkpoint.pt")
    assert state["train"]["truth_weight"] == 0.25 and state["train"]["augment"] is True
    assert len(state["history"]["truth_chi2"]) == 1
    prior = ["train-prior", "--data", data, "--vqvae", tmp_path / "vq", "--steps", "2",
             "--batch-size", "8", "--channels", "4", "--layers", "2", "--kernel-size", "3",
             "--quiet"]
    code, _, err = run(capsys, *prior, "--out", tmp_path / "p", "--dropout", "0.1",
                       "--ema", "0.95", "--class-label", "morph_class")
    assert code == 0, err
    state = load_checkpoint(tmp_path / "p" / "checkpoint.pt")
    assert state["config"]["dropout"] == 0.1 and state["config"]["num_classes"] == 2
    assert state["train"]["ema"] == 0.95 and state["train"]["class_label"] == "morph_class"
    assert state["classes"] == {"label": "morph_class", "names": ["disk", "bulge"]}


def test_steps_below_ae_warmup_warns(tmp_path, capsys):
    """--steps not above --ae-warmup never uses the codebook: the run says so (perplexity 0)."""
    from test_errors import TINY_VQVAE, write_dataset

    data = write_dataset(str(tmp_path / "d.h5"))
    args = ["train-vqvae", "--data", data, "--steps", 2, *TINY_VQVAE]
    code, out, err = run(capsys, *args, "--ae-warmup", 2, "--out", tmp_path / "a")
    assert code == 0 and "perplexity 0," in out
    assert "warning: --steps 2 is not above --ae-warmup 2" in err and "never used" in err
    code, out, err = run(capsys, *args, "--ae-warmup", 1, "--out", tmp_path / "b")
    assert code == 0 and "warning" not in err and "perplexity 0," not in out


def test_drawing_needs_no_extra(tiny_emulator, tmp_path):
    """Without matplotlib, h5py and scikit-image (the extras), galaxies are drawn (Python, the
    GalSim config path, sample); commands that need one name the extra to install; and
    setup.py does not force them on every user."""
    import ast
    import subprocess
    import sys

    code = f"""
import sys
for name in ("matplotlib", "h5py", "skimage"):
    sys.modules[name] = None  # as if not installed
import galsim, galsim_vqvae
from galsim_vqvae.cli import main
model = {str(tiny_emulator.path)!r}
out = {str(tmp_path)!r}
galsim_vqvae.Emulator.load(model).sample(1, {{"mag": 22.0, "hlr": 0.4}}, seed=1)
config = galsim.config.ReadConfig({str(Path(__file__).parents[1] / "examples" / "mock_survey.yaml")!r})[0]
galsim.config.Process(config, except_abort=True, new_params={{
    "input.vqvae_model.file_name": model, "image.nobjects": 2, "image.size": 64,
    "image.nproc": 1, "output.dir": out}})
assert main(["sample", "--model", model, "--n", "1", "--conditions", "mag=22,hlr=0.4",
             "--out", out + "/s.fits", "--quiet"]) == 0
assert main(["gallery", "--model", model, "--out", out + "/g.png", "--quiet"]) == 2
assert main(["make-dataset", "--source", "synthetic", "--n", "2", "--out", out + "/d.h5",
             "--quiet"]) == 2
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert 'matplotlib is not installed' in proc.stderr
    assert 'pip install "galsim_vqvae[plots]"' in proc.stderr
    assert 'pip install "galsim_vqvae[train]"' in proc.stderr
    assert {p.name for p in tmp_path.iterdir()} == {"mock_survey.fits", "mock_survey_truth.fits",
                                                    "s.fits"}
    setup = ast.parse((Path(__file__).parents[1] / "setup.py").read_text())
    call = next(n for n in ast.walk(setup) if isinstance(n, ast.Call)
                and getattr(n.func, "id", "") == "setup")
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords
              if k.arg in ("install_requires", "extras_require")}
    assert not {"matplotlib", "h5py", "scikit-image"} & set(kwargs["install_requires"])
    assert {"h5py", "matplotlib", "scikit-image"} <= set(kwargs["extras_require"]["test"])
