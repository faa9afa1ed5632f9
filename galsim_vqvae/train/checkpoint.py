"""Training checkpoints and output-directory locks, shared by every training loop.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts saved with
``torch.save`` to a temporary file and renamed, so a crash never leaves a corrupt file under the
final name, and loaded with ``weights_only=True`` so loading never runs pickled code.
"""

import io
import json
import os
import pickle
import re
import shutil
import socket
import time

import torch

from ..errors import VQVAEFormatError, VQVAEInputError
from ..fileio import OutputWriteError, atomic_path, failure_reason

CHECKPOINT_NAME = "checkpoint.pt"
LOCK_NAME = ".lock"


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


class RunLock:
    """Claims an output directory for one run; a second run pointed at it refuses, naming the first.

    The directory is created if it does not exist. If the run then fails (an exception leaves
    the ``with`` block) before writing a checkpoint, a directory this lock created is removed
    again, so that a run refused for bad input leaves nothing behind. A lock whose process no
    longer exists on this host is stale and is taken over.
    """

    def __init__(self, directory):
        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, LOCK_NAME)
        self.created = False

    def __enter__(self):
        try:
            parent = os.path.dirname(os.path.abspath(self.directory))
            os.makedirs(parent, exist_ok=True)
            try:
                os.mkdir(self.directory)  # atomic: of two runs, only one creates it
                self.created = True
            except FileExistsError:
                self.created = False
        except OSError as err:
            raise OutputWriteError(err.errno, f"cannot create the run directory "
                                   f"{self.directory}: {failure_reason(err)}") from err
        try:
            return self._claim()
        except BaseException:
            self._remove_if_created()
            raise

    def _claim(self):
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

    def __exit__(self, exc_type, exc, tb):
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        if exc_type is not None:
            self._remove_if_created()
        return False

    def _remove_if_created(self):
        if self.created and not os.path.exists(os.path.join(self.directory, CHECKPOINT_NAME)):
            shutil.rmtree(self.directory, ignore_errors=True)

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
