"""Real galaxies: how well the model reproduces real stamps through their own PSF.

Each real stamp is encoded and decoded by the model, the decoded pre-PSF galaxy is convolved with
the stamp's own PSF (`Emulator.reconstruct` with ``convolved=True``) and compared with the stamp:
the reduced chi^2 is the mean over the stamp's pixels of ((model - observed) / sigma)^2. 1 is a
reconstruction within the noise. The noise is taken as white with the stamp's sigma; resampled
HST noise is correlated, which this ignores.

Input: a dataset file made by ``galsim-vqvae make-dataset`` (``--source fits`` or ``cosmos``) on the
model's grid, or a GalSim RealGalaxyCatalog (e.g. COSMOS 25.2, or GalSim's AEGIS test
catalogs), which is read with `galsim_vqvae.data.cosmos.make_cosmos_dataset`: each galaxy and its
PSF are resampled from the catalog's pixel scale (0.03" for COSMOS/AEGIS) to the model's (0.06"
for the default model), finer inputs with the model pixel's response, and cut or padded to the
model's stamp.
"""

import os

import numpy as np

from ..errors import VQVAEInputError
from .common import Section, check_grid, fmt, shown_path

TITLE = "6. Real galaxies"


def load_real(path, emulator, work_dir, progress=False):
    """Stamps, PSFs, sigmas and header of ``path``: a dataset file (HDF5) on the model's grid, or
    a RealGalaxyCatalog FITS file (converted to one in ``work_dir``)."""
    from ..data.dataset import _h5py, load_arrays, read_header

    h5py = _h5py()

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VQVAEInputError(f"--real {path}: file not found (give a dataset file or a GalSim "
                              "RealGalaxyCatalog FITS file)")
    if not h5py.is_hdf5(path):
        from ..data.cosmos import make_cosmos_dataset

        converted = os.path.join(work_dir, "real_galaxies.h5")
        make_cosmos_dataset(converted, os.path.basename(path), os.path.dirname(path) or ".",
                            stamp_size=emulator.stamp_size,
                            pixel_scale=float(emulator.metadata["pixel_scale"]),
                            band=None, progress=progress)
        header = read_header(converted)
        header["input"] = path
        path = converted
    else:
        header = read_header(path)
        header["input"] = path
    check_grid(header, emulator, f"--real {header['input']}")
    arrays = load_arrays(path, keys=["observed", "psf_index", "sigma", "psf_bank"])
    arrays["psf"] = arrays["psf_bank"][arrays["psf_index"]]
    arrays["header"] = header
    return arrays


def run(emulator, arrays, out_dir):
    """The real-galaxy section: reduced chi^2 of each stamp's reconstruction (``arrays`` from
    `load_real`)."""
    from ..plots import save_gallery

    observed, psf, sigma = arrays["observed"], arrays["psf"], arrays["sigma"]
    convolved, chi2 = emulator.reconstruct(observed, psf, sigma, convolved=True)
    deconvolved, _ = emulator.reconstruct(observed, psf, sigma)
    header = arrays["header"]
    sec = Section(TITLE)
    sec.metrics.update({"real.n": len(chi2), "real.chi2_median": float(np.median(chi2)),
                        "real.chi2_mean": float(np.mean(chi2)),
                        "real.chi2_max": float(np.max(chi2))})
    sec.lines += [
        f"{len(chi2)} real stamps from `{shown_path(header['input'])}` "
        f"({header.get('description', '')}), "
        f"band {header.get('band', '?')}, on the model's grid ({emulator.stamp_size} pixels of "
        f"{emulator.metadata['pixel_scale']}\"; the model was trained in band "
        f"{emulator.metadata.get('band', '?')}). Reduced chi^2 of the reconstruction convolved "
        "with each stamp's own PSF (white noise of the stamp's sigma assumed): median "
        f"{fmt(np.median(chi2), 3)}, mean {fmt(np.mean(chi2), 3)}.", "",
        "| stamp | flux | sigma | reduced chi^2 |", "| --- | --- | --- | --- |"]
    for i in range(min(len(chi2), 50)):
        sec.lines.append(f"| {i} | {fmt(observed[i].sum(), 4)} | {fmt(sigma[i], 3)} | "
                         f"{fmt(chi2[i], 4)} |")
    if len(chi2) > 50:
        sec.lines.append(f"| ... {len(chi2) - 50} more | | | |")
    sec.lines.append("")
    k = min(8, len(chi2))
    save_gallery(os.path.join(out_dir, "real.png"),
                 {"observed": observed[:k], "reconstruction * PSF": convolved[:k],
                  "residual": observed[:k] - convolved[:k], "deconvolved": deconvolved[:k]},
                 title="real galaxies")
    sec.figures.append("real.png")
    return sec
