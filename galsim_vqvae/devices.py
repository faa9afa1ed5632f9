"""The torch device a user asks for, checked once for every entry point."""

import torch

from .errors import VQVAEInputError


def resolve_device(device):
    """A ``torch.device`` for ``device``, with a clear error for a bad name or a missing GPU."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise VQVAEInputError(f"device {device!r} is not a valid torch device: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VQVAEInputError(f"device {str(dev)!r} was requested but this machine has no usable "
                              "CUDA GPU (torch.cuda.is_available() is False); use 'cpu'")
    return dev
