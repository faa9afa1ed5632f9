"""Where do a model's artefacts come from? Decoder against prior, sky, edges, temperature.

Separates the VQ-VAE from the prior on held-out synthetic stamps with truth:

- ``decode(encode(noiseless))``: the VQ-VAE alone on noiseless PSF-convolved stamps;
- ``decode(encode(observed))``: the VQ-VAE on the noisy stamps it is trained on;
- ``decode(encode(truth))`` is not shown: the encoder never sees pre-PSF images;
- prior samples with the truth's labels, at temperatures 1.0 and 0.8.

For each set it prints the edge flux (the fraction of the flux in the outer 6 pixels), the
flux-weighted rms radius, the fraction of "holes" (pixels inside the galaxy, where the truth is
above 5% of its peak, that the model sets to exactly 0), and the realism KS statistics of each
set against the truth. It also decodes the empty sky (the code the encoder gives an all-zero
stamp, repeated over the map) and pure noise, and draws a figure: examples of each set, and the
mean image of each set on a log scale (a frame along the edges shows there at once).

    python examples/diagnose_model.py --model default --data val.h5 --n 300 --out diag/

``--per-class`` adds, for a class-conditional model, each class's samples against the truth of
that class (concentration, asymmetry, Gini).

``val.h5``: ``galsim-vqvae make-dataset --source synthetic --n 1500 --seed 99 --out val.h5``.
"""

import argparse
import json
import os

import numpy as np

import galsim_vqvae
from galsim_vqvae import metrics
from galsim_vqvae.data import dataset
from galsim_vqvae.validation.realism import compare, conditions_like


def rms_radius(images):
    """Flux-weighted rms distance from the flux centroid (pixels) of each image."""
    s = images.shape[-1]
    y, x = np.mgrid[:s, :s].astype(np.float64)
    w = np.clip(images.astype(np.float64), 0, None)
    tot = w.sum(axis=(1, 2))
    cx = (w * x).sum(axis=(1, 2)) / tot
    cy = (w * y).sum(axis=(1, 2)) / tot
    r2 = (x - cx[:, None, None]) ** 2 + (y - cy[:, None, None]) ** 2
    return np.sqrt((w * r2).sum(axis=(1, 2)) / tot)


def hole_fraction(images, truth):
    """Fraction of the galaxy's pixels (truth above 5% of its peak) that are exactly 0."""
    inside = truth > 0.05 * truth.max(axis=(1, 2), keepdims=True)
    return ((images <= 0) & inside).sum(axis=(1, 2)) / inside.sum(axis=(1, 2))


SIDES = ("first rows", "last rows", "first columns", "last columns")


def side_flux(images, width=8):
    """Mean fraction of the flux in the ``width`` pixels along each side, in the order of
    `SIDES` (the figures draw with origin="lower": the first rows at the bottom, where the
    PixelCNN's raster order starts, the last rows at the top, where it ends)."""
    tot = images.sum(axis=(1, 2))
    parts = (images[:, :width], images[:, -width:], images[:, :, :width], images[:, :, -width:])
    return {side: float(np.mean(p.sum(axis=(1, 2)) / tot)) for side, p in zip(SIDES, parts)}


def side_codes(codes, k=4):
    """Are the sky codes at the map's sides those of its interior? For each side (the outer
    row or column of the code maps) its ``k`` most common codes with their frequency, and the
    fraction of its positions whose code is among the interior's 10 most common (positions two
    cells inside the edge, sky in most stamps)."""
    def common(values, m):
        u, c = np.unique(values, return_counts=True)
        order = np.argsort(-c)[:m]
        return [(int(u[i]), round(float(c[i] / c.sum()), 3)) for i in order]

    ring = np.concatenate([codes[:, 2, 2:-2], codes[:, -3, 2:-2], codes[:, 2:-2, 2],
                           codes[:, 2:-2, -3]], axis=1)
    inner = [c for c, _ in common(ring.ravel(), 10)]
    sides = (codes[:, 0], codes[:, -1], codes[:, :, 0], codes[:, :, -1])
    out = {"interior (2 cells in)": common(ring.ravel(), k)}
    for side, values in zip(SIDES, sides):
        out[side] = {"common": common(values.ravel(), k),
                     "shared_with_interior": float(np.isin(values, inner).mean())}
    return out


def summarise(name, images, truth, scale, truth_stats):
    stats = metrics.morphology(images, scale)
    row = {"set": name, "edge_flux_mean": float(np.nanmean(stats["edge"])),
           "edge_flux_median": float(np.nanmedian(stats["edge"])),
           "rms_radius_px": float(np.mean(rms_radius(images))),
           "holes": float(np.mean(hole_fraction(images, truth))),
           "side_flux": side_flux(images),
           "flux_ratio_median": float(np.median(images.sum(axis=(1, 2)) /
                                                truth.sum(axis=(1, 2))))}
    for k in metrics.MORPHOLOGY:
        row[f"ks_{k}"] = compare(stats[k], truth_stats[k])["ks"]
    return row


def per_class(emu, arrays, truth, scale, seed):
    """For each class: the mean concentration, asymmetry and Gini of the truth of that class and
    of as many samples conditioned on it (their mag and hlr), and the samples' KS against them."""
    label = emu.class_label
    classes = np.asarray(arrays[f"params/{label}"]).astype(int)
    out = {}
    for k, name in enumerate(emu.class_names):
        rows = np.flatnonzero(classes == k)
        if len(rows) < 5:
            continue
        conditions = {c: np.asarray(arrays[f"params/{c}"])[rows] for c in emu.condition_names}
        info = emu.metadata["conditions"]
        for c, key in enumerate(emu.condition_names):
            conditions[key] = np.clip(conditions[key], info["min"][c], info["max"][c])
        conditions[label] = np.full(len(rows), k)
        samples = emu.sample(len(rows), conditions, seed=seed + k)
        stats_s = metrics.morphology(samples, scale)
        stats_t = metrics.morphology(truth[rows], scale)
        out[name] = {"n": int(len(rows))}
        for stat in ("concentration", "asymmetry", "gini"):
            out[name][stat] = {"truth": float(np.nanmean(stats_t[stat])),
                               "samples": float(np.nanmean(stats_s[stat])),
                               "ks": compare(stats_s[stat], stats_t[stat])["ks"]}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="bundle path or 'default'")
    parser.add_argument("--data", required=True, help="held-out synthetic dataset with truth")
    parser.add_argument("--n", type=int, default=300, help="stamps and samples per set")
    parser.add_argument("--seed", type=int, default=3, help="seed of the prior samples")
    parser.add_argument("--out", required=True, help="output folder (figure and JSON)")
    parser.add_argument("--per-class", action="store_true",
                        help="also compare samples of each morphology class with the truth of "
                        "that class (concentration, asymmetry, Gini; a class-conditional model)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    emu = galsim_vqvae.Emulator.load(args.model)
    scale = float(emu.metadata["pixel_scale"])
    n_all = dataset.read_header(args.data)["n"]
    index = np.arange(min(args.n, n_all))
    arrays = dataset.load_arrays(args.data, indices=index,
                                 keys=("observed", "truth", "sigma", "psf_index", "psf_bank",
                                       "params"))
    truth, observed = arrays["truth"], arrays["observed"]
    psf = arrays["psf_bank"][arrays["psf_index"]]
    from galsim_vqvae.nn.forward import convolve_psf
    import torch

    noiseless = convolve_psf(torch.from_numpy(truth)[:, None],
                             torch.from_numpy(psf)[:, None])[:, 0].numpy()
    conditions = conditions_like(emu, arrays, len(truth))
    sigma = arrays["sigma"]

    def autoencode(stamps):
        # encode brings each stamp to the training scale from its noise sigma (the noiseless
        # stamps are given the sigma of their noisy version, so both get the same factor)
        return emu.decode(emu.encode(stamps, noise_sigma=sigma)) / \
            emu.input_scale(stamps, sigma)[:, None, None]

    sample_codes = emu.sample_codes(len(truth), conditions, seed=args.seed)
    sets = {
        "truth": truth,
        "decode(encode(noiseless))": autoencode(noiseless),
        "decode(encode(observed))": autoencode(observed),
        "prior, T=1.0": emu.decode(sample_codes),
        "prior, T=0.8": emu.sample(len(truth), conditions, seed=args.seed, temperature=0.8),
    }
    truth_stats = metrics.morphology(truth, scale)
    rows = [summarise(k, v, truth, scale, truth_stats) for k, v in sets.items()]

    # the empty sky and pure noise
    latent = emu.metadata["latent_size"]
    s = emu.metadata["stamp_size"]
    sky_code = int(np.bincount(emu.encode(np.zeros((1, s, s), np.float32),
                                          noise_sigma=1.0).ravel()).argmax())
    sky = emu.decode(np.full((1, latent, latent), sky_code))[0]
    median_sigma = float(np.median(sigma))
    rng = np.random.default_rng(0)
    noise_codes = emu.encode((median_sigma * rng.normal(size=(8, s, s))).astype(np.float32),
                             noise_sigma=median_sigma)
    noise_dec = emu.decode(noise_codes)
    median_flux = float(np.median(truth.sum(axis=(1, 2))))
    codes = emu.encode(observed, noise_sigma=sigma)
    counts = np.bincount(codes.ravel(), minlength=emu.metadata["num_codes"])
    p = counts / counts.sum()
    perplexity = float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()))
    extra = {
        "sky_code": sky_code,
        "sky_decoded_flux_over_median_galaxy": float(sky.sum() / median_flux),
        "sky_decoded_edge_flux": float(metrics.edge_flux(sky)[0]),
        "noise_distinct_codes_per_stamp": float(np.mean([len(np.unique(c)) for c in noise_codes])),
        "noise_decoded_flux_over_median_galaxy": [float(v) for v in
                                                  noise_dec.sum(axis=(1, 2)) / median_flux],
        "perplexity_heldout": perplexity,
        "codes_used_heldout": int((counts > 0).sum()),
        "side_codes_heldout": side_codes(codes),
        "side_codes_samples": side_codes(sample_codes),
        "n": int(len(truth)),
    }
    if args.per_class and emu.class_label:
        extra["per_class"] = per_class(emu, arrays, truth, scale, args.seed)
    with open(os.path.join(args.out, "diagnosis.json"), "w") as f:
        json.dump({"sets": rows, **extra}, f, indent=1)

    keys = ["edge_flux_mean", "rms_radius_px", "holes", "flux_ratio_median", "ks_size", "ks_e",
            "ks_asymmetry", "ks_m20", "ks_edge"]
    print("| set | " + " | ".join(keys) + " |")
    print("| --- " * (len(keys) + 1) + "|")
    for r in rows:
        print(f"| {r['set']} | " + " | ".join(f"{r[k]:.4g}" for k in keys) + " |")
    print(json.dumps(extra, indent=1))
    _figure(os.path.join(args.out, "diagnosis.png"), sets, sky, noise_dec)


def _figure(path, sets, sky, noise_dec, k=6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(sets)
    fig, axes = plt.subplots(k + 1, len(names) + 1, figsize=(2.2 * (len(names) + 1), 2.2 * (k + 1)))
    for j, name in enumerate(names):
        for i in range(k):
            img = sets[name][i]
            axes[i, j].imshow(np.arcsinh(img / (0.02 * sets["truth"][i].max())), cmap="magma",
                              origin="lower", vmin=0)
        mean = np.mean(np.clip(sets[name], 0, None) / sets[name].sum(axis=(1, 2))[:, None, None],
                       axis=0)
        axes[k, j].imshow(np.log10(mean + 1e-7), cmap="viridis", origin="lower", vmin=-7, vmax=-1)
        axes[0, j].set_title(name, fontsize=8)
    axes[0, -1].imshow(np.arcsinh(sky / max(abs(sky).max(), 1e-12) * 50), cmap="magma",
                       origin="lower")
    axes[0, -1].set_title("decoded empty sky", fontsize=8)
    for i in range(1, k):
        axes[i, -1].imshow(np.arcsinh(noise_dec[(i - 1) % len(noise_dec)] /
                                      max(noise_dec.max(), 1e-12) * 50),
                           cmap="magma", origin="lower")
    axes[1, -1].set_title("decoded pure noise", fontsize=8)
    axes[k, 0].set_ylabel("mean image (log)", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
