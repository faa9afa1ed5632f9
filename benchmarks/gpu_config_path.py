"""Galaxies/s of the GalSim config path (a mock survey image of learned galaxies) on one device,
and where the time goes: generation (sampling and decoding) against GalSim's own work.

    PYTHONPATH=. python benchmarks/gpu_config_path.py [--model default] [--device cuda]
        [--nobjects 2048] [--batch-size 512] [--nprocs 1 4 8]
    PYTHONPATH=. python benchmarks/gpu_config_path.py --device cpu --nobjects 8 --batch-size 4 \
        --nprocs 1 2      # CPU smoke test

Each configuration is run once to warm up (model loading, the first decode) and then timed once,
each value of ``--nprocs`` in a fresh Python process (GalSim forks its workers, and a child forked
from a process that has used CUDA cannot use it; the parent here only reads the model's metadata,
on the CPU, so every worker initialises CUDA itself: with ``device: cuda`` and one GPU all the
workers share it). The survey is `bench_profile.survey_config` (0.7" Kolmogorov PSF,
0.2"/pixel, CCD noise, conditions over the middle of the training ranges).

The split: every process records the seconds (wall and CPU) it spends in the network call
(`galsim_vqvae.config.generate`: sampling and decoding, images back on the host) and in GalSim's
drawing of each stamp (`galsim.config.stamp.DrawBasic`: the InterpolatedImage's k-space draw
through the PSF). "other" is the rest of the worker-seconds (nproc x wall): stamp setup, the
dry runs that collect each block's requests, InterpolatedImage construction, noise, waiting for a
block another worker generates, writing the file.
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
import galsim_vqvae.config as vconfig  # noqa: E402
from galsim_vqvae import Emulator  # noqa: E402
from galsim_vqvae.emulator import _DEFAULT_PATH  # noqa: E402

_LOG = {"path": None}


def _timed(name, fn):
    """``fn`` that appends ``name pid wall cpu`` to the log file after each call (workers are
    forked, so they inherit the wrapper; they end with os._exit, so each call writes its line)."""
    def wrapper(*args, **kwargs):
        w, c = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            if _LOG["path"]:
                with open(_LOG["path"], "a") as f:
                    f.write(f"{name} {os.getpid()} {time.perf_counter() - w:.6f} "
                            f"{time.process_time() - c:.6f}\n")
    return wrapper


vconfig.generate = _timed("generate", vconfig.generate)
galsim.config.stamp.DrawBasic = _timed("draw", galsim.config.stamp.DrawBasic)


def _split(path):
    totals, pids = {}, set()
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                name, pid, wall, cpu = line.split()
                t = totals.setdefault(name, [0.0, 0.0, 0])
                t[0] += float(wall)
                t[1] += float(cpu)
                t[2] += 1
                pids.add(pid)
    return totals, len(pids)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--nobjects", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--nprocs", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()
    if len(args.nprocs) > 1:
        for nproc in args.nprocs:
            subprocess.run([sys.executable, __file__, "--model", args.model, "--device",
                            args.device, "--nobjects", str(args.nobjects), "--batch-size",
                            str(args.batch_size), "--nprocs", str(nproc)], check=True)
        return
    path = _DEFAULT_PATH if args.model == "default" else args.model
    emulator = Emulator.load(path)  # on the CPU: the metadata only
    prior = emulator.metadata["prior_config"]
    name = "default" if args.model == "default" else os.path.basename(path)
    shape = f"{prior['layers']} x {prior['channels']} prior"
    nproc = args.nprocs[0]
    with tempfile.TemporaryDirectory() as out:
        config = survey_config(path, out, args.nobjects, nproc, emulator.metadata)
        config["input"]["vqvae_model"].update(device=args.device, batch_size=args.batch_size)
        galsim.config.Process(copy.deepcopy(config), except_abort=True)
        _LOG["path"] = os.path.join(out, "split.txt")
        t0 = time.perf_counter()
        galsim.config.Process(copy.deepcopy(config), except_abort=True)
        dt = time.perf_counter() - t0
        totals, nworkers = _split(_LOG["path"])
    gen, draw = totals.get("generate", [0, 0, 0]), totals.get("draw", [0, 0, 0])
    busy = nproc * dt
    other = busy - gen[0] - draw[0]
    print(f"config path, model {name} ({shape}), {args.device}, {args.nobjects} galaxies, "
          f"blocks of {args.batch_size}, image.nproc={nproc}: {dt:.2f} s, "
          f"{args.nobjects / dt:.1f} galaxies/s", flush=True)
    print(f"  split of {busy:.2f} worker-s ({nproc} x wall; {nworkers} processes recorded): "
          f"generation {gen[0]:.2f} s ({100 * gen[0] / busy:.0f}%, {gen[2]} network calls, "
          f"CPU {gen[1]:.2f} s), GalSim drawing {draw[0]:.2f} s ({100 * draw[0] / busy:.0f}%, "
          f"CPU {draw[1]:.2f} s), other {other:.2f} s ({100 * other / busy:.0f}%: stamp setup, "
          f"dry runs, InterpolatedImage, noise, waiting, output)", flush=True)
    print(f"  per galaxy: generation {1e3 * gen[0] / args.nobjects:.2f} ms, drawing "
          f"{1e3 * draw[0] / args.nobjects:.2f} ms, other {1e3 * other / args.nobjects:.2f} ms "
          f"(worker-ms)", flush=True)


if __name__ == "__main__":
    main()
