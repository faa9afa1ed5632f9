"""Naive, PyTorch-cached and compiled cached sampling of the Gated PixelCNN on a GPU, in one run.

    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu_sampling.py [--batches 1 16 256 4096]
        [--priors default 15x128] [--out DIR] [--device cuda]

For each prior (``default``: the shipped model's prior, ``Emulator.load("default")``, conditioned
on the mean labels; ``15x128``: random weights, 15 layers, 128 channels, K=512, 5x5 kernels, the
size the samplers are benchmarked at) on 21x21 maps, and each batch size, it prints code maps/s of

* ``naive64``: `sample_naive` as it is, the float64 oracle (the whole prior once per position);
* ``naive32``: the naive loop on the float32 prior (cuDNN, TF32 allowed: PyTorch's defaults), the
  sampler as it was before every sampler moved to float64 logits: 23 maps/s on an H100 (2026-11-24);
* ``torch``: the PyTorch cached loop (`sample_fast(implementation="torch")`);
* ``op``: the compiled op ``galsim_vqvae::pixelcnn_sample`` on the GPU;
* ``e2e``: `sample_fast` as users call it (compiled op, plus the per-sample Gumbel noise drawn on
  the CPU and copied over).

The naive samplers run every position through the same full forward pass, so they are timed over
``--naive-positions`` positions (after one untimed) and scaled to H*W positions: said in the table.
The others run in full (noise pre-drawn on the GPU, except ``e2e``). Also: the op's time over one
float32 and one float64 full forward pass of the prior on the same batch (``op/fwd32``,
``op/fwd64``), the ratios to both naive samplers, whether op, torch loop and the naive sampler (at
the smallest batch) drew the same maps, the smallest top-2 score gap of the op's draws, and the
op's peak extra device memory (``torch.cuda.max_memory_allocated``) against the formula
(`cache_bytes` less the pre-activations that stay in registers, plus `row_step_bytes` with the
im2col, plus the outputs); ``nograph``: the op with its kernels launched one by one
(``GALSIM_VQVAE_CUDA_GRAPHS=0``) instead of replayed from CUDA graphs. With ``--profile``, the
op's device time by kernel (torch.profiler, graphs off) for the 15x128 prior at batch 256 (last);
``gemv``: the op with the small-batch per-position kernel (``GALSIM_VQVAE_CUDA_GEMV_MAX_BATCH``).

Cases run batch by batch (all priors at the smallest batch first), and ``gpu_sampling.json`` and
the log under ``--out`` are rewritten after each, so a run cut short keeps what it measured.
At batches above ``--fwd64-max`` the float64 forward pass is not timed separately: ``fwd64`` is
then the naive loop's time per position (one forward pass, plus the draw).
"""

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from galsim_vqvae import ops  # noqa: E402
from galsim_vqvae.nn.fast_sampling import (  # noqa: E402
    _sample_torch, cache_bytes, flat_weights, row_step_bytes, sample_fast)
from galsim_vqvae.nn.pixelcnn import GatedPixelCNN  # noqa: E402
from galsim_vqvae.nn.sampling import (  # noqa: E402
    float64_prior, gumbel_noise, per_sample_seeds, sample_naive)

LOG = []


def say(*args):
    line = " ".join(str(a) for a in args)
    LOG.append(line)
    print(line, flush=True)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def load_prior(name, device):
    """(prior in eval mode, map shape) on ``device``."""
    if name == "default":
        from galsim_vqvae.emulator import Emulator
        emulator = Emulator.load("default", device=device)
        latent = emulator.metadata["latent_size"]
        return emulator.prior.eval(), (latent, latent)
    layers, channels = (int(x) for x in name.split("x"))
    torch.manual_seed(0)
    prior = GatedPixelCNN(num_codes=512, channels=channels, layers=layers, kernel_size=5)
    return prior.to(device).eval(), (21, 21)


class Case:
    """One prior at one batch size: its inputs, drawn once."""

    def __init__(self, prior, shape, batch, device):
        self.prior, self.shape, self.batch, self.device = prior, shape, batch, device
        self.network = float64_prior(prior)
        self.seeds = per_sample_seeds(batch, batch)
        self.noise_seconds = 0.0  # noise version 2: computed inside the op
        # the naive loop's noise, of the positions it times (a map's noise does not depend on
        # its shape: these are the first positions of row 0)
        self.noise = gumbel_noise(self.seeds, (1, 8), prior.num_codes).to(device)
        self.seeds_tensor = ops.seeds_tensor(self.seeds, device)
        self.cond = (torch.zeros(batch, prior.cond_dim, device=device)
                     if prior.cond_dim else None)
        biases = self.network._layer_biases(batch, self.cond, None, torch.float64)
        self.bias = None if biases[0] is None else torch.stack([b[:, :, 0, 0] for b in biases], 1)

    def op(self):
        return ops.pixelcnn_sample(flat_weights(self.network), self.bias, self.seeds_tensor,
                                   self.shape, 1.0, self.prior.kernel_size)

    def torch_loop(self):
        codes = torch.empty(self.batch, *self.shape, dtype=torch.int64, device=self.device)

        class _Bar:
            def update(self, n):
                pass

        with torch.no_grad():
            _sample_torch(self.network, codes, self.cond, None, self.seeds, 1.0, _Bar())
        return codes

    def naive_seconds(self, network, positions):
        """The naive loop body (forward pass, scores, argmax) over ``positions`` positions after
        one untimed, scaled to all H*W positions."""
        height, width = self.shape
        codes = torch.zeros(self.batch, height, width, dtype=torch.int64, device=self.device)
        cond = None if self.cond is None else self.cond.to(next(network.parameters()).dtype)
        with torch.no_grad():
            def step(pos):
                i, j = 0, pos  # positions 0 .. 7 of row 0 (self.noise)
                logits = network(codes, cond)[:, :, i, j]
                scores = logits.double() / 1.0 + self.noise[:, i, j]
                codes[:, i, j] = scores.argmax(dim=1)

            step(0)
            seconds, _ = timed(lambda: [step(1 + q) for q in range(positions)], self.device)
        return seconds / positions * height * width

    def forward_seconds(self, network):
        codes = torch.randint(0, self.prior.num_codes, (self.batch, *self.shape),
                              generator=torch.Generator().manual_seed(0)).to(self.device)
        cond = None if self.cond is None else self.cond.to(next(network.parameters()).dtype)
        with torch.no_grad():
            network(codes, cond)
            seconds, _ = timed(lambda: network(codes, cond), self.device)
        return seconds


def predicted_bytes(prior, shape, batch):
    height, width = shape
    c, k = prior.channels, prior.kernel_size
    caches = cache_bytes(batch, prior.num_layers, c, width, k, prior.num_codes) - 8 * batch * 2 * c
    outputs = 8 * batch * (height * width + 1)  # codes and gaps
    return caches + row_step_bytes(batch, c, width, k, im2col=True) + outputs


def profile_op(name, prior, shape, batch, device):
    """The op's device time by kernel (graphs off, so each launch is seen), longest first."""
    from torch.profiler import ProfilerActivity, profile
    case = Case(prior, shape, batch, device)
    os.environ["GALSIM_VQVAE_CUDA_GRAPHS"] = "0"
    try:
        case.op()
        sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            case.op()
            sync(device)
    finally:
        os.environ.pop("GALSIM_VQVAE_CUDA_GRAPHS")
    rows = []
    for evt in prof.key_averages():  # self device time: kernels only, nothing counted twice
        us = getattr(evt, "self_device_time_total", None)
        if us is None:
            us = getattr(evt, "self_cuda_time_total", 0.0)
        if us > 0:
            rows.append((us / 1e3, evt.count, evt.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    say(f"op kernels, {name} B={batch} (graphs off): {total:.1f} ms of device time")
    for ms, count, key in rows[:14]:
        say(f"  {ms:9.2f} ms {100 * ms / total:5.1f}% {count:7d}x  {key[:110]}")
    return dict(prior=name, batch=batch, total_ms=total,
                kernels=[dict(ms=ms, count=count, name=key) for ms, count, key in rows[:30]])


def save(out, results, extra):
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_sampling.json").write_text(json.dumps(dict(results=results, **extra), indent=1))
    (out / "gpu_sampling.log").write_text("\n".join(LOG) + "\n")


def run_case(name, prior, shape, batch, device, args, results):
    row = dict(prior=name, batch=batch, shape=list(shape))
    case = Case(prior, shape, batch, device)
    row["noise_s"] = case.noise_seconds
    case.op()  # warm-up (module load, cuBLAS handles, graph instantiation paths)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    row["op_s"], (codes, gap) = timed(case.op, device)
    if args.repeats > 1 and batch <= 256:
        row["op_s"] = min([row["op_s"]] + [timed(case.op, device)[0]
                                           for _ in range(args.repeats - 1)])
    if device == "cuda":
        row["op_peak_bytes"] = torch.cuda.max_memory_allocated() - base
        row["op_predicted_bytes"] = predicted_bytes(prior, shape, batch)
    row["min_gap"] = float(gap.min())
    if batch <= args.gemv_max:  # the per-position products of the small-batch kernel
        os.environ["GALSIM_VQVAE_CUDA_GEMV_MAX_BATCH"] = str(batch)
        try:
            case.op()
            row["op_gemv_s"], (gemv, _) = min((timed(case.op, device) for _ in range(2)),
                                              key=lambda t: t[0])
            row["gemv_equal"] = bool(torch.equal(gemv, codes))
        finally:
            os.environ.pop("GALSIM_VQVAE_CUDA_GEMV_MAX_BATCH")
        say(f"    op with the small-batch kernel {row['op_gemv_s']:.4g} s "
            f"({batch / row['op_gemv_s']:.4g} maps/s), same maps: {row['gemv_equal']}")
    if batch <= args.nograph_max:
        os.environ["GALSIM_VQVAE_CUDA_GRAPHS"] = "0"
        try:
            case.op()
            row["op_nograph_s"] = min(timed(case.op, device)[0] for _ in range(2))
        finally:
            os.environ.pop("GALSIM_VQVAE_CUDA_GRAPHS")
    say(f"  {name} B={batch}: op {row['op_s']:.4g} s ({batch / row['op_s']:.4g} maps/s), "
        f"noise draw on the CPU {row['noise_s']:.3g} s")
    if not args.skip_torch:
        if batch <= 16:
            case.torch_loop()  # warm-up
        row["torch_s"], loop = timed(case.torch_loop, device)
        row["torch_equal"] = bool(torch.equal(loop, codes))
        say(f"    torch loop {row['torch_s']:.4g} s, same maps as the op: {row['torch_equal']}")
    if batch <= args.naive_full_batch:
        seeds = case.seeds
        seconds, naive = timed(lambda: sample_naive(prior, batch, shape, case.cond, None, seeds),
                               device)
        row["naive_full_s"] = seconds
        row["naive_equal"] = bool(torch.equal(naive, codes))
        say(f"    naive (full run) {seconds:.4g} s, same maps as the op: {row['naive_equal']}")
    positions = args.naive_positions
    row["naive64_s"] = case.naive_seconds(case.network, positions)
    row["naive32_s"] = case.naive_seconds(prior, positions)
    row["naive_positions"] = positions
    if batch <= args.fwd64_max:
        row["fwd64_s"] = case.forward_seconds(case.network)
    else:  # the naive loop's time per position: one float64 forward pass and the draw
        row["fwd64_s"] = row["naive64_s"] / (shape[0] * shape[1])
        row["fwd64_from_naive"] = True
    row["fwd32_s"] = case.forward_seconds(prior)
    e2e_batch = min(batch, args.e2e_max)
    if e2e_batch == batch:
        seconds, e2e = timed(lambda: sample_fast(prior, batch, shape, case.cond, seeds=case.seeds,
                                                 batch_size=batch), device)
        row["e2e_s"] = seconds
        row["e2e_equal"] = bool(torch.equal(e2e, codes))
    say(f"    naive64 {row['naive64_s']:.4g} s, naive32 {row['naive32_s']:.4g} s "
        f"(extrapolated from {positions} positions), forward fp64 {row['fwd64_s']:.4g} s, "
        f"fp32 {row['fwd32_s']:.4g} s" + (f", e2e {row['e2e_s']:.4g} s" if "e2e_s" in row else ""))
    results.append(row)
    del case
    if device == "cuda":
        torch.cuda.empty_cache()


def table(results):
    lines = ["maps/s (naive extrapolated from a few positions; op = compiled CUDA op, noise "
             "pre-drawn; e2e = sample_fast incl. CPU noise)",
             f"{'prior':>8} {'B':>5} {'naive64':>9} {'naive32':>9} {'torch':>9} {'op':>9} "
             f"{'e2e':>9} {'nograph':>9} {'gemv':>9} {'op/n64':>8} {'op/n32':>8} {'op/fwd32':>8} "
             f"{'op/fwd64':>8} {'same':>5} {'peakMB':>8} {'predMB':>8} {'min gap':>9}"]
    for r in results:
        b = r["batch"]

        def rate(key):
            return f"{b / r[key]:>9.4g}" if key in r else f"{'-':>9}"

        same = all(r.get(k, True) for k in ("torch_equal", "naive_equal", "e2e_equal",
                                          "gemv_equal"))
        lines.append(
            f"{r['prior']:>8} {b:>5} {rate('naive64_s')} {rate('naive32_s')} {rate('torch_s')} "
            f"{rate('op_s')} {rate('e2e_s')} {rate('op_nograph_s')} {rate('op_gemv_s')} "
            f"{r['naive64_s'] / r['op_s']:>8.1f} "
            f"{r['naive32_s'] / r['op_s']:>8.1f} {r['op_s'] / r['fwd32_s']:>8.2f} "
            f"{r['op_s'] / r['fwd64_s']:>8.2f} {str(same):>5} "
            f"{r.get('op_peak_bytes', 0) / 1e6:>8.1f} {r.get('op_predicted_bytes', 0) / 1e6:>8.1f} "
            f"{r['min_gap']:>9.2e}")
    return "\n".join(lines)


def markdown(results):
    """The results as a markdown table (for benchmarks/README.md and docs/sampling.md)."""
    lines = ["| prior | batch | naive64 maps/s | naive32 maps/s | PyTorch loop maps/s | op maps/s "
             "| op, no graphs | op, small-batch kernel | sample_fast (e2e) | op / naive64 "
             "| op / naive32 | op / fwd32 | op / fwd64 | same maps | peak MB | formula MB "
             "| min gap |",
             "|" + " --- |" * 17]
    for r in results:
        b = r["batch"]

        def rate(key):
            return f"{b / r[key]:.4g}" if key in r else "-"

        same = all(r.get(k, True) for k in ("torch_equal", "naive_equal", "e2e_equal",
                                          "gemv_equal"))
        peak = f"{r['op_peak_bytes'] / 1e6:.1f}" if "op_peak_bytes" in r else "-"
        pred = f"{r['op_predicted_bytes'] / 1e6:.1f}" if "op_predicted_bytes" in r else "-"
        lines.append(
            f"| {r['prior']} | {b} | {rate('naive64_s')} | {rate('naive32_s')} | "
            f"{rate('torch_s')} | {rate('op_s')} | {rate('op_nograph_s')} | {rate('op_gemv_s')} | "
            f"{rate('e2e_s')} | "
            f"{r['naive64_s'] / r['op_s']:.0f}x | {r['naive32_s'] / r['op_s']:.0f}x | "
            f"{r['op_s'] / r['fwd32_s']:.1f} | {r['op_s'] / r['fwd64_s']:.2f}"
            f"{'*' if r.get('fwd64_from_naive') else ''} | {same} | {peak} | {pred} | "
            f"{r['min_gap']:.1e} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", metavar="JSON",
                        help="print the results of an earlier run (its gpu_sampling.json) as a "
                             "markdown table and exit")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16, 256, 4096])
    parser.add_argument("--priors", nargs="*", default=["default", "15x128"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--naive-positions", type=int, default=2)
    parser.add_argument("--naive-full-batch", type=int, default=16,
                        help="run the naive sampler in full (and compare) up to this batch")
    parser.add_argument("--e2e-max", type=int, default=4096)
    parser.add_argument("--fwd64-max", type=int, default=1024,
                        help="time the float64 forward pass separately up to this batch")
    parser.add_argument("--nograph-max", type=int, default=256,
                        help="also time the op without CUDA graphs up to this batch")
    parser.add_argument("--gemv-max", type=int, default=256,
                        help="also time the op with the small-batch per-position kernel "
                             "(GALSIM_VQVAE_CUDA_GEMV_MAX_BATCH) up to this batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="the op's time by kernel, 15x128 prior at batch 256")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())["results"]))
        return
    device = args.device
    out = Path(args.out)
    extra = {}
    if device == "cuda":
        say(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
            f"sampler backend {ops.sampler_backend('cuda')} ({ops.sampler_load_error('cuda')})")
        extra["device"] = torch.cuda.get_device_name(0)
    extra["torch"] = torch.__version__
    priors = {}
    for name in args.priors:
        priors[name] = load_prior(name, device)
        say(f"prior {name}: {priors[name][0].config}, maps {priors[name][1]}")
    results = []
    for batch in args.batches:
        for name, (prior, shape) in priors.items():
            try:
                run_case(name, prior, shape, batch, device, args, results)
            except Exception:  # report and go on with the next case
                say(traceback.format_exc())
            save(out, results, extra)
        say(table(results))
    if args.profile and "15x128" in priors:
        try:
            extra["profile"] = profile_op("15x128", *priors["15x128"], 256, device)
        except Exception:
            say(traceback.format_exc())
    save(out, results, extra)


if __name__ == "__main__":
    main()
