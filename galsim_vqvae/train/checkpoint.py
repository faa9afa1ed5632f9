"""Training checkpoints and output-directory locks, shared by every training loop.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts saved with
``torch.save`` to a temporary file and renamed, so a crash never leaves a corrupt file under the
final name, and loaded with ``weights_only=True`` so loading never runs pickled code.
"""

import json
import os
import socket
import time

import torch

from ..errors import VQVAEFormatError, VQVAEInputError
from ..fileio import atomic_path

CHECKPOINT_NAME = "checkpoint.pt"
LOCK_NAME = ".lock"


def save_checkpoint(state, path):
    """Write ``state`` (a dict) to ``path`` atomically; the previous file stays intact on failure."""
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except OSError as err:
        raise OSError(f"could not write checkpoint {path}: {err.strerror or err}; "
                      "the previous checkpoint, if any, is intact") from err


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint written by `save_checkpoint` without unpickling arbitrary objects."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VQVAEFormatError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise VQVAEFormatError(f"checkpoint {path} is corrupt or truncated: {err}") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise VQVAEFormatError(f"checkpoint {path} is not a galsim_vqvae checkpoint "
                               "(no 'model' and 'config' entries)")
    return state


class RunLock:
    """Claims an output directory for one run; a second run pointed at it refuses, naming the first.

    A lock whose process no longer exists on this host is stale and is taken over.
    """

    def __init__(self, directory):
        self.path = os.path.join(os.fspath(directory), LOCK_NAME)

    def __enter__(self):
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                other = self._read()
                if other is not None and not self._stale(other):
                    raise VQVAEInputError(
                        f"output directory {os.path.dirname(self.path)} is in use by another run "
                        f"(pid {other.get('pid')} on {other.get('host')}); "
                        f"remove {self.path} if that run is gone") from None
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return self

    def __exit__(self, *exc):
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        return False

    def _read(self):
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    @staticmethod
    def _stale(other):
        if other.get("host") != socket.gethostname():
            return False
        try:
            os.kill(int(other.get("pid", -1)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, TypeError):
            return False
        return False
