"""Shear response: a ring test of galaxies sheared through a ground PSF, measured with HSM.

Each galaxy is rotated by ``n_angles`` angles k * 180 / n_angles degrees (a ring: the
orientations of a spin-2 shape, evenly spaced), sheared by g = +shear and -shear along each
component, convolved with the PSF and drawn on a pixel grid without noise. Each image's shape is
measured with ``galsim.hsm.EstimateShear`` (re-Gaussianization, PSF-corrected distortion e by
default), converted to a shear-type ellipticity g = e / (1 + sqrt(1 - |e|^2)), and averaged over
the ring. For an exact shear-type ellipticity the ring average is the applied shear up to terms of
order g^(n_angles - 1) |e|^n_angles, so that with 4 angles what is left is the estimator's
response: per galaxy and component, m = (<g>(+) - <g>(-)) / (2 shear) - 1 and
c = (<g>(+) + <g>(-)) / 2. Reported: the means over galaxies, with standard errors (standard
deviation over galaxies / sqrt(number)).

HSM's PSF correction is itself biased at the 0.5-1% level for non-Gaussian profiles (an
exponential disk of half-light radius 0.5" through a 0.7" Kolmogorov PSF at 0.2"/pixel has
m = -5e-3 with re-Gaussianization), so the report also runs the ring test on a control: for each
learned galaxy, an exponential profile with its half-light radius and HSM ellipticity. The
difference of the two, galaxy by galaxy, is the part of m that the learned galaxies add.
"""

import numpy as np

from .common import Goal, Section, fmt, parallel_chunks

TITLE = "4. Shear response (ring test)"
SHEAR = 0.02
PSF_FWHM = 0.7
PIXEL_SCALE = 0.2
STAMP_SIZE = 48
N_ANGLES = 4
M_GOAL = 2e-3


def shear_ellipticity(result):
    """The shear-type ellipticity (g1, g2) of an HSM ``ShapeData`` (from its PSF-corrected
    distortion, or its corrected shear for KSB); NaNs if HSM failed."""
    import galsim

    if result.correction_status != 0:
        return np.nan, np.nan
    if result.meas_type == "g":
        return result.corrected_g1, result.corrected_g2
    e1, e2 = result.corrected_e1, result.corrected_e2
    if not np.hypot(e1, e2) < 1:
        return np.nan, np.nan
    s = galsim.Shear(e1=e1, e2=e2)
    return s.g1, s.g2


def ring_test(galaxies, psf=None, pixel_scale=PIXEL_SCALE, stamp_size=STAMP_SIZE, shear=SHEAR,
              n_angles=N_ANGLES, method="REGAUSS", progress=False, workers=1):
    """Ring test of GalSim objects: multiplicative and additive shear biases per galaxy.

    Parameters:
        galaxies:       A list of `galsim.GSObject` (pre-PSF galaxies).
        psf:            The PSF, a `galsim.GSObject`. [default: Kolmogorov of FWHM 0.7"]
        pixel_scale:    Pixel scale of the images, arcsec. [default: 0.2]
        stamp_size:     Side of the images, pixels. [default: 48]
        shear:          The applied |g| along each component. [default: 0.02]
        n_angles:       Orientations per galaxy, evenly spaced over 180 degrees. [default: 4]
        method:         ``galsim.hsm.EstimateShear``'s ``shear_est``. [default: "REGAUSS"]
        progress:       Show a progress bar. [default: False]
        workers:        Processes to measure the galaxies in. [default: 1]

    Returns:
        dict: ``m1``, ``m2``, ``c1``, ``c2`` and their ``_err`` (standard errors), ``m`` and
        ``m_err`` (both components together), per-galaxy arrays ``m1_each``, ``m2_each``,
        ``c1_each``, ``c2_each`` (NaN where a measurement failed), ``n`` (galaxies measured),
        ``n_failed``.
    """
    import galsim
    from tqdm import tqdm

    if psf is None:
        psf = galsim.Kolmogorov(fwhm=PSF_FWHM)
    psf_image = psf.drawImage(nx=stamp_size, ny=stamp_size, scale=pixel_scale)
    image = galsim.ImageD(stamp_size, stamp_size, scale=pixel_scale)
    angles = [k * 180.0 / n_angles * galsim.degrees for k in range(n_angles)]

    def measure(a, b):
        per = {k: np.full(b - a, np.nan) for k in ("m1", "m2", "c1", "c2")}
        for i, gal in enumerate(tqdm(galaxies[a:b], desc="ring test", leave=False,
                                     disable=not progress or workers > 1)):
            mean = np.zeros((2, 2))  # [component, sign]
            for comp in range(2):
                for s, sign in enumerate((1, -1)):
                    g = [0.0, 0.0]
                    g[comp] = sign * shear
                    values = []
                    for angle in angles:
                        obj = galsim.Convolve(gal.rotate(angle).shear(g1=g[0], g2=g[1]), psf)
                        obj.drawImage(image=image)
                        result = galsim.hsm.EstimateShear(image, psf_image, shear_est=method,
                                                          strict=False)
                        values.append(shear_ellipticity(result)[comp])
                    mean[comp, s] = np.mean(values)
            for comp in range(2):
                per[f"m{comp + 1}"][i] = (mean[comp, 0] - mean[comp, 1]) / (2 * shear) - 1
                per[f"c{comp + 1}"][i] = (mean[comp, 0] + mean[comp, 1]) / 2
        return per

    per = parallel_chunks(measure, len(galaxies), workers, chunk=16)
    ok = np.all([np.isfinite(v) for v in per.values()], axis=0)
    out = {"n": int(ok.sum()), "n_failed": int((~ok).sum())}
    for k, v in per.items():
        out[f"{k}_each"] = v
        out[k], out[f"{k}_err"] = _mean_and_error(v[ok])
    out["m"], out["m_err"] = _mean_and_error(0.5 * (per["m1"][ok] + per["m2"][ok]))
    return out


def _mean_and_error(values):
    if len(values) == 0:
        return np.nan, np.nan
    err = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else np.nan
    return float(values.mean()), float(err)


def control_galaxies(images, pixel_scale):
    """Exponential profiles with the half-light radius and HSM ellipticity of each image."""
    import galsim

    from ..metrics import half_light_radius, hsm_shapes

    hlr = half_light_radius(images, pixel_scale)
    shapes = hsm_shapes(images, pixel_scale)
    out = []
    for h, e1, e2 in zip(hlr, shapes["e1"], shapes["e2"]):
        gal = galsim.Exponential(half_light_radius=float(h) if np.isfinite(h) else pixel_scale)
        if np.isfinite(e1) and np.hypot(e1, e2) < 0.95:
            gal = gal.shear(e1=float(e1), e2=float(e2))
        out.append(gal)
    return out


def run(emulator, n, seed=0, progress=False, workers=1):
    """The shear-response section: ring tests of ``n`` `VQVAEGalaxy` objects (conditions drawn
    like the training set) and of their exponential controls, in ``workers`` processes."""
    import galsim

    from ..metrics import draw_training_conditions
    from ..profile import VQVAEGalaxy

    conditions = (draw_training_conditions(emulator, n, seed) if emulator.condition_names
                  else None)
    galaxies = VQVAEGalaxy.makeGalaxies(n, emulator, conditions=conditions,
                                        rng=galsim.BaseDeviate(seed))
    model = ring_test(galaxies, progress=progress, workers=workers)
    images = np.stack([g.image.array for g in galaxies])
    control = ring_test(control_galaxies(images, float(emulator.metadata["pixel_scale"])),
                        progress=progress, workers=workers)
    both = np.isfinite(model["m1_each"] + model["m2_each"] + control["m1_each"]
                       + control["m2_each"])
    diff = 0.5 * (model["m1_each"] + model["m2_each"] - control["m1_each"]
                  - control["m2_each"])[both]
    dm, dm_err = _mean_and_error(diff)

    sec = Section(TITLE)
    for name, r in (("vqvae", model), ("control", control)):
        for k in ("m", "m_err", "m1", "m1_err", "m2", "m2_err", "c1", "c1_err", "c2", "c2_err",
                  "n", "n_failed"):
            sec.metrics[f"shear.{name}.{k}"] = r[k]
    sec.metrics.update({"shear.delta_m": dm, "shear.delta_m_err": dm_err})
    sec.lines += [
        f"{n} `VQVAEGalaxy` objects (seed {seed}), each at {N_ANGLES} orientations, sheared by "
        f"g = +/-{SHEAR} along each component, through a {PSF_FWHM}\" Kolmogorov PSF, drawn "
        f"without noise on {STAMP_SIZE}x{STAMP_SIZE} pixels of {PIXEL_SCALE}\"; shapes from "
        "`galsim.hsm.EstimateShear` (re-Gaussianization), converted to shear-type ellipticities. "
        "Errors: standard errors over galaxies. Control: exponential profiles with each "
        "galaxy's half-light radius and HSM ellipticity (HSM's own bias).", "",
        "| galaxies | m | m1 | m2 | c1 | c2 | measured (failed) |",
        "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in (("VQVAEGalaxy", model), ("exponential control", control)):
        sec.lines.append(
            f"| {name} | {_pm(r['m'], r['m_err'])} | {_pm(r['m1'], r['m1_err'])} | "
            f"{_pm(r['m2'], r['m2_err'])} | {_pm(r['c1'], r['c1_err'])} | "
            f"{_pm(r['c2'], r['c2_err'])} | {r['n']} ({r['n_failed']}) |")
    sec.lines += ["", f"m(VQVAEGalaxy) - m(control), galaxy by galaxy: {_pm(dm, dm_err)}.", ""]
    sec.goals.append(Goal("shear_m", "|m| of VQVAEGalaxy (HSM re-Gaussianization)",
                          abs(model["m"]), M_GOAL))
    return sec


def _pm(value, err):
    return f"{fmt(value, 3)} +/- {fmt(err, 2)}"
