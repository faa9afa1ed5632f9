"""Quick CPU benchmarks behind ``galsim-vqvae bench``: each op against its baseline, in one run.

The full suites are in ``benchmarks/`` (pytest-benchmark); this is the installed, dependency-free
version for a user's own machine. Figures are medians of ``repeats`` timed calls after a warm-up,
reported as ratios against the baseline measured in the same run.
"""

import statistics
import time

import torch

from . import ops


def _median_seconds(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_cpu_benchmarks(repeats=20, shapes=((14112, 64, 512),), seed=0):
    """Time ``ops.nearest_code`` against torch ``cdist``+argmin and matmul+argmin.

    Yields lines of a table: shape, milliseconds of each path, and the speed-up of the op over
    the faster torch path.
    """
    gen = torch.Generator().manual_seed(seed)
    yield (f"nearest_code on {torch.get_num_threads()} CPU threads, backend "
           f"{ops.backend()!r}, median of {repeats}")
    yield f"{'N':>8} {'D':>4} {'K':>5} {'op ms':>8} {'cdist ms':>9} {'matmul ms':>10} {'speed-up':>9}"
    for n, d, k in shapes:
        z = torch.randn(n, d, generator=gen)
        codebook = torch.randn(k, d, generator=gen)
        t_op = _median_seconds(lambda: ops.nearest_code(z, codebook), repeats)
        t_cdist = _median_seconds(lambda: torch.cdist(z, codebook).argmin(1), repeats)
        t_mm = _median_seconds(
            lambda: ((codebook * codebook).sum(1) - 2 * z @ codebook.t()).argmin(1), repeats)
        yield (f"{n:>8} {d:>4} {k:>5} {t_op * 1e3:>8.2f} {t_cdist * 1e3:>9.2f} "
               f"{t_mm * 1e3:>10.2f} {min(t_cdist, t_mm) / t_op:>8.2f}x")
