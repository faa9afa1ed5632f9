"""Which of several VQ-VAE runs reconstructs held-out galaxies most realistically?

For each ``train-vqvae`` run folder, decodes the encoded noisy held-out stamps of a synthetic
dataset with truth (the stamps are in the training set's units, so no rescaling), measures the
realism statistics of `galsim_vqvae.metrics.morphology` on the reconstructions and on the truth,
and scores the run by the sum of the eight KS statistics (flux, HSM size, |e|, C, A, Gini, M20,
edge flux) of reconstructions against truth (one that cannot be measured counts as 1); the
median flux ratio and the mean edge flux are printed beside it. The run with the lowest score
is chosen; with ``--link`` a symbolic link to it is made (what
``examples/train_default_model.sh prior`` reads as ``$RUN/vqvae``).

    python examples/select_vqvae.py --runs runs/a/vqvae_l1 runs/a/vqvae_hybrid \\
        --data runs/a/val.h5 --n 1000 --workers 16 --out runs/a/selection.json \\
        --link runs/a/vqvae

The rule was fixed before the runs it chooses between were trained (docs/default_model.md).
"""

import argparse
import json
import os

import numpy as np
import torch

from galsim_vqvae import metrics
from galsim_vqvae.checkpoints import load_checkpoint
from galsim_vqvae.data import dataset
from galsim_vqvae.nn.vqvae import VQVAE
from galsim_vqvae.validation.common import parallel_chunks
from galsim_vqvae.validation.realism import compare


def reconstruct(run, observed, device, batch=256):
    """decode(encode(observed)) of the VQ-VAE in ``run``/checkpoint.pt, as a float32 array."""
    state = load_checkpoint(os.path.join(run, "checkpoint.pt"))
    net = VQVAE.from_config(state["config"])
    net.load_state_dict(state["model"])
    net.to(device).eval()
    out = []
    with torch.inference_mode():
        for a in range(0, len(observed), batch):
            x = torch.as_tensor(observed[a:a + batch], device=device)[:, None]
            out.append(net.decode_codes(net.encode_codes(x))[:, 0].float().cpu().numpy())
    return np.concatenate(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="train-vqvae run folders")
    parser.add_argument("--data", required=True, help="held-out synthetic dataset with truth")
    parser.add_argument("--n", type=int, default=1000, help="held-out stamps")
    parser.add_argument("--workers", type=int, default=1, help="processes for the statistics")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True, help="JSON file of the scores")
    parser.add_argument("--link", help="make this path a symbolic link to the chosen run")
    args = parser.parse_args(argv)

    n = min(args.n, dataset.read_header(args.data)["n"])
    arrays = dataset.load_arrays(args.data, indices=np.arange(n), keys=("observed", "truth"))
    truth = np.asarray(arrays["truth"], dtype=np.float32)
    observed = np.asarray(arrays["observed"], dtype=np.float32)
    scale = float(dataset.read_header(args.data)["pixel_scale"])

    def stats(images):
        return parallel_chunks(lambda a, b: metrics.morphology(images[a:b], scale), len(images),
                               args.workers)

    truth_stats = stats(truth)
    rows = []
    for run in args.runs:
        images = reconstruct(run, observed, args.device)
        s = stats(images)
        ks = {k: compare(s[k], truth_stats[k])["ks"] for k in metrics.MORPHOLOGY}
        # a statistic that cannot be measured (HSM failing on every image) counts as KS 1
        rows.append({"run": run, "score": float(np.nansum([1.0 if np.isnan(v) else v
                                                            for v in ks.values()])),
                     "ks": ks, "mean_rel": {k: compare(s[k], truth_stats[k])["mean_rel"]
                                            for k in metrics.MORPHOLOGY},
                     "flux_ratio_median": float(np.median(images.sum(axis=(1, 2)) /
                                                          truth.sum(axis=(1, 2)))),
                     "edge_flux_mean": float(np.nanmean(s["edge"])),
                     "truth_edge_flux_mean": float(np.nanmean(truth_stats["edge"]))})
        print(f"{run}: score {rows[-1]['score']:.3f}, flux ratio "
              f"{rows[-1]['flux_ratio_median']:.3f}, edge flux {rows[-1]['edge_flux_mean']:.4%}, "
              + ", ".join(f"KS {k} {v:.3f}" for k, v in ks.items()), flush=True)
    best = min(rows, key=lambda r: r["score"])
    with open(args.out, "w") as f:
        json.dump({"n": n, "data": os.path.basename(args.data), "chosen": best["run"],
                   "rule": "lowest sum of the 8 KS statistics of decode(encode(observed)) "
                           "against the truth", "runs": rows}, f, indent=1)
    print("chosen:", best["run"])
    if args.link:
        if os.path.lexists(args.link):
            os.remove(args.link)
        os.symlink(os.path.abspath(best["run"]), args.link)


if __name__ == "__main__":
    main()
