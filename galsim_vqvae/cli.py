"""The ``galsim-vqvae`` command.

Every subcommand prints a one-line summary at the end. Bad input gives one line naming the file,
field or value and a non-zero exit (a traceback only with ``--debug``).
"""

import argparse
import os
import secrets
import sys
import time

from .errors import VQVAEInputError, VQVAEMissingExtraError
from .fileio import check_output_path

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (and exit status 2), like every other error."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _conditions_arg(text):
    """Parse ``name=value,name=value`` into a dict: numbers as floats, other values (a class
    name such as ``morph_class=bulge``) as strings, checked by the model."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"condition {item!r} is not of the form name=value")
        name, value = (part.strip() for part in item.split("=", 1))
        try:
            out[name] = float(value)
        except ValueError:
            out[name] = value
    return out


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _checkpoint_path(path):
    return os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path


# ------------------------------------------------------------------------------------------------
# Subcommands
def cmd_make_dataset(args):
    check_output_path(args.out, "--out")
    if args.source == "synthetic":
        from .data.synthetic import make_synthetic_dataset

        summary = make_synthetic_dataset(args.out, n=args.n, seed=args.seed, psf=args.psf_model,
                                         psf_file=args.psf_file, n_psf=args.n_psf,
                                         workers=args.workers, progress=not args.quiet,
                                         **({"population": args.population}
                                            if args.population else {}))
    elif args.source == "fits":
        from .data.fits import make_fits_dataset

        if not args.input or not args.psf:
            raise VQVAEInputError("--source fits needs --input DIR and --psf FILE_OR_DIR")
        summary = make_fits_dataset(args.out, args.input, args.psf, weight=args.weight,
                                    stamp_size=args.stamp_size, pixel_scale=args.pixel_scale,
                                    input_pixel_scale=args.input_pixel_scale,
                                    band=args.band or "F160W", zeropoint=args.zeropoint,
                                    progress=not args.quiet)
    else:
        from .data.cosmos import make_cosmos_dataset

        if not args.catalog:
            raise VQVAEInputError("--source cosmos needs --catalog FILE (and --dir DIR)")
        summary = make_cosmos_dataset(args.out, args.catalog, args.dir,
                                      stamp_size=args.stamp_size, pixel_scale=args.pixel_scale,
                                      max_galaxies=args.max_galaxies, band=args.band,
                                      zeropoint=args.zeropoint, progress=not args.quiet)
    return f"wrote {summary.get('n', '?')} stamps to {args.out}"


def cmd_train_vqvae(args):
    from .train.distributed import is_main_process
    from .train.vqvae import train_vqvae

    model = {k: v for k, v in (("embed_dim", args.embed_dim), ("num_codes", args.num_codes),
                               ("hidden", args.hidden), ("restart_every", args.restart_every),
                               ("output", args.output),
                               ("decoder_padding", args.decoder_padding),
                               ("encoder_padding", args.encoder_padding),
                               ("decoder_refine", args.decoder_refine))
             if v is not None}
    summary = train_vqvae(args.data, args.out, steps=args.steps, batch_size=args.batch_size,
                          lr=args.lr, seed=args.seed, device=args.device,
                          psf_layers=not args.no_psf_layers, model=model, resume=args.resume,
                          progress=not args.quiet, warmup=args.warmup, ae_warmup=args.ae_warmup,
                          lr_schedule=args.lr_schedule, log_every=args.log_every,
                          checkpoint_every=args.checkpoint_every, noise=args.noise,
                          truth_weight=args.truth_weight, augment=args.augment,
                          truth_norm=args.truth_norm)
    if not is_main_process():  # under torchrun, rank 0 reports
        return None
    if args.steps <= args.ae_warmup:
        print(f"galsim-vqvae train-vqvae: warning: --steps {args.steps} is not above --ae-warmup "
              f"{args.ae_warmup}: the run stayed a plain autoencoder and its codebook was never "
              "used (perplexity 0); train with --steps above --ae-warmup", file=sys.stderr)
    return (f"trained VQ-VAE to step {summary.get('step')}; checkpoint in {args.out}; "
            + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()
                        if isinstance(v, float)))


def cmd_train_prior(args):
    from .checkpoints import load_checkpoint
    from .data.dataset import mean_psf, median_sigma
    from .emulator import MAX_LABEL_ROWS, Emulator
    from .train.distributed import is_main_process
    from .train.prior import label_table, train_prior

    model = {k: v for k, v in (("channels", args.channels), ("layers", args.layers),
                               ("kernel_size", args.kernel_size), ("dropout", args.dropout))
             if v is not None}
    conditions = tuple(c for c in args.conditions.split(",") if c) if args.conditions else ()
    vqvae_ckpt = _checkpoint_path(args.vqvae)
    summary = train_prior(args.data, vqvae_ckpt, args.out, steps=args.steps,
                          batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          device=args.device, conditions=conditions, model=model,
                          resume=args.resume, progress=not args.quiet,
                          log_every=args.log_every, checkpoint_every=args.checkpoint_every,
                          ema=args.ema, class_label=args.class_label)
    if not is_main_process():  # under torchrun, rank 0 writes the bundle and reports
        return None
    bundle = os.path.join(args.out, "model.safetensors")
    trained_on = load_checkpoint(vqvae_ckpt)["data"]["path"]  # the VQ-VAE's training data
    # the labels of the prior's training split travel in the bundle (missing labels are drawn
    # from them): its conditions, then its class label
    labels = list(conditions) + ([args.class_label] if args.class_label else [])
    table = label_table(args.data, labels, MAX_LABEL_ROWS) if labels else None
    Emulator.from_checkpoints(vqvae_ckpt, os.path.join(args.out, "checkpoint.pt"),
                              psf_image=mean_psf(trained_on), label_table=table,
                              noise_sigma=median_sigma(trained_on)).save(bundle)
    bits = summary.get("test_bits_per_code")
    return (f"trained prior to step {summary.get('step')}"
            + (f", held-out NLL {bits:.4f} bits/code" if bits is not None else "")
            + f"; model bundle written to {bundle}")


def cmd_sample(args):
    from .emulator import Emulator
    from .outputs import write_samples

    check_output_path(args.out, "--out")
    conditions = args.conditions or None
    if args.processes:
        from .generate import generate_parallel

        if args.seed is None:
            raise VQVAEInputError("--processes needs --seed (the file is then the same for any "
                                  "number of processes)")
        shards = generate_parallel(args.model, args.n, args.out, args.seed, conditions,
                                   processes=args.processes, device=args.device,
                                   temperature=args.temperature, out_of_range=args.out_of_range)
        return f"wrote {args.n} galaxies to {args.out} ({shards} shard(s) in parallel)"
    from .nn.sampling import per_sample_seeds

    emulator = Emulator.load(args.model, device=args.device)
    # Without --seed, one is drawn and recorded in the file, so the file can be made again.
    seed = secrets.randbits(63) if args.seed is None else args.seed
    seeds = per_sample_seeds(seed, args.n)
    labels = emulator.draw_conditions(args.n, conditions, seeds, args.out_of_range) or None
    codes = emulator.sample_codes(args.n, labels, seed=seeds, temperature=args.temperature,
                                  progress=not args.quiet)
    images = emulator.decode(codes)
    write_samples(args.out, images, codes, emulator, labels, args.n, seed=seed)
    return f"wrote {args.n} galaxies ({images.shape[1]}x{images.shape[2]}) to {args.out}"


def cmd_reconstruct(args):
    from .emulator import Emulator
    from .outputs import read_stamps, write_reconstruction

    check_output_path(args.out, "--out")
    emulator = Emulator.load(args.model, device=args.device)
    size, scale = emulator.stamp_size, emulator.metadata["pixel_scale"]
    observed = read_stamps(args.input, "--input", size, scale)
    psf = read_stamps(args.psf, "--psf", None, scale, psf=True)  # any size: fit to the stamp
    if len(psf) not in (1, len(observed)):
        raise VQVAEInputError(f"--psf {args.psf} holds {len(psf)} PSF images and --input "
                              f"{args.input} {len(observed)} stamps: give one PSF for all "
                              "stamps or one per stamp")
    images, red_chi2 = emulator.reconstruct(observed, psf, args.sigma, convolved=args.convolved)
    write_reconstruction(args.out, images, red_chi2)
    return (f"reconstructed {len(images)} stamps to {args.out}; median reduced chi^2 "
            f"{float(sorted(red_chi2)[len(red_chi2) // 2]):.3f}")


def cmd_gallery(args):
    from .emulator import Emulator
    from .metrics import draw_training_conditions
    from .plots import save_gallery
    from .provenance import model_name

    check_output_path(args.out, "--out")
    emulator = Emulator.load(args.model, device=args.device)
    names = emulator.condition_names
    columns = {}
    if args.data:
        from .data.dataset import load_arrays, read_header, split_indices

        header = read_header(args.data)
        if header["stamp_size"] != emulator.stamp_size:
            raise VQVAEInputError(f"--data {args.data} has {header['stamp_size']}-pixel stamps; "
                                  f"the model makes {emulator.stamp_size}-pixel ones")
        scale = emulator.metadata["pixel_scale"]
        if abs(header["pixel_scale"] - scale) > 1e-3 * scale:
            raise VQVAEInputError(f"--data {args.data} has a pixel scale of "
                                  f"{header['pixel_scale']:g}\"/pixel; the model's is "
                                  f"{scale:g}\"/pixel")
        test = split_indices(header["n"], "test")[:args.n]
        arrays = load_arrays(args.data, indices=test, keys=["truth", "params"])
        if "truth" not in arrays:
            raise VQVAEInputError(f"--data {args.data} has no truth images (a synthetic "
                                  "dataset has)")
        columns["held-out truth"] = arrays["truth"]
        conditions = {k: arrays[f"params/{k}"] for k in names} if names else None
    else:
        conditions = draw_training_conditions(emulator, args.n, args.seed) if names else None
    n = len(next(iter(conditions.values()))) if conditions else args.n
    label = "sample, same " + "+".join(names) if args.data and names else "sample"
    columns[label] = emulator.sample(n, conditions, seed=args.seed, out_of_range="clip",
                                     progress=not args.quiet)
    save_gallery(args.out, columns, title=f"{n} galaxies sampled from the model "
                 f"{model_name(emulator.path)} (seed {args.seed})")
    return f"wrote a gallery of {n} sampled galaxies to {args.out}"


def cmd_evaluate(args):
    from .validation import evaluate

    metrics = evaluate(args.model, n=args.n, out=args.out, data=args.data,
                       plain_ae=args.plain_ae, real_path=args.real, seed=args.seed,
                       device=args.device, split=args.split, progress=not args.quiet,
                       workers=args.workers)
    goals = [k for k in metrics if k.startswith("goal.") and k.count(".") == 1]
    hit = sum(metrics[k] for k in goals)
    return (f"wrote {os.path.join(args.out, 'report.md')}, metrics.json and figures; "
            f"{hit} of {len(goals)} measured goals hit")


def cmd_bench(args):
    from .benchmark import run_cpu_benchmarks

    for line in run_cpu_benchmarks(repeats=args.repeats):
        print(line)
    return "benchmarks done"


# ------------------------------------------------------------------------------------------------
MODEL_HELP = ("'default' (the shipped model) or a model bundle .safetensors (train-prior writes "
              "DIR/model.safetensors)")
DEVICE_HELP = "torch device: cpu, cuda or cuda:N"
TRAIN_DEVICE_HELP = DEVICE_HELP + " (under torchrun, cuda: one GPU per process)"
DATA_HELP = "dataset file (.h5) made by make-dataset"
LR_HELP = "peak learning rate (Adam)"
TRAIN_SEED_HELP = "random seed of the initialisation and the batches"
CKPT_HELP = "steps between checkpoints (written atomically)"
RESUME_HELP = "continue the run in --out from its checkpoint"


def build_parser():
    parser = _Parser(prog="galsim-vqvae", description="A learned galaxy model for GalSim.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks on errors")
        return p

    p = add("make-dataset", cmd_make_dataset, "build a dataset file of galaxy stamps")
    p.add_argument("--source", choices=["synthetic", "fits", "cosmos"], required=True,
                   help="synthetic: a CANDELS-like population with truth; fits: a folder of "
                   "FITS cutouts; cosmos: a GalSim RealGalaxyCatalog")
    p.add_argument("--out", required=True, help="output dataset file (.h5)")
    p.add_argument("--n", type=_positive_int, default=1000, help="synthetic: number of stamps")
    p.add_argument("--seed", type=int, default=0, help="synthetic: random seed")
    p.add_argument("--workers", type=_positive_int, default=os.cpu_count() or 1,
                   help="synthetic: processes drawing the stamps [default: the CPU count]")
    p.add_argument("--psf-model", choices=["optical", "cosmos"], default="optical",
                   help="synthetic: PSF family")
    p.add_argument("--psf-file", help="synthetic with --psf-model cosmos: RealGalaxy PSF file")
    p.add_argument("--n-psf", type=_positive_int, default=64, help="synthetic: PSFs in the bank")
    p.add_argument("--population",
                   help="synthetic: galaxy population (docs/data.md): 2026-12, matched to real "
                        "COSMOS galaxies, or 2026-11, the training set of the default model of "
                        "2026-12-07 [default: 2026-12]")
    p.add_argument("--band", help="fits/cosmos: the band's name [default: F160W for fits, "
                   "the catalog's for cosmos]")
    p.add_argument("--zeropoint", type=float, default=25.94,
                   help="fits/cosmos: AB magnitude of unit flux (mag = -2.5 log10(flux) + zp)")
    p.add_argument("--input", help="fits: folder of FITS stamps")
    p.add_argument("--psf", help="fits: one PSF FITS file, or a folder of one PSF per stamp")
    p.add_argument("--input-pixel-scale", type=float, help="fits: pixel scale if not in headers")
    p.add_argument("--weight", help="fits: folder of weight or mask maps, one per stamp")
    p.add_argument("--pixel-scale", type=float, default=0.06,
                   help="fits/cosmos: the model's pixel scale in arcsec (0.03 keeps COSMOS "
                        "pixels) [default: 0.06]")
    p.add_argument("--stamp-size", type=_positive_int, default=84,
                   help="fits/cosmos: the model's stamp side in pixels [default: 84]")
    p.add_argument("--catalog", help="cosmos: RealGalaxyCatalog file")
    p.add_argument("--dir", help="cosmos: folder of the catalog's image files")
    p.add_argument("--max-galaxies", type=_positive_int, help="cosmos: use the first N only")

    p = add("train-vqvae", cmd_train_vqvae, "train the VQ-VAE through PSF and noise layers")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--out", required=True, help="run directory (checkpoint, log, gallery)")
    p.add_argument("--steps", type=_positive_int, required=True,
                   help="optimizer steps (more than --ae-warmup, or the codebook is never used)")
    p.add_argument("--batch-size", type=_positive_int, default=32,
                   help="stamps per step and process (under torchrun: per GPU)")
    p.add_argument("--lr", type=float, default=3e-4, help=LR_HELP)
    p.add_argument("--seed", type=int, default=0, help=TRAIN_SEED_HELP)
    p.add_argument("--device", default="cpu", help=TRAIN_DEVICE_HELP)
    p.add_argument("--no-psf-layers", action="store_true",
                   help="plain autoencoder on observed stamps (for comparison)")
    p.add_argument("--output", choices=("relu", "linear", "softplus"),
                   help="the decoder's output (default relu: non-negative); see VQVAE")
    p.add_argument("--decoder-padding", choices=("replicate", "zeros"),
                   help="padding of the decoder's convolutions (default zeros: keeps the "
                        "stamp's edges dark; replicate decodes a map of one code to a constant "
                        "image but leaves more light along the edges); a resumed run keeps its "
                        "checkpoint's")
    p.add_argument("--encoder-padding", choices=("replicate", "zeros"),
                   help="padding of the encoder's convolutions (default replicate: the sky is "
                        "encoded alike along the sides and inside; zeros, of models made before "
                        "2026-12-07, gives each side sky codes of its own); a resumed run keeps "
                        "its checkpoint's")
    p.add_argument("--decoder-refine", type=int, metavar="C",
                   help="channels of a 3x3 convolution and ReLU at full resolution before the "
                        "decoder's output (default 32: fewer dark rings around compact cores; "
                        "0: none, as in models made before 2026-12-08); a resumed run keeps its "
                        "checkpoint's")
    p.add_argument("--noise", choices=("data", "independent"), default="data",
                   help="'independent' (datasets with truth): encode one fresh noise realisation "
                        "of the convolved truth and compare with another, so the decoder cannot "
                        "fit the noise (docs/default_model.md)")
    p.add_argument("--truth-weight", type=float, default=0.0, metavar="W",
                   help="datasets with truth: add W * mean over pixels of ((decoded - truth) / "
                        "sigma)^2 per stamp to the loss, constraining the pre-PSF image where "
                        "the PSF does not (edges, ringing) [default: 0]")
    p.add_argument("--truth-norm", choices=["l2", "l1", "hybrid"], default="l2",
                   help="the truth term's distance: l2 (squared, as above), l1 (mean |decoded "
                        "- truth| / sigma, which drives faint frames and halos to exactly zero, "
                        "and trims faint wings), or hybrid (l2 plus the l1 term over the pixels "
                        "where the truth is below a small fraction of sigma, SKY_THRESHOLD in "
                        "galsim_vqvae.nn.forward: junk off the galaxy to zero, its wings "
                        "unbiased) [default: l2]")
    p.add_argument("--augment", action="store_true",
                   help="give each stamp one of the 8 rotations/flips about its centre (the "
                        "same for its truth and PSF), drawn from (seed, step)")
    p.add_argument("--embed-dim", type=_positive_int,
                   help="dimension of the codebook vectors [default: 64]")
    p.add_argument("--num-codes", type=_positive_int,
                   help="codebook size [default: 512]")
    p.add_argument("--hidden", type=_positive_int,
                   help="channels of the encoder and decoder, even [default: 128]")
    p.add_argument("--restart-every", type=int,
                   help="dead-code restart window in updates (0: never) [default: 100]")
    p.add_argument("--warmup", type=int, default=100, help="learning-rate warm-up steps")
    p.add_argument("--ae-warmup", type=int, default=200,
                   help="steps as a plain autoencoder before the codebook is k-means initialised")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="learning rate after the warm-up: constant, or a cosine decay to 0")
    p.add_argument("--log-every", type=_positive_int, default=50,
                   help="steps between log lines")
    p.add_argument("--checkpoint-every", type=_positive_int, default=500, help=CKPT_HELP)
    p.add_argument("--resume", action="store_true", help=RESUME_HELP)

    p = add("train-prior", cmd_train_prior,
            "train the Gated PixelCNN prior and write the model bundle")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--vqvae", required=True, help="train-vqvae run directory or checkpoint")
    p.add_argument("--out", required=True,
                   help="run directory (checkpoint, log, and the bundle model.safetensors)")
    p.add_argument("--steps", type=_positive_int, required=True, help="optimizer steps")
    p.add_argument("--conditions", default="mag,hlr",
                   help="comma-separated labels from the dataset's params ('' for none)")
    p.add_argument("--batch-size", type=_positive_int, default=64,
                   help="code maps per step and process (under torchrun: per GPU)")
    p.add_argument("--lr", type=float, default=3e-4, help=LR_HELP)
    p.add_argument("--seed", type=int, default=0, help=TRAIN_SEED_HELP)
    p.add_argument("--device", default="cpu", help=TRAIN_DEVICE_HELP)
    p.add_argument("--channels", type=_positive_int,
                   help="channels of the PixelCNN layers [default: 128]")
    p.add_argument("--layers", type=_positive_int,
                   help="gated PixelCNN layers [default: 15]")
    p.add_argument("--kernel-size", type=_positive_int,
                   help="kernel size of the layers, odd [default: 5]")
    p.add_argument("--dropout", type=float, metavar="P",
                   help="dropout probability in the gated layers while training (none when "
                        "sampling or evaluating) [default: 0]")
    p.add_argument("--ema", type=float, default=0.999, metavar="DECAY",
                   help="decay of the moving average of the weights that is evaluated and "
                        "shipped (0: the optimizer's weights) [default: 0.999]")
    p.add_argument("--class-label", metavar="NAME",
                   help="condition on a class label too: an integer params/NAME of the dataset "
                        "whose class names are its class_names attribute, e.g. morph_class")
    p.add_argument("--log-every", type=_positive_int, default=50,
                   help="steps between logs of the training and held-out bits per code")
    p.add_argument("--checkpoint-every", type=_positive_int, default=500, help=CKPT_HELP)
    p.add_argument("--resume", action="store_true", help=RESUME_HELP)

    p = add("sample", cmd_sample, "sample galaxies (pre-PSF images) from a model")
    p.add_argument("--model", default="default", help=MODEL_HELP)
    p.add_argument("--n", type=_positive_int, required=True, help="number of galaxies")
    p.add_argument("--out", required=True, help="output FITS file")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed; without it one is drawn, and either way it is recorded "
                   "in the file's header (SEED)")
    p.add_argument("--conditions", type=_conditions_arg, default=None,
                   help="labels of every sample, e.g. mag=22.5 or mag=23,morph_class=disk "
                        "(a class by name or number); labels left out are drawn from the "
                        "training population, given those set. Default: all drawn")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature of the prior (below 1: more typical galaxies)")
    p.add_argument("--out-of-range", choices=["error", "clip"], default="error",
                   help="conditions outside the training ranges: stop, or clip them to the "
                   "ranges")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda or cuda:N (with --processes, cuda spreads them over the GPUs)")
    p.add_argument("--processes", type=_positive_int,
                   help="generate in this many worker processes (at most one per block of "
                        "256 galaxies; galsim_vqvae.generate.generate_parallel): the same file "
                        "for any number; needs --seed")

    p = add("reconstruct", cmd_reconstruct, "deconvolved reconstruction of observed stamps")
    p.add_argument("--model", default="default", help=MODEL_HELP)
    p.add_argument("--input", required=True, help="FITS image or cube of observed stamps")
    p.add_argument("--psf", required=True,
                   help="FITS PSF image (or cube, one per stamp) at the model's pixel scale, of "
                        "any size: padded or cropped about its centre pixel (n//2, as GalSim "
                        "draws it) to the model's stamp")
    p.add_argument("--sigma", type=float, required=True, help="noise sigma of the stamps")
    p.add_argument("--out", required=True, help="output FITS file")
    p.add_argument("--convolved", action="store_true",
                   help="write the reconstructions convolved with the PSF (comparable with "
                   "--input) instead of deconvolved")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)

    p = add("evaluate", cmd_evaluate, "the science validation report (report.md, metrics.json, "
            "figures)")
    p.add_argument("--model", default="default", help=MODEL_HELP)
    p.add_argument("--n", type=_positive_int, default=1000,
                   help="stamps, samples and galaxies per check")
    p.add_argument("--out", default="evaluation", help="output folder")
    p.add_argument("--data", help="a synthetic dataset with truth (fidelity, realism, codebook)")
    p.add_argument("--split", choices=["test", "all"], default="test",
                   help="stamps of --data and of a --real dataset file: held out "
                   "(i %% 10 == 9), or all for a dataset the model never saw")
    p.add_argument("--plain-ae", help="a 'train-vqvae --no-psf-layers' run, for comparison")
    p.add_argument("--real", help="real galaxies: a dataset file or a RealGalaxyCatalog FITS file")
    p.add_argument("--seed", type=int, default=0, help="random seed of the samples")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument("--workers", type=_positive_int, default=1,
                   help="processes for the per-galaxy measurements (the report does not depend "
                   "on it; e.g. the machine's core count)")

    p = add("gallery", cmd_gallery, "a PNG gallery of sampled galaxies")
    p.add_argument("--model", default="default", help=MODEL_HELP)
    p.add_argument("--data", help="a dataset with truth: show held-out truth beside samples "
                   "conditioned on its labels")
    p.add_argument("--n", type=_positive_int, default=16, help="number of galaxies")
    p.add_argument("--seed", type=int, default=0, help="random seed of the samples")
    p.add_argument("--out", required=True, help="output PNG file")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)

    p = add("bench", cmd_bench, "quick CPU benchmarks of the ops against their baselines")
    p.add_argument("--repeats", type=_positive_int, default=20,
                   help="timed repeats of each benchmark")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    start = time.time()
    try:
        summary = args.func(args)
    except KeyboardInterrupt:
        print(f"galsim-vqvae {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one clear line unless --debug
        if args.debug or not _is_user_error(err):
            if not args.debug:
                print(f"galsim-vqvae {args.command}: internal error (run with --debug for the "
                      f"traceback): {type(err).__name__}: {err}", file=sys.stderr)
                return 1
            raise
        print(f"galsim-vqvae {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if summary is not None:  # None: a torchrun rank other than 0
        print(f"galsim-vqvae {args.command}: {summary} ({time.time() - start:.1f} s)")
    return 0


def _is_user_error(err):
    """Whether ``err`` is bad input (one line, exit 2): the package's own input errors, GalSim's
    (a bad config value), the OS's (a missing or unwritable file) and a missing optional
    dependency (naming the extra to install). Anything else, a bare
    ValueError included, is a bug and keeps its traceback."""
    import galsim

    return isinstance(err, (VQVAEInputError, VQVAEMissingExtraError, OSError,
                            galsim.GalSimError))


if __name__ == "__main__":
    sys.exit(main())
