"""The compiled cached sampler ``galsim_vqvae::pixelcnn_sample`` (C++ here, CUDA where there is a
GPU) against the naive sampler and the PyTorch cached loop: the same maps on fresh random
weights, seeds and conditions; the reported score gaps; dispatch, fallback and bad arguments.

Weights and seeds are fresh on every run; each assertion message carries the entropy that
reproduces it (``FRESH = <int>``).
"""

import os
import warnings

import numpy as np
import pytest
import torch

from galsim_vqvae import ops
from galsim_vqvae.errors import VQVAEInputError
from galsim_vqvae.nn.fast_sampling import flat_weights, sample_fast
from galsim_vqvae.nn.pixelcnn import GatedPixelCNN
from galsim_vqvae.nn.sampling import float64_prior, gumbel_noise, per_sample_seeds, sample_naive

COMPILED = ops.sampler_load_error("cpu") is None
needs_op = pytest.mark.skipif(not COMPILED, reason=f"compiled sampler not built: "
                                                   f"{ops.sampler_load_error('cpu')}")
CUDA = torch.cuda.is_available() and ops.sampler_load_error("cuda") is None
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and the CUDA kernels")
FRESH = int(np.random.SeedSequence().entropy % 2 ** 32)

pytestmark = pytest.mark.usefixtures("one_thread")


def fresh_prior(rng, dtype=torch.float32, **kwargs):
    """A prior with fresh random weights: O(1) biases, logits spread by a random factor."""
    torch.manual_seed(int(rng.integers(2 ** 31)))
    prior = GatedPixelCNN(**kwargs).to(dtype)
    with torch.no_grad():
        for name, p in prior.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
        prior.head[-1].weight.mul_(float(rng.uniform(1.0, 4.0)))
        if prior.cond_proj is not None:
            prior.cond_proj.weight.mul_(3.0)
    return prior


def fresh_conditions(rng, prior, n):
    cond = (torch.from_numpy(rng.normal(size=(n, prior.cond_dim))).float()
            if prior.cond_dim else None)
    label = (torch.from_numpy(rng.integers(0, prior.num_classes, n))
             if prior.num_classes else None)
    return cond, label


def teacher_forced_gap(prior, codes, cond, label, seeds, temperature):
    """Per map: the smallest gap between the two best float64 scores of its draws, from the full
    forward pass of the float64 prior over the drawn map (each position sees only its past)."""
    h, w = codes.shape[1:]
    with torch.no_grad():
        logits = float64_prior(prior)(codes, None if cond is None else cond.to(torch.float64),
                                      label)
    noise = gumbel_noise(seeds, (h, w), prior.num_codes).to(codes.device)
    scores = logits.permute(0, 2, 3, 1) / temperature + noise
    assert torch.equal(scores.argmax(-1), codes)  # the maps are the Gumbel argmax of their logits
    top = scores.topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1]).flatten(1).min(1).values


CONFIGS = [  # (prior kwargs, map shape)
    (dict(num_codes=12, channels=8, layers=3, kernel_size=3), (5, 6)),
    (dict(num_codes=33, channels=16, layers=2, kernel_size=5, cond_dim=3), (4, 7)),
    (dict(num_codes=7, channels=6, layers=4, kernel_size=3, num_classes=3), (6, 4)),
    (dict(num_codes=40, channels=12, layers=2, kernel_size=7, cond_dim=2, num_classes=2), (3, 5)),
    (dict(num_codes=9, channels=5, layers=3, kernel_size=5), (1, 9)),   # a single row
    (dict(num_codes=9, channels=5, layers=2, kernel_size=3), (7, 1)),   # a single column
]


@needs_op
@pytest.mark.parametrize("config, shape", CONFIGS)
def test_matches_naive_and_torch(config, shape):
    """Fresh weights, seeds, conditions and temperature; batch sizes 1, 3 and 7 (with two threads,
    each takes a contiguous chunk of the batch): the op draws exactly the naive maps."""
    rng = np.random.default_rng([FRESH, CONFIGS.index((config, shape))])
    prior = fresh_prior(rng, **config)
    n = 7
    cond, label = fresh_conditions(rng, prior, n)
    seeds = per_sample_seeds(int(rng.integers(2 ** 63)), n)
    temperature = float(rng.choice([0.3, 1.0, 2.5]))
    naive = sample_naive(prior, n, shape, cond, label, seeds, temperature)
    torch_loop = sample_fast(prior, n, shape, cond, label, seeds, temperature,
                             implementation="torch")
    msg = f"FRESH = {FRESH}, T = {temperature}"
    assert torch.equal(torch_loop, naive), msg
    for batch_size, threads in ((1, 1), (3, 1), (7, 2)):
        torch.set_num_threads(threads)  # two threads: two chunks of the batch
        compiled = sample_fast(prior, n, shape, cond, label, seeds, temperature,
                               batch_size=batch_size, implementation="compiled")
        assert torch.equal(compiled, naive), f"{msg}, batch_size = {batch_size}"


@needs_op
def test_gap_is_the_smallest_top2_margin():
    """The op's second output: per map, the smallest margin of its draws, as the naive logits
    give it to float64 rounding (a check that the op's logits are the naive ones to ~1e-13)."""
    rng = np.random.default_rng([FRESH, 100])
    prior = fresh_prior(rng, num_codes=20, channels=8, layers=3, kernel_size=5, cond_dim=2)
    n, shape, temperature = 5, (4, 6), 0.7
    cond, _ = fresh_conditions(rng, prior, n)
    seeds = per_sample_seeds(int(rng.integers(2 ** 63)), n)
    network = float64_prior(prior)
    biases = network._layer_biases(n, cond.double(), None, torch.float64)
    bias = torch.stack([b[:, :, 0, 0] for b in biases], 1)
    codes, gap = ops.pixelcnn_sample(flat_weights(network), bias, ops.seeds_tensor(seeds), shape,
                                     temperature, 5)
    assert codes.shape == (n, *shape) and gap.shape == (n,) and gap.dtype == torch.float64
    expected = teacher_forced_gap(prior, codes, cond, None, seeds, temperature)
    torch.testing.assert_close(gap, expected, rtol=0, atol=1e-10, msg=f"FRESH = {FRESH}")
    assert (gap > 0).all()


@needs_op
def test_opcheck():
    rng = np.random.default_rng([FRESH, 200])
    prior = fresh_prior(rng, num_codes=6, channels=4, layers=2, kernel_size=3, cond_dim=1)
    network = float64_prior(prior)
    w = flat_weights(network)
    for device in ["cpu"] + (["cuda"] if CUDA else []):
        weights = [w[k].to(device) for k in ops.SAMPLER_WEIGHTS]
        seeds = ops.seeds_tensor([1, 2 ** 64 - 1], device)
        bias = torch.randn(2, 2, 8, dtype=torch.float64, device=device)
        for b in (bias, None):
            torch.library.opcheck(torch.ops.galsim_vqvae.pixelcnn_sample.default,
                                  (weights, b, seeds, 3, 2, 0.8, 3))


@needs_op
def test_bad_arguments_are_named():
    rng = np.random.default_rng([FRESH, 300])
    prior = fresh_prior(rng, num_codes=6, channels=4, layers=2, kernel_size=3)
    w = dict(flat_weights(float64_prior(prior)))
    seeds = ops.seeds_tensor([1])
    ops.pixelcnn_sample(w, None, seeds, (2, 2), 1.0, 3)  # the good call runs
    with pytest.raises(VQVAEInputError, match="h_w must be Double, got Float"):
        ops.pixelcnn_sample({**w, "h_w": w["h_w"].float()}, None, seeds, (2, 2), 1.0, 3)
    with pytest.raises(VQVAEInputError, match=r"v_w must have shape \[2, 24, 8\], got \[2, 9, 8\]"):
        ops.pixelcnn_sample({**w, "v_w": w["v_w"][:, :9]}, None, seeds, (2, 2), 1.0, 3)
    with pytest.raises(VQVAEInputError, match=r"seeds must be \[B\], got shape \[1, 1\]"):
        ops.pixelcnn_sample(w, None, seeds[None], (2, 2), 1.0, 3)
    with pytest.raises(VQVAEInputError, match="seeds must be int64"):
        ops.pixelcnn_sample(w, None, seeds.int(), (2, 2), 1.0, 3)
    with pytest.raises(VQVAEInputError, match="the map must be at least 1x1, got 0x2"):
        ops.pixelcnn_sample(w, None, seeds, (0, 2), 1.0, 3)
    with pytest.raises(VQVAEInputError, match="temperature must be finite and > 0, got 0"):
        ops.pixelcnn_sample(w, None, seeds, (2, 2), 0.0, 3)
    with pytest.raises(VQVAEInputError, match="kernel_size must be odd"):
        ops.pixelcnn_sample(w, None, seeds, (2, 2), 1.0, 4)
    with pytest.raises(VQVAEInputError, match=r"bias must have shape \[1, 2, 8\]"):
        ops.pixelcnn_sample(w, torch.zeros(1, 2, 4, dtype=torch.float64), seeds, (2, 2), 1.0, 3)
    with pytest.raises(VQVAEInputError, match=r"weights lack \['head2_b'\]"):
        ops.pixelcnn_sample({k: v for k, v in w.items() if k != "head2_b"}, None, seeds, (2, 2),
                            1.0, 3)
    with pytest.raises(ValueError, match="embedding must be Double"):  # the raw op: ValueError
        torch.ops.galsim_vqvae.pixelcnn_sample(
            [w["embedding"].float(), *[w[k] for k in ops.SAMPLER_WEIGHTS[1:]]], None, seeds, 2, 2,
            1.0, 3)
    with pytest.raises(ValueError, match="weights must be 13 tensors"):
        torch.ops.galsim_vqvae.pixelcnn_sample(
            [w[k] for k in ops.SAMPLER_WEIGHTS[:-1]], None, seeds, 2, 2, 1.0, 3)
    with pytest.raises(VQVAEInputError, match="implementation must be one of"):
        sample_fast(prior, 1, (2, 2), seeds=[1], implementation="cpp")


@pytest.mark.skipif(os.environ.get("GALSIM_VQVAE_ALLOW_TORCH_OPS") == "1",
                    reason="GALSIM_VQVAE_ALLOW_TORCH_OPS=1: the PyTorch fallback is allowed")
def test_backend_is_compiled_here():
    assert ops.sampler_backend("cpu") == "cpp", ops.sampler_load_error("cpu")
    if torch.cuda.is_available():
        assert ops.sampler_backend("cuda") == "cuda", ops.sampler_load_error("cuda")


def test_fallback_is_announced(monkeypatch):
    """Without the compiled extension sample_fast warns once, says why, and runs the PyTorch
    loop (the same maps); implementation="compiled" is then an error naming the reason."""
    monkeypatch.setattr(ops, "_BACKEND", "torch")
    monkeypatch.setattr(ops, "_LOAD_ERROR", "test reason")
    monkeypatch.setattr(ops, "_SAMPLER_ANNOUNCED", set())
    rng = np.random.default_rng([FRESH, 400])
    prior = fresh_prior(rng, num_codes=8, channels=4, layers=2, kernel_size=3)
    seeds = per_sample_seeds(int(rng.integers(2 ** 63)), 2)
    with pytest.warns(RuntimeWarning, match="PyTorch cached-sampler fallback on cpu: test reason"):
        codes = sample_fast(prior, 2, (3, 3), seeds=seeds)
    assert ops.sampler_backend("cpu", announce=False) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = sample_fast(prior, 2, (3, 3), seeds=seeds)  # announced once only
    assert torch.equal(codes, again)
    assert torch.equal(codes, sample_naive(prior, 2, (3, 3), seeds=seeds))
    with pytest.raises(VQVAEInputError, match="not available on cpu: test reason"):
        sample_fast(prior, 2, (3, 3), seeds=seeds, implementation="compiled")


def test_emulator_fast_is_naive(tiny_emulator, monkeypatch):
    """The Emulator's default (fast, compiled where built) draws the naive maps."""
    from galsim_vqvae.nn import fast_sampling

    ran = []  # which implementation of the fast sampler ran (none: another sampler did)
    for name in ("_sample_compiled", "_sample_torch"):
        def spy(*args, _name=name, _real=getattr(fast_sampling, name), **kwargs):
            ran.append(_name)
            return _real(*args, **kwargs)
        monkeypatch.setattr(fast_sampling, name, spy)
    conditions = {"mag": [22.0, 24.5, 23.0], "hlr": [0.3, 1.0, 0.5]}
    fast = tiny_emulator.sample_codes(3, conditions, seed=FRESH)
    compiled = ops.sampler_backend("cpu", announce=False) != "torch"
    assert ran and set(ran) == {"_sample_compiled" if compiled else "_sample_torch"}, ran
    monkeypatch.undo()
    naive = tiny_emulator.sample_codes(3, conditions, seed=FRESH, method="naive")
    assert np.array_equal(fast, naive), f"FRESH = {FRESH}"


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("config, shape", CONFIGS)
def test_cuda_matches_naive_torch_and_cpu(config, shape, monkeypatch):
    """On the GPU, fresh weights, seeds, conditions and temperature: the CUDA op draws the naive
    sampler's maps (run on the GPU), the PyTorch loop's (on the GPU) and the CPU op's, at batch
    sizes 1, 5 and 18 (a partial tile of 16 maps, and more than one), with CUDA-graph replay
    (the default) and with the kernels launched one by one (GALSIM_VQVAE_CUDA_GRAPHS=0), with
    the per-position products of the tiled kernel and of the small-batch one
    (GALSIM_VQVAE_CUDA_GEMV_MAX_BATCH: 0 for none, 64 for every batch here)."""
    rng = np.random.default_rng([FRESH, 500 + CONFIGS.index((config, shape))])
    prior = fresh_prior(rng, **config)
    n = 18
    cond, label = fresh_conditions(rng, prior, n)
    seeds = per_sample_seeds(int(rng.integers(2 ** 63)), n)
    temperature = float(rng.choice([0.3, 1.0, 2.5]))
    cpu = sample_fast(prior, n, shape, cond, label, seeds, temperature,
                      implementation="compiled")
    gpu = prior.cuda()
    msg = f"FRESH = {FRESH}, T = {temperature}"
    naive = sample_naive(gpu, n, shape, cond, label, seeds, temperature)
    assert torch.equal(naive.cpu(), cpu), msg
    loop = sample_fast(gpu, n, shape, cond, label, seeds, temperature, implementation="torch")
    assert torch.equal(loop.cpu(), cpu), msg
    for graphs, gemv in (("1", "0"), ("0", "0"), ("1", "64"), ("0", "64")):
        monkeypatch.setenv("GALSIM_VQVAE_CUDA_GRAPHS", graphs)
        monkeypatch.setenv("GALSIM_VQVAE_CUDA_GEMV_MAX_BATCH", gemv)
        for batch_size in (1, 5, 18):
            codes = sample_fast(gpu, n, shape, cond, label, seeds, temperature,
                                batch_size=batch_size, implementation="compiled")
            assert codes.device.type == "cuda"
            assert torch.equal(codes.cpu(), naive.cpu()), \
                f"{msg}, graphs={graphs}, gemv={gemv}, batch_size={batch_size}"


@needs_cuda
@pytest.mark.cuda
def test_cuda_gap_and_realistic_size(monkeypatch):
    """K=512, 64 channels, 21-wide rows (several passes round the row caches) on the GPU: CUDA op
    (both per-position kernels), CPU op and PyTorch loop agree, and the gaps agree with the
    teacher-forced naive logits."""
    rng = np.random.default_rng([FRESH, 600])
    prior = fresh_prior(rng, num_codes=512, channels=64, layers=3, kernel_size=5, cond_dim=2)
    n, shape = 6, (5, 21)
    cond, _ = fresh_conditions(rng, prior, n)
    seeds = per_sample_seeds(int(rng.integers(2 ** 63)), n)
    network = float64_prior(prior.cuda())
    biases = network._layer_biases(n, cond.double().cuda(), None, torch.float64)
    bias = torch.stack([b[:, :, 0, 0] for b in biases], 1)
    sd = ops.seeds_tensor(seeds, "cuda")
    codes, gap = ops.pixelcnn_sample(flat_weights(network), bias, sd, shape, 1.0, 5)
    monkeypatch.setenv("GALSIM_VQVAE_CUDA_GEMV_MAX_BATCH", "64")
    gemv, gemv_gap = ops.pixelcnn_sample(flat_weights(network), bias, sd, shape, 1.0, 5)
    monkeypatch.delenv("GALSIM_VQVAE_CUDA_GEMV_MAX_BATCH")
    assert torch.equal(gemv, codes), f"FRESH = {FRESH}"
    torch.testing.assert_close(gemv_gap, gap, rtol=0, atol=1e-10, msg=f"FRESH = {FRESH}")
    cpu = sample_fast(prior.cpu(), n, shape, cond, None, seeds, implementation="compiled")
    assert torch.equal(codes.cpu(), cpu), f"FRESH = {FRESH}"
    loop = sample_fast(prior.cuda(), n, shape, cond, None, seeds, implementation="torch")
    assert torch.equal(loop.cpu(), cpu), f"FRESH = {FRESH}"
    expected = teacher_forced_gap(prior.cuda(), codes, cond.cuda(), None, seeds, 1.0)
    torch.testing.assert_close(gap, expected, rtol=0, atol=1e-10, msg=f"FRESH = {FRESH}")


@needs_cuda
@pytest.mark.cuda
def test_cuda_issue_configuration_on_a_side_stream(monkeypatch):
    """The issue's prior (15 layers, 128 channels, K=512, 21x21), called from a non-default
    stream: the CUDA op draws the maps of the PyTorch loop, and its gaps are the naive ones."""
    rng = np.random.default_rng([FRESH, 700])
    prior = fresh_prior(rng, num_codes=512, channels=128, layers=15, kernel_size=5).cuda()
    n, shape = 3, (21, 21)
    seeds = per_sample_seeds(int(rng.integers(2 ** 63)), n)
    loop = sample_fast(prior, n, shape, seeds=seeds, implementation="torch")
    sd = ops.seeds_tensor(seeds, "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        codes, gap = ops.pixelcnn_sample(flat_weights(float64_prior(prior)), None, sd, shape, 1.0,
                                         5)
        same = torch.equal(codes, loop)  # on the side stream, right after the call
    torch.cuda.current_stream().wait_stream(stream)
    assert same, f"FRESH = {FRESH}"
    monkeypatch.setenv("GALSIM_VQVAE_CUDA_GEMV_MAX_BATCH", "64")
    gemv, _ = ops.pixelcnn_sample(flat_weights(float64_prior(prior)), None, sd, shape, 1.0, 5)
    assert torch.equal(gemv, loop), f"FRESH = {FRESH}"
    expected = teacher_forced_gap(prior, codes, None, None, seeds, 1.0)
    torch.testing.assert_close(gap, expected, rtol=0, atol=1e-10, msg=f"FRESH = {FRESH}")


@needs_cuda
@pytest.mark.cuda
def test_cuda_emulator_fast_is_naive(tiny_emulator):
    """The Emulator on the GPU: its default sampler (the CUDA op) draws the naive maps."""
    from galsim_vqvae.emulator import Emulator

    emulator = Emulator.load(tiny_emulator.path, device="cuda")
    assert ops.sampler_backend("cuda") == "cuda"
    conditions = {"mag": [22.0, 24.5, 23.0, 23.5], "hlr": [0.3, 1.0, 0.5, 0.7]}
    fast = emulator.sample_codes(4, conditions, seed=FRESH)
    naive = emulator.sample_codes(4, conditions, seed=FRESH, method="naive")
    assert np.array_equal(fast, naive), f"FRESH = {FRESH}"
    assert np.array_equal(fast, tiny_emulator.sample_codes(4, conditions, seed=FRESH))


@needs_op
def test_op_noise_is_the_reference_noise():
    """Tied logits (the draw is the argmax of the noise alone) over 300 maps with fresh seeds,
    K = 515 (not a multiple of 4): the C++ op's in-kernel Philox noise picks the reference's
    argmax everywhere; seeds at and above 2**63 included."""
    rng = np.random.default_rng([FRESH, 900])
    prior = fresh_prior(rng, num_codes=515, channels=4, layers=1, kernel_size=3)
    with torch.no_grad():
        prior.head[-1].weight.zero_()
        prior.head[-1].bias.fill_(0.5)
    n, shape = 300, (3, 4)
    seeds = [int(s) for s in rng.integers(0, 2 ** 63, n - 2, dtype=np.uint64)] + [2 ** 63,
                                                                                   2 ** 64 - 1]
    expected = gumbel_noise(seeds, shape, 515).argmax(-1)
    codes = sample_fast(prior, n, shape, seeds=seeds, implementation="compiled")
    assert torch.equal(codes, expected), f"FRESH = {FRESH}"


@needs_cuda
@pytest.mark.cuda
def test_cuda_noise_and_maps_are_the_cpu_ones_over_hundreds_of_maps():
    """Philox inside both ops: 400 maps with fresh seeds on tied logits (noise alone: CUDA op ==
    reference argmax) and on a fresh conditional prior (CUDA op == C++ op, bit for bit)."""
    rng = np.random.default_rng([FRESH, 1000])
    n = 400
    seeds = per_sample_seeds(int(rng.integers(2 ** 63)), n)
    tied = fresh_prior(rng, num_codes=515, channels=4, layers=1, kernel_size=3)
    with torch.no_grad():
        tied.head[-1].weight.zero_()
        tied.head[-1].bias.fill_(0.5)
    codes = sample_fast(tied.cuda(), n, (3, 4), seeds=seeds, implementation="compiled")
    assert torch.equal(codes.cpu(), gumbel_noise(seeds, (3, 4), 515).argmax(-1)), \
        f"FRESH = {FRESH}"
    prior = fresh_prior(rng, num_codes=64, channels=16, layers=3, kernel_size=5, cond_dim=2)
    cond, _ = fresh_conditions(rng, prior, n)
    cpu = sample_fast(prior, n, (7, 9), cond, None, seeds, implementation="compiled")
    gpu = sample_fast(prior.cuda(), n, (7, 9), cond, None, seeds, implementation="compiled")
    assert torch.equal(gpu.cpu(), cpu), f"FRESH = {FRESH}"


@needs_op
def test_peaked_logits_skip_noise_and_still_draw_the_naive_maps():
    """Logits spread over ~100 (as in the trained model): the ops skip the noise of codes that
    cannot be among the two best scores (csrc/philox.h); the maps and the top-2 gaps are still
    the naive sampler's, also at a low temperature (which spreads the scores further)."""
    rng = np.random.default_rng([FRESH, 1100])
    prior = fresh_prior(rng, num_codes=96, channels=8, layers=2, kernel_size=3, cond_dim=1)
    with torch.no_grad():
        prior.head[-1].weight.mul_(40.0)
    n, shape = 6, (5, 4)
    cond, _ = fresh_conditions(rng, prior, n)
    seeds = per_sample_seeds(int(rng.integers(2 ** 63)), n)
    for temperature in (1.0, 0.3):
        naive = sample_naive(prior, n, shape, cond, None, seeds, temperature)
        network = float64_prior(prior)
        biases = network._layer_biases(n, cond.double(), None, torch.float64)
        bias = torch.stack([b[:, :, 0, 0] for b in biases], 1)
        codes, gap = ops.pixelcnn_sample(flat_weights(network), bias, ops.seeds_tensor(seeds),
                                         shape, temperature, 3)
        assert torch.equal(codes, naive), f"FRESH = {FRESH}"
        expected = teacher_forced_gap(prior, codes, cond, None, seeds, temperature)
        torch.testing.assert_close(gap, expected, rtol=0, atol=1e-9, msg=f"FRESH = {FRESH}")
