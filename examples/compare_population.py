"""Compare the synthetic training population's morphology with real COSMOS galaxies, matched.

Real galaxies: a GalSim ``RealGalaxyCatalog`` (e.g. the 100 COSMOS F814W galaxies of
``shared/data/hst/cosmos_btk/``), each stamp centred on a ``--stamp`` x ``--stamp`` grid at its
own 0.03" pixel scale, padding filled with a realisation of the catalog's noise model.

Synthetic galaxies: galaxy i of a ``make_synthetic_dataset`` file of seed ``--seed`` (the same
random stream, so the same galaxy as stamp i of the training set) is paired with the real
galaxy whose magnitude is nearest to its F160W magnitude + ``--colour`` (I - H), then drawn
like that real galaxy was observed: its GalSim profile convolved with the real galaxy's PSF
image, on the real pixel scale and stamp, with the real galaxy's flux, plus noise of the real
galaxy's noise model (the catalog's correlated noise at its NOISE_VARIANCE; ``--white-noise``:
white Gaussian noise of the same variance). Matched: PSF, pixel scale, flux (hence magnitude and
S/N), pixel noise variance (and its correlation unless --white-noise), stamp. Not matched: the
band (the synthetic profiles are F160W-like, the real ones F814W: bluer light is clumpier), and
the magnitude distribution only through the pairing.

Both sets are then measured by the same code: a detection mask (the connected region of the
image smoothed by a 1.5-pixel Gaussian above 2 sigma of its noise, about the brightest
smoothed pixel near the centre, dilated by 2 pixels); on the masked image: concentration,
asymmetry, clumpiness, half-light radius; Gini and M20 over the mask; HSM size and |e| on the
unmasked image. It prints a Markdown table (means, KS statistics), and writes ``compare.json``,
``compare.png`` (histograms, size against magnitude) and ``gallery.png`` (real above
synthetic) under ``--out``.

    python examples/compare_population.py --dir ../shared/data/hst/cosmos_btk \\
        --catalog real_galaxy_catalog_26_extension_example.fits --n 300 --seed 1 --out compare/
"""

import argparse
import json
import os

import numpy as np

from galsim_vqvae import metrics
from galsim_vqvae.data import synthetic as sy

STATS = ("concentration", "asymmetry", "clumpiness", "gini", "m20", "size", "e", "hlr",
         "size_at_mag", "edge")
LABELS = {"concentration": "C", "asymmetry": "A", "clumpiness": "S (clumpiness)",
          "gini": "Gini", "m20": "M20", "size": "HSM sigma (arcsec)", "e": "HSM |e|",
          "hlr": "half-light radius (arcsec)",
          "size_at_mag": "log10 hlr - real fit at its mag (dex)", "edge": "edge flux"}


def real_galaxies(catalog, directory, stamp, rng):
    """The real galaxies on ``stamp`` x ``stamp`` grids: dict of images [n,S,S], PSF profiles,
    noise models, variances, fluxes, catalog magnitudes and pixel scales."""
    import galsim

    rgc = galsim.RealGalaxyCatalog(catalog, dir=directory)
    out = dict(images=[], psf=[], noise=[], variance=[], flux=[], mag=[], scale=[])
    for j in range(rgc.nobjects):
        image = rgc.getGalImage(j)
        scale = image.scale
        noise = rgc.getNoise(j, rng=galsim.BaseDeviate(int(rng.integers(1, 2 ** 31))))
        canvas = galsim.Image(stamp, stamp, scale=scale)
        canvas.addNoise(noise)
        a = image.array.astype(np.float64)
        ny, nx = a.shape
        # crop or pad, centred on pixel n//2 of both
        sy0, sx0 = max(0, ny // 2 - stamp // 2), max(0, nx // 2 - stamp // 2)
        cy0, cx0 = max(0, stamp // 2 - ny // 2), max(0, stamp // 2 - nx // 2)
        h, w = min(ny - sy0, stamp - cy0), min(nx - sx0, stamp - cx0)
        canvas.array[cy0:cy0 + h, cx0:cx0 + w] = a[sy0:sy0 + h, sx0:sx0 + w]
        out["images"].append(canvas.array.copy())
        out["psf"].append(galsim.InterpolatedImage(rgc.getPSFImage(j)))
        out["noise"].append(noise)
        out["variance"].append(float(rgc.variance[j]))
        out["flux"].append(float(a.sum()))
        out["mag"].append(float(rgc.mag[j]))
        out["scale"].append(scale)
    out["images"] = np.array(out["images"])
    for key in ("variance", "flux", "mag", "scale"):
        out[key] = np.array(out[key])
    return out


def pair_by_magnitude(real_mag, pool_mag, n):
    """Partners: ``n`` synthetic galaxies of a pool (indices into ``pool_mag``) and the real
    galaxy of each, so that every real galaxy gets n // R or n // R + 1 partners: the
    synthetic magnitudes follow the real ones (each real galaxy, faintest first, takes the
    unused pool galaxy nearest in magnitude)."""
    real_mag, pool_mag = np.asarray(real_mag), np.asarray(pool_mag)
    wanted = np.resize(np.argsort(real_mag)[::-1], n)  # faint end first: fewest candidates
    free = np.ones(len(pool_mag), dtype=bool)
    chosen, partner = [], []
    for j in wanted:
        d = np.where(free, np.abs(pool_mag - real_mag[j]), np.inf)
        i = int(np.argmin(d))
        free[i] = False
        chosen.append(i)
        partner.append(int(j))
    order = np.argsort(chosen)
    return np.array(chosen)[order], np.array(partner)[order]


def synthetic_galaxies(real, n, seed, stamp, colour, white_noise, population, pool=4):
    """``n`` synthetic galaxies (from the first ``pool`` x n of a synthetic dataset of ``seed``
    and ``population``, chosen by `pair_by_magnitude` with F160W magnitude + ``colour``) drawn
    like their real partners were observed (see the module docstring). Returns images [n,S,S],
    the dataset index, the partner index and the synthetic F160W magnitude of each."""
    import galsim

    psf = sy.effective_psf(sy.optical_psf(seed, 0), 84, 0.06)
    ctx = dict(seed=seed, stamp_size=84, pixel_scale=0.06, psf="optical", n_psf=1,
               fine=[psf[1]], population=population)
    sy._init_worker(ctx)
    stamps = [sy.draw_stamp(seed, i, sy._CTX) for i in range(pool * n)]  # as in the dataset
    mag_h = np.array([st["mag"] for st in stamps])
    chosen, partner = pair_by_magnitude(real["mag"], mag_h + colour, n)
    images = []
    for i, j in zip(chosen, partner):
        profile = stamps[i]["galaxy"].intrinsic.withFlux(real["flux"][j])
        image = galsim.Convolve(profile, real["psf"][j]).drawImage(
            nx=stamp, ny=stamp, scale=real["scale"][j], method="no_pixel")
        noise_seed = int(np.random.SeedSequence([seed, int(i), 7]).generate_state(1)[0]) + 1
        if white_noise:
            image.addNoise(galsim.GaussianNoise(galsim.BaseDeviate(noise_seed),
                                                sigma=np.sqrt(real["variance"][j])))
        else:
            image.addNoise(real["noise"][j].withVariance(real["variance"][j]).copy(
                rng=galsim.BaseDeviate(noise_seed)))
        images.append(image.array.copy())
    return np.array(images), chosen, partner, mag_h[chosen]


def detection_masks(images, sigma=1.5, threshold=2.0, grow=2):
    """The galaxy's pixels in each noisy image: the connected region of the image smoothed by a
    Gaussian of ``sigma`` pixels above ``threshold`` times the smoothed noise (its robust
    standard deviation over the stamp) that holds the brightest smoothed pixel within a quarter
    stamp of the centre, dilated by ``grow`` pixels."""
    from scipy import ndimage

    masks = np.zeros(images.shape, dtype=bool)
    s = images.shape[-1]
    c0, c1 = s // 2 - s // 4, s // 2 + s // 4
    for k, image in enumerate(images):
        smooth = ndimage.gaussian_filter(image, sigma)
        noise = 1.4826 * np.median(np.abs(smooth - np.median(smooth)))
        labels, _ = ndimage.label(smooth > threshold * noise)
        centre = smooth[c0:c1, c0:c1]
        peak = np.unravel_index(np.argmax(centre), centre.shape)
        label = labels[peak[0] + c0, peak[1] + c0]
        if label:
            masks[k] = ndimage.binary_dilation(labels == label, iterations=grow)
    return masks


def measure(images, scale):
    """The statistics of `STATS` (except size_at_mag) of noisy images, all by the same code."""
    masks = detection_masks(images)
    masked = images * masks
    shapes = metrics.hsm_shapes(images, scale)
    return {"concentration": metrics.concentration(masked),
            "asymmetry": metrics.asymmetry(masked),
            "clumpiness": metrics.clumpiness(masked),
            "gini": metrics.gini_coefficient(images, masks),
            "m20": metrics.m20(images, masks),
            "size": shapes["sigma"], "e": shapes["e"],
            "hlr": metrics.half_light_radius(masked, scale),
            "edge": metrics.edge_flux(masked),
            "detected": masks.any(axis=(1, 2))}


def ks(a, b):
    from scipy.stats import ks_2samp

    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    r = ks_2samp(a, b)
    return float(r.statistic), float(r.pvalue)


def compare(real_stats, syn_stats):
    rows = {}
    for key in STATS:
        a, b = real_stats[key], syn_stats[key]
        d, p = ks(a, b)
        rows[key] = dict(real_mean=float(np.nanmean(a)), synthetic_mean=float(np.nanmean(b)),
                         real_median=float(np.nanmedian(a)),
                         synthetic_median=float(np.nanmedian(b)), ks=d, p=p,
                         n_real=int(np.isfinite(a).sum()), n_synthetic=int(np.isfinite(b).sum()))
    return rows


def table(rows):
    lines = ["| statistic | real mean | synthetic mean | real median | synthetic median | KS D "
             "| p |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, r in rows.items():
        lines.append(f"| {LABELS[key]} | {r['real_mean']:.3f} | {r['synthetic_mean']:.3f} | "
                     f"{r['real_median']:.3f} | {r['synthetic_median']:.3f} | {r['ks']:.2f} | "
                     f"{r['p']:.2g} |")
    return "\n".join(lines)


def figures(out, real, syn, real_stats, syn_stats, mag_real, mag_syn, fit):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in STATS if k != "size_at_mag"]
    fig, axes = plt.subplots(2, 5, figsize=(17, 6.5))
    for ax, key in zip(axes.ravel(), keys):
        a, b = real_stats[key], syn_stats[key]
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
        lo, hi = np.percentile(np.concatenate([a, b]), [1, 99])
        bins = np.linspace(lo, hi, 21)
        ax.hist(a, bins, density=True, histtype="step", lw=2, label=f"real COSMOS ({len(a)})")
        ax.hist(b, bins, density=True, histtype="step", lw=2, label=f"synthetic ({len(b)})")
        ax.set_xlabel(LABELS[key])
    ax = axes.ravel()[-1]
    ax.scatter(mag_real, real_stats["hlr"], s=8, label="real")
    ax.scatter(mag_syn, syn_stats["hlr"], s=4, alpha=0.5, label="synthetic")
    m = np.linspace(20, 26.5, 10)
    ax.plot(m, 10 ** (fit[0] * m + fit[1]), "k-", lw=1, label="fit to real")
    ax.set_yscale("log")
    ax.set_xlabel("F814W mag (synthetic: its partner's)")
    ax.set_ylabel("half-light radius (arcsec)")
    axes[0, 0].legend(fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "compare.png"), dpi=90)
    plt.close(fig)

    k = 10
    order_r = np.argsort(mag_real)[:: max(1, len(mag_real) // k)][:k]
    order_s = np.argsort(mag_syn)[:: max(1, len(mag_syn) // k)][:k]
    fig, axes = plt.subplots(2, k, figsize=(1.6 * k, 3.6))
    for row, (images, order, name) in enumerate(((real, order_r, "real"),
                                                 (syn, order_s, "synthetic"))):
        for ax, idx in zip(axes[row], order):
            img = images[idx]
            vmax = np.percentile(img, 99.7)
            ax.imshow(np.arcsinh(img / (0.1 * vmax)), origin="lower", cmap="gray_r")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(name)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "gallery.png"), dpi=60)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True, help="folder of the RealGalaxyCatalog")
    parser.add_argument("--catalog", default="real_galaxy_catalog_26_extension_example.fits")
    parser.add_argument("--n", type=int, default=300, help="synthetic galaxies")
    parser.add_argument("--seed", type=int, default=1, help="synthetic dataset seed")
    parser.add_argument("--population", default=sy.DEFAULT_POPULATION,
                        choices=sorted(sy.POPULATIONS), help="synthetic population")
    parser.add_argument("--stamp", type=int, default=64, help="stamp side (pixels)")
    parser.add_argument("--colour", type=float, default=1.0,
                        help="assumed I - H colour for pairing by magnitude")
    parser.add_argument("--white-noise", action="store_true",
                        help="white Gaussian noise instead of the catalog's correlated noise")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.dir, args.catalog)):
        parser.error(f"catalog not found: {os.path.join(args.dir, args.catalog)}")
    if args.n <= 0 or args.stamp <= 0:
        parser.error(f"--n and --stamp must be positive, got {args.n} and {args.stamp}")
    os.makedirs(args.out, exist_ok=True)

    rng = np.random.default_rng(np.random.SeedSequence([args.seed, 2 ** 20]))
    real = real_galaxies(args.catalog, args.dir, args.stamp, rng)
    syn, chosen, partner, mag_h = synthetic_galaxies(real, args.n, args.seed, args.stamp,
                                                     args.colour, args.white_noise,
                                                     args.population)
    scale = float(real["scale"][0])
    real_stats, syn_stats = measure(real["images"], scale), measure(syn, scale)
    mag_real, mag_syn = real["mag"], real["mag"][partner]
    ok = np.isfinite(real_stats["hlr"]) & (real_stats["hlr"] > 0)
    fit = np.polyfit(mag_real[ok], np.log10(real_stats["hlr"][ok]), 1)
    for stats, mag in ((real_stats, mag_real), (syn_stats, mag_syn)):
        with np.errstate(divide="ignore", invalid="ignore"):
            stats["size_at_mag"] = np.log10(stats["hlr"]) - np.polyval(fit, mag)
    rows = compare(real_stats, syn_stats)
    print(f"{len(real['images'])} real, {args.n} synthetic galaxies (seed {args.seed}, "
          f"population {args.population}); "
          f"detected: real {real_stats['detected'].mean():.0%}, "
          f"synthetic {syn_stats['detected'].mean():.0%}")
    print(table(rows))
    report = dict(args=vars(args), rows=rows, size_mag_fit_real=fit.tolist(),
                  synthetic_index=chosen.tolist(), synthetic_mag_h=mag_h.tolist(),
                  partner=partner.tolist(),
                  real={k: np.asarray(v).tolist() for k, v in real_stats.items()},
                  synthetic={k: np.asarray(v).tolist() for k, v in syn_stats.items()})
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump(report, f, indent=1)
    figures(args.out, real["images"], syn, real_stats, syn_stats, mag_real, mag_syn, fit)


if __name__ == "__main__":
    main()
