"""Sampling code maps from a Gated PixelCNN prior, reproducibly per sample.

Each sample ``i`` has its own 64-bit seed (`per_sample_seeds`). The code at (i, j) is
``argmax_k(logits[k, i, j] / temperature + g[i, j, k])`` (the Gumbel-max trick, an exact draw from
``softmax(logits / temperature)``), with the Gumbel noise ``g`` a function of the sample's seed and
the position alone (noise version `SAMPLER_NOISE_VERSION` = 2, `gumbel_noise`): word ``k % 4`` of
the counter-based generator Philox4x32-10 at counter ``(k // 4, j, i, 0)`` with the seed as its key,
``u = (word + 0.5) / 2**32``, ``g = -log(-log(u))`` in float64. The compiled ops compute the same
numbers where they draw (``csrc/philox.h``), so no noise tensor is made or copied. So a sample
depends only on its seed, its conditions and the weights: never on the other samples of the batch,
the batch size, nor the device. (Version 1, before 2026-12-07, drew ``torch.rand`` on the CPU per
sample: the same seed gives different maps in the two versions.)

Every sampler evaluates the logits in float64 (`float64_prior`: the prior's weights converted
exactly to float64, whatever its dtype) and forms the scores ``logits / temperature + g`` in
float64. Implementations that sum in different orders (convolutions here, cached matrix products
in `fast_sampling`, the C++ and CUDA ops) then differ by float64 rounding alone, about 1e-15 of the
logits (and the noise by the last bit of each platform's float64 ``log``), so their draws agree
unless the two best scores of a draw are that close (``docs/sampling.md`` gives the probability);
float32 logits would differ by about 1e-6.
"""

import copy
import weakref

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import VQVAEInputError

_SEED_LIMIT = 2 ** 64


def per_sample_seeds(seed, n, start=0):
    """Turn one seed into ``n`` independent 63-bit seeds (a list of Python ints).

    Uses ``numpy.random.SeedSequence(seed)``, so the first m seeds do not depend on n: sample k of a
    run of n is sample k of any longer run with the same seed.

    Parameters:
        seed:   Non-negative int, or None for fresh OS entropy (not reproducible).
        n:      Number of seeds.
        start:  Return only the seeds of samples ``start .. n - 1`` (one shard of a long run,
                without a Python int for every earlier sample). [default: 0]
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise VQVAEInputError(f"per_sample_seeds: n must be an int >= 0, got {n!r}")
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or not 0 <= start <= n:
        raise VQVAEInputError(f"per_sample_seeds: start must be an int in [0, n={n}], "
                              f"got {start!r}")
    if seed is None:
        sequence = np.random.SeedSequence()
    else:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise VQVAEInputError(f"per_sample_seeds: seed must be a non-negative int or None, "
                                  f"got {seed!r}")
        sequence = np.random.SeedSequence(int(seed))
    words = sequence.generate_state(int(n), dtype=np.uint64)[int(start):]
    return [int(w) >> 1 for w in words]


def _check_seeds(seeds, n, who="sample_naive"):
    if seeds is None:
        return per_sample_seeds(None, n)
    seeds = list(seeds)
    if len(seeds) != n:
        raise VQVAEInputError(f"{who}: got {len(seeds)} seeds for n={n} samples")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < _SEED_LIMIT:
            raise VQVAEInputError(f"{who}: each seed must be an int in [0, 2**64), got {s!r}")
    return [int(s) for s in seeds]


_DERIVED = weakref.WeakKeyDictionary()


def _state_signature(module):
    """Identity and in-place version of every parameter and buffer: changes whenever the module's
    weights are replaced or modified (an optimiser step bumps each tensor's version)."""
    return tuple((name, t.data_ptr(), t._version, t.dtype, t.device)
                 for name, t in [*module.named_parameters(), *module.named_buffers()])


def derived_from(module, key, build):
    """``build(module)``, computed once and reused while ``module``'s weights stay unchanged.

    Results are kept per module (weakly: dropped with it) and per ``key``; any change to a
    parameter or buffer (replacement or in-place update) makes them be rebuilt.
    """
    entry = _DERIVED.setdefault(module, {})
    signature = _state_signature(module)
    cached = entry.get(key)
    if cached is None or cached[0] != signature:
        cached = (signature, build(module))
        entry[key] = cached
    return cached[1]


def float64_prior(prior):
    """The prior as every sampler evaluates it: a float64 copy in eval mode (the prior itself,
    unchanged, if it already holds float64 weights). Float32, float16 and bfloat16 weights convert
    to float64 exactly. The copy is cached while the prior's weights stay unchanged."""
    param = next(prior.parameters())
    if param.dtype == torch.float64:
        return prior

    def build(module):
        copied = copy.deepcopy(module).to(torch.float64).eval()
        for p in copied.parameters():
            p.requires_grad_(False)
        return copied

    return derived_from(prior, "float64", build)


SAMPLER_NOISE_VERSION = 2
"""Version of the sampler's noise convention (the module docstring): recorded with samples."""

_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter, key):
    """Philox4x32-10 (Salmon et al. 2011), vectorised: the generator the compiled ops run.

    Parameters:
        counter:    Integer array [4, ...] of 32-bit words.
        key:        Integer array [2, ...] of 32-bit words (broadcast against the counter).

    Returns:
        uint64 array [4, ...] of the four 32-bit output words.
    """
    c = [np.asarray(w, dtype=np.uint64) & _MASK32 for w in counter]
    k0, k1 = (np.asarray(w, dtype=np.uint64) & _MASK32 for w in key)
    m0, m1 = np.uint64(_PHILOX_M[0]), np.uint64(_PHILOX_M[1])
    shift = np.uint64(32)
    for _ in range(10):
        p0, p1 = m0 * c[0], m1 * c[2]  # < 2**64: exact in uint64
        c = [(p1 >> shift) ^ c[1] ^ k0, p1 & _MASK32, (p0 >> shift) ^ c[3] ^ k1, p0 & _MASK32]
        k0 = (k0 + np.uint64(_PHILOX_W[0])) & _MASK32
        k1 = (k1 + np.uint64(_PHILOX_W[1])) & _MASK32
    return np.stack(np.broadcast_arrays(*c))


def gumbel_noise(seeds, shape, num_codes):
    """The Gumbel noise of each sample: float64 CPU tensor [len(seeds), H, W, num_codes].

    Noise version `SAMPLER_NOISE_VERSION` (module docstring): the numbers the compiled ops compute
    where they draw; this is the reference, used by `sample_naive` and the PyTorch cached loop.
    """
    height, width = shape
    n, blocks = len(seeds), (num_codes + 3) // 4
    seed = np.array([int(s) for s in seeds], dtype=np.uint64).reshape(n, 1, 1, 1)
    q, j, i = np.arange(blocks), np.arange(width), np.arange(height)
    counter = [q[None, None, None, :], j[None, None, :, None], i[None, :, None, None], 0]
    words = philox4x32_10(counter, [seed & _MASK32, seed >> np.uint64(32)])
    words = np.broadcast_to(words, (4, n, height, width, blocks))
    words = np.moveaxis(words, 0, -1).reshape(n, height, width, 4 * blocks)[..., :num_codes]
    u = (words.astype(np.float64) + 0.5) * 2.0 ** -32  # exact; 0 < u < 1
    return torch.from_numpy(-np.log(-np.log(u)))


def _check_shape(shape, who="sample_naive"):
    try:
        height, width = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise VQVAEInputError(f"{who}: shape must be (H, W), got {shape!r}") from None
    if height < 1 or width < 1:
        raise VQVAEInputError(f"{who}: shape must be positive, got {shape!r}")
    return height, width


def check_sampling_arguments(prior, n, shape, cond, class_label, seeds, temperature, batch_size,
                             who="sample_naive"):
    """Validate and normalise a sampler's arguments (shared by every sampler; errors name ``who``).

    Returns:
        dict: ``n``, ``shape`` (H, W), ``cond`` (tensor on the prior's device and dtype, or None),
        ``class_label`` (int64 tensor on the prior's device, or None), ``seeds`` (list of n ints),
        ``temperature`` (float), ``batch_size``, ``device``, ``dtype``.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise VQVAEInputError(f"{who}: n must be an int >= 0, got {n!r}")
    n = int(n)
    shape = _check_shape(shape, who)
    try:
        temperature = float(temperature)
    except (TypeError, ValueError):
        raise VQVAEInputError(f"{who}: temperature must be a number, "
                              f"got {temperature!r}") from None
    if not (np.isfinite(temperature) and temperature > 0):
        raise VQVAEInputError(f"{who}: temperature must be finite and > 0, got {temperature}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise VQVAEInputError(f"{who}: batch_size must be an int >= 1, got {batch_size!r}")
    seeds = _check_seeds(seeds, n, who)
    param = next(prior.parameters())
    device, dtype = param.device, param.dtype
    if cond is not None:
        cond = torch.as_tensor(np.asarray(cond) if not torch.is_tensor(cond) else cond)
        cond = cond.to(device=device, dtype=dtype)
        if cond.dim() != 2 or cond.shape[0] != n:
            raise VQVAEInputError(f"{who}: cond must have shape [n={n}, cond_dim], got "
                                  f"{list(cond.shape)}")
    if class_label is not None:
        class_label = torch.as_tensor(
            np.asarray(class_label) if not torch.is_tensor(class_label) else class_label)
        if class_label.is_floating_point() or class_label.shape != (n,):
            raise VQVAEInputError(f"{who}: class_label must be {n} ints, got "
                                  f"{class_label.dtype} {list(class_label.shape)}")
        class_label = class_label.to(device=device, dtype=torch.int64)
    return dict(n=n, shape=shape, cond=cond, class_label=class_label, seeds=seeds,
                temperature=temperature, batch_size=batch_size, device=device, dtype=dtype)


def sample_naive(prior, n, shape=(21, 21), cond=None, class_label=None, seeds=None,
                 temperature=1.0, progress=False, batch_size=256):
    """Draw ``n`` code maps by running the whole prior once per position (the reference sampler).

    Slow (H * W full forward passes) and simple on purpose: it is the oracle that a fast, cached
    sampler is checked against. See the module docstring for the noise convention.

    Parameters:
        prior:          A `GatedPixelCNN` (any device and dtype; evaluated in float64, see the
                        module docstring).
        n:              Number of code maps.
        shape:          (H, W) of the code maps. [default: (21, 21)]
        cond:           Normalised labels [n, cond_dim] (tensor or array), required iff
                        prior.cond_dim > 0. [default: None]
        class_label:    Class labels [n] (ints), required iff prior.num_classes > 0.
                        [default: None]
        seeds:          List of n non-negative ints, one per sample (see `per_sample_seeds`);
                        None draws fresh seeds (not reproducible). [default: None]
        temperature:    Softmax temperature, > 0: samples follow softmax(logits / temperature).
                        As it goes to 0 the draw tends to the most probable code at each step
                        (greedy decoding); 0 itself is rejected. [default: 1.0]
        progress:       Show a progress bar over positions. [default: False]
        batch_size:     Samples run through the network together; does not change the
                        result. [default: 256]

    Returns:
        codes [n, H, W] int64 tensor on the prior's device.
    """
    args = check_sampling_arguments(prior, n, shape, cond, class_label, seeds, temperature,
                                    batch_size)
    n, (height, width), seeds = args["n"], args["shape"], args["seeds"]
    cond, class_label, device = args["cond"], args["class_label"], args["device"]
    temperature = args["temperature"]

    out = torch.empty(n, height, width, dtype=torch.int64, device=device)
    was_training = prior.training
    prior.eval()
    bar = tqdm(total=n * height * width, disable=not progress, desc="sampling codes",
               unit="code")
    try:
        with torch.no_grad():
            network = float64_prior(prior)
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                noise = gumbel_noise(seeds[start:stop], (height, width), prior.num_codes)
                noise = noise.to(device)  # the reference: drawn on the CPU, float64
                codes = torch.zeros(stop - start, height, width, dtype=torch.int64, device=device)
                c = cond[start:stop] if cond is not None else None
                k = class_label[start:stop] if class_label is not None else None
                for i in range(height):
                    for j in range(width):
                        logits = network(codes, c, k)[:, :, i, j]  # float64
                        scores = logits / temperature + noise[:, i, j]
                        codes[:, i, j] = scores.argmax(dim=1)
                        bar.update(stop - start)
                out[start:stop] = codes
    finally:
        bar.close()
        prior.train(was_training)
    return out
