"""Python face of the compiled ops in ``csrc/``, each with its pure-PyTorch reference.

``nearest_code`` runs the op ``torch.ops.galsim_vqvae.nearest_code`` (C++ on the CPU, CUDA on the
GPU) when the compiled extension is installed, else `nearest_code_reference`, which computes the
same answer in PyTorch (it is also the test oracle's fast path). `backend` says which runs; the
fallback is announced once with a warning that says why.

``pixelcnn_sample`` runs the op ``galsim_vqvae::pixelcnn_sample``, the cached sampler of a Gated
PixelCNN (`galsim_vqvae.nn.fast_sampling.sample_fast` calls it; its PyTorch loop is the reference
and the fallback); `sampler_backend` says which implementation a device gets.

Exactness: for float32 inputs (other floating dtypes are cast to float32 first) the index is the
lowest ``k`` minimising the exact (real-valued, unrounded) squared distance
``sum_j (z[n, j] - codebook[k, j])**2``. A float64 brute force agrees with it except where float64
rounding itself misorders two distances equal to ~1e-15 relative. The returned distance is the
float64 distance of the chosen code rounded to float32. See ``docs/ops.md``.
"""

import math
import os
import warnings
from fractions import Fraction

import torch

from .errors import VQVAEInputError

__all__ = ["nearest_code", "nearest_code_reference", "backend", "load_error", "pixelcnn_sample",
           "sampler_backend", "sampler_load_error", "seeds_tensor"]

_BACKEND = None
_CUDA_OK = False
_LOAD_ERROR = None
_ANNOUNCED = False


def _load():
    """Imports the compiled modules once; records what loaded and why not."""
    global _BACKEND, _CUDA_OK, _LOAD_ERROR
    if _BACKEND is not None:
        return
    if os.environ.get("GALSIM_VQVAE_FORCE_TORCH_OPS") == "1":
        _BACKEND, _LOAD_ERROR = "torch", "GALSIM_VQVAE_FORCE_TORCH_OPS=1 is set"
        return
    try:
        from . import _C  # noqa: F401  (registers galsim_vqvae::nearest_code and its CPU kernel)
    except ImportError as exc:
        _BACKEND = "torch"
        root = _source_root_shadowing()
        if root is not None:
            _LOAD_ERROR = (f"Python was started in the source root {root}, whose galsim_vqvae "
                           "folder (without the compiled ops) shadows the installed package: "
                           "start Python in another folder")
        else:
            _LOAD_ERROR = (f"the compiled extension galsim_vqvae._C is not importable ({exc}); "
                           "build it with `pip install --no-build-isolation .` where a C++ "
                           "compiler and torch are installed")
        return
    _BACKEND = "cpp"
    try:
        from . import _C_cuda  # noqa: F401  (registers the CUDA kernel)
        _CUDA_OK = True
    except ImportError as exc:
        if torch.version.cuda:  # a CUDA torch without the CUDA kernel: CUDA tensors use PyTorch
            _LOAD_ERROR = (f"the CUDA kernel galsim_vqvae._C_cuda is not importable ({exc}); CUDA "
                           "tensors use the PyTorch reference")


def _source_root_shadowing():
    """The source root (the folder of setup.py and csrc/) when the package was imported from the
    source tree because Python runs there, shadowing any installed copy; else None."""
    package = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(package)
    if not (os.path.isfile(os.path.join(root, "setup.py"))
            and os.path.isdir(os.path.join(root, "csrc"))):
        return None
    return root if os.path.abspath(os.getcwd()) == root else None


def load_error():
    """Why a compiled module is missing (a string), or None when everything loaded."""
    _load()
    return _LOAD_ERROR


def backend():
    """Which implementation of the ops runs: ``"cuda"``, ``"cpp"`` or ``"torch"``.

    ``"cuda"``: the CUDA kernel is compiled and a CUDA device is available (CPU tensors still run
    the C++ kernel). ``"cpp"``: the C++ kernel. ``"torch"``: the compiled extension could not be
    loaded; a warning says why, once.
    """
    global _ANNOUNCED
    _load()
    if _BACKEND == "torch" and not _ANNOUNCED:
        _ANNOUNCED = True
        warnings.warn(f"galsim_vqvae: using the pure-PyTorch nearest_code fallback: {_LOAD_ERROR}",
                      RuntimeWarning, stacklevel=2)
    if _BACKEND == "cpp" and _CUDA_OK and torch.cuda.is_available():
        return "cuda"
    return _BACKEND


def _check(z, codebook):
    if not (isinstance(z, torch.Tensor) and isinstance(codebook, torch.Tensor)):
        raise VQVAEInputError("nearest_code: z and codebook must be torch tensors, got "
                              f"{type(z).__name__} and {type(codebook).__name__}")
    if z.dim() != 2 or codebook.dim() != 2:
        raise VQVAEInputError(f"nearest_code: z must be [N, D] and codebook [K, D], got shapes "
                              f"{tuple(z.shape)} and {tuple(codebook.shape)}")
    if z.shape[1] != codebook.shape[1]:
        raise VQVAEInputError(f"nearest_code: z has D={z.shape[1]} but the codebook has "
                              f"D={codebook.shape[1]}")
    if codebook.shape[0] < 1 or z.shape[1] < 1:
        raise VQVAEInputError(f"nearest_code: empty codebook or D=0 (codebook shape "
                              f"{tuple(codebook.shape)})")
    if not (z.is_floating_point() and codebook.is_floating_point()):
        raise VQVAEInputError(f"nearest_code: z and codebook must be floating point, got "
                              f"{z.dtype} and {codebook.dtype}")
    if z.device != codebook.device:
        raise VQVAEInputError(f"nearest_code: z is on {z.device} but the codebook is on "
                              f"{codebook.device}")


def _score_bound(z, cmax2):
    """Bound on the error of the float32 scores |c|^2 - 2 z.c (see csrc/cpu/nearest_code.cpp).

    float32 matrix products may use any summation order and FMA; on GPUs that allow TF32 for
    float32 products the bound would not hold, so the reference disables TF32 around its product.
    """
    d = z.shape[1]
    u = 2.0 ** -24
    gamma = (d + 4) * u / (1 - (d + 4) * u)
    zn2 = z.double().square().sum(1)
    return 2.0 * gamma * (2.0 * zn2 + 4.0 * cmax2) + (2.0 * d + 8.0) * 2.0 ** -149, zn2


def _exact_distance(z_row, code):
    """The exact squared distance of two float32 vectors, as a Fraction."""
    return sum((Fraction(a) - Fraction(b)) ** 2 for a, b in zip(z_row.tolist(), code.tolist()))


def _exact_argmin(z_row, codebook, cand, d64):
    """Lowest index of the exact minimum among candidate codes ``cand`` (ascending), given their
    float64 distances ``d64``; exact Fractions settle what the float64 bound cannot."""
    d = z_row.shape[0]
    rel = 2.0 * (d + 3) * 2.0 ** -53 / (1 - (d + 3) * 2.0 ** -53)
    best, db, exact_best = cand[0], d64[0], None
    for k, dk in zip(cand[1:], d64[1:]):
        fk, fb = math.isfinite(dk), math.isfinite(db)
        exact_k = None
        if fk != fb:
            take = fk
        elif not fk:
            take = False
        elif dk < db - rel * (dk + db):
            take = True
        elif dk > db + rel * (dk + db):
            take = False
        else:
            if exact_best is None:
                exact_best = _exact_distance(z_row, codebook[best])
            exact_k = _exact_distance(z_row, codebook[k])
            take = exact_k < exact_best
        if take:
            best, db, exact_best = k, dk, exact_k
    return best


def _recheck_candidates(z, codebook, c64, mask):
    """Exact nearest candidate for each row of ``z`` [n, D] (candidates: ``mask`` [n, K] True).

    Vectorised: rows with one candidate take it; the others compare their candidates' float64
    squared differences, ties to the lowest index (``argmin`` returns the first minimum). Only a
    row whose runner-up lies within float64's error bound of the best *and* is a different code
    vector (identical codes tie exactly, settled above) goes to exact rational arithmetic.
    """
    count = mask.sum(1)
    index = mask.int().argmax(1)  # the lowest candidate: right where it is the only one
    rows = torch.nonzero(count > 1).flatten()
    if rows.numel() == 0:
        return index
    m = int(count[rows].max())
    d = z.shape[1]
    rel = 2.0 * (d + 3) * 2.0 ** -53 / (1 - (d + 3) * 2.0 ** -53)
    step = max(1, (1 << 24) // (m * d))
    for a in range(0, rows.numel(), step):
        r = rows[a:a + step]
        # Candidate indices in ascending order, padded with each row's first candidate.
        order = torch.argsort((~mask[r]).to(torch.int8), dim=1, stable=True)[:, :m]
        valid = torch.arange(m, device=z.device)[None] < count[r][:, None]
        cand = torch.where(valid, order, order[:, :1])
        codes = c64[cand]
        d64 = (z[r].double()[:, None, :] - codes).square().sum(2)
        d64 = torch.where(valid, d64, torch.full_like(d64, float("inf")))
        arg = d64.argmin(1, keepdim=True)
        best = cand.gather(1, arg).squeeze(1)
        index[r] = best
        dbest = d64.gather(1, arg)
        close = valid & (d64 <= dbest + rel * (d64 + dbest))
        same = (codes == c64[best][:, None, :]).all(2)
        for i in torch.nonzero((close & ~same).any(1)).flatten().tolist():
            keep = torch.nonzero(close[i]).flatten()
            index[r[i]] = _exact_argmin(z[r[i]], codebook, cand[i, keep].tolist(),
                                        d64[i, keep].tolist())
    return index


def nearest_code_reference(z, codebook):
    """Pure-PyTorch nearest-codebook search, exact as `nearest_code`: the oracle and the fallback.

    A float32 pass scores every code (|c|^2 - 2 z.c, with a proven error bound); the candidates
    within twice the bound of the best score are re-checked in float64, and exact rational
    arithmetic settles any pair that float64 cannot separate (ties go to the lowest index).

    Parameters:
        z:          Tensor [N, D], the vectors to quantize (any floating dtype; used as float32).
        codebook:   Tensor [K, D], the code vectors (any floating dtype; used as float32).

    Returns:
        (index [N] int64, squared_distance [N] float32).
    """
    _check(z, codebook)
    z = z.detach().float()
    codebook = codebook.detach().float()
    n, k = z.shape[0], codebook.shape[0]
    index = torch.zeros(n, dtype=torch.int64, device=z.device)
    if n == 0:
        return index, torch.zeros(0, dtype=torch.float32, device=z.device)
    c64 = codebook.double()
    cn64 = c64.square().sum(1)
    cmax2 = cn64.max()
    bound, zn2 = _score_bound(z, cmax2)
    safe = torch.finfo(torch.float32).max / 8.0
    fast = (zn2 <= safe) & bool(cmax2 <= safe)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        chunk = max(1, (1 << 24) // k)
        for start in range(0, n, chunk):
            zc = z[start:start + chunk]
            scores = cn64.float() - 2.0 * (zc @ codebook.t())
            smin = scores.min(1).values.double()
            thr = smin + 2.0 * bound[start:start + chunk]
            mask = scores.double() <= thr[:, None]
            mask[~fast[start:start + chunk]] = True
            index[start:start + chunk] = _recheck_candidates(zc, codebook, c64, mask)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    dist = (z.double() - c64[index]).square().sum(1).float()
    return index, dist


def _register_fake():
    if _BACKEND == "torch" or not hasattr(torch.library, "register_fake"):
        return

    @torch.library.register_fake("galsim_vqvae::nearest_code")
    def _(z, codebook):
        n = z.shape[0]
        return (z.new_empty((n,), dtype=torch.int64), z.new_empty((n,), dtype=torch.float32))

    if _has_sampler_op():
        @torch.library.register_fake("galsim_vqvae::pixelcnn_sample")
        def _(weights, bias, seeds, height, width, temperature, kernel_size):
            torch._check(len(weights) == len(SAMPLER_WEIGHTS),
                         lambda: f"pixelcnn_sample: weights must be {len(SAMPLER_WEIGHTS)} "
                                 f"tensors, got {len(weights)}")
            torch._check(seeds.dim() == 1, lambda: "pixelcnn_sample: seeds must be [B]")
            torch._check(height >= 1 and width >= 1,
                         lambda: "pixelcnn_sample: the map must be at least 1x1")
            b = seeds.shape[0]
            return (seeds.new_empty((b, height, width), dtype=torch.int64),
                    seeds.new_empty((b,), dtype=torch.float64))


# ------------------------------------------------------------------ cached PixelCNN sampler

# The op's weights (its Tensor[] argument), in order; csrc/pixelcnn_sample.h describes each.
SAMPLER_WEIGHTS = ("embedding", "v_w", "v_b", "h_w", "h_b", "vh_w", "vh_b", "out_w", "out_b",
                   "head1_w", "head1_b", "head2_w", "head2_b")
_SAMPLER_ANNOUNCED = set()


def _has_sampler_op():
    try:
        torch.ops.galsim_vqvae.pixelcnn_sample
    except (AttributeError, RuntimeError):
        return False
    return True


def sampler_load_error(device="cpu"):
    """Why the compiled sampler cannot run on ``device`` (a string), or None when it can."""
    _load()
    kind = torch.device(device).type
    if _BACKEND == "torch":
        return _LOAD_ERROR
    if not _has_sampler_op():
        return ("the compiled extension galsim_vqvae._C has no pixelcnn_sample op (built from an "
                "older source); rebuild it with `pip install --no-build-isolation .`")
    if kind == "cpu":
        return None
    if kind == "cuda":
        if not _CUDA_OK:
            return _LOAD_ERROR or ("the CUDA kernels (galsim_vqvae._C_cuda) were not built: torch "
                                   "had no CUDA or nvcc was missing at build time")
        if not torch._C._dispatch_has_kernel_for_dispatch_key("galsim_vqvae::pixelcnn_sample",
                                                              "CUDA"):
            return ("galsim_vqvae._C_cuda has no pixelcnn_sample kernel (built from an older "
                    "source); rebuild the package")
        return None
    return f"no compiled sampler for {kind} devices"


def sampler_backend(device="cpu", announce=True):
    """Which implementation of the cached sampler runs for a prior on ``device``: ``"cuda"``,
    ``"cpp"`` or ``"torch"`` (the PyTorch loop of `galsim_vqvae.nn.fast_sampling`).

    Parameters:
        device:     A torch device (or its name). [default: "cpu"]
        announce:   Warn (once per device type) when the PyTorch fallback runs, saying why.
                    [default: True]
    """
    kind = torch.device(device).type
    reason = sampler_load_error(device)
    if reason is None:
        return "cuda" if kind == "cuda" else "cpp"
    if announce and kind not in _SAMPLER_ANNOUNCED:
        _SAMPLER_ANNOUNCED.add(kind)
        warnings.warn(f"galsim_vqvae: sampling with the PyTorch cached-sampler fallback on {kind}: "
                      f"{reason}", RuntimeWarning, stacklevel=2)
    return "torch"


def seeds_tensor(seeds, device="cpu"):
    """Per-sample seeds (ints in [0, 2**64)) as the op's int64 tensor (two's complement)."""
    return torch.tensor([s - (1 << 64) if s >= (1 << 63) else s for s in (int(s) for s in seeds)],
                        dtype=torch.int64).to(device)


def pixelcnn_sample(weights, bias, seeds, shape, temperature, kernel_size):
    """Run the compiled cached sampler ``galsim_vqvae::pixelcnn_sample`` on one batch.

    The Gumbel noise of each draw is computed inside the op from the map's seed and the position
    (Philox4x32-10, ``csrc/philox.h``; the same numbers as `galsim_vqvae.nn.sampling.gumbel_noise`).

    Parameters:
        weights:        Dict of float64 tensors in the layout of
                        `galsim_vqvae.nn.fast_sampling.flat_weights`, on one device.
        bias:           Conditioning bias [B, L, 2C] float64 added to every gate of layer l
                        (``GatedPixelCNN._layer_biases``), or None.
        seeds:          Per-map seeds: an int64 tensor [B] on the weights' device (`seeds_tensor`).
        shape:          (H, W) of the maps.
        temperature:    Softmax temperature, > 0.
        kernel_size:    The prior's odd kernel size.

    Returns:
        (codes [B, H, W] int64, gap [B] float64): the drawn maps, and for each map the smallest
        margin between the two best scores of any of its draws.
    """
    reason = sampler_load_error(seeds.device if isinstance(seeds, torch.Tensor) else "cpu")
    if reason is not None:
        raise VQVAEInputError(f"pixelcnn_sample: the compiled sampler is not available: {reason}")
    missing = [k for k in SAMPLER_WEIGHTS if k not in weights]
    if missing:
        raise VQVAEInputError(f"pixelcnn_sample: weights lack {missing}")
    height, width = (int(s) for s in shape)
    try:
        with torch.no_grad():
            return torch.ops.galsim_vqvae.pixelcnn_sample(
                [weights[k] for k in SAMPLER_WEIGHTS], bias, seeds, height, width,
                float(temperature), int(kernel_size))
    except ValueError as exc:  # the op's argument checks (c10::ValueError), one line each
        raise VQVAEInputError(str(exc).splitlines()[0]) from None


def nearest_code(z, codebook):
    """Index of the nearest code vector of ``codebook`` for each row of ``z``: exact argmin of the
    squared Euclidean distance, ties to the lowest index.

    Parameters:
        z:          Tensor [N, D] (float32, bfloat16 or float16; computed in float32; N may be 0).
        codebook:   Tensor [K, D] on the same device, K >= 1.

    Returns:
        (index [N] int64, squared_distance [N] float32). No gradient flows through this op.
    """
    backend()
    _check(z, codebook)
    with torch.no_grad():
        if _BACKEND == "torch" or (z.is_cuda and not _CUDA_OK):
            return nearest_code_reference(z, codebook)
        return torch.ops.galsim_vqvae.nearest_code(z.detach(), codebook.detach())


_load()
_register_fake()
