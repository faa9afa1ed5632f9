"""pytest-benchmark suite: ``ops.nearest_code`` against torch cdist+argmin and matmul+argmin on the
CPU, at the shapes of the default model's training (N = 14,112 = 32 stamps x 21 x 21, and N = 112,896; D = 64, K = 512).

``python benchmarks/bench_nearest_code.py`` also times the shipped model's encoding shapes
N = 441 and 7,056 (1 and 16 stamps) and the exact pure-PyTorch path
(`ops.nearest_code_reference`, the same indices as the op): the plain torch paths are not exact
(no tie rule, float32 rounding), so only the reference could stand in for the op.

    cd benchmarks && pytest bench_nearest_code.py --benchmark-columns=median,iqr,rounds

Each group pairs the op with both torch paths in the same run; compare medians within a group.
``python benchmarks/bench_nearest_code.py`` times the three paths interleaved call by call instead,
which is fairer when the machine is shared.
"""

import pytest
import torch

from galsim_vqvae import ops

D, K = 64, 512


def matmul_argmin(z, codebook):
    return ((codebook * codebook).sum(1) - 2 * z @ codebook.t()).argmin(1)


def cdist_argmin(z, codebook):
    return torch.cdist(z, codebook).argmin(1)


PATHS = {"op": ops.nearest_code, "cdist": cdist_argmin, "matmul": matmul_argmin}


@pytest.fixture(scope="module", params=[14_112, 112_896], ids=lambda n: f"n={n}")
def inputs(request):
    g = torch.Generator().manual_seed(request.param)
    return request.param, torch.randn(request.param, D, generator=g), torch.randn(K, D, generator=g)


@pytest.mark.parametrize("path", list(PATHS))
def test_nearest_code_cpu(benchmark, inputs, path):
    n, z, codebook = inputs
    benchmark.group = f"nearest_code N={n} D={D} K={K} ({torch.get_num_threads()} threads)"
    benchmark.extra_info.update(n=n, d=D, k=K, backend=ops.backend(), path=path)
    rounds = 20 if n < 50_000 else 5
    out = benchmark.pedantic(PATHS[path], args=(z, codebook), rounds=rounds, warmup_rounds=1)
    index = out[0] if isinstance(out, tuple) else out
    assert index.shape == (n,)


def interleaved(repeats=((441, 40), (7_056, 30), (14_112, 30), (112_896, 8)), seed=0):
    """The three paths timed call by call in turn (fairer on a shared, noisy machine); medians."""
    import statistics
    import time

    print(f"backend {ops.backend()!r}, {torch.get_num_threads()} threads")
    for n, reps in repeats:
        g = torch.Generator().manual_seed(seed + n)
        z, codebook = torch.randn(n, D, generator=g), torch.randn(K, D, generator=g)
        paths = dict(PATHS, reference=ops.nearest_code_reference)
        times = {name: [] for name in paths}
        for fn in paths.values():
            fn(z, codebook)
        for _ in range(reps):
            for name, fn in paths.items():
                start = time.perf_counter()
                fn(z, codebook)
                times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        best = min(med["cdist"], med["matmul"])
        print(f"N={n} D={D} K={K}: op {med['op']:.3g} ms, cdist+argmin {med['cdist']:.3g} ms, "
              f"matmul+argmin {med['matmul']:.3g} ms, exact reference {med['reference']:.3g} ms: "
              f"{best / med['op']:.2f}x the faster plain torch path, "
              f"{med['reference'] / med['op']:.2f}x the exact one")


if __name__ == "__main__":
    interleaved()
