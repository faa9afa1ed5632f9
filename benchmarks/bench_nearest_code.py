"""pytest-benchmark suite: ``ops.nearest_code`` against torch cdist+argmin and matmul+argmin on the
CPU, at the issue's shapes (N = 14,112 = 32 stamps x 21 x 21, and N = 112,896; D = 64, K = 512).

    cd benchmarks && pytest bench_nearest_code.py --benchmark-group-by=param:n \
        --benchmark-columns=median,iqr,rounds

Each group pairs the op with both torch paths in the same run; compare medians within a group.
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
