"""Corner noise estimator: unbiased on pure noise and beside a galaxy, robust to outliers."""

import galsim
import numpy as np
import pytest

from galsim_vqvae.data.noise import corner_pixels, estimate_sigma
from galsim_vqvae.errors import VQVAEInputError


def _galaxy(rng, size=84, scale=0.06):
    gal = galsim.Add([galsim.Sersic(4, half_light_radius=rng.uniform(0.1, 0.3), flux=0.4),
                      galsim.Exponential(half_light_radius=rng.uniform(0.3, 0.7), flux=0.6)
                      .shear(q=rng.uniform(0.3, 1), beta=rng.uniform(0, 3) * galsim.radians)])
    psf = galsim.Gaussian(fwhm=0.15)
    flux = 10 ** rng.uniform(2, 4)  # flux / sigma: S/N from ~10 to ~1000
    return galsim.Convolve(gal.withFlux(flux), psf).drawImage(nx=size, ny=size, scale=scale).array


@pytest.mark.parametrize("sigma", [0.003, 0.05, 2.0])
@pytest.mark.parametrize("with_galaxy", [False, True])
def test_recovers_sigma(sigma, with_galaxy):
    rng = np.random.default_rng()  # fresh draws each run
    estimates = []
    for _ in range(40):
        stamp = rng.normal(0, sigma, (84, 84)) + rng.normal(0, 5 * sigma)  # unknown background
        if with_galaxy:
            stamp += _galaxy(rng) * sigma
        estimates.append(estimate_sigma(stamp))
    ratio = np.array(estimates) / sigma
    # the mean over 40 stamps within 3% (statistical error ~0.3%) and every stamp within the
    # statistical scatter of 1764 corner pixels (~1.8% per stamp; 5 sigma)
    assert abs(ratio.mean() - 1) < 0.03, ratio.mean()
    assert np.all(np.abs(ratio - 1) < 0.09), ratio


def test_ignores_outliers_and_non_finite():
    rng = np.random.default_rng()
    stamp = rng.normal(0, 1.0, (84, 84))
    stamp[2, 3] = 1e4  # cosmic ray in a corner
    stamp[80, 1] = np.nan
    stamp[5:8, 75:80] += 30  # a neighbour's core in another corner
    assert abs(estimate_sigma(stamp) - 1) < 0.06
    assert abs(np.std(corner_pixels(np.nan_to_num(stamp))) - 1) > 0.5  # plain std is fooled


def test_corners_not_strips():
    stamp = np.zeros((40, 40))
    stamp[:, 20] = 1.0  # a column crossing the middle of the top and bottom edges
    assert corner_pixels(stamp, corner=10).sum() == 0
    assert len(corner_pixels(stamp)) == 4 * 10 * 10
    with pytest.raises(VQVAEInputError, match="corner"):
        estimate_sigma(stamp, corner=21)
    with pytest.raises(VQVAEInputError, match="2-D"):
        estimate_sigma(np.zeros((3, 4, 4)))
