"""The PSF and noise layers against scipy (exact, float64) and against GalSim's own convolution."""

import galsim
import numpy as np
import pytest
import scipy.signal
import torch

from galsim_vqvae.nn.forward import chi2, convolve_psf, padded_size, psf_transform


def _same_reference(image, psf):
    """Full linear convolution in float64, cropped to the window centred like GalSim: a PSF
    centred at pixel (S//2, S//2) does not move the galaxy."""
    s = image.shape[-1]
    c = s // 2
    return scipy.signal.fftconvolve(image, psf, mode="full")[c:c + s, c:c + s]


@pytest.mark.parametrize("size", [84, 32, 33, 21, 8])
def test_convolve_psf_exact_against_scipy_float64(size):
    rng = np.random.default_rng(1000 + size)
    image = rng.random((3, 1, size, size))
    psf = rng.random((3, 1, size, size))
    out = convolve_psf(torch.tensor(image), torch.tensor(psf))
    assert out.dtype == torch.float32 and out.shape == (3, 1, size, size)
    ref = np.stack([_same_reference(image[i, 0], psf[i, 0]) for i in range(3)])[:, None]
    # Random positive images fill the whole stamp, so any wrap-around would show at O(1).
    assert np.abs(out.numpy() - ref).max() <= 1e-5 * np.abs(ref).max()
    # The precomputed-transform path gives the same numbers.
    out_ft = convolve_psf(torch.tensor(image), psf_ft=psf_transform(torch.tensor(psf)))
    torch.testing.assert_close(out_ft, out, rtol=0, atol=0)


def test_padded_size_is_minimal_exact_size():
    for s in (8, 21, 32, 33, 84, 128):
        n = padded_size(s)
        assert n >= s + s // 2 and n > 2 * s - 2 - s // 2


def test_delta_image_reproduces_psf_centred():
    s = 84
    psf = torch.rand(1, 1, s, s, generator=torch.Generator().manual_seed(3))
    delta = torch.zeros(1, 1, s, s)
    delta[..., s // 2, s // 2] = 1.0
    torch.testing.assert_close(convolve_psf(delta, psf), psf, rtol=1e-5, atol=1e-6)


def test_convolve_psf_float32_under_bf16_autocast():
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    p = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = convolve_psf(x, p)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, convolve_psf(x, p), rtol=0, atol=0)


@pytest.mark.parametrize("size,hlr,n_sersic,tol", [(64, 0.4, 1.0, 2e-3), (84, 0.4, 1.5, 1e-2)])
def test_convolve_psf_matches_galsim(size, hlr, n_sersic, tol):
    """truth (no_pixel) * PSF image (pixel included), on the grid, against GalSim drawing
    Convolve(gal, psf) with method='auto'.

    The residual is GalSim's, not the FFT's: sampling the galaxy at pixel centres aliases the
    frequencies above Nyquist that its cusp has (the continuous convolution integrates them
    out), and the parts of galaxy and PSF beyond the stamp are lost; both are at the 1e-3 level
    for well-sampled galaxies, and grow with the Sersic index (cuspier core): measured 8e-4 for
    the exponential, 4e-3 for n=1.5, but 3e-2 for n=2.5 at hlr 0.25" and 5-7e-2 for n=4 on this
    0.1" grid, which is why truth images of cuspy bulges need finer sampling than the stamp's.
    """
    scale = 0.1
    gal = galsim.Sersic(n=n_sersic, half_light_radius=hlr, flux=1000.0).shear(e1=0.3, e2=-0.15)
    gal = gal.shift(0.03, -0.02)
    psf = galsim.Moffat(beta=3.0, fwhm=0.3).shear(e1=0.05, e2=0.02)
    truth = gal.drawImage(nx=size, ny=size, scale=scale, method="no_pixel").array
    psf_img = psf.drawImage(nx=size, ny=size, scale=scale, use_true_center=False).array
    expected = galsim.Convolve(gal, psf).drawImage(nx=size, ny=size, scale=scale).array
    out = convolve_psf(torch.tensor(truth)[None, None], torch.tensor(psf_img)[None, None])
    out = out[0, 0].double().numpy()
    rel = np.linalg.norm(out - expected) / np.linalg.norm(expected)
    assert rel < tol, rel
    # the convolution preserves flux up to what the PSF stamp misses
    assert abs(out.sum() / truth.sum() - psf_img.sum()) < 1e-4


def test_chi2_against_float64():
    rng = np.random.default_rng(7)
    model = rng.normal(size=(5, 1, 16, 16))
    observed = rng.normal(size=(5, 1, 16, 16))
    sigma = rng.uniform(0.5, 2.0, size=5)
    f32 = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    out = chi2(f32(model), f32(observed), f32(sigma))
    ref = (((model - observed) / sigma[:, None, None, None]) ** 2).reshape(5, -1).mean(1)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5)
    # pure noise of the stated sigma gives chi^2/pixel near 1
    noise = torch.randn(64, 1, 32, 32, generator=torch.Generator().manual_seed(8)) * 3.0
    c2 = chi2(torch.zeros_like(noise), noise, torch.full((64,), 3.0)).mean().item()
    assert abs(c2 - 1) < 0.02
