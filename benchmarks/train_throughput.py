"""VQ-VAE training throughput (images/s) with and without the PSF/noise layers.

Times the real training step (`galsim_vqvae.train.vqvae.train_step`: encode, quantize with EMA
update, decode, FFT PSF convolution, chi^2, backward, Adam) on synthetic galaxy-like stamps
(elliptical exponential blobs convolved with Moffat-like PSFs, plus noise; no dataset file),
held on the device like the training loop does. Warm-up steps first (cudnn autotuning, codebook
k-means, torch.compile), then the median of timed steps (CUDA: events around each step).

    python benchmarks/train_throughput.py --device cpu --batch-sizes 32
    python benchmarks/train_throughput.py --device cuda --batch-sizes 256 512 1024 --compile
"""

import argparse
import statistics
import time

import torch

from galsim_vqvae.nn.forward import convolve_psf, psf_transform
from galsim_vqvae.nn.vqvae import VQVAE
from galsim_vqvae.train.vqvae import prepare_model, train_step


def synthetic_batch(n, size, device, seed=0):
    """Random positive galaxy-like stamps: (observed [n,1,S,S], sigma [n], psf [n,1,S,S])."""
    g = torch.Generator().manual_seed(seed)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, 1, 1, generator=g)  # noqa: E731
    yy, xx = torch.meshgrid(torch.arange(size) - size // 2, torch.arange(size) - size // 2,
                            indexing="ij")
    th, q, r0 = u(0, 3.1416), u(0.3, 1.0), u(1.0, size / 12)
    dx, dy = xx - u(-2, 2), yy - u(-2, 2)
    x = dx * torch.cos(th) + dy * torch.sin(th)
    y = -dx * torch.sin(th) + dy * torch.cos(th)
    gal = torch.exp(-torch.sqrt(x ** 2 + (y / q) ** 2) / r0)
    gal = gal / gal.sum((1, 2), keepdim=True) * u(100, 5000)
    fwhm = u(2.0, 4.0)
    psf = (1 + (xx ** 2 + yy ** 2) / (fwhm / 2) ** 2) ** -3.0
    psf = psf / psf.sum((1, 2), keepdim=True)
    clean = convolve_psf(gal[:, None], psf[:, None])
    sigma = u(0.5, 2.0).reshape(n)
    observed = clean + sigma[:, None, None, None] * torch.randn(clean.shape, generator=g)
    return observed.to(device), sigma.to(device), psf[:, None].to(device)


def time_steps(batch_size, psf_layers, device, warmup, repeats, compile=False, channels_last=None,
               stamp_size=84, model=None):
    """Median seconds per training step, after ``warmup`` steps."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    net = VQVAE(stamp_size=stamp_size, image_scale=50.0, **(model or {})).to(dev).train()
    opt, channels_last = prepare_model(net, dev, 1e-4, channels_last, compile)
    obs, sigma, psf = synthetic_batch(batch_size, stamp_size, dev)
    if channels_last:
        obs = obs.contiguous(memory_format=torch.channels_last)
    psf_ft = psf_transform(psf[:, 0])

    def step():
        return train_step(net, opt, obs, sigma, psf_ft if psf_layers else None, psf_layers,
                          amp=cuda)

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32])
    p.add_argument("--warmup", type=int, default=None, help="[default: 3 cpu, 20 cuda]")
    p.add_argument("--repeats", type=int, default=None, help="[default: 5 cpu, 50 cuda]")
    p.add_argument("--compile", action="store_true", help="torch.compile encoder and decoder")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--stamp-size", type=int, default=84)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    warmup = args.warmup if args.warmup is not None else (20 if cuda else 3)
    repeats = args.repeats if args.repeats is not None else (50 if cuda else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"# VQ-VAE training throughput on {name}, torch {torch.__version__}, "
          f"{args.stamp_size}x{args.stamp_size} stamps, default model, "
          f"compile={args.compile}, channels_last={cuda and not args.no_channels_last}, "
          f"median of {repeats} steps after {warmup}")
    print(f"{'batch':>6} {'PSF layers':>11} {'ms/step':>9} {'images/s':>10} {'with/without':>13}")
    for b in args.batch_sizes:
        sec = {}
        for layers in (True, False):
            sec[layers] = time_steps(b, layers, args.device, warmup, repeats, compile=args.compile,
                                     channels_last=False if args.no_channels_last else None,
                                     stamp_size=args.stamp_size)
            ratio = f"{sec[True] / sec[False]:>13.3f}" if not layers else ""
            print(f"{b:>6} {'yes' if layers else 'no':>11} {1000 * sec[layers]:>9.2f} "
                  f"{b / sec[layers]:>10.0f} {ratio}", flush=True)


if __name__ == "__main__":
    main()
