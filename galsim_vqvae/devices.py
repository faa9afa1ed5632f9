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
