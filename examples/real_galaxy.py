"""A real HST galaxy encoded by the model, reconstructed, and re-rendered for a ground survey.

    python real_galaxy.py IMAGE.fits --psf PSF.fits [--input-scale 0.03] [--model default]
                          [--ground-fwhm 0.7] [--ground-scale 0.2] [--out output/real_galaxy.png]

For instance, with the COSMOS galaxy of the project's shared test data:

    D=../../shared/data/hst/cosmos_single
    python real_galaxy.py $D/147246.0_150.416558_1.998697_masknoise.fits \\
        --psf $D/147246.0_150.416558_1.998697.psf.fits --input-scale 0.03

Steps: the image and its PSF are resampled onto the model's grid (as the FITS dataset reader
does: `galsim_vqvae.data.fits`), the noise sigma is estimated from the corners; the VQ-VAE
encodes the stamp into a code map and reconstructs it (chi^2 of the reconstruction convolved with
the HST PSF against the stamp). The code map becomes a `VQVAEGalaxy`, which is then drawn through a
ground PSF at a ground pixel scale, with sky noise; for comparison the same ground image is made
from the HST stamp the classical GalSim way (the image deconvolved by its PSF, as
`galsim.RealGalaxy` does). One PNG shows the steps.
"""

import argparse
import sys
import os

import galsim
import numpy as np


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("image", help="FITS image of one galaxy (HST)")
    parser.add_argument("--psf", required=True, help="FITS image of its PSF")
    parser.add_argument("--input-scale", type=float, default=None,
                        help="pixel scale of IMAGE and PSF in arcsec (else from their headers)")
    parser.add_argument("--model", default="default",
                        help="'default' (the shipped model) or a saved model's path")
    parser.add_argument("--ground-fwhm", type=float, default=0.7, help="ground PSF FWHM, arcsec")
    parser.add_argument("--ground-scale", type=float, default=0.2, help="ground pixel, arcsec")
    parser.add_argument("--ground-snr", type=float, default=80.0,
                        help="signal-to-noise ratio of the galaxy in the ground image")
    parser.add_argument("--seed", type=int, default=1, help="seed of the ground noise")
    parser.add_argument("--out", default=os.path.join("output", "real_galaxy.png"))
    args = parser.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import galsim_vqvae
    from galsim_vqvae.data.fits import image_scale, model_psf, model_stamp, read_image
    from galsim_vqvae.fileio import atomic_path

    emulator = galsim_vqvae.profile.get_emulator(args.model)
    size, scale = emulator.stamp_size, emulator.metadata["pixel_scale"]
    print(f"model: {args.model}: {emulator}")

    data, header = read_image(args.image)
    in_scale = image_scale(header, args.input_scale, args.image)
    stamp, sigma = model_stamp(data, in_scale, size, scale, index=0)
    psf_data, psf_header = read_image(args.psf)
    psf_scale = image_scale(psf_header, args.input_scale, args.psf)
    psf = model_psf(psf_data, psf_scale, size, scale, args.psf)
    print(f"{os.path.basename(args.image)}: {data.shape[1]}x{data.shape[0]} at {in_scale}\"/pixel"
          f" -> {size}x{size} at {scale}\"/pixel; noise sigma {sigma:.4g}; "
          f"flux {stamp.sum():.4g}")

    convolved, chi2 = emulator.reconstruct(stamp, psf, sigma, convolved=True)
    # codes are unit-free: decoded, they have the stamp's flux over encode's input factor
    codes = emulator.encode(stamp, noise_sigma=sigma)[0]
    gal = galsim_vqvae.VQVAEGalaxy(emulator, code_map=codes,
                                   flux_rescale=1 / emulator.input_scale(stamp, sigma)[0])
    print(f"reconstruction: chi^2/pixel {chi2[0]:.3f}; model flux {gal.flux:.4g} "
          f"(stamp {stamp.sum():.4g})")

    # The ground survey: the learned galaxy and the classical deconvolution, same PSF, same noise.
    ground_psf = galsim.Kolmogorov(fwhm=args.ground_fwhm)
    gal.check_target_psf(ground_psf, pixel_scale=args.ground_scale)
    hst_psf = galsim.InterpolatedImage(galsim.Image(psf, scale=scale), flux=1.0,
                                       use_true_center=False)
    classical = galsim.Convolve(
        galsim.InterpolatedImage(galsim.Image(stamp, scale=scale), use_true_center=False),
        galsim.Deconvolve(hst_psf))
    n = max(32, int(np.ceil(size * scale / args.ground_scale)) + 8)
    ground = [galsim.Convolve(obj, ground_psf).drawImage(nx=n, ny=n, scale=args.ground_scale)
              for obj in (gal, classical)]
    # the noise sigma that gives the learned galaxy the requested (optimal-filter) S/N
    noise_sigma = np.sqrt(np.sum(ground[0].array ** 2)) / args.ground_snr
    rng = galsim.BaseDeviate(args.seed)
    for image in ground:
        image.addNoise(galsim.GaussianNoise(galsim.BaseDeviate(rng.raw()), sigma=noise_sigma))

    panels = [
        ("HST stamp (model grid)", stamp),
        (f"reconstruction * PSF\nchi2/pix {chi2[0]:.2f}", convolved[0]),
        ("residual / sigma", (stamp - convolved[0]) / sigma),
        ("VQVAEGalaxy (pre-PSF)", gal.image.array),
        (f"ground {args.ground_fwhm}\" / {args.ground_scale}\"/pix\nVQVAEGalaxy", ground[0].array),
        ("ground, classical\n(HST image deconvolved)", ground[1].array),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.0))
    for ax, (title, a) in zip(axes, panels):
        if title.startswith("residual"):
            ax.imshow(a, origin="lower", cmap="RdBu_r", vmin=-4, vmax=4)
        else:
            soft = max(3 * 1.4826 * np.median(np.abs(a - np.median(a))), 1e-3 * a.max())
            ax.imshow(np.arcsinh(a / soft), origin="lower", cmap="magma",
                      vmin=-1, vmax=np.arcsinh(a.max() / soft))
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{os.path.basename(args.image)} through {os.path.basename(str(args.model))}",
                 fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with atomic_path(args.out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as err:  # bad input: one line naming the problem
        sys.exit(f"{__file__.rsplit('/', 1)[-1]}: error: {err}")
