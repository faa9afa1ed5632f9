"""Batch generation of many galaxies to FITS files, sharded over processes, GPUs or machines.

For users who do not go through a GalSim config: ``generate_stamps`` writes one shard of a run of
``n`` galaxies, ``merge_shards`` joins the shards into one file, and ``generate_parallel`` does
both with a pool of worker processes on one machine::

    from galsim_vqvae.generate import generate_stamps, generate_parallel, merge_shards

    # one machine, 8 processes (device="cuda" spreads them over the GPUs)
    generate_parallel("default", 100_000, "gals.fits", seed=1, processes=8,
                      conditions={"mag": mags, "hlr": hlrs})
    # or one shard per job (torchrun rank, SLURM array task...), merged afterwards
    generate_stamps("default", 100_000, f"gals_{rank}.fits", seed=1, num_shards=world, shard=rank)
    merge_shards([f"gals_{r}.fits" for r in range(world)], "gals.fits")

Reproducibility. Galaxy ``i`` of a run has the sampling seed ``per_sample_seeds(seed, n)[i]``
(its code map is that of ``Emulator.sample_codes(n, conditions, seed)[i]``). The run is cut into
fixed blocks of ``batch_size`` consecutive galaxies, one network call each, and a shard is a
contiguous range of whole blocks (the ``torch.utils.data`` way: shard ``k`` of ``N`` takes the
k-th of N near-equal parts): the batches, and so even the floating-point results, depend on
``(seed, n, batch_size)`` only. The merged shards of any split are therefore the file that one
process writes, byte for byte.

Output. Each file is what ``galsim-vqvae sample`` writes (`galsim_vqvae.outputs.sample_hdus`:
pre-PSF image cube, ``CODES``, ``CONDITIONS`` with each galaxy's labels) with these header
cards added: ``NTOTAL`` (galaxies in the whole run), ``FIRST`` (the run index of the file's
first galaxy), ``SHARD``/``NSHARDS``, ``BLOCK`` (batch_size) and ``TEMP`` (temperature). A shard
is held in memory until it is written (about 4 stamp_size^2 bytes a galaxy): use more shards for
more galaxies. Files are written atomically.
"""

import concurrent.futures
import multiprocessing
import os
import shutil
import tempfile

import numpy as np

from .errors import VQVAEFormatError, VQVAEInputError
from .fileio import check_output_path

__all__ = ["generate_stamps", "merge_shards", "generate_parallel", "shard_range"]

_RUN_CARDS = ("NTOTAL", "SEED", "BLOCK", "TEMP", "NSHARDS", "MODEL", "PIXSCALE", "BAND",
              "NOISEVER")


def _count(value, what, low=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise VQVAEInputError(f"{what} must be an integer >= {low}, got {value!r}")
    return int(value)


def shard_range(n, batch_size, num_shards=1, shard=0):
    """The run indices ``(first, last)`` of the galaxies of shard ``shard`` of ``num_shards``:
    the k-th of ``num_shards`` near-equal contiguous parts of the run's ``ceil(n / batch_size)``
    blocks.

    Parameters:
        n:              Galaxies in the whole run.
        batch_size:     Galaxies per block (network call).
        num_shards:     Shards the run is cut into, at most the number of blocks. [default: 1]
        shard:          This shard, 0 <= shard < num_shards. [default: 0]
    """
    n, batch_size = _count(n, "n"), _count(batch_size, "batch_size")
    num_shards = _count(num_shards, "num_shards")
    blocks = -(-n // batch_size)
    if num_shards > blocks:
        raise VQVAEInputError(f"num_shards={num_shards} exceeds the {blocks} block(s) of "
                              f"batch_size={batch_size} galaxies in a run of n={n}; use fewer "
                              "shards or a smaller batch_size")
    if isinstance(shard, bool) or not isinstance(shard, (int, np.integer)) \
            or not 0 <= shard < num_shards:
        raise VQVAEInputError(f"shard must be an integer in [0, {num_shards - 1}], got {shard!r}")
    first = shard * blocks // num_shards * batch_size
    last = min(n, (shard + 1) * blocks // num_shards * batch_size)
    return first, last


def _load(model, device):
    from .emulator import Emulator

    if isinstance(model, Emulator):
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise VQVAEInputError(f"model must be an Emulator, 'default' or the path of a saved "
                              f"model, got {type(model).__name__}")
    return Emulator.load(model, device=device)


def _run_conditions(emulator, conditions, n, out_of_range):
    """The labels given for the whole run, checked once (see `Emulator.check_conditions`)."""
    return emulator.check_conditions(conditions, n, out_of_range)


def generate_stamps(model, n, out, seed, conditions=None, num_shards=1, shard=0, batch_size=256,
                    device="cpu", temperature=1.0, out_of_range="error", method="fast",
                    progress=False):
    """Generate shard ``shard`` of ``num_shards`` of a run of ``n`` galaxies and write it to the
    FITS file ``out``. Returns the run indices ``(first, last)`` of the galaxies written.

    Parameters:
        model:          An `Emulator`, ``"default"`` or the path of a saved model.
        n:              Galaxies in the whole run (all shards).
        out:            The FITS file of this shard (written atomically).
        seed:           The run's seed (an int >= 0): the same seed gives the same galaxies
                        whatever the number of shards.
        conditions:     The labels given for the run's galaxies (any subset; see
                        `Emulator.check_conditions`): a dict label -> a value or an array of n
                        values, or an array [n, C] in the model's label order. Each shard takes
                        its rows; labels not given are drawn from each galaxy's seed and
                        written to the file. [default: None]
        num_shards:     Shards the run is cut into (see `shard_range`). [default: 1]
        shard:          The shard to generate, 0 <= shard < num_shards. [default: 0]
        batch_size:     Galaxies per network call; part of the run's definition (floating-point
                        results depend on it), so every shard must use the same. [default: 256]
        device:         Torch device to load a named model on. [default: "cpu"]
        temperature:    Softmax temperature of the prior, > 0. [default: 1.0]
        out_of_range:   ``"error"`` or ``"clip"`` for conditions outside the training range.
                        [default: "error"]
        method:         Sampler, ``"fast"`` or ``"naive"`` (same code maps). [default: "fast"]
        progress:       Show a progress bar per block. [default: False]
    """
    from .outputs import _write, sample_hdus

    n, batch_size = _count(n, "n"), _count(batch_size, "batch_size")
    seed = _count(seed, "seed", low=0)
    first, last = shard_range(n, batch_size, num_shards, shard)
    out = check_output_path(out, "out")
    emulator = _load(model, device)
    run_cond = _run_conditions(emulator, conditions, n, out_of_range)
    from .nn.sampling import per_sample_seeds

    seeds = per_sample_seeds(seed, last, start=first)  # those of galaxies first..last-1
    labels = emulator.fill_conditions({k: v[first:last] for k, v in run_cond.items()},
                                      last - first, seeds)  # missing ones: from each seed
    images, codes = [], []
    for start in range(first, last, batch_size):
        stop = min(start + batch_size, last)
        cond = {k: v[start - first:stop - first] for k, v in labels.items()} or None
        c = emulator.sample_codes(stop - start, cond, seed=seeds[start - first:stop - first],
                                  method=method, temperature=temperature,
                                  out_of_range=out_of_range, batch_size=batch_size,
                                  progress=progress)
        codes.append(c)
        images.append(emulator.decode(c, batch_size=batch_size))
    hdus = sample_hdus(np.concatenate(images), np.concatenate(codes), emulator, labels,
                       last - first, seed)
    _set_shard_cards(hdus[0].header, n, first, shard, num_shards, batch_size, temperature)
    _write(out, hdus)
    return first, last


def _set_shard_cards(header, n, first, shard, num_shards, batch_size, temperature):
    header["NTOTAL"] = (int(n), "galaxies in the whole run")
    header["FIRST"] = (int(first), "run index of this file's first galaxy")
    header["SHARD"] = (int(shard), "this shard")
    header["NSHARDS"] = (int(num_shards), "shards of the run")
    header["BLOCK"] = (int(batch_size), "galaxies per network call")
    header["TEMP"] = (float(temperature), "sampling temperature")


def merge_shards(paths, out, remove=False):
    """Join the shard files of one run (written by `generate_stamps`) into one FITS file,
    byte-identical to the file of the whole run written by one process (``num_shards=1``).
    Returns the number of galaxies.

    Parameters:
        paths:      The shard files, in any order: every shard of the run exactly once.
        out:        The merged FITS file (written atomically).
        remove:     Delete the shard files once the merged file is written. [default: False]
    """
    from astropy.io import fits

    from .outputs import _write

    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise VQVAEInputError("merge_shards: no shard files given")
    out = check_output_path(out, "out")
    shards = {}
    for path in paths:
        if not os.path.isfile(path):
            raise VQVAEInputError(f"shard file not found: {path}")
        try:
            with fits.open(path, memmap=False) as f:
                header = f[0].header.copy()
                images = np.asarray(f[0].data)
                codes = np.asarray(f["CODES"].data)
                table = f["CONDITIONS"].data if "CONDITIONS" in f else None
                cond = None if table is None else {k: np.asarray(table[k])
                                                   for k in table.columns.names}
        except (OSError, KeyError, TypeError, ValueError) as err:
            raise VQVAEFormatError(f"{path} is not a readable galaxy FITS file: {err}") from None
        missing = [k for k in _RUN_CARDS + ("SHARD", "FIRST", "NSAMPLE") if k not in header]
        if missing:
            raise VQVAEFormatError(f"{path} is not a shard written by generate_stamps: header "
                                   f"card(s) {missing} missing")
        if header["SHARD"] in shards:
            raise VQVAEInputError(f"{path} and {shards[header['SHARD']][0]} are both shard "
                                  f"{header['SHARD']} of the run")
        shards[header["SHARD"]] = (path, header, images, codes, cond)
    order = [shards[k] for k in sorted(shards)]
    path0, h0 = order[0][0], order[0][1]
    for path, h, images, codes, cond in order:
        differ = [k for k in _RUN_CARDS if h[k] != h0[k]]
        if differ:
            raise VQVAEInputError(f"{path} is not from the run of {path0}: header card(s) "
                                  + ", ".join(f"{k} ({h[k]!r} vs {h0[k]!r})" for k in differ)
                                  + " differ")
        if (cond is None) != (order[0][4] is None) or cond and list(cond) != list(order[0][4]):
            raise VQVAEInputError(f"{path} has other condition columns than {path0}")
    absent = sorted(set(range(h0["NSHARDS"])) - set(shards))
    if absent or len(shards) != h0["NSHARDS"]:
        raise VQVAEInputError(f"the run of {path0} has {h0['NSHARDS']} shards; missing shard(s) "
                              f"{absent}, extra: {sorted(set(shards) - set(range(h0['NSHARDS'])))}")
    expected = 0
    for path, h, images, codes, cond in order:
        if h["FIRST"] != expected or h["NSAMPLE"] != len(images) or len(codes) != len(images):
            raise VQVAEFormatError(f"{path} holds galaxies {h['FIRST']}..+{len(images)} but "
                                   f"the next galaxy of the run is {expected} (NSAMPLE "
                                   f"{h['NSAMPLE']}, {len(codes)} code maps)")
        expected += len(images)
    if expected != h0["NTOTAL"]:
        raise VQVAEFormatError(f"the shards hold {expected} galaxies; the run has "
                               f"NTOTAL={h0['NTOTAL']}")
    header = h0.copy()
    header["NSAMPLE"] = expected
    header["FIRST"] = 0
    header["SHARD"] = 0
    header["NSHARDS"] = 1
    primary = fits.PrimaryHDU(np.concatenate([s[2] for s in order]), header=header)
    hdus = [primary, fits.ImageHDU(np.concatenate([s[3] for s in order]), name="CODES")]
    if order[0][4] is not None:
        hdus.append(fits.BinTableHDU.from_columns(
            [fits.Column(name=k, format="K" if order[0][4][k].dtype.kind in "iu" else "D",
                         array=np.concatenate([s[4][k] for s in order]))
             for k in order[0][4]], name="CONDITIONS"))
    _write(out, fits.HDUList(hdus))
    if remove:
        for path in paths:
            os.remove(path)
    return expected


# ------------------------------------------------------------------------------------------------
def generate_parallel(model, n, out, seed, conditions=None, processes=None, num_shards=None,
                      batch_size=256, device="cpu", num_threads=1, temperature=1.0,
                      out_of_range="error", method="fast", keep_shards=False):
    """Generate a run of ``n`` galaxies with a pool of worker processes and write one FITS file:
    byte-identical to ``generate_stamps(model, n, out, seed, ...)`` in one process.

    The workers are started with ``spawn`` (no CUDA context crosses a fork; a script therefore
    calls this under ``if __name__ == "__main__":``, as `multiprocessing` requires); each loads
    the model once and generates shards ``w, w + processes, ...``, which are then merged. With ``device``
    ``"cuda"`` on a machine with several GPUs, worker w runs on ``cuda:(w mod count)``
    (`galsim_vqvae.devices.worker_device`). Returns the number of shards.

    Parameters:
        model:          ``"default"`` or the path of a saved model (or an `Emulator` loaded from
                        one: its path is used).
        n, seed, conditions, batch_size, temperature, out_of_range, method:
                        As for `generate_stamps`.
        out:            The FITS file (written atomically).
        processes:      Worker processes. [default: os.cpu_count(), at most the number of
                        blocks]
        num_shards:     Shards (shard files, one task each). [default: processes]
        device:         ``"cpu"``, ``"cuda"`` (spread over the GPUs) or ``"cuda:N"``.
                        [default: "cpu"]
        num_threads:    Torch CPU threads per worker; 0 leaves torch's default. [default: 1]
        keep_shards:    Keep the shard files (in a folder beside ``out``) rather than delete
                        them after the merge. [default: False]
    """
    n, batch_size = _count(n, "n"), _count(batch_size, "batch_size")
    seed = _count(seed, "seed", low=0)
    blocks = -(-n // batch_size)
    processes = min(blocks, os.cpu_count() or 1) if processes is None else \
        _count(processes, "processes")
    processes = min(processes, blocks)
    num_shards = processes if num_shards is None else _count(num_shards, "num_shards")
    shard_range(n, batch_size, num_shards, num_shards - 1)  # checks num_shards
    processes = min(processes, num_shards)
    num_threads = _count(num_threads, "num_threads", low=0)
    if not isinstance(model, (str, os.PathLike)):
        path = getattr(model, "path", None)
        if not path:
            raise VQVAEInputError("generate_parallel needs a model that each worker can load: "
                                  "'default', a path, or an Emulator loaded from a file")
        model = path
    model = os.fspath(model)
    if model != "default" and not os.path.isfile(model):
        raise VQVAEInputError(f"model file not found: {model}")
    from .devices import resolve_device

    resolve_device(device)  # a clear error here, not in every worker
    out = check_output_path(out, "out")
    folder = tempfile.mkdtemp(prefix="." + os.path.basename(out) + ".shards-",
                              dir=os.path.dirname(os.path.abspath(out)))
    paths = [os.path.join(folder, "shard_%05d.fits" % k) for k in range(num_shards)]
    kwargs = dict(n=n, seed=seed, conditions=conditions, num_shards=num_shards,
                  batch_size=batch_size, temperature=temperature, out_of_range=out_of_range,
                  method=method)
    try:
        with concurrent.futures.ProcessPoolExecutor(
                processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            jobs = [pool.submit(_worker, w, model, device, num_threads,
                                [(k, paths[k]) for k in range(w, num_shards, processes)], kwargs)
                    for w in range(processes)]
            for job in concurrent.futures.as_completed(jobs):
                job.result()  # the first error, raised here
        merge_shards(paths, out)
    finally:
        if not keep_shards:
            shutil.rmtree(folder, ignore_errors=True)
    return num_shards


def _worker(worker, model, device, num_threads, shards, kwargs):
    """One worker process: load the model once, on its device, and generate its shards."""
    import torch

    from .devices import worker_device

    if num_threads:
        torch.set_num_threads(num_threads)
    n_gpus = torch.cuda.device_count() if device == "cuda" else 0
    emulator = _load(model, worker_device(device, worker, n_gpus))
    for shard, path in shards:
        generate_stamps(emulator, out=path, shard=shard, **kwargs)
    return str(emulator.device)
