"""Naive against cached (fast) sampling of the Gated PixelCNN prior on the CPU, paired in one run:
the naive sampler, the PyTorch cached loop and the compiled C++ op (``sample_fast``'s
``implementation="torch"`` and ``"compiled"``).

As a pytest-benchmark suite (prints the ratio table at the end; ``-s`` to see it)::

    PYTHONPATH=. python -m pytest benchmarks/bench_sampling.py -s

(torch's default thread count; prefix ``OMP_NUM_THREADS=1`` on a busy machine, see
docs/sampling.md).
In pytest-benchmark's own table the naive rows time the ``NAIVE_POSITIONS`` timed positions; the
ratio table printed at the end uses the extrapolation to all H*W positions.

The table gives code maps/s of each, the ratios, and the compiled sampler's time over one full
forward pass of the float64 prior on the same batch (how far it is from its arithmetic floor).
Every sampler evaluates the logits in float64 (``docs/sampling.md``); ``naive32`` is the naive loop
on the float32 prior, the sampler as it was before that change, for reference.

As a script that prints a table (``--threads N`` sets torch's thread count, ``--full-naive`` runs
the naive sampler over every position instead of extrapolating)::

    PYTHONPATH=. python benchmarks/bench_sampling.py [--threads 1] [--repeats 3] [--full-naive]

All samplers draw 21x21 maps from a float32 prior with K=512 codes and 5x5 kernels: a small one
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

from galsim_vqvae import ops
from galsim_vqvae.nn.fast_sampling import cache_bytes, row_step_bytes, sample_fast
from galsim_vqvae.nn.pixelcnn import GatedPixelCNN
from galsim_vqvae.nn.sampling import float64_prior, gumbel_noise, per_sample_seeds, sample_naive

SHAPE = (21, 21)
NUM_CODES = 512
PRIORS = {"6x64": dict(layers=6, channels=64), "15x128": dict(layers=15, channels=128)}
BATCHES = (1, 16)
NAIVE_POSITIONS = 3
# sample_fast implementations timed: the compiled op where it is built
FAST = ("torch", "compiled") if ops.sampler_load_error("cpu") is None else ("torch",)


def make_prior(name):
    torch.manual_seed(0)
    return GatedPixelCNN(num_codes=NUM_CODES, kernel_size=5, **PRIORS[name]).eval()


def time_fast(prior, batch, seed=0, implementation="compiled"):
    seeds = per_sample_seeds(seed, batch)
    start = time.perf_counter()
    sample_fast(prior, batch, SHAPE, seeds=seeds, implementation=implementation)
    return time.perf_counter() - start


def time_forward(prior, batch):
    """Seconds for one full forward pass of the float64 prior on ``batch`` maps (the arithmetic
    floor of the cached samplers, which do the same multiply-adds spread over H*W steps)."""
    network = float64_prior(prior)
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, prior.num_codes, (batch, *SHAPE), generator=gen)
    with torch.no_grad():
        network(codes)
        start = time.perf_counter()
        network(codes)
        return time.perf_counter() - start


def time_naive(prior, batch, seed=0, positions=NAIVE_POSITIONS, precision="float64"):
    """Seconds for `sample_naive` of ``batch`` maps: measured in full if ``positions`` is None,
    else its loop body timed over ``positions`` positions and scaled to H*W (every pass costs the
    same: the network always runs on the whole [B, H, W] map). ``precision="float32"``: the same
    loop on the float32 prior (the naive sampler before every sampler moved to float64)."""
    seeds = per_sample_seeds(seed, batch)
    if positions is None and precision == "float64":
        start = time.perf_counter()
        sample_naive(prior, batch, SHAPE, seeds=seeds)
        return time.perf_counter() - start
    network = float64_prior(prior) if precision == "float64" else prior
    height, width = SHAPE
    positions = height * width if positions is None else positions
    start = time.perf_counter()
    noise = gumbel_noise(seeds, SHAPE, prior.num_codes)
    setup = time.perf_counter() - start
    codes = torch.zeros(batch, height, width, dtype=torch.int64)
    with torch.no_grad():
        network(codes)  # warm-up (one-off allocations), not timed
        start = time.perf_counter()
        for pos in range(positions):
            i, j = divmod(pos, width)
            logits = network(codes)[:, :, i, j]
            scores = logits / 1.0 + noise[:, i, j]
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
@pytest.mark.parametrize("method", ["naive"] + list(FAST))
def test_sampling(benchmark, method, name, batch):
    prior = make_prior(name)
    if method == "naive":
        seconds = benchmark.pedantic(time_naive, args=(prior, batch), rounds=2, iterations=1)
    else:
        sample_fast(prior, 1, (3, 3), seeds=[0], implementation=method)  # warm-up
        benchmark.pedantic(time_fast, args=(prior, batch, 0, method), rounds=2, iterations=1)
        # pytest-benchmark times the call; the naive figure is the extrapolated value it returns
        seconds = benchmark.stats.stats.min
    _RESULTS[(name, batch, method)] = seconds
    benchmark.extra_info.update(maps_per_s=batch / seconds,
                                naive_extrapolated=(method == "naive"))


def format_table(results):
    lines = [f"sampling {SHAPE[0]}x{SHAPE[1]} maps, K={NUM_CODES}, float32 prior (float64 logits), "
             f"CPU, torch threads={torch.get_num_threads()}; maps/s",
             f"{'prior':>8} {'batch':>5} {'naive64':>9} {'naive32':>9} {'torch':>9} "
             f"{'compiled':>9} {'c/naive64':>9} {'c/naive32':>9} {'t/naive64':>9} "
             f"{'c/forward':>9}"]
    for name in PRIORS:
        for batch in BATCHES:
            naive = results.get((name, batch, "naive"))
            if naive is None:
                continue
            get = {m: results.get((name, batch, m)) for m in ("naive32", "torch", "compiled",
                                                               "forward")}

            def rate(seconds):
                return f"{batch / seconds:>9.4g}" if seconds else f"{'-':>9}"

            def ratio(a, b):
                return f"{a / b:>9.1f}" if a and b else f"{'-':>9}"

            lines.append(f"{name:>8} {batch:>5} {rate(naive)} {rate(get['naive32'])} "
                         f"{rate(get['torch'])} {rate(get['compiled'])} "
                         f"{ratio(naive, get['compiled'])} "
                         f"{ratio(get['naive32'], get['compiled'])} "
                         f"{ratio(naive, get['torch'])} {ratio(get['compiled'], get['forward'])}")
    return "\n".join(lines)


# ---------------------------------------------------------------- cache memory

def _peak_rss_child(name, batch, implementation, queue):
    torch.set_num_threads(1)
    prior = make_prior(name)
    # warm-up: libraries, kernels, the float64 weights (and their packed panels) in memory
    sample_fast(prior, 1, (3, 3), seeds=[0], implementation=implementation)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sample_fast(prior, batch, SHAPE, seeds=per_sample_seeds(0, batch),
                implementation=implementation)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put((after - before) * 1024)  # ru_maxrss is in KiB on Linux


def peak_memory(name, batch, implementation="compiled"):
    """Measured growth of the peak resident memory of a fresh process over one `sample_fast`
    call, against the formula for the caches plus the row step's scratch (`row_step_bytes`: with
    the im2col for the PyTorch loop, without for the C++ op), the Gumbel noise (float64, the
    PyTorch loop only: the op computes it where it draws) and the codes."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_rss_child, args=(name, batch, implementation, queue))
    proc.start()
    measured = queue.get()
    proc.join()
    height, width = SHAPE
    cfg = PRIORS[name]
    caches = cache_bytes(batch, cfg["layers"], cfg["channels"], width, 5, NUM_CODES)
    scratch = row_step_bytes(batch, cfg["channels"], width, 5, im2col=(implementation == "torch"))
    noise = 8 * batch * height * width * NUM_CODES if implementation == "torch" else 0
    codes = 8 * batch * height * width
    return dict(measured=measured, caches=caches, scratch=scratch, noise=noise, codes=codes,
                predicted=caches + scratch + noise + codes)


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
        print(f"{'prior':>8} {'impl':>8} {'batch':>5} {'caches MB':>10} {'scratch MB':>11} "
              f"{'noise MB':>9} {'predicted MB':>13} {'measured MB':>12}")
        for name in args.priors:
            for implementation in FAST:
                for batch in args.memory:
                    m = peak_memory(name, batch, implementation)
                    print(f"{name:>8} {implementation:>8} {batch:>5} {m['caches'] / 1e6:>10.2f} "
                          f"{m['scratch'] / 1e6:>11.2f} {m['noise'] / 1e6:>9.2f} "
                          f"{m['predicted'] / 1e6:>13.2f} {m['measured'] / 1e6:>12.2f}",
                          flush=True)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for name in args.priors:
        prior = make_prior(name)
        for implementation in FAST:
            sample_fast(prior, 1, (3, 3), seeds=[0], implementation=implementation)  # warm-up
        for batch in BATCHES:
            times = {}
            for r in range(args.repeats):  # interleaved, so all see the same machine load
                positions = None if args.full_naive else NAIVE_POSITIONS
                times.setdefault("naive", []).append(time_naive(prior, batch, r, positions))
                times.setdefault("naive32", []).append(
                    time_naive(prior, batch, r, positions, precision="float32"))
                for implementation in FAST:
                    times.setdefault(implementation, []).append(
                        time_fast(prior, batch, r, implementation))
                times.setdefault("forward", []).append(time_forward(prior, batch))
            for key, values in times.items():
                results[(name, batch, key)] = min(values)
            print(f"{name} batch {batch}: " + ", ".join(f"{k} {min(v):.3g} s"
                                                        for k, v in times.items()), flush=True)
    print(format_table(results))


if __name__ == "__main__":
    main()
