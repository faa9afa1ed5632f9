"""The instrument as differentiable layers: PSF convolution and the Gaussian noise likelihood.

`convolve_psf` is an exact linear ("same") convolution computed with zero-padded real FFTs in
float32, whatever the autocast state: the padded size is large enough that no circular
wrap-around reaches the S x S output window. The PSF is centred at pixel (S//2, S//2) as GalSim
draws it, and is expected to include the pixel response (drawn with ``method='auto'``), so that
``convolve_psf(truth, psf)`` is GalSim's ``Convolve(galaxy, psf)`` drawn on the same grid.
"""

import torch

from ..errors import VQVAEInputError

_FAST_FACTORS = (2, 3, 5, 7)


def fast_fft_size(n):
    """Smallest integer >= ``n`` whose prime factors are all in (2, 3, 5, 7)."""
    m = max(int(n), 1)
    while True:
        k = m
        for p in _FAST_FACTORS:
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def padded_size(stamp_size):
    """FFT size for an exact "same" convolution of two S x S images centred at (S//2, S//2).

    The full linear convolution spans 2S-1 pixels and the output keeps pixels
    [S//2, S//2 + S); a circular convolution of length n leaves them untouched by wrap-around iff
    n >= S + S//2 and n > 2S - 2 - S//2. The result is rounded up to a fast FFT size.
    """
    s = int(stamp_size)
    return fast_fft_size(max(s + s // 2, 2 * s - 1 - s // 2))


def psf_transform(psf, size=None):
    """Real FFT [..., n, n//2+1] (complex64) of PSF images [..., S, S], zero-padded to ``size``.

    Precompute it once for a fixed PSF bank and pass it to `convolve_psf` as ``psf_ft``.
    """
    s = psf.shape[-1]
    n = padded_size(s) if size is None else size
    return torch.fft.rfft2(psf.float(), s=(n, n))


def convolve_psf(image, psf=None, psf_ft=None):
    """Convolve images with PSFs: exact linear convolution, "same" output, float32.

    Parameters:
        image:      Tensor [B, 1, S, S] (or any [..., S, S]), e.g. decoded pre-PSF galaxies.
        psf:        Tensor of the same shape (or broadcastable), PSF images centred at
                    (S//2, S//2), each summing to 1 with the pixel response included.
                    [default: None, then ``psf_ft`` is used]
        psf_ft:     `psf_transform` of the PSFs, to skip their FFT. [default: None]

    Returns:
        Tensor [..., S, S] float32: ``out[j] = sum_k image[k] * psf[j - k + S//2]``.
    """
    if (psf is None) == (psf_ft is None):
        raise VQVAEInputError("give exactly one of psf and psf_ft")
    s = image.shape[-1]
    if image.shape[-2] != s:
        raise VQVAEInputError(f"images must be square, got {list(image.shape)}")
    n = padded_size(s)
    with torch.autocast(device_type=image.device.type, enabled=False):
        if psf_ft is None:
            if psf.shape[-2:] != image.shape[-2:]:
                raise VQVAEInputError(f"psf shape {list(psf.shape)} does not match image shape "
                                      f"{list(image.shape)}")
            psf_ft = psf_transform(psf, n)
        elif psf_ft.shape[-2:] != (n, n // 2 + 1):
            raise VQVAEInputError(f"psf_ft has shape {list(psf_ft.shape)}, expected [..., {n}, "
                                  f"{n // 2 + 1}] for stamps of {s} pixels")
        full = torch.fft.irfft2(torch.fft.rfft2(image.float(), s=(n, n)) * psf_ft, s=(n, n))
        c = s // 2
        return full[..., c:c + s, c:c + s]


def chi2(model, observed, sigma):
    """Chi-square per pixel of each stamp under Gaussian noise of per-stamp ``sigma``.

    Parameters:
        model:      Tensor [B, 1, S, S], the noiseless model of the observed stamps.
        observed:   Tensor [B, 1, S, S], the noisy stamps.
        sigma:      Tensor [B], the noise standard deviation of each stamp (pixel units, > 0).

    Returns:
        Tensor [B] float32: ``mean over pixels of ((model - observed) / sigma)**2``.
    """
    with torch.autocast(device_type=model.device.type, enabled=False):
        sigma = sigma.float().reshape(-1, *([1] * (model.dim() - 1)))
        r = (model.float() - observed.float()) / sigma
        return (r * r).flatten(1).mean(1)
