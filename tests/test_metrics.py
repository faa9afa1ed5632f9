"""Morphology statistics against GalSim's own measurements on fresh random profiles."""

import galsim
import numpy as np
import pytest

from galsim_vqvae.metrics import (clumpiness, conditioning_accuracy, half_light_radius,
                                  magnitude)


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


@pytest.mark.parametrize("radius, width", [(12.0, 3), (20.0, 5)])
def test_clumpiness_known_values(radius, width):
    """A broad smooth galaxy has S ~ 0; unresolved knots inside the annulus add their flux times
    1 - 1/w^2 (a w x w boxcar keeps 1/w^2 of a point at its pixel)."""
    rng = np.random.default_rng()
    s = 96
    y, x = np.mgrid[:s, :s] - s // 2
    smooth = rng.uniform(50, 200) * np.exp(-0.5 * (x ** 2 + y ** 2) / 15.0 ** 2)
    s_smooth = clumpiness(smooth, radius)[0]
    assert 0 <= s_smooth < 0.005
    knots = np.zeros_like(smooth)
    # pairs of knots facing each other keep the centroid (the annulus' centre) in place
    n = int(rng.integers(2, 5))
    angles = rng.permutation(6)[:n] * (2 * np.pi / 12)  # >= 30 degrees apart: no overlaps
    angles = np.concatenate([angles, angles + np.pi])
    r = np.tile(rng.uniform(0.4, 1.3, size=n) * radius, 2)
    f = np.tile(rng.uniform(0.01, 0.05, size=n) * smooth.sum(), 2)
    for ang, rad, flux in zip(angles, r, f):
        knots[s // 2 + int(round(rad * np.sin(ang))), s // 2 + int(round(rad * np.cos(ang)))] \
            += flux
    expected = (f.sum() * (1 - 1 / width ** 2) + s_smooth * smooth.sum()) / (smooth.sum()
                                                                             + f.sum())
    measured = clumpiness(smooth + knots, radius)[0]
    assert measured == pytest.approx(expected, abs=0.004)
    assert measured > 3 * s_smooth + 0.02
    # knots outside the annulus (beyond 1.5 r_p) do not count
    outside = np.zeros_like(smooth)
    outside[s // 2, s // 2 + int(1.7 * radius)] = outside[s // 2, s // 2 - int(1.7 * radius)] = \
        f.sum() / 2
    assert clumpiness(smooth + outside, radius)[0] < 0.006
    # the Petrosian radius measured when not given; NaN for an empty image
    assert np.isfinite(clumpiness(smooth + knots)[0])
    assert np.isnan(clumpiness(np.zeros((s, s)))[0])


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


class KnownGalaxies:
    """A stand-in for an `Emulator` whose samples carry a known conditioning error: GalSim
    exponential profiles of magnitude ``mag + MAG_OFFSET`` and half-light radius ``hlr *
    (1 + HLR_BIAS) * (1 + HLR_SCATTER * N(0, 1))``. What `conditioning_accuracy` reports must be
    these numbers, signs included."""

    MAG_OFFSET, HLR_BIAS, HLR_SCATTER = 0.2, -0.1, 0.05
    metadata = {"zeropoint": 25.0, "pixel_scale": 0.06,
                "conditions": {"names": ["mag", "hlr"], "mean": [22.0, 0.35], "std": [0.8, 0.1],
                               "min": [20.0, 0.2], "max": [24.0, 0.5]}}

    def sample(self, n, conditions, seed=None):
        rng = np.random.default_rng(seed + 1000)
        meta = self.metadata
        factor = (1 + self.HLR_BIAS) * (1 + self.HLR_SCATTER * rng.standard_normal(n))
        images = []
        for mag, hlr, f in zip(conditions["mag"], conditions["hlr"], factor):
            flux = 10 ** (-0.4 * (mag + self.MAG_OFFSET - meta["zeropoint"]))
            gal = galsim.Exponential(half_light_radius=hlr * f, flux=flux)
            images.append(gal.drawImage(nx=96, ny=96, scale=meta["pixel_scale"],
                                        method="no_pixel").array)
        return np.array(images)


def test_conditioning_accuracy_measures_a_known_bias():
    result = conditioning_accuracy(KnownGalaxies(), n=40, seed=3)
    assert result["mag_bias"] == pytest.approx(KnownGalaxies.MAG_OFFSET, abs=0.005)
    assert result["mag_scatter"] < 0.005
    np.testing.assert_allclose(result["mag_measured"] - result["mag_requested"], 0.2, atol=0.005)
    assert result["hlr_rel_bias"] == pytest.approx(KnownGalaxies.HLR_BIAS, abs=0.02)
    assert result["hlr_rel_scatter"] == pytest.approx(KnownGalaxies.HLR_SCATTER, abs=0.02)
    assert (result["hlr_measured"] < result["hlr_requested"]).mean() > 0.9
