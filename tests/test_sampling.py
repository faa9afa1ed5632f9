"""The naive (reference) sampler: per-sample reproducibility, exactness of the draw, conditioning."""

import numpy as np
import pytest
import torch
from scipy import stats

from galsim_vqvae.errors import VQVAEInputError
from galsim_vqvae.nn.pixelcnn import GatedPixelCNN
from galsim_vqvae.nn.sampling import (SAMPLER_NOISE_VERSION, gumbel_noise, per_sample_seeds,
                                      philox4x32_10, sample_naive)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_prior(seed=0, dtype=torch.float64, logit_scale=1.0, scale=1.0, **kwargs):
    """A hand-set prior: random weights, all scaled by ``scale``, logits further spread."""
    torch.manual_seed(seed)
    prior = GatedPixelCNN(**kwargs).to(dtype)
    with torch.no_grad():  # spread the logits so the distributions are far from uniform
        for p in prior.parameters():
            p.mul_(scale)
        prior.head[-1].weight.mul_(logit_scale)
        prior.head[-1].bias.normal_(0.0, logit_scale)
    return prior


def test_per_sample_seeds():
    a = per_sample_seeds(123, 50)
    assert a == per_sample_seeds(123, 50)
    assert len(set(a)) == 50
    assert all(isinstance(s, int) and 0 <= s < 2 ** 63 for s in a)
    assert per_sample_seeds(123, 7) == a[:7]  # a longer run extends a shorter one
    assert per_sample_seeds(123, 50, start=20) == a[20:]  # one shard of the run
    assert per_sample_seeds(123, 50, start=50) == []
    assert set(per_sample_seeds(124, 50)).isdisjoint(a)
    assert per_sample_seeds(np.int64(123), 3) == a[:3]
    assert per_sample_seeds(None, 4) != per_sample_seeds(None, 4)  # fresh entropy
    assert per_sample_seeds(5, 0) == []
    # 63-bit seeds use the top bits too (not just small numbers)
    assert max(per_sample_seeds(0, 200)) > 2 ** 62
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(VQVAEInputError, match="seed"):
            per_sample_seeds(bad, 3)
    with pytest.raises(VQVAEInputError, match="n must"):
        per_sample_seeds(1, -2)


# Random123's published known-answer vectors for Philox4x32-10 (its tests/kat_vectors):
# (counter, key, output).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def test_philox_known_answers():
    for counter, key, expected in PHILOX_KAT:
        assert tuple(int(w) for w in philox4x32_10(counter, key)) == expected
    # vectorised: the same words whatever the broadcast
    counters = np.array([c for c, _, _ in PHILOX_KAT], dtype=np.uint64).T
    keys = np.array([k for _, k, _ in PHILOX_KAT], dtype=np.uint64).T
    out = philox4x32_10(counters, keys)
    assert [tuple(int(w) for w in out[:, q]) for q in range(3)] == [e for _, _, e in PHILOX_KAT]


def test_gumbel_noise_is_the_documented_philox_stream():
    """Noise version 2: word k % 4 of Philox4x32-10 at counter (k // 4, j, i, 0), key = the seed's
    two halves; u = (word + 0.5) / 2**32; g = -log(-log(u)) in float64. Checked element by element
    with plain Python ints and math.log on fresh seeds (up to 2**64 - 1)."""
    import math
    assert SAMPLER_NOISE_VERSION == 2
    rng = np.random.default_rng()
    seeds = [int(s) for s in rng.integers(0, 2 ** 63, 2)] + [2 ** 64 - 1]
    noise = gumbel_noise(seeds, (3, 4), 6)
    assert noise.shape == (3, 3, 4, 6) and noise.dtype == torch.float64
    assert noise.device.type == "cpu"
    for b, s in enumerate(seeds):
        for i in range(3):
            for j in range(4):
                for k in range(6):
                    word = int(philox4x32_10((k // 4, j, i, 0), (s % 2 ** 32, s >> 32))[k % 4])
                    u = (word + 0.5) / 2 ** 32
                    assert abs(noise[b, i, j, k].item() + math.log(-math.log(u))) <= 1e-14, seeds
    # a map's noise does not depend on its shape: the top-left 2x3 of a 3x4 map is the 2x3 map's
    torch.testing.assert_close(gumbel_noise(seeds, (2, 3), 6), noise[:, :2, :3], rtol=0, atol=0)
    # nor on the other samples
    torch.testing.assert_close(gumbel_noise(seeds[1:2], (3, 4), 6)[0], noise[1], rtol=0, atol=0)
    # and it is Gumbel(0, 1): mean 0.5772, variance pi^2 / 6
    many = gumbel_noise(per_sample_seeds(1, 4), (21, 21), 512)
    assert abs(many.mean().item() - 0.5772) < 0.01 and abs(many.var().item() - 1.645) < 0.02
    # The global RNG plays no part.
    torch.manual_seed(0)
    again = gumbel_noise(seeds, (3, 4), 6)
    torch.testing.assert_close(again, noise, rtol=0, atol=0)


SMALL = dict(num_codes=6, channels=8, layers=3, kernel_size=3)


def test_reproducible_and_independent_of_batch():
    prior = make_prior(logit_scale=3.0, **SMALL)
    seeds = per_sample_seeds(42, 6)
    a = sample_naive(prior, 6, (4, 5), seeds=seeds)
    assert a.shape == (6, 4, 5) and a.dtype == torch.int64
    assert int(a.min()) >= 0 and int(a.max()) < SMALL["num_codes"]
    torch.testing.assert_close(sample_naive(prior, 6, (4, 5), seeds=seeds), a, rtol=0, atol=0)
    # drawn alone, in another batch, in a different order, or in chunks: the same map
    alone = sample_naive(prior, 1, (4, 5), seeds=[seeds[3]])
    torch.testing.assert_close(alone[0], a[3], rtol=0, atol=0)
    mixed = sample_naive(prior, 3, (4, 5), seeds=[seeds[5], 777, seeds[0]])
    torch.testing.assert_close(mixed[0], a[5], rtol=0, atol=0)
    torch.testing.assert_close(mixed[2], a[0], rtol=0, atol=0)
    chunked = sample_naive(prior, 6, (4, 5), seeds=seeds, batch_size=4)
    torch.testing.assert_close(chunked, a, rtol=0, atol=0)
    # different seeds give different maps
    maps = {tuple(m.flatten().tolist()) for m in a}
    assert len(maps) == 6
    # the global RNG plays no part
    torch.manual_seed(1234)
    torch.testing.assert_close(sample_naive(prior, 6, (4, 5), seeds=seeds), a, rtol=0, atol=0)


def test_sample_is_the_gumbel_argmax_of_its_own_logits():
    """Teacher-forced check of every position: code = argmax(logits / T + g) in raster order."""
    prior = make_prior(logit_scale=2.0, cond_dim=2, **SMALL)
    seeds = per_sample_seeds(3, 5)
    cond = torch.randn(5, 2, dtype=torch.float64)
    for temperature in (1.0, 0.3):
        codes = sample_naive(prior, 5, (3, 4), cond=cond, seeds=seeds, temperature=temperature)
        with torch.no_grad():
            logits = prior(codes, cond)  # [n, K, H, W]; position (i, j) sees only its past
        noise = gumbel_noise(seeds, (3, 4), SMALL["num_codes"]).double()
        expected = (logits.permute(0, 2, 3, 1) / temperature + noise).argmax(-1)
        torch.testing.assert_close(codes, expected, rtol=0, atol=0)


def _chi2_pvalue(observed_codes, probs):
    counts = np.bincount(observed_codes, minlength=len(probs))
    return stats.chisquare(counts, probs * counts.sum()).pvalue


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_empirical_distribution_matches_softmax(temperature):
    """Chi-square at the first position (empty context) and at the second one given the first."""
    k = 5
    prior = make_prior(seed=7, scale=3.0, num_codes=k, channels=6, layers=2, kernel_size=3)
    n = 4000
    codes = sample_naive(prior, n, (1, 2), seeds=per_sample_seeds(11, n),
                         temperature=temperature, batch_size=n).numpy()
    with torch.no_grad():
        ctx = torch.zeros(k, 1, 2, dtype=torch.int64)
        ctx[:, 0, 0] = torch.arange(k)
        logits = prior(ctx).double() / temperature  # [k, K, 1, 2]
    p_first = torch.softmax(logits[0, :, 0, 0], 0).numpy()
    assert p_first.max() > 2 * p_first.min()  # a clearly non-uniform target
    assert _chi2_pvalue(codes[:, 0, 0], p_first) > 1e-3
    # the test has power: the same counts reject a uniform distribution
    assert _chi2_pvalue(codes[:, 0, 0], np.full(k, 1.0 / k)) < 1e-6
    c = int(np.bincount(codes[:, 0, 0]).argmax())
    given = codes[codes[:, 0, 0] == c, 0, 1]
    p_second = torch.softmax(logits[c, :, 0, 1], 0).numpy()
    assert np.abs(p_second - p_first).max() > 0.05  # the context matters
    assert _chi2_pvalue(given, p_second) > 1e-3
    assert _chi2_pvalue(given, p_first) < 1e-3  # and it does depend on the context


def test_conditional_sampling():
    prior = make_prior(logit_scale=3.0, cond_dim=2, num_classes=3, **SMALL)
    seeds = per_sample_seeds(5, 4)
    cond = np.array([[0.5, -1.0], [2.0, 0.0], [-1.5, 1.0], [0.0, 0.0]])
    labels = [0, 1, 2, 1]
    a = sample_naive(prior, 4, (4, 4), cond=cond, class_label=labels, seeds=seeds)
    alone = sample_naive(prior, 1, (4, 4), cond=torch.tensor(cond[2:3]), class_label=[2],
                         seeds=seeds[2:3])
    torch.testing.assert_close(alone[0], a[2], rtol=0, atol=0)
    # same seeds, different conditions: different maps
    b = sample_naive(prior, 4, (4, 4), cond=-cond, class_label=[2, 0, 1, 0], seeds=seeds)
    assert not torch.equal(a, b)
    with pytest.raises(VQVAEInputError, match="cond"):
        sample_naive(prior, 4, (4, 4), class_label=labels, seeds=seeds)
    with pytest.raises(VQVAEInputError, match="cond must have shape"):
        sample_naive(prior, 4, (4, 4), cond=cond[:3], class_label=labels, seeds=seeds)
    with pytest.raises(VQVAEInputError, match="class_label"):
        sample_naive(prior, 4, (4, 4), cond=cond, class_label=[0.5] * 4, seeds=seeds)


def test_dtype_and_device_do_not_change_the_noise():
    """The noise depends on the seeds alone, whatever the prior's dtype/device, so a float32 and a
    float64 copy of a prior agree except at near-ties."""
    prior64 = make_prior(logit_scale=3.0, **SMALL)
    prior32 = make_prior(logit_scale=3.0, dtype=torch.float32, **SMALL)
    seeds = per_sample_seeds(8, 8)
    a = sample_naive(prior64, 8, (3, 3), seeds=seeds)
    b = sample_naive(prior32, 8, (3, 3), seeds=seeds)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    prior = make_prior(logit_scale=3.0, **SMALL)
    seeds = per_sample_seeds(8, 8)
    a = sample_naive(prior, 8, (4, 4), seeds=seeds)
    b = sample_naive(prior.cuda(), 8, (4, 4), seeds=seeds)
    assert b.device.type == "cuda"
    torch.testing.assert_close(b.cpu(), a, rtol=0, atol=0)


def test_bad_arguments():
    prior = make_prior(**SMALL)
    for t in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(VQVAEInputError, match="temperature"):
            sample_naive(prior, 2, (2, 2), seeds=[1, 2], temperature=t)
    with pytest.raises(VQVAEInputError, match="2 seeds for n=3"):
        sample_naive(prior, 3, (2, 2), seeds=[1, 2])
    with pytest.raises(VQVAEInputError, match="seed"):
        sample_naive(prior, 2, (2, 2), seeds=[1, -2])
    with pytest.raises(VQVAEInputError, match="shape"):
        sample_naive(prior, 2, (2, 0), seeds=[1, 2])
    with pytest.raises(VQVAEInputError, match="n must"):
        sample_naive(prior, -1, (2, 2))
    assert sample_naive(prior, 0, (2, 3), seeds=[]).shape == (0, 2, 3)
    # the prior's training flag is restored
    prior.train()
    sample_naive(prior, 1, (2, 2), seeds=[1])
    assert prior.training
