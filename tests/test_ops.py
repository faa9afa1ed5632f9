"""galsim_vqvae.ops.nearest_code: the compiled op (C++ here, CUDA where there is a GPU) against a
float64 brute force and exact rational arithmetic, on random and adversarial inputs."""

import os
import warnings
from fractions import Fraction

import pytest
import torch

from galsim_vqvae import ops
from galsim_vqvae.errors import VQVAEInputError

COMPILED = ops.backend() != "torch"
needs_op = pytest.mark.skipif(not COMPILED, reason="compiled op not built: " + str(ops.load_error()))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def implementations():
    """(name, function) pairs to check: the compiled op where built, and the reference."""
    impls = [("reference", ops.nearest_code_reference)]
    if COMPILED:
        impls.append(("op", lambda z, c: torch.ops.galsim_vqvae.nearest_code(z, c)))
    return impls


IMPLS = implementations()
IMPL_IDS = [name for name, _ in IMPLS]


def brute_float64(z, codebook, chunk=256):
    """argmin (first on ties) of the float64 squared distance of the float32-cast inputs."""
    z = z.float().double().cpu()
    c = codebook.float().double().cpu()
    index, dist = [], []
    for s in range(0, z.shape[0], chunk):
        d = (z[s:s + chunk, None, :] - c[None]).square().sum(-1)
        v, i = d.min(1)
        index.append(i)
        dist.append(v)
    if not index:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float64)
    return torch.cat(index), torch.cat(dist)


def exact_argmin(z, codebook):
    """The definition: lowest index of the minimal exact (rational) squared distance."""
    z, c = z.float().cpu().tolist(), codebook.float().cpu().tolist()
    out = []
    for row in z:
        d = [sum((Fraction(a) - Fraction(b)) ** 2 for a, b in zip(row, code)) for code in c]
        out.append(min(range(len(c)), key=lambda k: (d[k], k)))
    return torch.tensor(out, dtype=torch.int64)


@pytest.mark.skipif(os.environ.get("GALSIM_VQVAE_ALLOW_TORCH_OPS") == "1",
                    reason="GALSIM_VQVAE_ALLOW_TORCH_OPS=1: the PyTorch fallback is allowed")
def test_backend_is_compiled_here():
    assert ops.backend() != "torch", ops.load_error()
    assert ops.backend() in ("cpp", "cuda")


def _thread_ticks():
    """CPU clock ticks used so far by each thread of this process (Linux /proc)."""
    ticks = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks[tid] = int(fields[11]) + int(fields[12])
    return ticks


@needs_op
@pytest.mark.skipif(not (os.path.isdir("/proc/self/task") and torch._C.has_openmp),
                    reason="needs Linux /proc and an OpenMP build of torch")
def test_compiled_op_uses_its_threads():
    """The C++ op is built with OpenMP, so at::parallel_for really splits the work: with two
    torch threads both accrue CPU time (built without -fopenmp, one thread did everything)."""
    g = torch.Generator().manual_seed(11)
    z, codebook = torch.randn(60_000, 64, generator=g), torch.randn(512, 64, generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ops.nearest_code(z, codebook)
        before = _thread_ticks()
        for _ in range(4):
            ops.nearest_code(z, codebook)
        after = _thread_ticks()
    finally:
        torch.set_num_threads(threads)
    used = sorted((after[t] - before.get(t, 0) for t in after), reverse=True)
    assert len(used) >= 2 and used[1] >= 0.25 * used[0], used


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", [f for _, f in IMPLS], ids=IMPL_IDS)
@pytest.mark.parametrize("shape", [(1000, 64, 512), (257, 17, 33), (31, 3, 1), (5, 256, 70)])
def test_random_matches_float64(impl, shape, device):
    n, d, k = shape
    g = torch.Generator().manual_seed(n * 7 + d * 3 + k)
    z = torch.randn(n, d, generator=g)
    # Codes near the data, some near each other: the regime of a trained codebook.
    codebook = torch.randn(k, d, generator=g) * 0.5 + z[torch.randint(0, n, (k,), generator=g)] * 0.5
    index, dist = impl(z.to(device), codebook.to(device))
    ref_i, ref_d = brute_float64(z, codebook)
    assert index.dtype == torch.int64 and dist.dtype == torch.float32
    assert index.shape == (n,) and dist.shape == (n,)
    assert torch.equal(index.cpu(), ref_i)
    torch.testing.assert_close(dist.cpu().double(), ref_d, rtol=1e-7, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", [f for _, f in IMPLS], ids=IMPL_IDS)
def test_adversarial_exact(impl, device):
    g = torch.Generator().manual_seed(5)
    k, d = 24, 6
    base = torch.randn(k, d, generator=g)
    base[7] = base[2]                       # exact duplicates: the lowest index wins
    base[19] = base[2]
    base[11] = torch.nextafter(base[4], torch.full_like(base[4], 10.0))  # one ulp apart
    base[13] = -0.0                          # -0.0 and +0.0 codes at the same distance
    base[14] = 0.0
    z = torch.cat([
        base[[2, 7, 19, 4, 11, 13, 14]],
        base[[4, 11]] + 1e-7 * torch.randn(2, d, generator=g),
        torch.zeros(2, d), -torch.zeros(1, d),
        # exactly equidistant from codes 0 and 1 (their midpoint, when exactly representable)
        ((base[0].double() + base[1].double()) / 2).float()[None],
        torch.randn(20, d, generator=g),
    ])
    index, _ = impl(z.to(device), base.to(device))
    assert torch.equal(index.cpu(), exact_argmin(z, base))
    assert index[1].item() == 2 and index[2].item() == 2   # duplicates
    assert index[9].item() == 13 and index[10].item() == 13  # +-0.0 tie goes to the lower index


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", [f for _, f in IMPLS], ids=IMPL_IDS)
def test_exact_beyond_float64(impl, device):
    # d(0) = 2^60 + 2^-60 and d(1) = 2^60: equal in float64, but code 1 is nearer.
    z = torch.zeros(3, 2)
    codebook = torch.tensor([[2.0 ** 30, 2.0 ** -30], [2.0 ** 30, 0.0]])
    index, dist = impl(z.to(device), codebook.to(device))
    assert brute_float64(z, codebook)[0].tolist() == [0, 0, 0]   # float64 cannot tell
    assert index.tolist() == [1, 1, 1]
    assert dist.cpu().tolist() == [2.0 ** 60] * 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", [f for _, f in IMPLS], ids=IMPL_IDS)
@pytest.mark.parametrize("scale", [1e18, 1e30, 3e37, 1e-20, 1e-42])
def test_huge_and_tiny_magnitudes(impl, scale, device):
    g = torch.Generator().manual_seed(int(abs(torch.tensor(scale).log2().item())))
    codebook = (torch.randn(40, 8, generator=g, dtype=torch.float64) * scale).float()
    z = (codebook[torch.randint(0, 40, (30,), generator=g)].double()
         * (1 + 1e-3 * torch.randn(30, 8, generator=g, dtype=torch.float64))).float()
    z = torch.cat([z, (torch.randn(10, 8, generator=g, dtype=torch.float64) * scale).float()])
    index, dist = impl(z.to(device), codebook.to(device))
    assert torch.equal(index.cpu(), exact_argmin(z, codebook))
    ref_d = (z.double() - codebook.double()[index.cpu()]).square().sum(1)
    torch.testing.assert_close(dist.cpu(), ref_d.float(), rtol=1.2e-7, atol=0)  # inf past 3e38


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", [f for _, f in IMPLS], ids=IMPL_IDS)
def test_many_near_ties(impl, device):
    # Every code within a few ulps of every row: the fast pass keeps many candidates.
    g = torch.Generator().manual_seed(11)
    centre = torch.randn(1, 5, generator=g)
    ulps = torch.randint(-3, 4, (50, 5), generator=g).float()
    codebook = centre + ulps * torch.finfo(torch.float32).eps * centre.abs()
    z = centre + torch.randint(-3, 4, (40, 5), generator=g).float() * 1e-7 * centre.abs()
    index, _ = impl(z.to(device), codebook.to(device))
    assert torch.equal(index.cpu(), exact_argmin(z, codebook))


@needs_op
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes_compute_in_float32(dtype, device):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(300, 32, generator=g).to(dtype)
    codebook = torch.randn(64, 32, generator=g).to(dtype)
    index, dist = ops.nearest_code(z.to(device), codebook.to(device))
    ref_i, ref_d = ops.nearest_code(z.float().to(device), codebook.float().to(device))
    assert torch.equal(index, ref_i) and torch.equal(dist, ref_d)
    assert torch.equal(index.cpu(), brute_float64(z, codebook)[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", [f for _, f in IMPLS], ids=IMPL_IDS)
def test_non_contiguous_and_empty(impl, device):
    g = torch.Generator().manual_seed(4)
    zt = torch.randn(16, 200, generator=g).to(device)      # z = zt.T is [200, 16], not contiguous
    cb = torch.randn(48, 32, generator=g).to(device)[:, ::2]   # strided codebook [48, 16]
    index, dist = impl(zt.t(), cb)
    ref_i, ref_d = impl(zt.t().contiguous(), cb.contiguous())
    assert torch.equal(index, ref_i) and torch.equal(dist, ref_d)
    assert torch.equal(index.cpu(), brute_float64(zt.t(), cb)[0])
    i0, d0 = impl(torch.zeros(0, 16, device=device), cb)
    assert i0.shape == (0,) and d0.shape == (0,) and i0.dtype == torch.int64
    assert d0.dtype == torch.float32


def test_bad_input_is_named():
    with pytest.raises(VQVAEInputError, match="D=8"):
        ops.nearest_code(torch.zeros(3, 8), torch.ones(4, 7))
    with pytest.raises(VQVAEInputError, match="empty codebook"):
        ops.nearest_code(torch.ones(3, 8), torch.ones(0, 8))
    with pytest.raises(VQVAEInputError, match="shapes"):
        ops.nearest_code(torch.ones(3, 8, 1), torch.ones(4, 8))
    with pytest.raises(VQVAEInputError, match="floating point"):
        ops.nearest_code(torch.ones(3, 8, dtype=torch.int32), torch.ones(4, 8))
    if COMPILED:
        with pytest.raises(ValueError, match="D="):
            torch.ops.galsim_vqvae.nearest_code(torch.ones(3, 8), torch.ones(4, 7))


def test_no_gradient_and_straight_through():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(50, 8, generator=g, requires_grad=True)
    codebook = torch.randn(16, 8, generator=g)
    index, dist = ops.nearest_code(z, codebook)
    assert not index.requires_grad and not dist.requires_grad
    q = codebook[index]
    z_q = z + (q - z).detach()          # the quantizer's straight-through estimator
    z_q.square().sum().backward()
    torch.testing.assert_close(z.grad, 2 * q)


@needs_op
def test_opcheck():
    g = torch.Generator().manual_seed(8)
    for device in DEVICES:
        for n, d, k in [(40, 8, 16), (0, 4, 3), (7, 64, 512)]:
            args = (torch.randn(n, d, generator=g).to(device), torch.randn(k, d, generator=g).to(device))
            torch.library.opcheck(torch.ops.galsim_vqvae.nearest_code.default, args)


@needs_op
def test_torch_compile():
    g = torch.Generator().manual_seed(9)
    z = torch.randn(100, 16, generator=g)
    codebook = torch.randn(32, 16, generator=g)

    def quantize(z, codebook):
        index, dist = torch.ops.galsim_vqvae.nearest_code(z, codebook)
        return codebook[index], dist.sum()

    compiled = torch.compile(quantize, backend="aot_eager", fullgraph=True)
    q, s = compiled(z, codebook)
    q_ref, s_ref = quantize(z, codebook)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    wrapped = torch.compile(lambda z, c: ops.nearest_code(z, c)[0], backend="aot_eager")
    assert torch.equal(wrapped(z, codebook), brute_float64(z, codebook)[0])


def test_fallback_is_announced(monkeypatch):
    monkeypatch.setattr(ops, "_BACKEND", "torch")
    monkeypatch.setattr(ops, "_ANNOUNCED", False)
    monkeypatch.setattr(ops, "_LOAD_ERROR", "test reason")
    with pytest.warns(RuntimeWarning, match="test reason"):
        assert ops.backend() == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.backend() == "torch"   # announced once only
        z, c = torch.randn(20, 4), torch.randn(6, 4)
        assert torch.equal(ops.nearest_code(z, c)[0], brute_float64(z, c)[0])


def test_source_tree_shadowing_is_named(tmp_path):
    """Python started in a source root without the compiled ops imports the source tree, not the
    installed package: the fallback warning says so (not 'build it', which the user did)."""
    import shutil
    import subprocess
    import sys

    package = os.path.dirname(os.path.abspath(ops.__file__))
    root = tmp_path / "src"
    shutil.copytree(package, root / "galsim_vqvae",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "models", "__pycache__"))
    (root / "setup.py").write_text("")
    (root / "csrc").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "GALSIM_VQVAE_FORCE_TORCH_OPS"}
    # (an editable install's import hook would find the built _C anyway: set it aside, as a
    # regular install has none)
    code = ("import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in "
            "getattr(f, '__module__', '')]; import galsim_vqvae.ops as o; print(o.__file__); "
            "print(o.load_error())")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.startswith(str(root))
    assert f"started in the source root {root}" in out and "shadows the installed" in out
