"""Output-directory locks of the training runs; the checkpoint files themselves are
`galsim_vqvae.checkpoints` (imported from here too, for the trainers)."""

import json
import os
import shutil
import socket
import time

from ..checkpoints import CHECKPOINT_NAME, load_checkpoint, save_checkpoint  # noqa: F401
from ..errors import VQVAEInputError
from ..fileio import OutputWriteError, failure_reason

LOCK_NAME = ".lock"


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
