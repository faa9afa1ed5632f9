"""Noise on stamps: a robust Gaussian sigma from the stamp's four corners, and the power spectrum
of correlated noise on the stamp grid (what the chi^2 of `galsim_vqvae.nn.forward` divides by)."""

import numpy as np

from ..errors import VQVAEInputError

# std of a unit Gaussian truncated at +-3 sigma: corrects the clipped standard deviation
_CLIP = 3.0
_CLIP_STD = 0.986578


def _corners(stamp, corner):
    a = np.asarray(stamp)
    if a.ndim != 2:
        raise VQVAEInputError(f"stamp must be 2-D, got shape {a.shape}")
    c = max(2, min(a.shape) // 4) if corner is None else int(corner)
    if not 1 <= c <= min(a.shape) // 2:
        raise VQVAEInputError(f"corner {c} must be between 1 and half the stamp side "
                              f"{min(a.shape) // 2} (stamp shape {a.shape})")
    return [a[:c, :c], a[:c, -c:], a[-c:, :c], a[-c:, -c:]]


def corner_pixels(stamp, corner=None):
    """The pixels of the four ``corner`` x ``corner`` corner squares of a 2-D stamp (1-D array).

    Parameters:
        stamp:  2-D image.
        corner: Side of each corner square in pixels; None uses a quarter of the smaller side
                (21 pixels for an 84x84 stamp, 1764 pixels in all). [default: None]
    """
    return np.concatenate([c.ravel() for c in _corners(stamp, corner)])


def estimate_sigma(stamp, corner=None):
    """Robust Gaussian noise sigma of a stamp, from the pixels of its four corner squares.

    Each corner's own median is subtracted (a galaxy's wings or a background gradient shift the
    corners differently); the pooled residuals give a first estimate from the median absolute
    deviation (x 1.4826), refined by an iterated 3-sigma-clipped standard deviation (corrected for
    the clipping): nearly as efficient as the plain standard deviation on pure noise, yet blind
    to a cosmic ray or a neighbour's core in a corner. Non-finite pixels are ignored.

    Parameters:
        stamp:  2-D image.
        corner: Side of each corner square in pixels; None uses a quarter of the smaller side.
                [default: None]

    Returns:
        sigma (float, pixel units); 0.0 for a constant image.
    """
    parts = []
    for block in _corners(stamp, corner):
        x = block.astype(np.float64).ravel()
        x = x[np.isfinite(x)]
        if x.size:
            parts.append(x - np.median(x))
    x = np.concatenate(parts) if parts else np.zeros(0)
    if x.size < 4:
        raise VQVAEInputError(f"too few finite corner pixels ({x.size}) to estimate the noise")
    med = np.median(x)
    sigma = 1.4826 * np.median(np.abs(x - med))
    if sigma == 0:
        return float(np.std(x))
    for _ in range(5):
        keep = x[np.abs(x - med) < _CLIP * sigma]
        med = np.mean(keep)
        new = np.std(keep) / _CLIP_STD
        if abs(new - sigma) < 1e-6 * sigma:
            break
        sigma = new
    return float(sigma)


# ----------------------------------------------------------------------------------------------
# Correlated noise: the power spectrum on the S x S stamp grid
#
# A stamp's noise is stationary with correlation function C(l) (l a lag in pixels). The chi^2 of
# `galsim_vqvae.nn.forward` whitens residuals with the DFT of the S x S stamp, dividing by the
# noise power spectrum at the DFT frequencies, P(k) = sum_l C(l) exp(-2 pi i k.l / S) (all lags,
# which folds them modulo S). Its mean over the S^2 frequencies is C(0), the pixel variance; white
# noise of sigma has P = sigma^2 at every k. The dataset stores P / C(0) (mean 1), and the
# stamp's sigma = sqrt(C(0)) separately.
#
# A stamp is a cut-out of a larger field, not periodic: the DFT's whitening treats its opposite
# edges as neighbours, so pixels within the whitening kernel's reach of the stamp's edge are not
# whitened right (on COSMOS noise at 0.03", a full 64 x 64 stamp gets a reduced chi^2 of 1.035).
# Datasets with correlated noise give those pixels weight 0 (`whitening_reach`; 3 pixels for
# COSMOS noise: the bias drops to 0.1%). The alternative, the expected periodogram of an S x S
# stamp (C(l) tapered by the Bartlett window), is exact summed over the whole stamp but 3% low
# in its interior, where galaxies lie.
#
# A correlation function measured from data need not be positive definite, nor stay so once cut
# at the stamp's size: GalSim's AEGIS noise files give a spectrum that dips to -9% of its mean at
# 0.03" (GalSim itself draws such noise with the negative part set to 0). The spectrum is
# floored at POWER_FLOOR of its mean, then renormalised to mean 1; COSMOS's is unchanged (its
# minimum is 1.7% of the mean at 0.03", 25% at 0.06").

POWER_FLOOR = 0.01


def power_from_correlation(cf, stamp_size):
    """Power spectrum shape on the S x S DFT grid of noise with correlation function ``cf``.

    Parameters:
        cf:         [2L+1, 2L+1] correlation function, lag (0, 0) at the centre pixel (L, L).
                    Lags beyond L, and those of |lx| or |ly| >= S (no pixel pair of an S x S
                    stamp is that far apart), are taken as 0.
        stamp_size: S.

    Returns:
        (power [S, S] float64 on numpy's ``fft2`` grid (k = 0 at [0, 0]), floored at
        ``POWER_FLOOR`` of its mean and normalised to mean 1; variance ``cf[L, L]``).
    """
    cf = np.asarray(cf, dtype=np.float64)
    n = cf.shape[0]
    if cf.ndim != 2 or cf.shape[1] != n or n % 2 == 0:
        raise VQVAEInputError(f"correlation function must be a square image of odd side, got "
                              f"shape {cf.shape}")
    s, half = int(stamp_size), n // 2
    variance = float(cf[half, half])
    if not (np.isfinite(cf).all() and variance > 0):
        raise VQVAEInputError(f"correlation function has a non-positive or non-finite variance "
                              f"{variance}")
    lags = np.arange(-half, half + 1)
    keep = np.abs(lags) < s  # an S x S stamp holds no pixel pair further apart
    lags, cf = lags[keep] % s, cf[np.ix_(keep, keep)]
    folded = np.zeros((s, s))
    np.add.at(folded, (lags[:, None], lags[None, :]), cf)
    power = np.fft.fft2(folded).real / variance
    power = np.maximum(power, POWER_FLOOR * power.mean())
    return power / power.mean(), variance


def whitening_reach(power, leak=0.01):
    """Reach in pixels of the whitening kernel IDFT(1 / sqrt(power)): the half-side r of the
    smallest (2r+1)^2 box about lag 0 that holds all but ``leak`` of its squared sum (0 for
    white noise). Pixels closer than this to a stamp's edge get weight 0 under correlated noise.

    Parameters:
        power:  [S, S] power spectrum shape (numpy ``fft2`` grid).
        leak:   Fraction of the kernel's squared sum allowed outside the box. [default: 0.01]
    """
    power = np.asarray(power, dtype=np.float64)
    g2 = np.fft.fftshift(np.fft.ifft2(1.0 / np.sqrt(power)).real ** 2)
    s = power.shape[0]
    c, total = s // 2, g2.sum()
    for r in range(s // 2):
        if g2[c - r:c + r + 1, c - r:c + r + 1].sum() >= (1 - leak) * total:
            return r
    return s // 2


def correlation_function(fields, max_lag):
    """Correlation function [2L+1, 2L+1] (lag (0, 0) at the centre) estimated from noise fields.

    Each field's mean is removed; products at each lag are averaged over every pixel pair the
    fields hold at that lag (zero-padded FFTs).

    Parameters:
        fields:     Sequence of 2-D noise images (any sizes larger than ``max_lag``).
        max_lag:    L, the largest lag along each axis, in pixels.
    """
    L = int(max_lag)
    total, count = 0.0, 0.0
    for a in fields:
        a = np.asarray(a, dtype=np.float64)
        a = a - a.mean()
        ny, nx = a.shape
        shape = (2 * ny, 2 * nx)
        c = np.fft.irfft2(np.abs(np.fft.rfft2(a, s=shape)) ** 2, s=shape)
        iy, ix = np.r_[-L:L + 1] % shape[0], np.r_[-L:L + 1] % shape[1]
        total = total + c[np.ix_(iy, ix)]
        lag = np.abs(np.r_[-L:L + 1])
        count = count + np.outer(ny - lag, nx - lag)
    return total / count


def draw_correlated(power, sigma, rng):
    """A realisation of stationary noise with power spectrum shape ``power`` [S, S] (mean 1) and
    pixel standard deviation ``sigma``, periodic on the S x S grid (white noise filtered by
    sqrt(power) in Fourier space). ``rng`` is a numpy Generator."""
    power = np.asarray(power, dtype=np.float64)
    white = rng.standard_normal(power.shape)
    field = np.fft.ifft2(np.fft.fft2(white) * np.sqrt(np.maximum(power, 0.0))).real
    return sigma * field
