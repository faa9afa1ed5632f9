"""Data-parallel training under ``torchrun``: every piece of distributed plumbing the trainers use.

``train-vqvae`` and ``train-prior`` run unchanged as ``torchrun --nproc_per_node N -m
galsim_vqvae.cli train-vqvae ...``. `setup` reads torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``), starts the process group (NCCL on CUDA, gloo on the CPU; the
environment variable ``GALSIM_VQVAE_DIST_BACKEND`` overrides, e.g. ``gloo`` for several processes
on one GPU, which NCCL refuses) and puts each rank on ``cuda:LOCAL_RANK``. Then:

* ``--batch-size`` is the batch of one process; a step takes a global batch of
  ``batch_size * world_size`` stamps from the epoch's permutation, rank r its r-th slice
  (`rank_slice`), so the schedule is a function of (seed, step, world size) and a run resumes with
  any world size.
* Gradients are averaged by `torch.nn.parallel.DistributedDataParallel` (`Context.wrap`).
* The VQ-VAE's EMA codebook statistics are summed over the ranks, and the dead-code candidates
  are drawn from the global batch with the quantizer's own seed (`Context.share_codebook`); the
  k-means initialisation runs on rank 0 on the gathered global batch and is broadcast
  (`Context.init_codebook`). Every rank therefore holds the same codebook and weights, bit for
  bit, which `Context.check_identical` verifies at each checkpoint, and N ranks of batch B
  compute what one process computes with batch N*B, up to floating-point rounding.
* Rank 0 alone writes checkpoints, logs, galleries, bundles and progress bars; set-up errors on
  rank 0 (a locked directory, a missing checkpoint) are raised on every rank (`Context.on_main`).

A single process without torchrun (or with ``WORLD_SIZE=1``) runs no collective at all and gives,
bit for bit, the results it gave before this module existed.
"""

import contextlib
import gc
import hashlib
import inspect
import os

import torch
import torch.distributed as dist

from ..devices import resolve_device
from ..errors import VQVAEFormatError, VQVAEInputError

BACKEND_ENV = "GALSIM_VQVAE_DIST_BACKEND"


def process_rank():
    """This process's rank in the torchrun job (0 without torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process():
    """Whether this process is the one that writes outputs (rank 0, or the only process)."""
    return process_rank() == 0


def rank_slice(k, batch_size, rank=0, world_size=1):
    """The slice of an epoch's permutation that rank ``rank`` takes at the epoch's ``k``-th step:
    the ``rank``-th ``batch_size`` rows of the ``k``-th global batch of ``batch_size *
    world_size`` rows (with one process, the ``k``-th batch)."""
    start = (k * world_size + rank) * batch_size
    return slice(start, start + batch_size)


class Context:
    """Where this process stands in a training job of ``world_size`` processes.

    Attributes:
        rank:           This process's rank (0 for a single process).
        world_size:     Number of processes (1 for a single process).
        local_rank:     Rank on this node (picks the GPU).
        device:         The ``torch.device`` this process trains on.
        owns_group:     Whether `setup` started the process group (then `close` ends it).
    """

    def __init__(self, rank, world_size, local_rank, device, owns_group):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device, self.owns_group = device, owns_group

    @property
    def active(self):
        """Whether there are other processes to talk to."""
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    def __repr__(self):
        return (f"<galsim_vqvae distributed context: rank {self.rank} of {self.world_size}, "
                f"device {self.device}>")

    # --------------------------------------------------------------------------------------------
    def wrap(self, module):
        """``module`` in `DistributedDataParallel` (gradients averaged over the ranks), or itself
        for a single process. Buffers are not broadcast: the codebook is kept identical by
        construction (and checked), not overwritten from rank 0 at every step."""
        if not self.active:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # (newer torch names the switch forward_sync_buffers; the buffers are equal at the start)
        sync = ("forward_sync_buffers" if "forward_sync_buffers" in
                inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers")
        return DistributedDataParallel(module, device_ids=ids, **{sync: False})

    def mean(self, tensor):
        """The mean of ``tensor`` over the ranks (the tensor itself for a single process)."""
        if not self.active:
            return tensor
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor / self.world_size

    def broadcast_(self, tensors, src=0):
        """Overwrite ``tensors`` on every rank with rank ``src``'s values (in place)."""
        if self.active:
            for t in tensors:
                dist.broadcast(t, src)

    def share_codebook(self, quantizer):
        """Make ``quantizer`` (a `VectorQuantizer`) apply on every rank the update of the global
        batch: its per-code counts and sums and its dead-code candidates (each rank holding its
        part of the global draw, see `VectorQuantizer.batch_statistics`) summed over the ranks.
        Nothing changes for a single process."""
        if not self.active:
            return
        quantizer.shard = (self.rank, self.world_size)
        quantizer.stats_reducer = self._sum_statistics

    @staticmethod
    def _sum_statistics(stats):
        parts = [stats["count"][:, None], stats["sum"]]
        if "candidates" in stats:
            parts.append(stats["candidates"])
        flat = torch.cat(parts, dim=1)  # one collective for all
        dist.all_reduce(flat)
        d = stats["sum"].shape[1]
        out = {"count": flat[:, 0].contiguous(), "sum": flat[:, 1:1 + d].contiguous()}
        if "candidates" in stats:
            out["candidates"] = flat[:, 1 + d:].contiguous()
        return out

    @torch.no_grad()
    def init_codebook(self, quantizer, z):
        """Initialise ``quantizer`` before its first quantized step on every rank alike: k-means
        on rank 0 over the encoder outputs ``z`` [N, D] of all ranks (gathered in rank order,
        i.e. the global batch), then broadcast. Nothing to do for a single process (the quantizer
        initialises itself in its first forward pass) or once initialised."""
        if not self.active or quantizer.is_initialized or quantizer.kmeans_iters <= 0:
            return
        z = z.float().contiguous()
        parts = [torch.empty_like(z) for _ in range(self.world_size)]
        dist.all_gather(parts, z)
        if self.is_main:
            quantizer.kmeans_init(torch.cat(parts))
        self.broadcast_([quantizer.codebook, quantizer.ema_count, quantizer.ema_sum])
        quantizer.mark_initialized()

    # --------------------------------------------------------------------------------------------
    def on_main(self, fn):
        """Run ``fn()`` on rank 0 alone and return its result there (None elsewhere); an error it
        raises is raised on every rank, so that no rank waits for a rank that has stopped."""
        error = None
        result = None
        if self.is_main:
            try:
                result = fn()
            except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
                error = err
        if self.active:
            message = [None if error is None else (type(error).__name__, str(error))]
            dist.broadcast_object_list(message, 0, device=self._object_device())
            if not self.is_main and message[0] is not None:
                name, text = message[0]
                cls = {"VQVAEFormatError": VQVAEFormatError, "VQVAEInputError": VQVAEInputError,
                       "FileNotFoundError": FileNotFoundError}.get(name, RuntimeError)
                raise cls(f"{text} (raised on rank 0)")
        if error is not None:
            raise error
        return result

    @contextlib.contextmanager
    def main_context(self, make):
        """Rank 0 alone enters the context manager ``make()`` (e.g. the lock of the run
        directory) for the duration of the block; an error entering it is raised on every rank."""
        with contextlib.ExitStack() as stack:
            self.on_main(lambda: stack.enter_context(make()))
            yield

    def main_first(self, fn):
        """``fn()`` on rank 0, then (if it succeeded) on the other ranks: e.g. rank 0 writes a
        cache that the others then read."""
        result = self.on_main(fn)
        return result if self.is_main else fn()

    def check_identical(self, named_tensors, what):
        """Raise if the ranks do not hold bit-identical ``named_tensors`` (name -> tensor)."""
        if not self.active:
            return
        mine = {}
        for name, t in named_tensors.items():
            if torch.is_tensor(t):
                data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                mine[name] = hashlib.sha256(data.tobytes()).hexdigest()
        everyone = [None] * self.world_size
        dist.all_gather_object(everyone, mine)
        differ = sorted({k for other in everyone for k in mine if other.get(k) != mine[k]})
        if differ:
            raise RuntimeError(f"data-parallel ranks hold different {what}: {differ[:8]}"
                               f"{' ...' if len(differ) > 8 else ''} differ between ranks")

    def barrier(self):
        """Wait for every rank (e.g. before the processes end: a rank that leaves early can
        bring its peers down)."""
        if self.active:
            dist.barrier()

    def _object_device(self):
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def close(self):
        """End the process group if `setup` started it."""
        if self.owns_group and dist.is_initialized():
            # Free what still holds the group (a DistributedDataParallel wrapper is often in a
            # reference cycle) now: its gloo threads, left to the interpreter's shutdown, can
            # abort the process ("terminate called without an active exception").
            gc.collect()
            dist.destroy_process_group()
            self.owns_group = False


def _env_int(name):
    value = os.environ.get(name)
    try:
        return None if value is None else int(value)
    except ValueError:
        raise VQVAEInputError(f"environment variable {name}={value!r} is not an integer") from None


def setup(device="cpu"):
    """The `Context` of this process for training on ``device``.

    Under torchrun (``WORLD_SIZE`` > 1 in the environment) starts the process group with NCCL on
    CUDA or gloo on the CPU (``GALSIM_VQVAE_DIST_BACKEND`` overrides) and moves a CUDA device to
    ``cuda:(LOCAL_RANK mod device count)``. A process group that the caller already started is
    used as it is. Otherwise a single process on ``device``.

    Parameters:
        device:     The device asked for, e.g. ``"cpu"`` or ``"cuda"``. [default: "cpu"]
    """
    dev = resolve_device(device)
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK") or 0
        owns = False
    else:
        world = _env_int("WORLD_SIZE") or 1
        rank = _env_int("RANK") or 0
        local = _env_int("LOCAL_RANK") or 0
        owns = world > 1
        if world < 1 or not 0 <= rank < world:
            raise VQVAEInputError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
        if owns and not dist.is_available():
            raise VQVAEInputError(f"WORLD_SIZE={world} but this torch has no torch.distributed")
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    if owns:
        backend = os.environ.get(BACKEND_ENV) or ("nccl" if dev.type == "cuda" else "gloo")
        if backend not in ("nccl", "gloo"):
            raise VQVAEInputError(f"{BACKEND_ENV}={backend!r}: choose 'nccl' or 'gloo'")
        if backend == "nccl" and dev.type != "cuda":
            raise VQVAEInputError(f"{BACKEND_ENV}=nccl needs a CUDA device, got {dev}")
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, rank=rank, world_size=world, **kwargs)
    return Context(rank, world, local, dev, owns)
