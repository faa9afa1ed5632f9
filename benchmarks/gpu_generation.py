"""Generation speed end to end on one GPU: what users get from `Emulator.sample`, and the prior.

    PYTHONPATH=. python3 benchmarks/gpu_generation.py [--device cuda] [--out DIR]
        [--sample-n 256 4096] [--prior 15x128] [--prior-batch 256] [--naive-positions 2]

Prints one table and writes ``generation.json`` under ``--out`` (default ``$OUT`` or ``.``):

* ``Emulator.sample`` of the shipped default model (codes and decode, images on the host as a
  numpy array; every label at its training mean) in galaxies/s for each ``--sample-n``, after one
  untimed call of 64 galaxies; and ``Emulator.sample_codes`` alone for the same n.
* The random ``--prior`` (layers x channels, K = 512, 5x5 kernels, 21x21 maps) at
  ``--prior-batch``: the compiled op through `sample_fast` (noise inside the op) in maps/s, against
  the naive sampler on the float64 prior (``naive64``, the reference) and on the float32 prior with
  PyTorch's defaults (``naive32``), both timed over ``--naive-positions`` positions after one
  untimed and scaled to H*W positions; all in the same run.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from galsim_vqvae import ops  # noqa: E402
from galsim_vqvae.emulator import Emulator  # noqa: E402
from galsim_vqvae.nn.fast_sampling import sample_fast  # noqa: E402
from galsim_vqvae.nn.pixelcnn import GatedPixelCNN  # noqa: E402
from galsim_vqvae.nn.sampling import float64_prior, gumbel_noise, per_sample_seeds  # noqa: E402


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def mean_conditions(emulator, n):
    """The training mean of every label, for n galaxies (None for an unconditional model)."""
    names = emulator.condition_names
    if not names:
        return None
    mean = emulator.metadata["conditions"]["mean"]
    return {k: np.full(n, float(mean[c])) for c, k in enumerate(names)}


def emulator_rows(device, sizes):
    emulator = Emulator.load("default", device=device)
    prior = emulator.metadata["prior_config"]
    shape = f"{prior['layers']} x {prior['channels']} prior"
    # warm-up: weights, float64 prior, kernels, allocator
    emulator.sample(64, mean_conditions(emulator, 64), seed=0)
    rows = []
    for n in sizes:
        cond = mean_conditions(emulator, n)
        seconds, images = timed(lambda: emulator.sample(n, cond, seed=1), device)
        assert isinstance(images, np.ndarray) and images.shape[0] == n
        codes_s, _ = timed(lambda: emulator.sample_codes(n, cond, seed=1), device)
        rows.append(dict(what=f"Emulator.sample, default model ({shape}), n={n}", n=n,
                         seconds=seconds, per_s=n / seconds, codes_per_s=n / codes_s))
        print(f"Emulator.sample, default model ({shape}), n={n}: {n / seconds:.1f} galaxies/s "
              f"(sample_codes alone {n / codes_s:.1f} maps/s)", flush=True)
    return rows


def naive_seconds(network, batch, shape, seeds, positions, device):
    """The naive loop body (forward pass, float64 scores, argmax) over ``positions`` positions
    after one untimed, scaled to every position of the map."""
    height, width = shape
    codes = torch.zeros(batch, height, width, dtype=torch.int64, device=device)
    # the noise of positions (0, 0 .. positions): a map's noise does not depend on its shape
    noise = gumbel_noise(seeds, (1, positions + 1), network.num_codes).to(device)
    with torch.no_grad():
        def step(j):
            logits = network(codes)[:, :, 0, j]
            codes[:, 0, j] = (logits.double() + noise[:, 0, j]).argmax(dim=1)

        step(0)
        seconds, _ = timed(lambda: [step(1 + q) for q in range(positions)], device)
    return seconds / positions * height * width


def prior_rows(device, spec, batch, positions):
    layers, channels = (int(x) for x in spec.split("x"))
    torch.manual_seed(0)
    prior = GatedPixelCNN(num_codes=512, channels=channels, layers=layers,
                          kernel_size=5).to(device).eval()
    shape = (21, 21)
    seeds = per_sample_seeds(3, batch)
    sample_fast(prior, min(batch, 16), shape, seeds=seeds[:16], implementation="compiled")
    op_s, _ = timed(lambda: sample_fast(prior, batch, shape, seeds=seeds, batch_size=batch,
                                        implementation="compiled"), device)
    n64 = naive_seconds(float64_prior(prior), batch, shape, seeds, positions, device)
    n32 = naive_seconds(prior, batch, shape, seeds, positions, device)
    row = dict(what=f"{spec} prior, batch {batch}", batch=batch, op_per_s=batch / op_s,
               naive64_per_s=batch / n64, naive32_per_s=batch / n32)
    print(f"{spec} batch {batch}: op {batch / op_s:.1f} maps/s, naive64 {batch / n64:.3g}, "
          f"naive32 {batch / n32:.3g} (op / naive64 {n64 / op_s:.0f}x, / naive32 "
          f"{n32 / op_s:.0f}x)", flush=True)
    return [row]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sample-n", type=int, nargs="*", default=[256, 4096])
    parser.add_argument("--prior", default="15x128")
    parser.add_argument("--prior-batch", type=int, default=256)
    parser.add_argument("--naive-positions", type=int, default=2)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, sampler backend "
          f"{ops.sampler_backend(device)}, threads {torch.get_num_threads()}", flush=True)
    result = dict(device=name, torch=torch.__version__, rows=[])
    result["rows"] += emulator_rows(device, args.sample_n)
    if args.prior:
        result["rows"] += prior_rows(device, args.prior, args.prior_batch, args.naive_positions)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "generation.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
