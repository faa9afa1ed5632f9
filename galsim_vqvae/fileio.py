"""Atomic file writing: outputs appear under their final name complete, or not at all."""

import contextlib
import os
import tempfile

from .errors import VQVAEInputError


def check_output_path(path, what="output"):
    """Check, before any work is done, that ``path`` can be written: its folder exists and is
    writable, and ``path`` itself is not a folder. Raises `VQVAEInputError` naming ``what``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise VQVAEInputError(f"{what} {path} is a folder; give a file name")
    if not os.path.isdir(directory):
        raise VQVAEInputError(f"{what}: output directory does not exist: {directory}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise VQVAEInputError(f"{what}: output directory is not writable: {directory}")
    return path


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The file gets the mode a plain ``open(path, "w")`` would give it (0666 less the umask).
    On any exception the temporary file is removed and ``path`` (if it existed) is left untouched.
    The temporary name starts with ``.`` and ends with ``.tmp`` so that it is never mistaken for
    a finished output. An `OSError` (a full disk, an unwritable folder) is raised again as an
    `OSError` of the same errno whose message names ``path``.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"output directory does not exist: {directory}")
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                                   dir=directory)
    except OSError as err:
        raise _naming(err, path) from err
    try:  # mkstemp makes the file 0600: give it the mode a plain open() would (0666 - umask)
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if (isinstance(err, OSError) and not isinstance(err, OutputWriteError)
                and err.filename in (None, tmp)):  # not an error reading some input file
            raise _naming(err, path) from err
        raise


def _umask():
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class OutputWriteError(OSError):
    """An output could not be written (full disk, unwritable folder...); the message names it."""

    def __str__(self):
        return self.strerror


def _naming(err, path):
    out = OutputWriteError(err.errno, f"cannot write {path}: {failure_reason(err)}")
    out.reason = failure_reason(err)
    return out


def failure_reason(err):
    """Why an OSError happened, without the file name: its ``strerror`` (e.g. "No space left on
    device"), or for an error from `atomic_path`, the reason it recorded."""
    return getattr(err, "reason", None) or err.strerror or str(err) or type(err).__name__
