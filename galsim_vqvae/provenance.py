"""Provenance of the files galsim_vqvae writes: which model (name and sha256 of the bundle) and
which version of the package made them, as FITS header cards."""

import hashlib
import os

from ._version import __version__

_SHA256 = {}  # (path, size, mtime) -> sha256 of the file


def file_sha256(path):
    """The sha256 (hex) of the file ``path``, computed once per process for an unchanged file."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _SHA256[key] = digest.hexdigest()
    return _SHA256[key]


def model_name(path):
    """``"default"`` for the shipped model, else the bundle's file name."""
    from .emulator import _DEFAULT_PATH

    if os.path.abspath(path) == os.path.abspath(_DEFAULT_PATH):
        return "default"
    return os.path.basename(path)


def provenance_cards(model_path):
    """FITS header cards ``{keyword: (value, comment)}`` naming the model bundle at
    ``model_path`` (MODEL, MODELSHA) and the package version (VQVAEVER); ``model_path`` None: a
    model never saved (MODEL "unsaved", no MODELSHA)."""
    cards = {"VQVAEVER": (__version__, "galsim_vqvae version")}
    if model_path is None:
        cards["MODEL"] = ("unsaved", "model built in memory, never saved")
    else:
        cards["MODEL"] = (model_name(model_path)[:68], "galsim_vqvae model bundle")
        cards["MODELSHA"] = (file_sha256(model_path), "")  # sha256: no room for a comment
    return cards
