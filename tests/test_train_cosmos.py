"""The real-galaxy recipe, ``examples/train_cosmos.sh``, end to end with tiny models on the CPU, at
COSMOS's native 0.03"/pixel on 128 x 128 stamps: make-dataset (correlated noise model, weights),
train-vqvae and train-prior through that noise model, evaluate --real; then the bundle samples
and draws as a `VQVAEGalaxy` at that stamp size.

CI has no ``../shared``: the recipe runs there on a RealGalaxyCatalog written by GalSim in the
test (`realcat`); with ``../shared`` it also runs on the 100 real COSMOS galaxies.
"""

import json
import os
import subprocess
import sys

import galsim
import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.join(ROOT, "examples", "train_cosmos.sh")
COSMOS = os.path.join(ROOT, "..", "shared", "data", "hst", "cosmos_btk")
TINY = {"DEVICE": "cpu", "QUIET": "1", "VQ_STEPS": "6", "VQ_BATCH": "8", "AE_WARMUP": "3",
        "WARMUP": "2", "PRIOR_STEPS": "4", "PRIOR_BATCH": "8", "LOG_EVERY": "2",
        "CHECKPOINT_EVERY": "100", "EVAL_N": "4", "EVAL_SPLIT": "all",
        # zero padding: a 6-step decoder with replicate padding can decode a whole sample to a
        # constant negative pre-activation, i.e. exactly 0 after the ReLU, which evaluate refuses
        "VQ_MODEL": "--hidden 16 --embed-dim 8 --num-codes 32 --decoder-padding zeros",
        "PRIOR_MODEL": "--channels 8 --layers 2 --kernel-size 3", "OMP_NUM_THREADS": "1"}


def run_recipe(tmp_path, directory, catalog):
    run = tmp_path / "run"
    env = dict(os.environ, PY=sys.executable, COSMOS_DIR=str(directory), CATALOG=catalog,
               RUN=str(run), **TINY)
    done = subprocess.run(["bash", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "median reduced chi^2" in done.stdout
    return run


def check_run(run, n_expected):
    from galsim_vqvae import VQVAEGalaxy
    from galsim_vqvae.data.dataset import read_header
    from galsim_vqvae.emulator import Emulator

    header = read_header(run / "cosmos.h5")
    assert header["stamp_size"] == 128 and header["pixel_scale"] == pytest.approx(0.03)
    assert header["noise"] == ["noise_bank", "noise_index", "weight"]
    assert header["n"] == n_expected
    metrics = json.loads((run / "evaluation" / "metrics.json").read_text())
    assert metrics["real.n"] == 4 and metrics["real.noise_correlated"] == 1
    assert np.isfinite(metrics["real.chi2_median"]) and metrics["real.chi2_median"] > 0
    assert metrics["real.same_band"] == 1 and "real.lanusse.gini.real" in metrics
    for name in ("real.png", "real_residuals.png", "real_samples.png", "real_gini_m20.png"):
        assert (run / "evaluation" / name).stat().st_size > 0
    emulator = Emulator.load(run / "prior" / "model.safetensors")
    assert emulator.stamp_size == 128 and emulator.metadata["latent_size"] == 32
    assert emulator.condition_names == ["catalog_mag"]
    images = emulator.sample(2, {"catalog_mag": [22.0, 23.0]}, seed=3)
    assert images.shape == (2, 128, 128) and np.isfinite(images).all()
    for method in ("fast", "naive"):  # both samplers at 32 x 32 code maps
        codes = emulator.sample_codes(1, {"catalog_mag": 22.5}, seed=4, method=method)
        assert codes.shape == (1, 32, 32)
    # a VQVAEGalaxy of a 32 x 32 code map, drawn on the model's grid, is the decoded image
    gal = VQVAEGalaxy(emulator, code_map=codes[0])
    image = gal.drawImage(nx=128, ny=128, scale=0.03, method="no_pixel", use_true_center=False)
    decoded = emulator.decode(codes)[0]
    np.testing.assert_allclose(image.array, decoded, atol=1e-6 * np.abs(decoded).max())
    gal = VQVAEGalaxy(emulator, conditions={"catalog_mag": 22.5}, index=1)
    image = galsim.Convolve(gal, galsim.Gaussian(fwhm=0.1)).drawImage(nx=64, ny=64, scale=0.03)
    assert np.isfinite(image.array).all()


def test_recipe_on_a_catalog_written_by_galsim(tmp_path):
    """CI: 12 Sersic galaxies with COSMOS correlated noise in a RealGalaxyCatalog."""
    import realcat

    catalog = realcat.write_catalog(tmp_path / "catalog", n=12)
    check_run(run_recipe(tmp_path, tmp_path / "catalog", catalog), 12)


@pytest.mark.skipif(not os.path.isdir(COSMOS), reason="../shared/data/hst/cosmos_btk is absent")
def test_recipe_on_100_real_cosmos_galaxies(tmp_path):
    """The 100 real COSMOS galaxies of ../shared, the recipe's tiny settings."""
    check_run(run_recipe(tmp_path, COSMOS, "real_galaxy_catalog_26_extension_example.fits"), 100)
