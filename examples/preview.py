"""Preview a survey image as a PNG: ``python preview.py IMAGE.fits OUT.png [--truth TRUTH.fits]``.

An asinh stretch between the sky noise and the brightest pixels; with ``--truth`` (by default
the ``*_truth.fits`` beside the image, if there is one) each galaxy of the truth catalog is
circled.
"""

import argparse
import os

import numpy as np


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("image", help="FITS image")
    parser.add_argument("png", help="output PNG")
    parser.add_argument("--truth", help="truth catalog (FITS table with pos.x, pos.y columns)")
    args = parser.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from astropy.io import fits

    from galsim_vqvae.fileio import atomic_path

    image = fits.getdata(args.image).astype(np.float64)
    truth = args.truth
    if truth is None:
        guess = args.image.replace(".fits", "_truth.fits")
        truth = guess if guess != args.image and os.path.exists(guess) else None
    sky = np.median(image)
    noise = 1.4826 * np.median(np.abs(image - sky))
    top = np.percentile(image - sky, 99.8)
    soft = max(3 * noise, 1e-12)  # linear within ~3 sigma of the sky, logarithmic above
    stretched = np.arcsinh((image - sky) / soft) / np.arcsinh(max(top, soft) / soft)

    ny, nx = image.shape
    fig, ax = plt.subplots(figsize=(8, 8 * ny / nx))
    ax.imshow(stretched, origin="lower", cmap="gray_r", vmin=-0.15, vmax=1.0,
              interpolation="nearest")
    if truth:
        cat = fits.getdata(truth)
        ax.scatter(cat["pos.x"] - 1, cat["pos.y"] - 1, s=160, facecolors="none",
                   edgecolors="tab:red", linewidths=0.6)
    ax.set_title(os.path.basename(args.image) + (f" ({len(cat)} galaxies circled)" if truth
                                                  else ""))
    ax.set_axis_off()
    with atomic_path(args.png) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
