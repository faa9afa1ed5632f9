"""Run under ``torchrun`` by tests/test_distributed.py: in one process group, train the VQ-VAE and
the prior each twice, straight and split in two resumed halves, into ``OUT/{vq,prior}_{straight,
halves}``: ``python -m torch.distributed.run --nproc_per_node 2 tests/ddp_resume.py DATA OUT``.

The VQ-VAE trains with every lever on (independent noise, the truth term, augmentation, codebook
restarts before and after the break), the prior with dropout, a moving average and a class label.
"""

import os
import sys

import torch
import torch.distributed as dist

from galsim_vqvae.train.prior import train_prior
from galsim_vqvae.train.vqvae import train_vqvae

VQ = dict(batch_size=8, lr=2e-3, warmup=4, ae_warmup=4, seed=5, noise="independent",
          truth_weight=0.5, augment=True, log_every=4, progress=False,
          model=dict(hidden=16, embed_dim=8, num_codes=32, restart_every=3,
                     restart_threshold=8.0))
PRIOR = dict(batch_size=8, lr=3e-3, seed=2, ema=0.9, class_label="morph_class", log_every=3,
             model=dict(channels=8, layers=2, kernel_size=3, dropout=0.2), progress=False)


def main(data, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # the trainers use it, and leave it open between runs
    try:
        train_vqvae(data, os.path.join(out, "vq_straight"), 16, **VQ)
        train_vqvae(data, os.path.join(out, "vq_halves"), 8, **VQ)
        train_vqvae(data, os.path.join(out, "vq_halves"), 16, resume=True, **VQ)
        vq = os.path.join(out, "vq_straight", "checkpoint.pt")
        train_prior(data, vq, os.path.join(out, "prior_straight"), 12, **PRIOR)
        train_prior(data, vq, os.path.join(out, "prior_halves"), 6, **PRIOR)
        train_prior(data, vq, os.path.join(out, "prior_halves"), 12, resume=True, **PRIOR)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
