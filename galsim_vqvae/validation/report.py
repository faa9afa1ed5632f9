"""The science report of a model (``galsim-vqvae evaluate``): runs the checks, writes
``report.md``, ``metrics.json`` (flat keys, numbers only) and PNG figures into one folder.

The folder's files are written into a temporary folder beside it and moved in only when every
check has finished, so an interrupted run leaves the previous report (if any) as it was.
"""

import contextlib
import json
import math
import os
import shutil
import tempfile
import time

import numpy as np

from ..data.dataset import read_header
from ..errors import VQVAEInputError
from . import codebook, conditioning, fidelity, real, realism, shear
from .common import SPLITS, cell, check_grid, fmt, load_heldout, shown_path, skipped

FIGURES = ("fidelity.png", "fidelity_gallery.png", "realism.png", "realism_gallery.png",
           "conditioning.png", "codebook.png", "real.png", "real_residuals.png",
           "real_samples.png", "real_gini_m20.png")


def evaluate(model="default", n=1000, out="evaluation", data=None, plain_ae=None, real_path=None,
             seed=0, device="cpu", split="test", progress=True, workers=1):
    """Run every check of the science report and write it to ``out``.

    Parameters:
        model:      ``"default"``, a model bundle or its directory, or an `Emulator`.
                    [default: "default"]
        n:          Number of stamps, samples and galaxies per check. [default: 1000]
        out:        Output folder (created; its report files are replaced). [default: "evaluation"]
        data:       A synthetic dataset file with truth, for fidelity, realism and the codebook's
                    colours; without it those parts are skipped. [default: None]
        plain_ae:   A ``train-vqvae --no-psf-layers`` run directory (or checkpoint) for the
                    fidelity comparison. [default: None]
        real_path:  Real galaxies: a dataset file on the model's grid or a GalSim
                    RealGalaxyCatalog FITS file. [default: None]
        seed:       Seed of every random draw. [default: 0]
        device:     Torch device. [default: "cpu"]
        split:      Stamps of ``data`` to use: "test" (held out, i % 10 == 9) or "all" (for a
                    dataset the model never saw). [default: "test"]
        progress:   Show progress bars. [default: True]
        workers:    Processes for the per-galaxy measurements (morphology, HSM, Richardson-Lucy,
                    ring test); the report does not depend on it. [default: 1]

    Returns:
        dict: the metrics written to ``metrics.json``.
    """
    from tqdm import tqdm

    from ..emulator import Emulator

    for name, value in (("n", n), ("workers", workers)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise VQVAEInputError(f"{name} must be a positive integer, got {value!r}")
    if split not in SPLITS:
        raise VQVAEInputError(f"split must be one of {SPLITS}, got {split!r}")
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and not os.path.isdir(out):
        raise VQVAEInputError(f"--out {out} exists and is not a folder")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise VQVAEInputError(f"--out {out}: its parent folder does not exist")
    # Every input is checked before any work starts.
    emulator = model if isinstance(model, Emulator) else Emulator.load(model, device=device)
    if isinstance(model, Emulator):
        emulator.to(device)
    if data is not None:
        header = read_header(data)
        check_grid(header, emulator, f"--data {data}")
        if not header["has_truth"]:
            raise VQVAEInputError(f"--data {data} has no truth images (make one with "
                                  "'galsim-vqvae make-dataset --source synthetic')")
    net = fidelity.load_plain_autoencoder(plain_ae, device) if plain_ae is not None else None
    if real_path is not None and not os.path.isfile(os.fspath(real_path)):
        raise VQVAEInputError(f"--real {real_path}: file not found (give a dataset file or a "
                              "GalSim RealGalaxyCatalog FITS file)")

    start = time.time()
    stage = tempfile.mkdtemp(prefix="." + os.path.basename(out) + ".", suffix=".tmp", dir=parent)
    try:
        # The real galaxies are read first: a catalog whose images are missing fails at once,
        # not after the hours of the other checks.
        real_arrays = (real.load_real(real_path, emulator, stage, progress, n, split)
                       if real_path is not None else None)
        sections = []
        steps = ["fidelity", "realism", "conditioning", "shear", "codebook", "real"]
        bar = tqdm(steps, desc="evaluate", disable=not progress)
        sampled = None
        seconds = {}
        for step in bar:
            bar.set_postfix_str(step)
            t0 = time.time()
            if step == "fidelity":
                sections.append(fidelity.run(emulator, data, n, stage, split, net, progress,
                                             workers)
                                if data is not None else
                                skipped(fidelity.TITLE, "no --data (a synthetic dataset)"))
            elif step == "realism":
                if data is not None:
                    sec, codes, conds = realism.run(emulator, data, n, stage, split, seed,
                                                    progress, workers)
                    sampled = (codes, conds)
                    sections.append(sec)
                else:
                    sections.append(skipped(realism.TITLE, "no --data (a synthetic dataset)"))
            elif step == "conditioning":
                sections.append(conditioning.run(emulator, n, stage, seed + 1, progress))
            elif step == "shear":
                sections.append(shear.run(emulator, n, seed + 2, progress, workers))
            elif step == "codebook":
                sections.append(_codebook(emulator, data, n, split, sampled, stage, seed))
            elif step == "real":
                sections.append(real.run(emulator, real_arrays, stage)
                                if real_arrays is not None else
                                skipped(real.TITLE, "no --real (a dataset file or a GalSim "
                                        "RealGalaxyCatalog)"))
            seconds[step] = time.time() - t0
        metrics = _flat_metrics(sections)
        metrics["evaluate.seconds"] = round(time.time() - start, 1)
        metrics.update({f"evaluate.seconds.{k}": round(v, 1) for k, v in seconds.items()})
        with open(os.path.join(stage, "report.md"), "w") as f:
            f.write(_markdown(emulator, sections, dict(model=model, n=n, data=data,
                                                       plain_ae=plain_ae, real=real_path,
                                                       seed=seed, split=split, device=device),
                              metrics["evaluate.seconds"]))
        with open(os.path.join(stage, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1, sort_keys=True, allow_nan=False)
        for name in os.listdir(stage):  # keep only the report's files
            if not (name.endswith(".png") or name in ("report.md", "metrics.json")):
                os.remove(os.path.join(stage, name))
        os.makedirs(out, exist_ok=True)
        for name in FIGURES:  # a figure of an earlier report that this one does not have
            if not os.path.exists(os.path.join(stage, name)):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(out, name))
        for name in sorted(os.listdir(stage), key=lambda s: s == "metrics.json"):
            os.replace(os.path.join(stage, name), os.path.join(out, name))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return metrics


def _codebook(emulator, data, n, split, sampled, stage, seed):
    from ..metrics import draw_training_conditions

    data_codes = data_props = None
    if data is not None:
        arrays = load_heldout(data, emulator, n, split, keys=("observed", "params"))
        data_codes = emulator.encode(arrays["observed"])
        data_props = {k: arrays[f"params/{k}"] for k in ("hlr", "mag") if f"params/{k}" in arrays}
    if sampled is None:
        conds = draw_training_conditions(emulator, n, seed) if emulator.condition_names else None
        sampled = (emulator.sample_codes(n, conds, seed=seed), conds)
    codes, conds = sampled
    sample_props = dict(conds) if conds else None
    return codebook.run(emulator, stage, data_codes, data_props, codes, sample_props, seed)


def _flat_metrics(sections):
    """All sections' metrics and goals as one flat dict of finite numbers (NaNs left out)."""
    out = {}
    for sec in sections:
        for key, value in sec.metrics.items():
            value = float(value)
            if math.isfinite(value):
                out[key] = int(value) if value.is_integer() and abs(value) < 2 ** 53 else value
        for goal in sec.goals:
            if goal.passed is not None:
                out[f"goal.{goal.key}"] = int(goal.passed)
            if math.isfinite(goal.value):
                out[f"goal.{goal.key}.value"] = float(goal.value)
    return out


def _markdown(emulator, sections, args, seconds):
    from .. import __version__
    from ..provenance import file_sha256, model_name

    md = emulator.metadata
    path = getattr(emulator, "path", None)
    name = f"`{model_name(path)}`, sha256 {file_sha256(path)}" if path else "an in-memory Emulator"
    lines = ["# Science report", "",
             f"Model {name}: "
             f"{md['stamp_size']}x{md['stamp_size']} pixels of {md['pixel_scale']}\", band "
             f"{md.get('band', '?')}, {md['num_codes']} codes, conditions "
             f"{emulator.condition_names}; training data: "
             f"{md.get('training_data', {}).get('description', md.get('training_data'))}.", "",
             f"`galsim-vqvae evaluate` (galsim_vqvae {__version__}), n = {args['n']}, seed "
             f"{args['seed']}, data `{shown_path(args['data'])}` (split `{args['split']}`), "
             f"plain autoencoder `{shown_path(args['plain_ae'])}`, real galaxies "
             f"`{shown_path(args['real'])}`, device "
             f"{args['device']}; {seconds:.0f} s. Definitions: docs/evaluate.md.", "",
             "## Goals", "", "| goal | value | target | result |", "| --- | --- | --- | --- |"]
    for sec in sections:
        for g in sec.goals:
            result = "not measured" if g.passed is None else ("hit" if g.passed else "miss")
            lines.append(f"| {cell(g.text)} | {fmt(g.value, 3)} | < {g.threshold:g} | {result} |")
    lines.append("")
    for sec in sections:
        lines += [f"## {sec.title}", ""] + sec.lines
        lines += [f"![{f}]({f})" for f in sec.figures]
        lines.append("")
    return "\n".join(lines) + "\n"
