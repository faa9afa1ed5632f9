"""Python face of the compiled ops in ``csrc/``, each with its pure-PyTorch reference.

The reference is the test oracle and the announced fallback when the compiled extension is not
available (see `backend`).
"""

import warnings

import torch

_BACKEND = None


def backend():
    """Which implementation of the ops runs: ``"cuda"``, ``"cpp"`` or ``"torch"``.

    ``"torch"`` means the compiled extension could not be loaded; a warning said why when it was
    first looked for.
    """
    global _BACKEND
    if _BACKEND is None:
        _BACKEND = "torch"
        warnings.warn("galsim_vqvae: compiled ops not built yet; using the pure-PyTorch reference",
                      RuntimeWarning, stacklevel=2)
    return _BACKEND


def nearest_code_reference(z, codebook):
    """Pure-PyTorch nearest-codebook search: the oracle for the compiled op.

    Parameters:
        z:          Tensor [N, D], the vectors to quantize.
        codebook:   Tensor [K, D], the code vectors.

    Returns:
        (index [N] int64, squared_distance [N] float32); ties go to the lowest index.
    """
    z = z.float()
    codebook = codebook.float()
    if z.shape[0] == 0:
        return (torch.zeros(0, dtype=torch.int64, device=z.device),
                torch.zeros(0, dtype=torch.float32, device=z.device))
    d = (z * z).sum(1, keepdim=True) - 2.0 * (z @ codebook.t()) + (codebook * codebook).sum(1)
    index = d.argmin(1)
    diff = z - codebook[index]
    return index, (diff * diff).sum(1)


def nearest_code(z, codebook):
    """Index of the nearest code vector of ``codebook`` [K, D] for each row of ``z`` [N, D].

    Returns:
        (index [N] int64, squared_distance [N] float32). No gradient flows through this op.
    """
    backend()
    with torch.no_grad():
        return nearest_code_reference(z, codebook)
