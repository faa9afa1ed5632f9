"""pytest-benchmark suite: the GalSim side of galsim_vqvae.

1. Drawing cost of a `VQVAEGalaxy` once generated, against a plain `galsim.InterpolatedImage` of
   the same decoded stamp and against a GalSim bulge+disk galaxy, all through a 0.7" Kolmogorov
   PSF onto a 48x48 stamp at 0.2"/pixel, in one run (goal: VQVAEGalaxy within 1.2x of the
   InterpolatedImage). Also the per-galaxy cost of building the object from its decoded image
   and drawing it once (what the config path pays per galaxy, the network aside).
2. End-to-end galaxies/s of the config path: ``galsim.config.Process`` of a Scattered survey
   image with ``nobjects`` learned galaxies, network included.

    cd benchmarks && pytest bench_profile.py --benchmark-columns=median,iqr,rounds

The model: ``VQVAE_BENCH_MODEL`` (a path, or ``default``); by default the shipped model if it is
installed, else the tests' tiny random-weight model (say which when you quote a figure: each
benchmark's ``extra_info`` records it). ``VQVAE_BENCH_NOBJ`` (128) galaxies per config run,
``VQVAE_BENCH_BATCH`` (32) galaxies per network call, ``VQVAE_BENCH_THREADS`` (1) torch threads,
``VQVAE_BENCH_DEVICE`` (cpu) the networks' device on the config path, ``VQVAE_BENCH_NPROCS``
(1,2) the ``image.nproc`` values to run.
"""

import copy
import os
import sys
import tempfile
import time

import galsim
import numpy as np
import pytest

import galsim_vqvae  # noqa: F401  (registers the config types)
from galsim_vqvae import VQVAEGalaxy
from galsim_vqvae.profile import get_emulator

STAMP, SCALE = 48, 0.2
PSF = galsim.Kolmogorov(fwhm=0.7)


def _model_path():
    name = os.environ.get("VQVAE_BENCH_MODEL")
    if name:
        return name
    from galsim_vqvae.emulator import _DEFAULT_PATH

    if os.path.isfile(_DEFAULT_PATH):
        return "default"
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    import conftest

    path = os.path.join(tempfile.mkdtemp(prefix="bench_profile_"), "model.safetensors")
    conftest.save_tiny_emulator(path)
    return path


@pytest.fixture(scope="module")
def model():
    import torch

    torch.set_num_threads(int(os.environ.get("VQVAE_BENCH_THREADS", "1")))
    path = _model_path()
    emulator = get_emulator(path)
    md = emulator.metadata
    label = "default" if path == "default" else os.path.basename(os.path.dirname(path)) + "/" + \
        os.path.basename(path)
    return path, emulator, f"{label} ({md['stamp_size']}x{md['stamp_size']} at " \
                           f"{md['pixel_scale']}\"/pixel)"


def _conditions(emulator, n, rng):
    info = emulator.metadata["conditions"]
    names = info.get("names", [])
    lo, hi = np.asarray(info.get("min", [])), np.asarray(info.get("max", []))
    values = lo + (hi - lo) * rng.uniform(0.2, 0.8, size=(n, len(names)))
    return [dict(zip(names, map(float, v))) for v in values] if names else None


@pytest.fixture(scope="module")
def galaxies(model):
    """A generated VQVAEGalaxy, a plain InterpolatedImage of the same decoded stamp, and a
    bulge+disk galaxy of similar size and flux."""
    _, emulator, _ = model
    cond = _conditions(emulator, 1, np.random.default_rng(1))
    gal = VQVAEGalaxy(emulator, index=1, conditions=None if cond is None else cond[0],
                      flux=1000.)
    ii = galsim.InterpolatedImage(gal.image, flux=1000., use_true_center=False)
    bd = galsim.Add(galsim.DeVaucouleurs(half_light_radius=0.25, flux=300.),
                    galsim.Exponential(half_light_radius=0.5, flux=700.).shear(e1=0.3, e2=0.1))
    return {"VQVAEGalaxy": gal, "InterpolatedImage": ii, "bulge+disk": bd}  # hlr 0.25", 0.5"


@pytest.mark.parametrize("kind", ["VQVAEGalaxy", "InterpolatedImage", "bulge+disk"])
def test_draw(benchmark, galaxies, model, kind):
    prof = galaxies[kind]
    image = galsim.Image(STAMP, STAMP, scale=SCALE)
    benchmark.group = f"draw {STAMP}x{STAMP} at {SCALE}\"/pixel through a 0.7\" Kolmogorov PSF"
    benchmark.extra_info.update(model=model[2], kind=kind)

    def draw():
        galsim.Convolve(prof, PSF).drawImage(image=image)

    draw()  # warm caches (the k-space tables), as in a simulation drawing many stamps
    benchmark.pedantic(draw, rounds=200, iterations=1, warmup_rounds=5)


@pytest.mark.parametrize("kind", ["VQVAEGalaxy", "InterpolatedImage"])
def test_build_and_draw(benchmark, galaxies, model, kind):
    """What one galaxy costs once its image is decoded: build the object, draw it once."""
    gal = galaxies["VQVAEGalaxy"]
    array = gal.image.array
    info = galsim_vqvae.profile._model_info(model[1])
    image = galsim.Image(STAMP, STAMP, scale=SCALE)
    benchmark.group = "build from the decoded image + draw once"
    benchmark.extra_info.update(model=model[2], kind=kind)
    if kind == "VQVAEGalaxy":
        def build():
            return VQVAEGalaxy._from_generated(array, info, seed=1, flux=1000.)
    else:
        def build():
            return galsim.InterpolatedImage(galsim.Image(array, scale=gal.pixel_scale),
                                            flux=1000., use_true_center=False)

    def run():
        galsim.Convolve(build(), PSF).drawImage(image=image)

    benchmark.pedantic(run, rounds=50, iterations=1, warmup_rounds=2)


def survey_config(model_path, out_dir, nobjects, nproc, metadata=None):
    """The config of a mock survey image of ``nobjects`` learned galaxies; with the model's
    ``metadata``, conditions drawn over the middle 60% of each label's training range."""
    config = {
        "modules": ["galsim_vqvae"],
        "input": {"vqvae_model": {"file_name": model_path,
                                  "device": os.environ.get("VQVAE_BENCH_DEVICE", "cpu"),
                                  "batch_size": int(os.environ.get("VQVAE_BENCH_BATCH", "32"))}},
        "psf": {"type": "Kolmogorov", "fwhm": 0.7},
        "gal": {"type": "VQVAEGalaxy", "flux": {"type": "Random", "min": 300, "max": 3000},
                "rotate": {"type": "Random"}},
        "image": {"type": "Scattered", "size": 400, "pixel_scale": SCALE,
                  "nobjects": nobjects, "random_seed": 8, "nproc": nproc,
                  "noise": {"type": "CCD", "sky_level": 200, "gain": 1, "read_noise": 5}},
        "output": {"dir": out_dir, "file_name": "bench.fits", "nproc": 1},
    }
    cond = (metadata or {}).get("conditions", {})
    if cond.get("names"):
        config["gal"]["conditions"] = {
            k: {"type": "Random", "min": a + 0.2 * (b - a), "max": a + 0.8 * (b - a)}
            for k, a, b in zip(cond["names"], cond["min"], cond["max"])}
    return config


@pytest.mark.parametrize(
    "nproc", [int(n) for n in os.environ.get("VQVAE_BENCH_NPROCS", "1,2").split(",")])
def test_config_galaxies_per_second(benchmark, model, nproc, tmp_path):
    path, emulator, label = model
    nobjects = int(os.environ.get("VQVAE_BENCH_NOBJ", "128"))
    config = survey_config(path, str(tmp_path), nobjects, nproc, emulator.metadata)
    benchmark.group = f"config path, {nobjects} galaxies (galaxies/s = {nobjects} / time)"
    times = []

    def run():
        t0 = time.perf_counter()
        galsim.config.Process(copy.deepcopy(config), except_abort=True)
        times.append(time.perf_counter() - t0)

    benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=0)
    rate = nobjects / min(times)
    benchmark.extra_info.update(model=label, nobjects=nobjects, image_nproc=nproc,
                                galaxies_per_second=round(rate, 2))
    device = config["input"]["vqvae_model"]["device"]
    benchmark.extra_info["device"] = device
    print(f"\nconfig path: {rate:.1f} galaxies/s (nproc={nproc}, {device}, {label})")
