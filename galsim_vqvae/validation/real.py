"""Real galaxies: how well the model reproduces real stamps through their own PSF and noise.

Each real stamp is encoded and decoded by the model, the decoded pre-PSF galaxy is convolved with
the stamp's own PSF (`Emulator.reconstruct` with ``convolved=True``) and compared with the stamp
under the stamp's own noise model (`galsim_vqvae.nn.forward.chi2`): HST noise is correlated
(drizzling, then resampling to the model's grid), so the residual is whitened in Fourier space
with the stamp's noise power spectrum and the reduced chi^2 is the mean of its square over the
pixels with data (weight > 0: the galaxy's own image, not the padding). 1 is a reconstruction
within the noise. A dataset without a noise model is taken as white noise of its sigma.

The residual figure shows each stamp's whitened residual in units of sigma; the mean residual's
radial profile is the residual (observed - model) / sigma, averaged over the galaxies at each
pixel with data, then over annuli of one pixel about the stamp centre: a systematic error at the
galaxies' cores or wings shows as a profile away from 0.

For a model trained in the band of the real galaxies, the comparison of Lanusse et al. (2021):
each real galaxy beside a prior sample drawn with that galaxy's labels (``mag`` from the stamp's
flux; ``hlr`` measured on the decoded reconstruction; any other label from the dataset's
``params``), both through the galaxy's own PSF and noise (the sample is convolved with the PSF
and given a realisation of the galaxy's noise model), compared in mean |g| (HSM adaptive moments,
g = e / (1 + sqrt(1 - e^2))), mean HSM size and the Gini-M20 plane (Lotz et al. 2004; the
`galsim_vqvae.metrics` definitions), measured identically on both noisy sets.

Input: a dataset file made by ``galsim-vqvae make-dataset`` (``--source fits`` or ``cosmos``) on the
model's grid, or a GalSim RealGalaxyCatalog (e.g. COSMOS 25.2, or GalSim's AEGIS test
catalogs), which is read with `galsim_vqvae.data.cosmos.make_cosmos_dataset` (its noise model
included): each galaxy and its PSF are resampled from the catalog's pixel scale (0.03" for
COSMOS/AEGIS) to the model's, finer inputs with the model pixel's response, and cut or padded to
the model's stamp.
"""

import os

import numpy as np

from ..errors import VQVAEInputError
from .common import Goal, Section, check_grid, fmt, shown_path

TITLE = "6. Real galaxies"
CHI2_RANGE = (0.95, 1.10)  # goal for a model trained on these galaxies' band (issue 18)
PROFILE_GOAL = 1.0  # |mean residual| in sigma, every annulus


def load_real(path, emulator, work_dir, progress=False, n=None, split="all"):
    """Stamps, PSFs, sigmas, noise model and header of ``path``: a dataset file (HDF5) on the
    model's grid (the stamps of its ``split``: "test", the held-out stamps i % 10 == 9, or "all"),
    or a RealGalaxyCatalog FITS file (converted to one in ``work_dir``; every galaxy). At most the
    first ``n`` of them (None: all)."""
    from ..data.dataset import _h5py, load_arrays, read_header, split_indices

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
                            band=None, progress=progress, max_galaxies=n)
        split = "all"
        header = read_header(converted)
        header["input"] = path
        path = converted
    else:
        header = read_header(path)
        header["input"] = path
    check_grid(header, emulator, f"--real {header['input']}")
    index = split_indices(header["n"], None if split == "all" else split)[:n]
    if len(index) == 0:
        raise VQVAEInputError(f"--real {header['input']} has no stamps in its {split!r} split "
                              f"({header['n']} stamps)")
    arrays = load_arrays(path, indices=index,
                         keys=["observed", "psf_index", "sigma", "psf_bank", "noise_bank",
                               "noise_index", "weight", "params"])
    header["split"] = split
    arrays["psf"] = arrays["psf_bank"][arrays["psf_index"]]
    s = emulator.stamp_size
    n = len(arrays["observed"])
    if "noise_bank" in arrays:
        arrays["noise_power"] = arrays["noise_bank"][arrays["noise_index"]]
    else:
        arrays["noise_power"] = np.ones((n, s, s), np.float32)
    arrays.setdefault("weight", np.ones((n, s, s), np.float32))
    arrays["header"] = header
    return arrays


def noise_chi2(model, arrays):
    """Reduced chi^2 [n] of ``model`` [n, S, S] against the real stamps under their noise model,
    and the whitened residuals (model - observed) / sigma [n, S, S]."""
    import torch

    from ..nn.forward import chi2, whiten

    t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
    residual = t(model) - t(arrays["observed"])
    power, sigma = t(arrays["noise_power"]), t(arrays["sigma"])
    c2 = chi2(t(model)[:, None], t(arrays["observed"])[:, None], sigma, noise_power=power,
              weight=t(arrays["weight"])[:, None])
    white = whiten(residual, power) / sigma[:, None, None]
    return c2.numpy(), white.numpy()


def radial_profile(residual, weight):
    """The mean over stamps of ``residual`` [n, S, S] at each pixel of weight > 0, averaged over
    annuli of one pixel about pixel (S//2, S//2): (radii [pixels], profile, its standard error,
    pixels per annulus)."""
    residual = np.asarray(residual, dtype=np.float64)
    has = np.asarray(weight) > 0
    count = has.sum(0)
    mean = np.where(count > 0, (residual * has).sum(0) / np.maximum(count, 1), np.nan)
    var = np.where(count > 1, ((residual - mean) ** 2 * has).sum(0) / np.maximum(count - 1, 1),
                   np.nan) / np.maximum(count, 1)
    s = residual.shape[-1]
    y, x = np.mgrid[:s, :s] - s // 2
    ring = np.rint(np.hypot(y, x)).astype(int)
    radii, profile, error, pixels = [], [], [], []
    for r in range(s // 2):
        sel = (ring == r) & (count > 0)
        if sel.any():
            radii.append(r)
            profile.append(float(np.average(mean[sel], weights=count[sel])))
            error.append(float(np.sqrt(np.nansum(var[sel] * count[sel] ** 2)) / count[sel].sum()))
            pixels.append(int(sel.sum()))
    return np.array(radii), np.array(profile), np.array(error), np.array(pixels)


def _shear_modulus(e):
    """|g| of a distortion modulus e (HSM's observed shape)."""
    e = np.asarray(e, dtype=np.float64)
    return e / (1.0 + np.sqrt(np.clip(1.0 - e * e, 0.0, None)))


def real_labels(emulator, arrays, deconvolved):
    """The model's conditioning labels of each real galaxy (see the module docstring), or None
    with the reason when one cannot be measured."""
    from ..metrics import half_light_radius

    zeropoint = float(emulator.metadata.get("zeropoint", 25.94))
    labels = {}
    for name in emulator.condition_names:
        if name == "mag":
            flux = arrays["observed"].astype(np.float64).sum(axis=(1, 2))
            labels[name] = zeropoint - 2.5 * np.log10(np.maximum(flux, 1e-30))
        elif name == "hlr":
            labels[name] = half_light_radius(np.clip(deconvolved, 0, None),
                                             float(emulator.metadata["pixel_scale"]))
        elif f"params/{name}" in arrays:
            labels[name] = np.asarray(arrays[f"params/{name}"], dtype=np.float64)
        else:
            return None, f"the model's label {name!r} is not measured on real galaxies"
        if not np.isfinite(labels[name]).all():
            return None, f"label {name!r} is not finite for every real galaxy"
    return labels, None


def lanusse_comparison(emulator, arrays, deconvolved, seed, out_dir):
    """Real stamps against prior samples with their labels through their PSF and noise: (metric
    dict, Markdown lines, figure names)."""
    import torch

    from ..data.noise import draw_correlated
    from ..metrics import gini_coefficient, hsm_shapes, m20, segmentation
    from ..nn.forward import convolve_psf
    from ..plots import save_gallery

    labels, why = real_labels(emulator, arrays, deconvolved)
    if labels is None:
        return {}, [f"*Lanusse et al. (2021) comparison skipped: {why}.*", ""], []
    n = len(arrays["observed"])
    samples = emulator.sample(n, labels or None, seed=seed, out_of_range="clip")
    convolved = convolve_psf(torch.as_tensor(samples, dtype=torch.float32)[:, None],
                             torch.as_tensor(arrays["psf"], dtype=torch.float32)[:, None])
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x1A5]))
    noisy = convolved[:, 0].numpy().astype(np.float64) + np.stack(
        [draw_correlated(arrays["noise_power"][i], float(arrays["sigma"][i]), rng)
         for i in range(n)])
    scale = float(emulator.metadata["pixel_scale"])
    stats = {}
    for name, images in (("real", arrays["observed"].astype(np.float64)), ("sample", noisy)):
        shapes = hsm_shapes(images, scale)
        masks = segmentation(images)
        stats[name] = {"g": _shear_modulus(shapes["e"]), "size": shapes["sigma"],
                       "gini": gini_coefficient(images, masks), "m20": m20(images, masks)}
    metrics, lines = {}, [
        "Lanusse et al. (2021) comparison: each real galaxy beside a prior sample drawn with its "
        f"labels ({', '.join(labels) or 'none: unconditional model'}), the sample convolved with "
        "the galaxy's PSF and given a realisation of its noise model; both measured the same way "
        "(HSM adaptive moments; Gini and M20 over the Lotz et al. 2004 segmentation). Lanusse et "
        "al. found +3.9% in mean |g| and +0.7% in mean size for their flow-VAE on COSMOS.", "",
        "| statistic | mean (real) | mean (samples) | rel. diff |", "| --- | --- | --- | --- |"]
    for key, label in (("g", "\\|g\\|"), ("size", "HSM size (arcsec)"), ("gini", "Gini"),
                       ("m20", "M20")):
        a, b = stats["real"][key], stats["sample"][key]
        ok = np.isfinite(a) & np.isfinite(b)
        ma, mb = (float(np.mean(v[ok])) if ok.any() else np.nan for v in (a, b))
        rel = mb / ma - 1 if ok.any() and ma != 0 else np.nan
        metrics.update({f"real.lanusse.{key}.real": ma, f"real.lanusse.{key}.sample": mb,
                        f"real.lanusse.{key}.rel_diff": rel,
                        f"real.lanusse.{key}.n": int(ok.sum())})
        lines.append(f"| {label} | {fmt(ma)} | {fmt(mb)} | {fmt(100 * rel, 3)}% |")
    lines.append("")
    k = min(8, n)
    save_gallery(os.path.join(out_dir, "real_samples.png"),
                 {"real galaxy": arrays["observed"][:k], "sample, its labels, PSF, noise":
                  noisy[:k]}, title="real galaxies and samples with their labels")
    _gini_m20_figure(os.path.join(out_dir, "real_gini_m20.png"), stats)
    return metrics, lines, ["real_samples.png", "real_gini_m20.png"]


def _gini_m20_figure(path, stats):
    from matplotlib.figure import Figure

    from ..fileio import atomic_path

    fig = Figure(figsize=(4.2, 3.6))
    ax = fig.subplots()
    for name, colour in (("real", "k"), ("sample", "tab:orange")):
        ax.scatter(stats[name]["m20"], stats[name]["gini"], s=8, c=colour, label=name, alpha=0.7)
    ax.set_xlabel("M20")
    ax.set_ylabel("Gini")
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)


def _residual_figure(path, arrays, convolved, white, radii, profile, error):
    """Observed, reconstruction * PSF and whitened residual (sigma, masked) of up to 8 stamps,
    and the mean residual's radial profile."""
    from matplotlib.figure import Figure

    from ..fileio import atomic_path

    k = min(8, len(convolved))
    fig = Figure(figsize=(1.5 * k + 0.5, 6.4))
    grid = fig.add_gridspec(4, k)
    for i in range(k):
        obs = arrays["observed"][i]
        lo, hi = np.percentile(obs, 5), max(obs.max(), convolved[i].max())
        soft = max(np.percentile(obs, 99) - lo, 1e-30) * 0.05
        for row, (img, kind) in enumerate(((obs, "image"), (convolved[i], "image"),
                                           (np.where(arrays["weight"][i] > 0, white[i], np.nan),
                                            "residual"))):
            ax = fig.add_subplot(grid[row, i])
            if kind == "image":
                ax.imshow(np.arcsinh((img - lo) / soft), origin="lower", cmap="magma", vmin=0,
                          vmax=np.arcsinh(max(hi - lo, soft) / soft), interpolation="nearest")
            else:
                ax.imshow(img, origin="lower", cmap="RdBu_r", vmin=-3, vmax=3,
                          interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(("observed", "model * PSF", "whitened\nresidual (-3..3 sigma)")[row],
                              fontsize=7)
    ax = fig.add_subplot(grid[3, :])
    ax.errorbar(radii, profile, yerr=error, fmt="o-", ms=3)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("radius (pixels)")
    ax.set_ylabel("mean residual (sigma)", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)


def run(emulator, arrays, out_dir, seed=0):
    """The real-galaxy section: reduced chi^2 of each stamp's reconstruction under its noise
    model, residual figures, the mean residual's radial profile and, for a model of the same
    band, the Lanusse et al. (2021) comparison (``arrays`` from `load_real`)."""
    from ..plots import save_gallery

    observed, psf, sigma = arrays["observed"], arrays["psf"], arrays["sigma"]
    convolved, chi2_white = emulator.reconstruct(observed, psf, sigma, convolved=True)
    deconvolved, _ = emulator.reconstruct(observed, psf, sigma)
    chi2, white = noise_chi2(convolved, arrays)
    header = arrays["header"]
    weight = arrays["weight"]
    residual = (observed.astype(np.float64) - convolved) / sigma[:, None, None]
    radii, profile, error, _ = radial_profile(residual, weight)
    inner = radii < emulator.stamp_size // 4
    worst = float(np.max(np.abs(profile))) if len(profile) else np.nan
    correlated = "noise_bank" in arrays and not np.all(arrays["noise_bank"] == 1)
    band, model_band = str(header.get("band", "?")), str(emulator.metadata.get("band", "?"))
    same_band = band.strip().upper() == model_band.strip().upper()

    sec = Section(TITLE)
    sec.metrics.update({"real.n": len(chi2), "real.chi2_median": float(np.median(chi2)),
                        "real.chi2_mean": float(np.mean(chi2)),
                        "real.chi2_max": float(np.max(chi2)),
                        "real.chi2_white_median": float(np.median(chi2_white)),
                        "real.residual_profile_max_abs": worst,
                        "real.residual_profile_inner_mean": float(np.mean(profile[inner]))
                        if inner.any() else np.nan,
                        "real.noise_correlated": int(correlated), "real.same_band": int(same_band)})
    noise_text = (
        "The noise of these stamps is correlated (drizzled HST noise, resampled to the model's "
        "grid): the chi^2 whitens each residual in Fourier space with the stamp's noise power "
        "spectrum (the dataset's `noise_bank`), then averages the squared whitened residual over "
        "the pixels with data (weight > 0: the galaxy's image, not the padding; see "
        "`galsim_vqvae.nn.forward`)." if correlated else
        "These stamps carry no correlated-noise model: the chi^2 takes their noise as white of "
        "the stamp's sigma, over the pixels with data (weight > 0).")
    sec.lines += [
        f"{len(chi2)} real stamps (split `{header.get('split', 'all')}`) from "
        f"`{shown_path(header['input'])}` ({header.get('description', '')}), "
        f"band {band}, on the model's grid ({emulator.stamp_size} pixels of "
        f"{emulator.metadata['pixel_scale']}\"; the model was trained in band {model_band}). "
        f"{noise_text} Reduced chi^2 of the reconstruction convolved with each stamp's own PSF: "
        f"median {fmt(np.median(chi2), 3)}, mean {fmt(np.mean(chi2), 3)} (taking the noise as "
        f"white over the whole stamp instead: median {fmt(np.median(chi2_white), 3)}).", "",
        f"Mean residual (observed - model) / sigma over the galaxies, by radius: largest "
        f"|value| {fmt(worst, 3)} sigma; within {emulator.stamp_size // 4} pixels of the centre "
        f"{fmt(sec.metrics['real.residual_profile_inner_mean'], 3)} sigma on average "
        f"(`real_residuals.png`).", ""]
    sec.goals.append(Goal("real_residual_profile", "largest |mean residual| of the radial "
                          "profile of the real galaxies (sigma)", worst, PROFILE_GOAL))
    if same_band:
        lo, hi = CHI2_RANGE
        med = float(np.median(chi2))
        sec.goals.append(Goal("real_chi2_median", f"median reduced chi^2 of the real galaxies "
                              f"in [{lo}, {hi}] (value: distance outside the range)",
                              max(lo - med, med - hi, 0.0), 1e-12))
    sec.lines += ["| stamp | flux | sigma | pixels with data | reduced chi^2 |",
                  "| --- | --- | --- | --- | --- |"]
    for i in range(min(len(chi2), 50)):
        sec.lines.append(f"| {i} | {fmt(observed[i].sum(), 4)} | {fmt(sigma[i], 3)} | "
                         f"{int((weight[i] > 0).sum())} | {fmt(chi2[i], 4)} |")
    if len(chi2) > 50:
        sec.lines.append(f"| ... {len(chi2) - 50} more | | | | |")
    sec.lines.append("")
    k = min(8, len(chi2))
    save_gallery(os.path.join(out_dir, "real.png"),
                 {"observed": observed[:k], "reconstruction * PSF": convolved[:k],
                  "residual": observed[:k] - convolved[:k], "deconvolved": deconvolved[:k]},
                 title="real galaxies")
    _residual_figure(os.path.join(out_dir, "real_residuals.png"), arrays, convolved, white,
                     radii, profile, error)
    sec.figures += ["real.png", "real_residuals.png"]
    if same_band:
        metrics, lines, figures = lanusse_comparison(emulator, arrays, deconvolved, seed, out_dir)
        sec.metrics.update(metrics)
        sec.lines += lines
        sec.figures += figures
    else:
        sec.lines += [f"*Lanusse et al. (2021) comparison skipped: the model was trained in band "
                      f"{model_band}, these galaxies are {band}.*", ""]
    return sec
