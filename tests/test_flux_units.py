"""`Emulator.encode` and `reconstruct` do not depend on the flux unit of the stamps."""

from pathlib import Path

import numpy as np
import pytest

from galsim_vqvae.emulator import Emulator

pytestmark = pytest.mark.usefixtures("one_thread")

COSMOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "hst" / "cosmos_single"


def relative_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.skipif(not COSMOS.is_dir(), reason=f"no shared HST data at {COSMOS}")
def test_reconstruct_of_a_real_stamp_over_six_decades():
    """A real COSMOS galaxy with its noise, resampled to the default model's grid, in units
    1e-3 and 1e3 times its own: the reconstructions agree to < 1e-3 (relative L2) once scaled
    back, as do the codes and the reduced chi^2. Measured on 2026-12-07 with the 2026-11-24
    default model: 4.6e-8 and 4.5e-8; without the normalisation 280% and 98.5%."""
    from galsim_vqvae.data.fits import image_scale, model_psf, model_stamp, read_image

    emu = Emulator.load("default")
    size, scale = emu.stamp_size, emu.metadata["pixel_scale"]
    data, header = read_image(COSMOS / "147246.0_150.416558_1.998697_masknoise.fits")
    stamp, sigma = model_stamp(data, image_scale(header, 0.03, "image"), size, scale, index=0)
    psf_data, psf_header = read_image(COSMOS / "147246.0_150.416558_1.998697.psf.fits")
    psf = model_psf(psf_data, image_scale(psf_header, 0.03, "psf"), size, scale, "psf")
    stamp = np.asarray(stamp, np.float32)
    ref, chi = emu.reconstruct(stamp, psf, sigma)
    codes = emu.encode(stamp)  # sigma estimated from the stamp's frame
    for k in (1e-3, 1e3):
        scaled = (stamp * np.float32(k)).astype(np.float32)
        out, chi_k = emu.reconstruct(scaled, psf, sigma * k)
        assert relative_l2(out / k, ref) < 1e-3
        np.testing.assert_allclose(chi_k, chi, rtol=1e-3)
        np.testing.assert_array_equal(emu.encode(scaled), codes)


def test_input_scale_is_homogeneous(tiny_emulator):
    """The factor of a stamp k times brighter is 1/k times as large, whether the noise is given
    or estimated, and noiseless stamps fall back to the brightest pixel."""
    rng = np.random.default_rng(3)
    s = tiny_emulator.stamp_size
    y, x = np.mgrid[:s, :s] - s // 2
    blob = 5.0 * np.exp(-(x ** 2 + y ** 2) / 8.0)
    stamps = np.stack([blob + rng.normal(0, 0.2, (s, s)), blob])
    f = tiny_emulator.input_scale(stamps)
    np.testing.assert_allclose(f[1], tiny_emulator.vqvae.image_scale / 5.0)
    for k in (1e-3, 1e3):
        np.testing.assert_allclose(tiny_emulator.input_scale(stamps * k), f / k, rtol=1e-12)
    meta = dict(tiny_emulator.metadata, noise_sigma_median=0.05)
    emu = Emulator(tiny_emulator.vqvae, tiny_emulator.prior, meta, tiny_emulator.psf_image,
                   label_table=tiny_emulator.label_table)
    f = emu.input_scale(stamps)
    assert abs(f[0] * 0.2 / 0.05 - 1) < 0.15  # the frame's MAD finds the noise sigma
    np.testing.assert_allclose(emu.input_scale(stamps, [0.2, 0.0]),
                               [0.05 / 0.2, tiny_emulator.vqvae.image_scale / 5.0])
    for k in (1e-3, 1e3):
        np.testing.assert_allclose(emu.input_scale(stamps * k), f / k, rtol=1e-12)
