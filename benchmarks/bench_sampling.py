"""Naive against cached (fast) sampling of the Gated PixelCNN prior on the CPU, paired in one run.

As a pytest-benchmark suite (prints the ratio table at the end; ``-s`` to see it)::

    PYTHONPATH=. python -m pytest benchmarks/bench_sampling.py -s

(torch's default thread count; prefix ``OMP_NUM_THREADS=1`` on a busy machine, see
docs/sampling.md).
In pytest-benchmark's own table the naive rows time the ``NAIVE_POSITIONS`` timed positions; the
ratio table printed at the end uses the extrapolation to all H*W positions.

The table gives code maps/s of both, their ratio, and the fast sampler's time over one full forward
pass of the prior on the same batch (how far it is from its arithmetic floor).

As a script that prints a table (``--threads N`` sets torch's thread count, ``--full-naive`` runs
the naive sampler over every position instead of extrapolating)::

    PYTHONPATH=. python benchmarks/bench_sampling.py [--threads 1] [--repeats 3] [--full-naive]

Both samplers draw 21x21 maps from a float32 prior with K=512 codes and 5x5 kernels: a small one
(6 layers, 64 channels) and the 15-layer, 128-channel configuration of the issue, at batch 1 and 16.
The naive sampler runs the whole network once per position: H*W = 441 forward passes that all cost
the same. At 15 layers / 128 channels that is about an hour per batch of 16 on a 2-core machine, so
by default it is timed over its first ``NAIVE_POSITIONS`` positions (its own loop body: a forward
pass, the Gumbel scores and the argmax) and scaled to H*W, plus the one-off noise draw;
``--full-naive`` checks the extrapolation on the configurations where a full run is affordable.
"""

import argparse
import multiprocessing
import resource
import time

import pytest
import torch

from galsim_vqvae.nn.fast_sampling import cache_bytes, sample_fast
from galsim_vqvae.nn.pixelcnn import GatedPixelCNN
from galsim_vqvae.nn.sampling import gumbel_noise, per_sample_seeds, sample_naive

SHAPE = (21, 21)
NUM_CODES = 512
PRIORS = {"6x64": dict(layers=6, channels=64), "15x128": dict(layers=15, channels=128)}
BATCHES = (1, 16)
NAIVE_POSITIONS = 3


def make_prior(name):
    torch.manual_seed(0)
    return GatedPixelCNN(num_codes=NUM_CODES, kernel_size=5, **PRIORS[name]).eval()


def time_fast(prior, batch, seed=0):
    seeds = per_sample_seeds(seed, batch)
    start = time.perf_counter()
    sample_fast(prior, batch, SHAPE, seeds=seeds)
    return time.perf_counter() - start


def time_forward(prior, batch):
    """Seconds for one full forward pass of the prior on ``batch`` maps (the arithmetic floor of
    the cached sampler, which does the same multiply-adds spread over H*W steps)."""
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, prior.num_codes, (batch, *SHAPE), generator=gen)
    with torch.no_grad():
        prior(codes)
        start = time.perf_counter()
        prior(codes)
        return time.perf_counter() - start


def time_naive(prior, batch, seed=0, positions=NAIVE_POSITIONS):
    """Seconds for `sample_naive` of ``batch`` maps: measured in full if ``positions`` is None,
    else its loop body timed over ``positions`` positions and scaled to H*W (every pass costs the
    same: the network always runs on the whole [B, H, W] map)."""
    seeds = per_sample_seeds(seed, batch)
    if positions is None:
        start = time.perf_counter()
        sample_naive(prior, batch, SHAPE, seeds=seeds)
        return time.perf_counter() - start
    height, width = SHAPE
    start = time.perf_counter()
    noise = gumbel_noise(seeds, SHAPE, prior.num_codes)
    setup = time.perf_counter() - start
    codes = torch.zeros(batch, height, width, dtype=torch.int64)
    with torch.no_grad():
        prior(codes)  # warm-up (one-off allocations), not timed
        start = time.perf_counter()
        for pos in range(positions):
            i, j = divmod(pos, width)
            logits = prior(codes)[:, :, i, j]
            scores = logits.to(torch.float32) / 1.0 + noise[:, i, j]
            codes[:, i, j] = scores.argmax(dim=1)
        per_position = (time.perf_counter() - start) / positions
    return setup + per_position * height * width


# ---------------------------------------------------------------- pytest-benchmark suite

_RESULTS = {}


@pytest.fixture(scope="module", autouse=True)
def ratio_table():
    yield
    print("\n" + format_table(_RESULTS))


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", list(PRIORS))
@pytest.mark.parametrize("method", ["naive", "fast"])
def test_sampling(benchmark, method, name, batch):
    prior = make_prior(name)
    if method == "fast":
        sample_fast(prior, 1, (3, 3), seeds=[0])  # warm-up
        seconds = benchmark.pedantic(time_fast, args=(prior, batch), rounds=2, iterations=1)
    else:
        seconds = benchmark.pedantic(time_naive, args=(prior, batch), rounds=2, iterations=1)
    # pytest-benchmark times the call; the naive figure is the extrapolated value it returns
    seconds = seconds if method == "naive" else benchmark.stats.stats.min
    _RESULTS[(name, batch, method)] = seconds
    benchmark.extra_info.update(maps_per_s=batch / seconds,
                                naive_extrapolated=(method == "naive"))


def format_table(results):
    lines = [f"sampling {SHAPE[0]}x{SHAPE[1]} maps, K={NUM_CODES}, float32, CPU, "
             f"torch threads={torch.get_num_threads()}",
             f"{'prior':>8} {'batch':>5} {'naive maps/s':>13} {'fast maps/s':>12} {'ratio':>7}"
             f" {'fast/forward':>13}"]
    for name in PRIORS:
        for batch in BATCHES:
            naive, fast = results.get((name, batch, "naive")), results.get((name, batch, "fast"))
            if naive is None or fast is None:
                continue
            forward = results.get((name, batch, "forward"))
            lines.append(f"{name:>8} {batch:>5} {batch / naive:>13.4g} {batch / fast:>12.4g} "
                         f"{naive / fast:>7.1f}"
                         + (f" {fast / forward:>13.1f}" if forward else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------- cache memory

def _peak_rss_child(name, batch, queue):
    torch.set_num_threads(1)
    prior = make_prior(name)
    sample_fast(prior, 1, (3, 3), seeds=[0])  # warm-up: libraries, kernels, weights in memory
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sample_fast(prior, batch, SHAPE, seeds=per_sample_seeds(0, batch))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put((after - before) * 1024)  # ru_maxrss is in KiB on Linux


def peak_memory(name, batch):
    """Measured growth of the peak resident memory of a fresh process over one `sample_fast`
    call, against the formula for the caches plus the Gumbel noise and the output codes."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_rss_child, args=(name, batch, queue))
    proc.start()
    measured = queue.get()
    proc.join()
    height, width = SHAPE
    cfg = PRIORS[name]
    caches = cache_bytes(batch, cfg["layers"], cfg["channels"], width, 5, NUM_CODES)
    noise = 4 * batch * height * width * NUM_CODES
    codes = 8 * batch * height * width
    return dict(measured=measured, caches=caches, noise=noise, codes=codes,
                predicted=caches + noise + codes)


# ---------------------------------------------------------------- script

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs each")
    parser.add_argument("--full-naive", action="store_true",
                        help="time the naive sampler over all H*W positions")
    parser.add_argument("--priors", nargs="*", default=list(PRIORS))
    parser.add_argument("--memory", type=int, nargs="*", default=None, metavar="BATCH",
                        help="measure the peak memory of sample_fast at these batch sizes")
    args = parser.parse_args()
    if args.memory:
        print(f"{'prior':>8} {'batch':>5} {'caches MB':>10} {'noise MB':>9} {'predicted MB':>13} "
              f"{'measured MB':>12}")
        for name in args.priors:
            for batch in args.memory:
                m = peak_memory(name, batch)
                print(f"{name:>8} {batch:>5} {m['caches'] / 1e6:>10.2f} {m['noise'] / 1e6:>9.2f} "
                      f"{m['predicted'] / 1e6:>13.2f} {m['measured'] / 1e6:>12.2f}", flush=True)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for name in args.priors:
        prior = make_prior(name)
        sample_fast(prior, 1, (3, 3), seeds=[0])  # warm-up
        for batch in BATCHES:
            fast, naive, forward = [], [], []
            for r in range(args.repeats):  # interleaved, so both see the same machine load
                naive.append(time_naive(prior, batch, r,
                                        positions=None if args.full_naive else NAIVE_POSITIONS))
                fast.append(time_fast(prior, batch, r))
                forward.append(time_forward(prior, batch))
            results[(name, batch, "naive")] = min(naive)
            results[(name, batch, "fast")] = min(fast)
            results[(name, batch, "forward")] = min(forward)
            print(f"{name} batch {batch}: naive {min(naive):.2f} s, fast {min(fast):.3f} s",
                  flush=True)
    print(format_table(results))


if __name__ == "__main__":
    main()
