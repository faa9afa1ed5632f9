"""What every check of the science report shares: its result type, goals, the held-out stamps
and the process pool that spreads per-galaxy measurements over the machine's cores."""

import multiprocessing
import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import VQVAEInputError

SPLITS = ("test", "all")


def shown_path(path):
    """How a report names an input file: its path relative to the current folder when it lies
    below it, else its file name (never an absolute path of the machine that made the report);
    None and "default" as they are."""
    if path is None or path == "default":
        return path
    path = os.fspath(path)
    relative = os.path.relpath(os.path.abspath(path))
    return os.path.basename(path) if relative.startswith(os.pardir) else relative


@dataclass
class Goal:
    """One goal of the report: ``value`` compared with ``threshold`` (``passed`` is None when the
    value could not be measured)."""

    key: str
    text: str
    value: float
    threshold: float
    passed: object = None

    def __post_init__(self):
        if self.passed is None and np.isfinite(self.value):
            self.passed = bool(self.value < self.threshold)


@dataclass
class Section:
    """The result of one check: flat numeric metrics, Markdown lines, goals, figure file names."""

    title: str
    metrics: dict = field(default_factory=dict)
    lines: list = field(default_factory=list)
    goals: list = field(default_factory=list)
    figures: list = field(default_factory=list)


_TASK = None


def _run_task(bounds):
    return _TASK(*bounds)


def parallel_chunks(function, n, workers=1, chunk=64):
    """``function(a, b)`` over consecutive index ranges covering ``range(n)``, results
    concatenated along their first axis (arrays, or dicts of arrays concatenated key by key).

    With ``workers`` > 1 the ranges run in that many forked processes, which inherit
    ``function`` and the data it closes over (nothing is pickled but the results). The ranges
    and the order of the results do not depend on ``workers``, so neither does the output.
    """
    global _TASK
    bounds = [(a, min(n, a + chunk)) for a in range(0, n, chunk)]
    if workers <= 1 or len(bounds) <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        parts = [function(a, b) for a, b in bounds]
    else:
        _TASK = function
        try:
            with multiprocessing.get_context("fork").Pool(min(workers, len(bounds))) as pool:
                parts = pool.map(_run_task, bounds, chunksize=1)
        finally:
            _TASK = None
    if not parts:
        return function(0, 0)
    if isinstance(parts[0], dict):
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return np.concatenate(parts)


def skipped(title, reason):
    """A section that did not run, with the reason as its only line."""
    return Section(title, lines=[f"*Skipped: {reason}.*"])


def fmt(value, digits=4):
    """A number for a Markdown table (``n/a`` for NaN)."""
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:.{digits}g}"


def cell(text):
    """Text for a Markdown table cell (``|`` escaped)."""
    return str(text).replace("|", "\\|")


def load_heldout(data, emulator, n, split="test", keys=("observed", "truth", "psf_index", "sigma",
                                                          "params")):
    """Up to ``n`` stamps of a dataset's ``split`` ("test": the held-out stamps, i % 10 == 9;
    "all": every stamp, for a dataset the model never saw) as arrays, ``psf`` per stamp included.

    Raises `VQVAEInputError` naming the file if its stamps do not match the model's grid or it
    has no truth images.
    """
    from ..data.dataset import load_arrays, read_header, split_indices

    if split not in SPLITS:
        raise VQVAEInputError(f"split must be one of {SPLITS}, got {split!r}")
    header = read_header(data)
    check_grid(header, emulator, f"--data {data}")
    if "truth" in keys and not header["has_truth"]:
        raise VQVAEInputError(f"--data {data} has no truth images (make one with "
                              "'galsim-vqvae make-dataset --source synthetic')")
    index = split_indices(header["n"], None if split == "all" else split)[:n]
    if len(index) == 0:
        raise VQVAEInputError(f"--data {data} has no stamps in its {split!r} split "
                              f"({header['n']} stamps)")
    arrays = load_arrays(data, indices=index, keys=list(keys) + ["psf_bank"])
    if "psf_index" in arrays:
        arrays["psf"] = arrays["psf_bank"][arrays["psf_index"]]
    arrays["index"] = index
    arrays["header"] = header
    return arrays


def check_grid(header, emulator, what):
    """Raise unless a dataset header's stamp size and pixel scale are the model's."""
    size, scale = emulator.stamp_size, float(emulator.metadata["pixel_scale"])
    if int(header["stamp_size"]) != size or abs(float(header["pixel_scale"]) - scale) > 1e-6 * scale:
        raise VQVAEInputError(f"{what} has {header['stamp_size']}-pixel stamps at "
                              f"{header['pixel_scale']}\"/pixel; the model works on {size}-pixel "
                              f"stamps at {scale}\"/pixel")
