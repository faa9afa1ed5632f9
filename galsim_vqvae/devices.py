"""The torch device a user asks for, checked once for every entry point."""

import torch

from .errors import VQVAEInputError

SUPPORTED = ("cpu", "cuda", "mps")


def resolve_device(device):
    """A ``torch.device`` for ``device``, with a clear error for a bad name, a kind of device this
    package does not run on, or a missing GPU."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise VQVAEInputError(f"device {device!r} is not a valid torch device: {err}") from None
    if dev.type not in SUPPORTED:
        raise VQVAEInputError(f"device {str(dev)!r} is not supported; use one of "
                              f"{', '.join(SUPPORTED)} (cuda:N for GPU N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise VQVAEInputError(f"device {str(dev)!r} was requested but this machine has no "
                                  "usable CUDA GPU (torch.cuda.is_available() is False); use "
                                  "'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise VQVAEInputError(f"device {str(dev)!r} was requested but this machine has "
                                  f"{torch.cuda.device_count()} CUDA GPU(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise VQVAEInputError(f"device {str(dev)!r} was requested but Apple's MPS backend is not "
                              "available here; use 'cpu'")
    return dev


def worker_device(device, worker, n_gpus):
    """The device of worker process number ``worker`` (0-based) of a pool asked to run on
    ``device``: plain ``"cuda"`` on a machine with ``n_gpus`` > 1 GPUs spreads the workers over
    them, worker k on ``cuda:(k mod n_gpus)``; anything else (``"cpu"``, ``"cuda:N"``, one GPU)
    is used as given.

    Parameters:
        device:     The device asked for (a string).
        worker:     The worker's number, 0 for the first.
        n_gpus:     The number of CUDA GPUs on the machine (``torch.cuda.device_count()``).
    """
    if str(device) != "cuda" or n_gpus < 2:
        return str(device)
    return "cuda:%d" % (int(worker) % n_gpus)
