"""Augmentation by the 8 rotations and flips of a square stamp (the dihedral group D4).

Every image of the project is centred at pixel (S//2, S//2) (GalSim's convention, also the PSF's),
so each transform maps that pixel onto itself: a flip is a reflection about the centre pixel
(``i -> (S - i) mod S`` for even S, ``i -> S - 1 - i`` for odd S) and a rotation by 90 degrees is
a transpose followed by such a flip. Then the convolution commutes with the transform,
``convolve_psf(T(truth), T(psf)) == T(convolve_psf(truth, psf))``: exactly for odd S; for even S
on all pixels but row and column 0, where row and column 0 of the inputs are empty (a reflection
about pixel S//2 sends them off the stamp; the flip wraps them onto themselves so as to stay a
permutation). ``tests/test_train_vqvae.py`` checks both. Galaxy stamps and PSFs are empty there
in practice; with ``noise='independent'`` the target is made from the turned truth and PSF, so
it is exactly consistent.

A transform is a permutation of the pixels, applied to a batch in one ``gather`` (each stamp its
own transform, no host sync); which stamp of step ``s`` gets which transform is drawn from
``(seed, s)`` alone, so resumed and data-parallel runs draw what one uninterrupted process does.
"""

import torch

NUM_TRANSFORMS = 8
_SALT = 0x5DEECE66D  # keeps these draws apart from the noise draws of the same (seed, step)


def _flip(x, dim):
    """Reflection of ``x`` about its centre pixel S//2 along ``dim``."""
    flipped = torch.flip(x, (dim,))
    return torch.roll(flipped, 1, dim) if x.shape[dim] % 2 == 0 else flipped


def transform(x, k):
    """Transform ``k`` (0..7) of images ``x`` [..., S, S]: transpose if ``k & 4``, then flip
    rows about the centre if ``k & 1`` and columns if ``k & 2``; 0 is the identity."""
    k = int(k)
    if not 0 <= k < NUM_TRANSFORMS:
        raise ValueError(f"dihedral transform index must be in [0, 8), got {k}")
    if k & 4:
        x = x.transpose(-1, -2)
    if k & 1:
        x = _flip(x, x.dim() - 2)
    if k & 2:
        x = _flip(x, x.dim() - 1)
    return x


def all_transforms(x):
    """The 8 transforms of ``x`` [..., S, S], stacked on a new leading axis [8, ..., S, S]."""
    return torch.stack([transform(x, k) for k in range(NUM_TRANSFORMS)])


class Dihedral:
    """Per-stamp transforms of batches of S x S stamps on ``device``.

    ``apply(x, k)`` gives ``x[b]`` transformed by ``k[b]`` for every b, for x [B, 1, S, S] or
    [B, S, S] and k [B] (ints 0..7), as one gather of precomputed pixel permutations.
    """

    def __init__(self, size, device):
        index = torch.arange(size * size, device=device).reshape(size, size)
        self.source = all_transforms(index).reshape(NUM_TRANSFORMS, size * size)
        self.size = size

    def apply(self, x, k):
        flat = x.reshape(x.shape[0], self.size * self.size)
        return flat.gather(1, self.source[k]).reshape(x.shape)


def draw(seed, step, batch_size, device, rank=0, world_size=1):
    """The transforms [batch_size] (int64 on ``device``) of this rank's stamps at step ``step``:
    rank ``rank`` takes its rows of the draw for the global batch, a function of (seed, step)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(((int(seed) * 1_000_003 + int(step)) ^ _SALT) % (2**63 - 1))
    k = torch.randint(0, NUM_TRANSFORMS, (batch_size * world_size,), generator=gen, device=device)
    return k[rank * batch_size:(rank + 1) * batch_size]
