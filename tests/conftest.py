"""Shared test fixtures."""

from pathlib import Path

import numpy as np
import pytest
import torch

SHARED_HST = Path(__file__).resolve().parents[2] / "shared" / "data" / "hst"


def build_tiny_emulator(stamp_size=32, seed=0, cond=True):
    """A small random-weight Emulator (not trained): fast enough for unit tests.

    Its prior is conditioned on ``mag`` and ``hlr`` (unless ``cond=False``); its training PSF is a
    small Gaussian; its metadata describe an F160W-like model at 0.06"/pixel.
    """
    from galsim_vqvae.emulator import Emulator
    from galsim_vqvae.nn.pixelcnn import GatedPixelCNN
    from galsim_vqvae.nn.vqvae import VQVAE

    torch.manual_seed(seed)
    vqvae = VQVAE(stamp_size=stamp_size, hidden=16, res_blocks=1, res_hidden=8, embed_dim=8,
                  num_codes=16, image_scale=2.0)
    prior = GatedPixelCNN(num_codes=16, channels=8, layers=2, kernel_size=3,
                          cond_dim=2 if cond else 0)
    y, x = np.mgrid[:stamp_size, :stamp_size] - stamp_size // 2
    psf = np.exp(-(x ** 2 + y ** 2) / (2 * 1.2 ** 2))
    psf /= psf.sum()
    names = ["mag", "hlr"] if cond else []
    conditions = {"names": names, "mean": [22.5, 0.4][:len(names)], "std": [1.2, 0.2][:len(names)],
                  "min": [18.0, 0.05][:len(names)], "max": [26.0, 2.0][:len(names)]}
    metadata = dict(format_version=1, pixel_scale=0.06, stamp_size=stamp_size,
                    latent_size=stamp_size // 4, num_codes=16, embed_dim=8, band="F160W",
                    zeropoint=25.94, image_scale=2.0,
                    flux_convention="pixel value = flux in the pixel (counts/s); "
                                    "stamp sum = total flux",
                    psf_fwhm=2.355 * 1.2 * 0.06, conditions=conditions,
                    vqvae_config=vqvae.config, prior_config=prior.config,
                    training_data={"source": "none: random weights for tests"})
    return Emulator(vqvae, prior, metadata, psf)


@pytest.fixture(scope="session")
def tiny_emulator(tmp_path_factory):
    """A tiny random-weight conditional Emulator, saved and loaded back; ``.path`` is its file."""
    from galsim_vqvae.emulator import Emulator

    path = tmp_path_factory.mktemp("tiny_model") / "model.safetensors"
    build_tiny_emulator().save(path)
    return Emulator.load(path)
