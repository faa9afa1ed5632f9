"""Galaxies/s of the GalSim config path (a mock survey image of learned galaxies) on one device.

    PYTHONPATH=. python benchmarks/gpu_config_path.py [--model default] [--device cuda]
        [--nobjects 512] [--batch-size 128] [--nprocs 1 4]

Each configuration is run once to warm up (model loading, the first decode) and then timed once,
each value of ``--nprocs`` in a fresh Python process (GalSim forks its workers, and a child forked
from a process that has used CUDA cannot use it). The survey is `bench_profile.survey_config` (0.7" Kolmogorov PSF, 0.2"/pixel, CCD noise,
conditions over the middle of the training ranges).
"""

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time

import galsim

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_profile import survey_config  # noqa: E402

import galsim_vqvae  # noqa: E402,F401  (registers the config types)
from galsim_vqvae import Emulator  # noqa: E402
from galsim_vqvae.emulator import _DEFAULT_PATH  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--nobjects", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--nprocs", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    if len(args.nprocs) > 1:
        for nproc in args.nprocs:
            subprocess.run([sys.executable, __file__, "--model", args.model, "--device",
                            args.device, "--nobjects", str(args.nobjects), "--batch-size",
                            str(args.batch_size), "--nprocs", str(nproc)], check=True)
        return
    path = _DEFAULT_PATH if args.model == "default" else args.model
    metadata = Emulator.load(path).metadata
    with tempfile.TemporaryDirectory() as out:
        for nproc in args.nprocs:
            config = survey_config(path, out, args.nobjects, nproc, metadata)
            config["input"]["vqvae_model"].update(device=args.device, batch_size=args.batch_size)
            galsim.config.Process(copy.deepcopy(config), except_abort=True)
            t0 = time.perf_counter()
            galsim.config.Process(copy.deepcopy(config), except_abort=True)
            dt = time.perf_counter() - t0
            print(f"config path on {args.device}, {args.nobjects} galaxies, batch "
                  f"{args.batch_size}, image.nproc={nproc}: {dt:.2f} s, "
                  f"{args.nobjects / dt:.1f} galaxies/s", flush=True)


if __name__ == "__main__":
    main()
