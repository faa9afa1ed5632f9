"""Reduced chi^2 of a model's reconstructions: by S/N bin on held-out synthetic stamps, and on
edge-on disks through an Airy PSF (issue 15's fidelity goal: median <= 1.2 everywhere).

    python examples/reconstruction_chi2.py --model default --data val.h5 --n 500

``val.h5``: ``galsim-vqvae make-dataset --source synthetic --n 1500 --seed 99 --out val.h5``.
The disks: exponentials of half-light radius 0.2"-0.5" and axis ratio 0.15-0.4 at magnitudes
21-24 (in the training range), through a 2.4 m Airy PSF at 1600 nm (obscuration 0.33) and the
pixel, with Gaussian noise of sigma log-uniform over the training range (0.0025-0.02).
"""

import argparse

import galsim
import numpy as np

import galsim_vqvae
from galsim_vqvae.data import dataset

SNR_BINS = ((0, 20), (20, 50), (50, 100), (100, np.inf))


def edge_on_disks(emu, n, seed):
    """``n`` noisy edge-on disks on the model's grid, their PSF image and noise sigmas."""
    rng = np.random.default_rng(seed)
    s, scale = emu.stamp_size, emu.metadata["pixel_scale"]
    airy = galsim.Airy(lam=1600, diam=2.4, obscuration=0.33, scale_unit=galsim.arcsec)
    psf = galsim.Convolve(airy, galsim.Pixel(scale)).drawImage(
        nx=s, ny=s, scale=scale, method="no_pixel").array
    stamps, sigmas = [], []
    for _ in range(n):
        flux = 10 ** (-0.4 * (rng.uniform(21, 24) - emu.metadata["zeropoint"]))
        disk = galsim.Exponential(half_light_radius=rng.uniform(0.2, 0.5), flux=flux).shear(
            q=rng.uniform(0.15, 0.4), beta=rng.uniform(0, 180) * galsim.degrees)
        image = galsim.Convolve(disk, airy).drawImage(nx=s, ny=s, scale=scale).array
        sigma = 10 ** rng.uniform(np.log10(0.0025), np.log10(0.02))
        stamps.append(image + rng.normal(0, sigma, image.shape))
        sigmas.append(sigma)
    return np.array(stamps, np.float32), psf / psf.sum(), np.array(sigmas)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="bundle path or 'default'")
    parser.add_argument("--data", required=True, help="held-out synthetic dataset")
    parser.add_argument("--n", type=int, default=500, help="held-out stamps")
    parser.add_argument("--disks", type=int, default=40, help="edge-on disks")
    parser.add_argument("--seed", type=int, default=3, help="seed of the disks")
    args = parser.parse_args(argv)

    emu = galsim_vqvae.Emulator.load(args.model)
    n = min(args.n, dataset.read_header(args.data)["n"])
    a = dataset.load_arrays(args.data, indices=np.arange(n),
                            keys=("observed", "sigma", "psf_index", "psf_bank", "params"))
    _, chi2 = emu.reconstruct(a["observed"], a["psf_bank"][a["psf_index"]], a["sigma"])
    print("| stamps | n | median reduced chi^2 |\n| --- | --- | --- |")
    for lo, hi in SNR_BINS:
        m = (a["params/snr"] >= lo) & (a["params/snr"] < hi)
        print(f"| S/N {lo}-{hi} | {m.sum()} | {np.median(chi2[m]):.3f} |")
    stamps, psf, sigmas = edge_on_disks(emu, args.disks, args.seed)
    _, chi2 = emu.reconstruct(stamps, psf, sigmas)
    print(f"| edge-on disks (q 0.15-0.4, Airy PSF) | {args.disks} | {np.median(chi2):.3f} |")


if __name__ == "__main__":
    main()
