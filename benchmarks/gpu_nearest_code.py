"""Build, check and time the CUDA ``nearest_code`` op on a GPU machine, in one run.

    python3 benchmarks/gpu_nearest_code.py [--no-build] [--out DIR] [--quick]

1. Builds the extensions in place (``python3 setup.py build_ext --inplace``; set
   ``TORCH_CUDA_ARCH_LIST``, default "9.0") and imports ``galsim_vqvae.ops`` (without the package's
   ``__init__``, so galsim need not be installed there); ``ops.backend()`` must say "cuda".
2. Checks the op on fresh random inputs at four shapes (N = 14,112 and 112,896; K = 512 and
   8,192; D = 64) against float64 (every row:
   a float64 argmin; each disagreement is settled with exact rational arithmetic and counted as an
   exact tie or an error), its distances against the float64 distance of the chosen code, and on
   adversarial inputs (duplicates, +-0.0, near-ties, huge and tiny magnitudes) against the C++ op.
   Also ``torch.library.opcheck`` and ``torch.compile`` on CUDA tensors.
3. Times it (CUDA events, median, inputs rotated so that L2 does not hold them) against torch fp32
   matmul+argmin (TF32 off) and cdist+argmin; reports TFLOP/s (2 N K D flops), the measured fp32 and
   TF32 matrix-product ceilings, and the peak extra memory of each path; prints a table last and
   writes ``results.json`` and the log under ``--out`` (default ``$OUT`` or ``.``).
"""

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
import types
from fractions import Fraction
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(112_896, 64, 512), (112_896, 64, 8192), (1_048_576, 64, 1024), (1_048_576, 256, 8192)]
LOG = []
KERNELS = ("tc", "fp32")  # 3xTF32 tensor cores (default for D > 128), CUDA-core float32


def set_kernel(kernel):
    """Chooses the CUDA search kernel through GALSIM_VQVAE_CUDA_FP32 (read at each call)."""
    if kernel == "default":
        os.environ.pop("GALSIM_VQVAE_CUDA_FP32", None)
    else:
        os.environ["GALSIM_VQVAE_CUDA_FP32"] = "1" if kernel == "fp32" else "0"


def say(*args):
    line = " ".join(str(a) for a in args)
    LOG.append(line)
    print(line, flush=True)


def build():
    env = dict(os.environ)
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    say(f"build: rc={proc.returncode} in {time.time() - t0:.0f} s")
    for line in out.splitlines():
        if any(w in line for w in ("registers", "spill", "WARNING", "error", "stack frame")):
            say("  " + line.strip())
    return out


def import_ops():
    try:
        import galsim  # noqa: F401
    except ImportError:  # galsim_vqvae/__init__ imports galsim: load the subpackage without it
        pkg = types.ModuleType("galsim_vqvae")
        pkg.__path__ = [str(ROOT / "galsim_vqvae")]
        sys.modules.setdefault("galsim_vqvae", pkg)
    sys.path.insert(0, str(ROOT))
    return importlib.import_module("galsim_vqvae.ops")


def exact_d(z_row, code):
    return sum((Fraction(a) - Fraction(b)) ** 2 for a, b in zip(z_row.tolist(), code.tolist()))


def check_random(ops, shape, seed):
    """Disagreements of the op with a float64 argmin over every row, settled exactly."""
    n, d, k = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    z = torch.randn(n, d, device="cuda", generator=g)
    c = torch.randn(k, d, device="cuda", generator=g) * 0.7
    c[: k // 2] = c[: k // 2] * 0.5 + z[torch.randint(0, n, (k // 2,), device="cuda", generator=g)] * 0.5
    poison = torch.full((4 * n,), -7, dtype=torch.int64, device="cuda")
    del poison  # the caching allocator hands this poisoned block to the op's outputs
    idx, dist = ops.nearest_code(z, c)
    torch.cuda.synchronize()
    assert int((idx < 0).sum()) == 0 and int((idx >= k).sum()) == 0, "unwritten or out-of-range index"
    z64, c64 = z.double(), c.double()
    cn = c64.square().sum(1)
    chunk = max(1, (1 << 29) // k)
    disagree = []
    dist_bad = 0
    for s in range(0, n, chunk):
        zc = z64[s:s + chunk]
        i64 = (cn - 2.0 * zc @ c64.t()).argmin(1)
        diff = torch.nonzero(i64 != idx[s:s + chunk]).flatten()
        disagree += [(s + int(r), int(i64[r])) for r in diff]
        dref = (zc - c64[idx[s:s + chunk]]).square().sum(1).float()
        dist_bad += int((dref != dist[s:s + chunk]).sum())
    ties = errors = 0
    for row, other in disagree[:2000]:
        zr = z[row].cpu()
        a, b = exact_d(zr, c[int(idx[row])].cpu()), exact_d(zr, c[other].cpu())
        if a < b or (a == b and int(idx[row]) < other):
            ties += a == b           # the op is right: float64 (expansion) misordered or tied
        else:
            errors += 1
    errors += max(0, len(disagree) - 2000)  # unverified: counted as errors
    return {"rows": n, "float64_disagreements": len(disagree), "exact_ties_lower_index": ties,
            "errors": errors, "distance_mismatches": dist_bad}


def adversarial_sets():
    g = torch.Generator().manual_seed(5)
    sets = []
    base = torch.randn(300, 16, generator=g)
    base[7] = base[2]
    base[19] = base[2]
    base[11] = torch.nextafter(base[4], torch.full_like(base[4], 10.0))
    base[13] = -0.0
    base[14] = 0.0
    z = torch.cat([base[[2, 7, 19, 4, 11, 13, 14]], torch.zeros(3, 16), -torch.zeros(2, 16),
                   ((base[0].double() + base[1].double()) / 2).float()[None],
                   base[:200] + 1e-7 * torch.randn(200, 16, generator=g), torch.randn(500, 16, generator=g)])
    sets.append(("duplicates/+-0/near-ties", z, base))
    for scale in (1e18, 1e30, 3e37, 1e-20, 1e-42):
        c = (torch.randn(200, 8, generator=g, dtype=torch.float64) * scale).float()
        zz = (c[torch.randint(0, 200, (400,), generator=g)].double()
              * (1 + 1e-3 * torch.randn(400, 8, generator=g, dtype=torch.float64))).float()
        sets.append((f"magnitude {scale:g}", zz, c))
    centre = torch.randn(1, 5, generator=g)
    c = centre + torch.randint(-3, 4, (700, 5), generator=g).float() * 1.2e-7 * centre.abs()
    zz = centre + torch.randint(-3, 4, (300, 5), generator=g).float() * 1e-7 * centre.abs()
    sets.append(("many candidates (ulp grid)", zz, c))
    sets.append(("beyond float64", torch.zeros(40, 2), torch.tensor([[2.0 ** 30, 2.0 ** -30], [2.0 ** 30, 0.0]])))
    z = torch.randn(1000, 300, generator=g)   # D too large for the shared-memory tiles
    sets.append(("D=300", z, torch.randn(100, 300, generator=g)))
    sets.append(("bf16 inputs", torch.randn(2000, 64, generator=g).bfloat16(),
                 torch.randn(512, 64, generator=g).bfloat16()))
    sets.append(("non-contiguous", torch.randn(64, 3000, generator=g).t(),
                 torch.randn(256, 128, generator=g)[:, ::2]))
    return sets


def time_ms(fn, inputs, warmup=3, repeat=20):
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    torch.cuda.synchronize()
    times = []
    for i in range(repeat):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn(*inputs[i % len(inputs)])
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def peak_extra_mb(fn, args):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn(*args)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2 ** 20


def matmul_argmin(z, c):
    return ((c * c).sum(1) - 2 * z @ c.t()).argmin(1)


def cdist_argmin(z, c):
    return torch.cdist(z, c).argmin(1)


def ceilings():
    out = {}
    a = torch.randn(8192, 8192, device="cuda")
    b = torch.randn(8192, 8192, device="cuda")
    for name, tf32 in (("fp32", False), ("tf32", True)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        ms = time_ms(lambda x, y: x @ y, [(a, b)], warmup=2, repeat=10)
        out[name] = 2 * 8192 ** 3 / ms / 1e9
    torch.backends.cuda.matmul.allow_tf32 = False
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-build", action="store_true")
    parser.add_argument("--quick", action="store_true", help="first two shapes only")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        results["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                           capture_output=True, text=True).stdout.strip()
    except OSError:
        results["commit"] = ""
    results["commit"] = results["commit"] or os.environ.get("GVQ_COMMIT", "?")
    say(f"device {results['device']}, torch {results['torch']}, {results['date']}, commit {results['commit']}")
    if not args.no_build:
        (out / "build.log").write_text(build())
    ops = import_ops()
    results["backend"] = ops.backend()
    say("ops.backend():", results["backend"], "| load error:", ops.load_error())
    if results["backend"] != "cuda":
        raise SystemExit("the CUDA op did not load")
    torch.backends.cuda.matmul.allow_tf32 = False
    shapes = SHAPES[:2] if args.quick else SHAPES

    # Checks.
    checks = {}
    for kernel in KERNELS:
        set_kernel(kernel)
        for i, shape in enumerate(shapes):
            key = f"{kernel} {shape}"
            try:
                checks[key] = r = check_random(ops, shape, seed=100 + i)
                say(f"check {key}: {r}")
            except Exception:
                say(traceback.format_exc())
                checks[key] = "FAILED"
    adv_fail = 0
    for (name, z, c), kernel in [(a, kn) for kn in KERNELS for a in adversarial_sets()]:
        set_kernel(kernel)
        name = f"[{kernel}] {name}"
        i_cpu, d_cpu = torch.ops.galsim_vqvae.nearest_code(z, c)
        i_gpu, d_gpu = ops.nearest_code(z.cuda(), c.cuda())
        ok = torch.equal(i_cpu, i_gpu.cpu()) and torch.equal(d_cpu, d_gpu.cpu())
        adv_fail += not ok
        say(f"adversarial {name}: {'ok' if ok else 'MISMATCH'} "
            f"({int((i_cpu != i_gpu.cpu()).sum())} index, {int((d_cpu != d_gpu.cpu()).sum())} distance mismatches)")
    checks["adversarial_mismatching_sets"] = adv_fail
    set_kernel("default")
    try:
        z, c = torch.randn(300, 64, device="cuda"), torch.randn(100, 64, device="cuda")
        torch.library.opcheck(torch.ops.galsim_vqvae.nearest_code.default, (z, c))
        f = torch.compile(lambda z, c: torch.ops.galsim_vqvae.nearest_code(z, c)[0], fullgraph=True)
        assert torch.equal(f(z, c), ops.nearest_code(z, c)[0])
        checks["opcheck_and_compile"] = "ok"
    except Exception:
        say(traceback.format_exc())
        checks["opcheck_and_compile"] = "FAILED"
    say("opcheck + torch.compile (inductor) on CUDA:", checks["opcheck_and_compile"])
    results["checks"] = checks

    # How many rows take the exact re-check (diagnostic: synchronises, so not timed).
    os.environ["GALSIM_VQVAE_CUDA_STATS"] = "1"
    for kernel in KERNELS:
        set_kernel(kernel)
        for n, d, k in shapes:
            g = torch.Generator(device="cuda").manual_seed(n + k)
            ops.nearest_code(torch.randn(n, d, device="cuda", generator=g),
                             torch.randn(k, d, device="cuda", generator=g))
            torch.cuda.synchronize()
    os.environ["GALSIM_VQVAE_CUDA_STATS"] = "0"

    # Timings.
    results["ceiling_tflops"] = ceil = ceilings()
    say(f"measured ceilings: fp32 {ceil['fp32']:.1f}, tf32 {ceil['tf32']:.1f} TFLOP/s")
    rows = []
    for n, d, k in shapes:
        g = torch.Generator(device="cuda").manual_seed(n + k)
        nbuf = max(1, min(3, (2 << 30) // (n * d * 4)))
        inputs = [(torch.randn(n, d, device="cuda", generator=g), torch.randn(k, d, device="cuda", generator=g))
                  for _ in range(nbuf)]
        flops = 2.0 * n * k * d
        row = {"N": n, "D": d, "K": k}
        for name, fn in (("op", lambda z, c: ops.nearest_code(z, c)),
                         ("optc", lambda z, c: ops.nearest_code(z, c)),
                         ("opfp32", lambda z, c: ops.nearest_code(z, c)),
                         ("matmul", matmul_argmin), ("cdist", cdist_argmin)):
            set_kernel({"optc": "tc", "opfp32": "fp32"}.get(name, "default"))
            try:
                ms = time_ms(fn, inputs, repeat=20 if n * k < 2 ** 31 else 5)
                row[name + "_ms"] = ms
                row[name + "_tflops"] = flops / ms / 1e9
                row[name + "_peak_mb"] = peak_extra_mb(fn, inputs[0])
            except torch.OutOfMemoryError:
                row[name + "_ms"] = None
                say(f"{name} at {(n, d, k)}: out of memory")
            torch.cuda.empty_cache()
        rows.append(row)
        say(json.dumps(row))
        del inputs
        torch.cuda.empty_cache()
    results["timings"] = rows
    (out / "results.json").write_text(json.dumps(results, indent=1))

    def f(x, fmt="{:.3f}"):
        return "   -" if x is None else fmt.format(x)

    say("")
    say(f"{results['device']} | torch {results['torch']} | {results['date']} | commit {results['commit']}")
    say(f"fp32 matmul ceiling {ceil['fp32']:.1f} TFLOP/s, tf32 {ceil['tf32']:.1f} TFLOP/s; op checks: "
        + "; ".join(f"{s}: {v['errors']} errors, {v['exact_ties_lower_index']} exact ties"
                    if isinstance(v, dict) else f"{s}: {v}" for s, v in checks.items()
                    if s[:3] in ("tc ", "fp3")))
    say("op = the op's default kernel (CUDA-core fp32 for D <= 128, 3xTF32 tensor cores above); "
        "last columns: each kernel forced")
    say(f"{'N':>9} {'D':>4} {'K':>5} | {'op ms':>7} {'TFLOP/s':>7} {'MiB':>7} | {'matmul ms':>9} {'MiB':>8} "
        f"| {'cdist ms':>8} {'MiB':>8} | {'vs matmul':>9} {'vs cdist':>8} | {'fp32 ms':>8} {'3xTF32 ms':>9}")
    for r in rows:
        sp_m = r["matmul_ms"] / r["op_ms"] if r.get("matmul_ms") and r.get("op_ms") else None
        sp_c = r["cdist_ms"] / r["op_ms"] if r.get("cdist_ms") and r.get("op_ms") else None
        say(f"{r['N']:>9} {r['D']:>4} {r['K']:>5} | {f(r.get('op_ms')):>7} {f(r.get('op_tflops'), '{:.1f}'):>7} "
            f"{f(r.get('op_peak_mb'), '{:.1f}'):>7} | {f(r.get('matmul_ms')):>9} {f(r.get('matmul_peak_mb'), '{:.0f}'):>8} "
            f"| {f(r.get('cdist_ms')):>8} {f(r.get('cdist_peak_mb'), '{:.0f}'):>8} | {f(sp_m, '{:.2f}x'):>9} "
            f"{f(sp_c, '{:.2f}x'):>8} | {f(r.get('opfp32_ms')):>8} {f(r.get('optc_ms')):>9}")
    (out / "gpu_nearest_code.log").write_text("\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
