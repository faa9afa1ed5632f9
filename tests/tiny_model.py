"""The tests' tiny random-weight model (the `tiny_emulator` fixture of conftest.py), also usable
without pytest, e.g. to try the examples without the shipped model::

    python tests/tiny_model.py tiny.safetensors

Its weights are random (seeded), so its "galaxies" are smooth blobs, not realistic ones.
"""

import os
import sys

import numpy as np


def save_tiny_emulator(path):
    """Build the `tiny_emulator` and save it to ``path``."""
    import galsim
    import torch

    from galsim_vqvae.emulator import Emulator, psf_fwhm
    from galsim_vqvae.nn.pixelcnn import GatedPixelCNN
    from galsim_vqvae.nn.vqvae import VQVAE

    stamp, scale, codes = 32, 0.03, 32
    with torch.random.fork_rng(devices=[]):  # seeded weights, the global RNG left untouched
        torch.manual_seed(1234)
        vqvae = VQVAE(stamp_size=stamp, hidden=16, res_blocks=1, res_hidden=8, embed_dim=8,
                      num_codes=codes, image_scale=0.05)
        # Spread the codebook so that different codes decode to visibly different images.
        with torch.no_grad():
            vqvae.quantizer.codebook.mul_(3.0)
        prior = GatedPixelCNN(num_codes=codes, channels=16, layers=3, kernel_size=3,
                              cond_dim=2)
    psf = galsim.Gaussian(fwhm=0.12).drawImage(nx=stamp, ny=stamp, scale=scale,
                                               use_true_center=False).array
    psf = (psf / psf.sum()).astype(np.float32)
    metadata = {
        "format_version": 1, "pixel_scale": scale, "stamp_size": stamp,
        "latent_size": stamp // 4, "num_codes": codes, "embed_dim": 8, "band": "F814W",
        "zeropoint": 25.94,
        "flux_convention": "pixel value = flux in the pixel (counts/s); stamp sum = total flux",
        "image_scale": 0.05, "psf_fwhm": psf_fwhm(psf, scale),
        "conditions": {"names": ["mag", "hlr"], "mean": [23.0, 0.5], "std": [1.0, 0.2],
                       "min": [20.0, 0.1], "max": [25.5, 1.5]},
        "vqvae_config": vqvae.config, "prior_config": prior.config,
        "training_data": {"source": "random weights (test fixture)"},
    }
    Emulator(vqvae, prior, metadata, psf, label_table=tiny_label_table()).save(path)


def tiny_label_table(n=500, seed=5):
    """A table of (mag, hlr) training labels for the `tiny_emulator`: mag normal(23, 1), hlr
    falling with mag (larger galaxies are brighter, as in the synthetic population), both
    clipped to the fixture's training ranges."""
    rng = np.random.default_rng(seed)
    mag = np.clip(rng.normal(23.0, 1.0, n), 20.0, 25.5)
    hlr = np.clip(0.5 - 0.15 * (mag - 23.0) + rng.normal(0.0, 0.05, n), 0.1, 1.5)
    return np.stack([mag, hlr], axis=1).astype(np.float32)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tiny_model.py OUT.safetensors")
    os.makedirs(os.path.dirname(os.path.abspath(sys.argv[1])), exist_ok=True)
    save_tiny_emulator(sys.argv[1])
    print(f"wrote the tiny random-weight model to {sys.argv[1]}")
