"""galsim_vqvae: a learned galaxy model for GalSim.

``import galsim_vqvae`` registers the GalSim config types (input ``vqvae_model``, object
``VQVAEGalaxy``), so that a config's ``modules: [galsim_vqvae]`` is all GalSim needs. It imports
galsim but not torch: `Emulator` (and torch with it) is imported on first use.
"""

from . import config  # noqa: F401  (registers the GalSim config types)
from ._version import __version__  # noqa: F401
from .profile import VQVAEGalaxy  # noqa: F401

__all__ = ["Emulator", "VQVAEGalaxy", "__version__"]


def __getattr__(name):
    if name == "Emulator":
        from .emulator import Emulator

        return Emulator
    raise AttributeError(f"module 'galsim_vqvae' has no attribute {name!r}")
