"""The instrument as differentiable layers: PSF convolution and the Gaussian noise likelihood.

`convolve_psf` is an exact linear ("same") convolution computed with zero-padded real FFTs in
float32, whatever the autocast state: the padded size is large enough that no circular
wrap-around reaches the S x S output window. The PSF is centred at pixel (S//2, S//2) as GalSim
draws it, and is expected to include the pixel response (drawn with ``method='auto'``), so that
``convolve_psf(truth, psf)`` is GalSim's ``Convolve(galaxy, psf)`` drawn on the same grid.

`chi2` is the noise likelihood. A stamp's noise is Gaussian and stationary with pixel variance
sigma^2 and power spectrum sigma^2 P(k) on the S x S grid (P of mean 1, the stamp's entry of the
dataset's ``noise_bank``; P = 1 for white noise), and each pixel has a weight w(x) >= 0 (a
relative inverse variance; 0 where there is no data: padding, masked neighbours). The residual
r = model - observed is first **whitened** over the whole stamp,
r_w = IDFT(DFT(r) / sqrt(P)) / sigma, then **masked**: the reduced chi^2 is
sum_x w(x) r_w(x)^2 / #{x: w(x) > 0}.

What this is and approximates:

- With every weight 1 it is the exact Gaussian chi^2 of noise whose covariance is circulant on the
  S x S grid with spectrum sigma^2 P(k) (Lanusse et al. 2021 train on COSMOS this way): by
  Parseval sum_x r_w^2 = sum_k |DFT(r)(k)|^2 / (S^2 sigma^2 P(k)). P is the expected periodogram
  of an S x S stamp (`galsim_vqvae.data.noise.power_from_correlation`), so on pure noise the
  expected reduced chi^2 is exactly 1, though the stamp's real noise is not periodic.
- White noise (P = 1, or no noise power given) and every weight 1 give today's
  mean((model - observed)^2 / sigma^2).
- With a mask, whitening first spreads whatever lies in the masked pixels (noise filling the
  padding, a replaced neighbour, the model's wings there) into the pixels within the whitening
  kernel's reach of the mask's edge (a few pixels for drizzled HST noise). The exact likelihood of
  the unmasked pixels, r_M^T (C_MM)^-1 r_M, needs a solve per stamp; whitening then masking keeps
  the expectation exact on stationary noise (each whitened pixel has unit variance) and is exact
  away from the mask's edges. Masking first and whitening after would instead bias the chi^2
  high along every edge. A weight w(x) != 1 scales pixel x's whitened residual as a noise of
  variance sigma^2 / w(x) there: exact for white noise, an approximation for correlated noise.
"""

import torch

from ..errors import VQVAEFormatError, VQVAEInputError

# The "sky" of a noiseless truth stamp, for `hybrid_deviation`: pixels below this many noise
# sigma. Measured on the synthetic population (make-dataset --source synthetic, 3000 stamps of
# seed 5 and 300 of seed 6): 0.30% of all the truths' flux lies in such pixels, 0.55% of the
# median stamp's (90th percentile 1.8-2.0%), and they are 73% of the pixels. At 0.02: 0.54%,
# 0.95%, 78%; at 0.1: 2.0%, 3.2%, 87%.
SKY_THRESHOLD = 0.01

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


def whiten(residual, noise_power):
    """Whitened residuals ``IDFT(DFT(residual) / sqrt(noise_power))`` (float32).

    Parameters:
        residual:       Tensor [..., S, S].
        noise_power:    Tensor [..., S, S] (broadcastable), the noise power spectrum shape on
                        numpy's ``fft2`` grid (k = 0 at [0, 0]), > 0; only its first S//2 + 1
                        columns are read (a real field's spectrum is symmetric).
    """
    s = residual.shape[-1]
    half = noise_power[..., : s // 2 + 1].float()
    return torch.fft.irfft2(torch.fft.rfft2(residual.float()) * torch.rsqrt(half), s=(s, s))


def chi2(model, observed, sigma, noise_power=None, weight=None):
    """Reduced chi^2 of each stamp under its noise model (see the module docstring).

    Parameters:
        model:          Tensor [B, 1, S, S], the noiseless model of the observed stamps.
        observed:       Tensor [B, 1, S, S], the noisy stamps.
        sigma:          Tensor [B], the noise standard deviation of each stamp's pixels (> 0).
        noise_power:    Tensor [B, S, S] (or [B, 1, S, S]), each stamp's noise power spectrum
                        shape (mean 1, numpy ``fft2`` grid), or None for white noise.
                        [default: None]
        weight:         Tensor [B, 1, S, S], each pixel's weight (>= 0; 0 where there is no
                        data), or None for every weight 1. [default: None]

    Returns:
        Tensor [B] float32: ``sum_x w(x) r_w(x)**2 / #{w > 0}`` with ``r_w`` the whitened residual
        ``(model - observed) / sigma`` (white noise and no weight: its mean square).
    """
    with torch.autocast(device_type=model.device.type, enabled=False):
        sigma = sigma.float().reshape(-1, *([1] * (model.dim() - 1)))
        r = model.float() - observed.float()
        if noise_power is not None:
            r = whiten(r, noise_power.reshape(r.shape[0], *([1] * (r.dim() - 3)),
                                              *noise_power.shape[-2:]))
        r = r / sigma
        if weight is None:
            return (r * r).flatten(1).mean(1)
        weight = weight.float()
        count = (weight > 0).flatten(1).sum(1).clamp_min(1)
        return (weight * r * r).flatten(1).sum(1) / count


class NoiseLookup:
    """The noise model of a set of stamps on a device: batch indices -> the keyword arguments of
    `chi2` (``noise_power``, ``weight``), empty for white noise and full weight.

    Parameters:
        noise_bank:     [Q, S, S] noise power spectrum shapes, or None (white noise).
        noise_index:    [N] index into ``noise_bank`` of each stamp, or None.
        weight:         [N, S, S] pixel weights, or None (every weight 1).
        device:         Torch device.
        where:          What to name in errors (the dataset). [default: "dataset"]
    """

    def __init__(self, noise_bank, noise_index, weight, device, where="dataset"):
        self.bank = self.index = self.weight = None
        if (noise_bank is None) != (noise_index is None):
            raise VQVAEFormatError(f"{where}: noise_bank and noise_index come together")
        if noise_bank is not None:
            bank = torch.as_tensor(noise_bank, dtype=torch.float32)
            index = torch.as_tensor(noise_index, dtype=torch.int64)
            if len(index) and (index.min() < 0 or index.max() >= len(bank)):
                raise VQVAEFormatError(f"{where}: noise_index has values outside [0, {len(bank)})")
            if not (torch.isfinite(bank).all() and (bank > 0).all()):
                raise VQVAEFormatError(f"{where}: noise_bank holds non-positive or non-finite "
                                       f"power")
            if not bool((bank == 1).all()):  # a white bank is today's chi^2, exactly
                self.bank, self.index = bank.to(device), index.to(device)
        if weight is not None:
            weight = torch.as_tensor(weight, dtype=torch.float32)
            if not (torch.isfinite(weight).all() and (weight >= 0).all()):
                raise VQVAEFormatError(f"{where}: weight holds negative or non-finite values")
            empty = torch.nonzero(~(weight > 0).flatten(1).any(1)).flatten()
            if len(empty):
                raise VQVAEFormatError(f"{where}: weight is 0 everywhere in stamp "
                                       f"{int(empty[0])} of the loaded stamps (its mask leaves it "
                                       f"empty)")
            if not bool((weight == 1).all()):
                self.weight = weight.to(device)

    def __call__(self, i):
        out = {}
        if self.bank is not None:
            out["noise_power"] = self.bank[self.index[i]]
        if self.weight is not None:
            out["weight"] = self.weight[i][:, None]
        return out


def abs_deviation(model, target, sigma):
    """Mean absolute deviation per pixel of each stamp in units of its noise ``sigma``.

    Parameters:
        model:      Tensor [B, 1, S, S].
        target:     Tensor [B, 1, S, S] (e.g. the noiseless pre-PSF truth).
        sigma:      Tensor [B], the noise standard deviation of each stamp (> 0).

    Returns:
        Tensor [B] float32: ``mean over pixels of |model - target| / sigma``.
    """
    with torch.autocast(device_type=model.device.type, enabled=False):
        sigma = sigma.float().reshape(-1, *([1] * (model.dim() - 1)))
        return ((model.float() - target.float()).abs() / sigma).flatten(1).mean(1)


def sky_mask(target, sigma, threshold=SKY_THRESHOLD):
    """The pixels of each noiseless ``target`` [B, 1, S, S] below ``threshold`` times its stamp's
    noise ``sigma`` [B]: a bool tensor of ``target``'s shape."""
    with torch.no_grad():
        return target.float() < threshold * sigma.float().reshape(-1, *([1] * (target.dim() - 1)))


def hybrid_deviation(model, target, sigma):
    """`chi2` of ``model`` against the noiseless ``target`` plus an l1 term over its sky.

    ``mean over pixels of ((model - target) / sigma)^2 + mean over pixels of
    |model - target| / sigma * sky`` with ``sky`` 1 where the target is below
    `SKY_THRESHOLD` sigma (`sky_mask`), 0 elsewhere. The l1 pull on faint light off the galaxy
    does not fade with its amplitude, so faint junk, frames and halos are driven to exactly zero;
    on the galaxy, wings included, the squared distance alone acts, whose optimum is the mean
    (an l1 term there would pull faint wings towards the median, i.e. down). Both terms are
    means over all pixels in units of sigma, so that an l1 residual of 0.5 sigma pulls as hard
    as the squared one.

    Parameters:
        model:      Tensor [B, 1, S, S].
        target:     Tensor [B, 1, S, S], the noiseless pre-PSF truth.
        sigma:      Tensor [B], the noise standard deviation of each stamp (> 0).

    Returns:
        Tensor [B] float32.
    """
    with torch.autocast(device_type=model.device.type, enabled=False):
        sky = sky_mask(target, sigma)
        s = sigma.float().reshape(-1, *([1] * (model.dim() - 1)))
        r = (model.float() - target.float()) / s
        return (r * r).flatten(1).mean(1) + (r.abs() * sky).flatten(1).mean(1)
