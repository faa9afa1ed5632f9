"""Conditioning accuracy: the measured magnitude and half-light radius of samples against the
requested ones (`galsim_vqvae.metrics.conditioning_accuracy`)."""

import numpy as np

from ..metrics import conditioning_accuracy
from .common import Section, fmt, skipped

TITLE = "3. Conditioning accuracy"


def run(emulator, n, out_dir, seed=0, progress=False):
    """The conditioning section on ``n`` samples with conditions drawn like the training set."""
    import os

    from ..plots import save_scatter

    if not emulator.condition_names:
        return skipped(TITLE, "the model is unconditional")
    result = conditioning_accuracy(emulator, n=n, seed=seed, progress=progress)
    sec = Section(TITLE)
    sec.metrics["conditioning.n"] = n
    sec.lines += [f"{n} samples (seed {seed}), conditions drawn like the training set "
                  "(normal with the training mean and spread, clipped to its range); magnitude "
                  "from the image sum, half-light radius from the curve of growth.", "",
                  "| label | bias | scatter | median |", "| --- | --- | --- | --- |"]
    panels = {}
    if "mag_bias" in result:
        d = result["mag_measured"] - result["mag_requested"]
        sec.metrics.update({"conditioning.mag_bias": result["mag_bias"],
                            "conditioning.mag_scatter": result["mag_scatter"],
                            "conditioning.mag_median": float(np.nanmedian(d))})
        sec.lines.append(f"| magnitude (measured - requested) | {fmt(result['mag_bias'], 3)} | "
                         f"{fmt(result['mag_scatter'], 3)} | {fmt(np.nanmedian(d), 3)} |")
        panels["magnitude"] = {"x": result["mag_requested"], "y": result["mag_measured"],
                               "xlabel": "requested", "ylabel": "measured", "diagonal": True}
    if "hlr_rel_bias" in result:
        d = result["hlr_measured"] / result["hlr_requested"] - 1
        sec.metrics.update({"conditioning.hlr_rel_bias": result["hlr_rel_bias"],
                            "conditioning.hlr_rel_scatter": result["hlr_rel_scatter"],
                            "conditioning.hlr_rel_median": float(np.nanmedian(d))})
        sec.lines.append(f"| half-light radius (measured / requested - 1) | "
                         f"{fmt(result['hlr_rel_bias'], 3)} | {fmt(result['hlr_rel_scatter'], 3)}"
                         f" | {fmt(np.nanmedian(d), 3)} |")
        panels["half-light radius (arcsec)"] = {
            "x": result["hlr_requested"], "y": result["hlr_measured"], "xlabel": "requested",
            "ylabel": "measured", "diagonal": True}
    sec.lines.append("")
    if panels:
        save_scatter(os.path.join(out_dir, "conditioning.png"), panels,
                     title="Conditioning: measured against requested")
        sec.figures.append("conditioning.png")
    return sec
