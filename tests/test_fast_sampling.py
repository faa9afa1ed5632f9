"""The cached sampler against the naive one: the same code maps for the same seeds, for each
implementation of `sample_fast` (the PyTorch loop and, where built, the compiled C++ op)."""

import pytest
import torch

from galsim_vqvae import ops
from galsim_vqvae.errors import VQVAEInputError
from galsim_vqvae.nn.fast_sampling import _Caches, cache_bytes, row_step_bytes, sample_fast
from galsim_vqvae.nn.pixelcnn import GatedPixelCNN
from galsim_vqvae.nn.sampling import per_sample_seeds, sample_naive


pytestmark = pytest.mark.usefixtures("one_thread")

# The implementations of sample_fast to check on the CPU: the compiled op where it is built.
IMPLEMENTATIONS = ["torch"] + (["compiled"] if ops.sampler_load_error("cpu") is None else [])


def make_prior(seed=0, dtype=torch.float64, logit_scale=3.0, **kwargs):
    """Fresh random weights; the biases randomised too (PyTorch's default init leaves them small
    but nonzero; here every bias is O(1) so a mistake in any bias path shows), logits spread so
    the distributions are far from uniform."""
    torch.manual_seed(seed)
    prior = GatedPixelCNN(**kwargs).to(dtype)
    with torch.no_grad():
        for name, p in prior.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
        prior.head[-1].weight.mul_(logit_scale)
    return prior


def conditions(prior, n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    cond = (torch.randn(n, prior.cond_dim, generator=gen, dtype=torch.float64)
            if prior.cond_dim else None)
    label = (torch.randint(0, prior.num_classes, (n,), generator=gen)
             if prior.num_classes else None)
    return cond, label


def assert_same_as_naive(prior, n, shape, seed, temperature=1.0, cond=None, label=None,
                         **kwargs):
    """Every implementation of sample_fast draws exactly the naive sampler's maps."""
    if cond is None and label is None:
        cond, label = conditions(prior, n, seed)
    seeds = per_sample_seeds(seed, n)
    naive = sample_naive(prior, n, shape, cond, label, seeds, temperature)
    for implementation in IMPLEMENTATIONS:
        fast = sample_fast(prior, n, shape, cond, label, seeds, temperature,
                           implementation=implementation, **kwargs)
        assert fast.dtype == torch.int64 and fast.shape == (n, *shape)
        torch.testing.assert_close(fast, naive, rtol=0, atol=0, msg=implementation)
    # not a degenerate case: the maps use several codes and differ between samples
    assert len(torch.unique(naive)) >= 2
    if n > 1:
        assert not (naive == naive[:1]).all()
    return naive


@pytest.mark.parametrize("kernel_size, layers, shape, temperature", [
    (3, 1, (4, 5), 1.0),
    (3, 2, (5, 3), 0.7),
    (5, 1, (3, 6), 1.3),
    (5, 3, (6, 4), 1.0),
    (3, 4, (4, 4), 0.5),
    (5, 4, (2, 7), 1.0),
    (7, 2, (5, 5), 1.0),
    (3, 3, (1, 6), 1.0),   # a single row: the vertical stack never reaches the horizontal one
    (5, 2, (6, 1), 1.0),   # a single column: everything comes from above
])
def test_matches_naive_float64(kernel_size, layers, shape, temperature):
    prior = make_prior(seed=kernel_size * 10 + layers, num_codes=11, channels=6, layers=layers,
                       kernel_size=kernel_size)
    assert_same_as_naive(prior, 4, shape, seed=layers, temperature=temperature)


def test_matches_naive_random_configurations():
    """Configurations drawn at random (seeded): kernel, depth, width, map shape, conditioning."""
    rng = torch.Generator().manual_seed(2026)

    def pick(*options):
        return options[torch.randint(len(options), (1,), generator=rng).item()]

    for trial in range(6):
        kwargs = dict(num_codes=pick(5, 16, 40), channels=pick(3, 8), layers=pick(1, 2, 3, 4),
                      kernel_size=pick(3, 5), cond_dim=pick(0, 1, 3), num_classes=pick(0, 2))
        prior = make_prior(seed=100 + trial, **kwargs)
        shape = (pick(1, 3, 5), pick(1, 4, 6))
        if shape[0] * shape[1] < 6:
            shape = (3, 4)
        assert_same_as_naive(prior, pick(2, 3), shape, seed=trial, temperature=pick(1.0, 0.8))


@pytest.mark.parametrize("cond_dim, num_classes", [(3, 0), (0, 4), (2, 3)])
def test_matches_naive_conditional(cond_dim, num_classes):
    prior = make_prior(seed=cond_dim + 7 * num_classes, num_codes=9, channels=6, layers=3,
                       kernel_size=3, cond_dim=cond_dim, num_classes=num_classes)
    with torch.no_grad():  # make the conditioning matter
        if prior.cond_proj is not None:
            prior.cond_proj.weight.mul_(3.0)
        if prior.class_embedding is not None:
            prior.class_embedding.weight.mul_(3.0)
    assert_same_as_naive(prior, 5, (4, 5), seed=3, temperature=0.8)
    # the conditions do change the draw (so the test above checks their path)
    seeds = per_sample_seeds(3, 5)
    cond, label = conditions(prior, 5, seed=3)
    other = sample_fast(prior, 5, (4, 5), None if cond is None else cond + 2.0,
                        None if label is None else (label + 1) % num_classes, seeds, 0.8)
    assert not torch.equal(other, sample_fast(prior, 5, (4, 5), cond, label, seeds, 0.8))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_batch_invariance(implementation):
    prior = make_prior(seed=5, num_codes=13, channels=8, layers=3, kernel_size=5, cond_dim=2)
    n, shape = 7, (5, 6)
    cond, _ = conditions(prior, n)
    seeds = per_sample_seeds(11, n)
    together = sample_fast(prior, n, shape, cond, seeds=seeds, implementation=implementation)
    for batch_size in (1, 3):
        torch.testing.assert_close(
            sample_fast(prior, n, shape, cond, seeds=seeds, batch_size=batch_size,
                        implementation=implementation), together,
            rtol=0, atol=0)
    for i in (0, 4, 6):
        alone = sample_fast(prior, 1, shape, cond[i:i + 1], seeds=[seeds[i]],
                            implementation=implementation)
        torch.testing.assert_close(alone[0], together[i], rtol=0, atol=0)
    # a different seed gives a different map
    assert not torch.equal(sample_fast(prior, 1, shape, cond[:1], seeds=[seeds[0] + 1],
                                       implementation=implementation)[0],
                           together[0])


def test_float32_prior():
    """float32 weights: every sampler evaluates them in float64, so the cached samplers (other
    summation orders than the naive convolutions) still draw exactly the naive maps."""
    prior = make_prior(seed=21, dtype=torch.float32, num_codes=64, channels=16, layers=4,
                       kernel_size=5, cond_dim=2)
    assert_same_as_naive(prior, 12, (6, 7), seed=17, temperature=0.9)


def test_realistic_width_float32():
    """K=512 codes, 32 channels, a 21-wide row: the draws of the big softmax agree too."""
    prior = make_prior(seed=3, dtype=torch.float32, logit_scale=1.0, num_codes=512, channels=32,
                       layers=2, kernel_size=5)
    assert_same_as_naive(prior, 3, (3, 21), seed=4)


def test_tied_logits_everywhere():
    """A prior whose logits are all equal draws argmax of the noise alone: checks the noise
    indexing [sample, row, column, code] independently of the network."""
    from galsim_vqvae.nn.sampling import gumbel_noise
    prior = make_prior(seed=2, num_codes=10, channels=4, layers=2, kernel_size=3)
    with torch.no_grad():
        prior.head[-1].weight.zero_()
        prior.head[-1].bias.fill_(0.25)
    seeds = per_sample_seeds(6, 3)
    for implementation in IMPLEMENTATIONS:
        codes = sample_fast(prior, 3, (4, 5), seeds=seeds, temperature=0.5,
                            implementation=implementation)
        torch.testing.assert_close(codes, gumbel_noise(seeds, (4, 5), 10).argmax(-1), rtol=0,
                                   atol=0)


def test_bad_arguments_and_state():
    prior = make_prior(num_codes=6, channels=4, layers=2, kernel_size=3)
    for t in (0, -1.0, float("nan"), float("inf"), "hot"):
        with pytest.raises(VQVAEInputError, match="temperature"):
            sample_fast(prior, 2, (2, 2), seeds=[1, 2], temperature=t)
    with pytest.raises(VQVAEInputError, match="2 seeds for n=3"):
        sample_fast(prior, 3, (2, 2), seeds=[1, 2])
    with pytest.raises(VQVAEInputError, match="seed"):
        sample_fast(prior, 2, (2, 2), seeds=[1, -2])
    with pytest.raises(VQVAEInputError, match="shape"):
        sample_fast(prior, 2, (2, 0), seeds=[1, 2])
    with pytest.raises(VQVAEInputError, match="n must"):
        sample_fast(prior, -1, (2, 2))
    with pytest.raises(VQVAEInputError, match="batch_size"):
        sample_fast(prior, 2, (2, 2), seeds=[1, 2], batch_size=0)
    with pytest.raises(VQVAEInputError, match="cond_dim=0"):
        sample_fast(prior, 2, (2, 2), cond=[[1.0], [2.0]], seeds=[1, 2])
    conditional = make_prior(num_codes=6, channels=4, layers=2, kernel_size=3, cond_dim=2,
                             num_classes=3)
    with pytest.raises(VQVAEInputError, match="cond must have shape"):
        sample_fast(conditional, 2, (2, 2), cond=[[1.0, 2.0]], class_label=[0, 1], seeds=[1, 2])
    with pytest.raises(VQVAEInputError, match="pass cond"):
        sample_fast(conditional, 2, (2, 2), class_label=[0, 1], seeds=[1, 2])
    with pytest.raises(VQVAEInputError, match="class_label"):
        sample_fast(conditional, 2, (2, 2), cond=[[1.0, 2.0]] * 2, class_label=[0.5, 1.0],
                    seeds=[1, 2])
    # arrays are accepted like in sample_naive
    import numpy as np
    out = sample_fast(conditional, 2, (2, 3), cond=np.ones((2, 2)), class_label=np.array([0, 2]),
                      seeds=[1, 2])
    assert out.shape == (2, 2, 3)
    assert sample_fast(prior, 0, (2, 3), seeds=[]).shape == (0, 2, 3)
    # the prior's training flag is restored, its weights untouched
    prior.train()
    before = {k: v.clone() for k, v in prior.state_dict().items()}
    sample_fast(prior, 1, (2, 2), seeds=[1], progress=True)
    assert prior.training
    for k, v in prior.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    prior = make_prior(num_codes=11, channels=8, layers=3, kernel_size=5, cond_dim=2)
    seeds = per_sample_seeds(8, 6)
    cond, _ = conditions(prior, 6)
    a = sample_fast(prior, 6, (5, 5), cond, seeds=seeds)
    b = sample_fast(prior.cuda(), 6, (5, 5), cond, seeds=seeds)
    assert b.device.type == "cuda"
    torch.testing.assert_close(b.cpu(), a, rtol=0, atol=0)


def test_cache_bytes_formula():
    for batch, layers, channels, width, kernel, codes, dtype in [
            (16, 15, 128, 21, 5, 512, torch.float32), (3, 2, 6, 7, 7, 11, torch.float64),
            (1, 1, 4, 1, 3, 2, torch.float32)]:
        caches = _Caches(batch, layers, channels, width, kernel // 2, codes, dtype, "cpu")
        itemsize = torch.empty(0, dtype=dtype).element_size()
        assert caches.nbytes == cache_bytes(batch, layers, channels, width, kernel, codes, itemsize)
    # 15 layers, 128 channels, 21 wide: 2.18 MB per map in float64, the samplers' dtype
    # (docs/sampling.md); 1.09 MB in float32
    assert cache_bytes(1, 15, 128, 21, 5, 512) == 2_182_152
    assert cache_bytes(1, 15, 128, 21, 5, 512, itemsize=4) == 1_091_076
    # the row step's scratch: pre-activations of a row, plus the im2col where there is one
    assert row_step_bytes(2, 128, 21, 5, im2col=False) == 8 * 2 * 21 * 256
    assert row_step_bytes(2, 128, 21, 5) == 8 * 2 * 21 * (256 + 3 * 5 * 128)
