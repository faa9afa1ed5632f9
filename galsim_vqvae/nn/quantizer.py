"""Vector quantizer with an EMA codebook, k-means initialisation and dead-code restarts.

The codebook is not trained by gradients: it follows exponential moving averages of the encoder
outputs assigned to each code (van den Oord et al. 2017, appendix; Razavi et al. 2019). The
encoder is pulled towards its codes by the commitment loss and receives the decoder's gradient
through the straight-through estimator.

All state (codebook, EMA counts and sums, the dead-code window, the update counter) lives in
buffers, so ``state_dict`` holds it and a resumed run continues exactly. An update is split in two
so that data-parallel training can all-reduce in between: `VectorQuantizer.batch_statistics`
computes this batch's per-code counts and sums (and, on restart updates, candidate vectors), and
`VectorQuantizer.apply_statistics` folds them into the EMA state. Set ``stats_reducer`` to a
function ``dict -> dict`` (a sum over the ranks of ``count``, ``sum`` and ``candidates``) and
``shard`` to ``(rank, world_size)`` to make every rank apply the update that one process would
apply to the whole (global) batch, restarts included (`galsim_vqvae.train.distributed`).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..errors import VQVAEInputError


class QuantizerOutput(NamedTuple):
    """What `VectorQuantizer.forward` returns.

    Attributes:
        z_q:             [B, D, h, w] float32 quantized latents; the straight-through estimator
                         passes their gradient unchanged to the encoder output.
        codes:           [B, h, w] int64 code indices.
        commitment_loss: scalar, ``beta * mean((z_e - sg[z_q])**2)``.
        perplexity:      scalar, ``exp`` of the entropy of this batch's code histogram.
        usage:           scalar, the fraction of codes used at least once in this batch.
    """

    z_q: torch.Tensor
    codes: torch.Tensor
    commitment_loss: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantizer of ``[B, D, h, w]`` latents onto ``num_codes`` code vectors.

    Parameters:
        num_codes:          Number of code vectors K. [default: 512]
        embed_dim:          Dimension D of a code vector. [default: 64]
        beta:               Weight of the commitment loss. [default: 0.25]
        decay:              EMA decay of the codebook statistics. [default: 0.99]
        eps:                Laplace smoothing of the EMA counts. [default: 1e-5]
        kmeans_iters:       Lloyd iterations of the k-means initialisation on the first training
                            batch (0 keeps the random initial codebook). [default: 10]
        restart_every:      Length, in updates, of the window over which code usage is counted;
                            at the end of each window codes used fewer than ``restart_threshold``
                            times are reset to random encoder outputs of the current batch
                            (0 disables restarts). [default: 100]
        restart_threshold:  Usage count below which a code is dead. [default: 1.0]
        seed:               Seed of the k-means and restart draws (with the update counter, so a
                            resumed run draws the same vectors). [default: 0]
    """

    def __init__(self, num_codes=512, embed_dim=64, beta=0.25, decay=0.99, eps=1e-5,
                 kmeans_iters=10, restart_every=100, restart_threshold=1.0, seed=0):
        super().__init__()
        if num_codes < 2 or embed_dim < 1:
            raise VQVAEInputError(f"need num_codes >= 2 and embed_dim >= 1, got {num_codes}, "
                                  f"{embed_dim}")
        if not 0.0 <= decay < 1.0:
            raise VQVAEInputError(f"decay must be in [0, 1), got {decay}")
        self.num_codes = num_codes
        self.embed_dim = embed_dim
        self.beta = beta
        self.decay = decay
        self.eps = eps
        self.kmeans_iters = kmeans_iters
        self.restart_every = restart_every
        self.restart_threshold = restart_threshold
        self.seed = seed
        init = torch.randn(num_codes, embed_dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("codebook", init)
        self.register_buffer("ema_count", torch.ones(num_codes))
        self.register_buffer("ema_sum", init.clone())
        self.register_buffer("window_count", torch.zeros(num_codes))
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("restarted", torch.zeros((), dtype=torch.int64))
        self.stats_reducer = None
        self.shard = (0, 1)  # (rank, world size): this batch's rows among the global batch's
        # Host-side mirrors of `initialized` and `updates`, so that a training step never waits
        # for the device to read them; refreshed from the buffers after load_state_dict.
        self._initialized = False
        self._updates = 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.initialized)
        self._updates = int(self.updates)

    def _generator(self, device, salt):
        g = torch.Generator(device=device)
        g.manual_seed((self.seed * 1_000_003 + salt * 7919 + 12345) % (2 ** 63))
        return g

    def embed(self, codes):
        """Code vectors of ``codes`` [B, h, w] as latents [B, D, h, w] (float32)."""
        return F.embedding(codes, self.codebook).permute(0, 3, 1, 2).contiguous()

    def forward(self, z_e):
        """Quantize ``z_e`` [B, D, h, w]; in training mode also update the codebook.

        Returns:
            a `QuantizerOutput`.
        """
        b, d, h, w = z_e.shape
        if d != self.embed_dim:
            raise VQVAEInputError(f"latents have {d} channels, the codebook has dimension "
                                  f"{self.embed_dim}")
        with torch.autocast(device_type=z_e.device.type, enabled=False):  # codes in float32
            return self._quantize(z_e)

    def _quantize(self, z_e):
        b, d, h, w = z_e.shape
        z = z_e.float().permute(0, 2, 3, 1).reshape(-1, d)
        if self.training and not self._initialized:
            if self.kmeans_iters > 0:
                self.kmeans_init(z.detach())
            else:
                self.initialized.fill_(True)
                self._initialized = True
        codes, _ = ops.nearest_code(z.detach(), self.codebook)
        q = F.embedding(codes, self.codebook)  # before this batch's update, as in the EMA papers
        if self.training:
            stats = self.batch_statistics(z.detach(), codes)
            if self.stats_reducer is not None:
                stats = self.stats_reducer(stats)
            counts = stats["count"]
            self.apply_statistics(stats)
        else:
            counts = self._histogram(codes)
        commitment = self.beta * F.mse_loss(z, q.detach())
        z_q = z + (q - z).detach()
        z_q = z_q.reshape(b, h, w, d).permute(0, 3, 1, 2).contiguous()
        p = counts / counts.sum().clamp_min(1.0)
        perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
        usage = (counts > 0).float().mean()
        return QuantizerOutput(z_q, codes.reshape(b, h, w), commitment, perplexity, usage)

    @torch.no_grad()
    def batch_statistics(self, z, codes):
        """Per-code statistics of one batch of encoder outputs ``z`` [N, D] assigned to ``codes``.

        Returns:
            dict with ``count`` [K] (float32), ``sum`` [K, D] (float32) and, when the coming
            update ends a restart window, ``candidates`` [K, D]: random rows of ``z``, the
            replacements for dead codes. With ``shard = (rank, world)``, ``z`` is the
            ``rank``-th of ``world`` equal parts of a global batch; the rows are drawn from the
            global batch and each rank fills in those it holds (zeros elsewhere), so that the
            sum over the ranks is what one process would draw from the global batch.
        """
        z = z.float()
        count = self._histogram(codes)
        total = torch.zeros(self.num_codes, z.shape[1], dtype=z.dtype, device=z.device)
        total.index_add_(0, codes, z)
        stats = {"count": count, "sum": total}
        if self._restart_due():
            g = self._generator(z.device, self._updates + 1)
            rank, world = self.shard
            n = z.shape[0]
            pick = torch.randint(n * world, (self.num_codes,), generator=g, device=z.device)
            if world == 1:
                stats["candidates"] = z[pick]
            else:
                local = pick - rank * n
                mine = (local >= 0) & (local < n)
                stats["candidates"] = torch.where(mine[:, None], z[local.clamp(0, n - 1)], 0.0)
        return stats

    def _histogram(self, codes):
        # not torch.bincount: on CUDA it reads the maximum back to the host, a sync per step
        ones = torch.ones(codes.shape[0], dtype=torch.float32, device=codes.device)
        return torch.zeros(self.num_codes, device=codes.device).index_add_(0, codes, ones)

    def _restart_due(self):
        return self.restart_every > 0 and (self._updates + 1) % self.restart_every == 0

    @torch.no_grad()
    def apply_statistics(self, stats):
        """Fold batch statistics (from `batch_statistics`, possibly all-reduced) into the codebook.

        ``ema_count <- decay*ema_count + (1-decay)*count``, the same for ``ema_sum``, then each code
        becomes ``ema_sum / smoothed_count`` with Laplace-smoothed counts
        ``(ema_count + eps) / (n + K*eps) * n``, ``n = sum(ema_count)``. At the end of a restart
        window, codes used fewer than ``restart_threshold`` times in the window are reset to the
        ``candidates`` (with an EMA count of 1).
        """
        d = self.decay
        self.ema_count.mul_(d).add_(stats["count"], alpha=1.0 - d)
        self.ema_sum.mul_(d).add_(stats["sum"], alpha=1.0 - d)
        self.window_count.add_(stats["count"])
        restart = self._restart_due() and "candidates" in stats
        self.updates.add_(1)
        self._updates += 1
        if restart:
            dead = self.window_count < self.restart_threshold
            self.ema_sum.copy_(torch.where(dead[:, None], stats["candidates"], self.ema_sum))
            self.ema_count.copy_(torch.where(dead, torch.ones_like(self.ema_count), self.ema_count))
            self.restarted.add_(dead.sum())
            self.window_count.zero_()
        n = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (n + self.num_codes * self.eps) * n
        self.codebook.copy_(self.ema_sum / smoothed[:, None])
        if restart:  # a restarted code is exactly its candidate, not a smoothed copy of it
            self.codebook.copy_(torch.where(dead[:, None], stats["candidates"], self.codebook))

    @torch.no_grad()
    def kmeans_init(self, z):
        """Initialise the codebook by k-means (``kmeans_iters`` Lloyd iterations) on ``z`` [N, D].

        Starts from K distinct random rows (drawn with replacement, slightly jittered, when N < K).
        Codes left empty keep their starting vector. Sets the EMA state to the final clusters.
        """
        z = z.float()
        n = z.shape[0]
        g = self._generator(z.device, 0)
        if n >= self.num_codes:
            centres = z[torch.randperm(n, generator=g, device=z.device)[:self.num_codes]].clone()
        else:
            centres = z[torch.randint(n, (self.num_codes,), generator=g, device=z.device)].clone()
            jitter = torch.randn(centres.shape, generator=g, device=z.device)
            centres += 1e-3 * (z.std() + 1e-12) * jitter
        count = torch.ones(self.num_codes, device=z.device)
        for _ in range(self.kmeans_iters):
            index, _ = ops.nearest_code(z, centres)
            count = self._histogram(index)
            total = torch.zeros_like(centres).index_add_(0, index, z)
            means = total / count.clamp_min(1.0)[:, None]
            centres = torch.where(count[:, None] > 0, means, centres)
        count = count.clamp_min(1.0)
        self.codebook.copy_(centres)
        self.ema_count.copy_(count)
        self.ema_sum.copy_(centres * count[:, None])
        self.window_count.zero_()
        self.initialized.fill_(True)
        self._initialized = True
