"""Errors raised by galsim_vqvae for bad input.

Every error names the file, field or value at fault. GalSim-facing code (``profile.py``,
``config.py``) raises GalSim's own error classes; the rest of the package raises these, which
subclass ``ValueError`` so that callers may catch either.
"""


class VQVAEInputError(ValueError):
    """Bad user input: a file, field or value that cannot be used. The message names it."""


class VQVAEFormatError(VQVAEInputError):
    """A dataset or model file that is missing, truncated, corrupt, or of an unknown version."""


class VQVAEMissingExtraError(ImportError):
    """An optional dependency is not installed. The message names the package's extra that
    installs it (e.g. ``pip install "galsim_vqvae[train]"``); drawing galaxies needs none."""
