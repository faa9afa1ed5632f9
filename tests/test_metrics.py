"""Morphology statistics against GalSim's own measurements on fresh random profiles."""

import galsim
import numpy as np
import pytest

from galsim_vqvae.metrics import conditioning_accuracy, half_light_radius, magnitude


def test_half_light_radius_matches_galsim():
    rng = np.random.default_rng(12)
    scale = 0.06
    for _ in range(5):
        hlr = rng.uniform(0.2, 0.8)
        n = rng.uniform(0.6, 2.0)
        gal = galsim.Sersic(n=n, half_light_radius=hlr, flux=rng.uniform(10, 1000)).shift(
            rng.uniform(-0.1, 0.1), rng.uniform(-0.1, 0.1))
        image = gal.drawImage(nx=192, ny=192, scale=scale, method="no_pixel").array
        measured = half_light_radius(image, scale)[0]
        assert measured == pytest.approx(hlr, rel=0.03)


def test_magnitude():
    images = np.full((2, 10, 10), 0.01)
    images[1] *= 10
    np.testing.assert_allclose(magnitude(images, 25.0), [25.0, 22.5])
    assert np.isnan(magnitude(np.zeros((1, 4, 4)), 25.0)[0])


def test_conditioning_accuracy_reports_bias_and_scatter(tiny_emulator):
    result = conditioning_accuracy(tiny_emulator, n=6, seed=2)
    for key in ("mag_bias", "mag_scatter", "hlr_rel_bias", "hlr_rel_scatter"):
        assert np.isfinite(result[key])
    info = tiny_emulator.metadata["conditions"]
    assert (result["mag_requested"] >= info["min"][0]).all()
    assert (result["mag_requested"] <= info["max"][0]).all()
