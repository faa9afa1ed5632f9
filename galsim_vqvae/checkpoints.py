"""Checkpoint files: a plain dict of tensors, numbers, strings, lists and dicts saved with
``torch.save`` to a temporary file and renamed, so a crash never leaves a corrupt file under the
final name, and loaded with ``weights_only=True`` so loading never runs pickled code. Written by
the trainers (`galsim_vqvae.train`), read by them and by `galsim_vqvae.emulator` and
`galsim_vqvae.validation`.
"""

import io
import os
import pickle
import re

import torch

from .errors import VQVAEFormatError
from .fileio import OutputWriteError, atomic_path, failure_reason

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(state, path):
    """Write ``state`` (a dict) to ``path`` atomically; the previous file stays intact on failure
    (a full disk or an unwritable folder raises an `OSError` that names ``path`` and says so)."""
    buffer = io.BytesIO()  # serialised first, so that a full disk is a plain OSError on write
    torch.save(state, buffer)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
    except OSError as err:
        raise OutputWriteError(err.errno, f"could not write checkpoint {path}: "
                               f"{failure_reason(err)}; the previous checkpoint, if any, is "
                               "intact") from err


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint written by `save_checkpoint` without unpickling arbitrary objects."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VQVAEFormatError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        raise VQVAEFormatError(
            f"checkpoint {path} holds pickled Python objects"
            + (f" ({found.group(1)})" if found else "") + ", not only tensors and plain values; "
            "galsim_vqvae never unpickles those (that could run code from the file): refused"
        ) from None
    except Exception as err:  # torch raises several types for truncated or foreign files
        reason = str(err).strip().split("\n")[0].split(". ")[0]  # torch's first sentence
        raise VQVAEFormatError(f"checkpoint {path} is corrupt or truncated ({reason})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise VQVAEFormatError(f"checkpoint {path} is not a galsim_vqvae checkpoint "
                               "(no 'model' and 'config' entries)")
    return state
