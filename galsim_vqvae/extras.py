"""The optional dependencies and the extras that install them.

Drawing galaxies (`Emulator`, `VQVAEGalaxy`, the GalSim config types, ``sample`` and
``reconstruct``) needs none of them. Each is imported where it is used, through `require`, which
names the extra to install when it is missing::

    pip install "galsim_vqvae[plots]"       # matplotlib: galleries and figures (PNG)
    pip install "galsim_vqvae[train]"       # h5py and matplotlib: datasets and training
    pip install "galsim_vqvae[evaluate]"    # h5py, matplotlib and scikit-image: the report
"""

from .errors import VQVAEMissingExtraError

# module -> (pip name, extra that installs it, what needs it)
OPTIONAL = {
    "matplotlib": ("matplotlib", "plots", "PNG galleries and figures"),
    "h5py": ("h5py", "train", "dataset files (.h5): make-dataset, training, evaluate --data"),
    "skimage": ("scikit-image", "evaluate", "the science report's Richardson-Lucy baseline"),
}


def require(module):
    """Import the optional top-level ``module`` (a key of `OPTIONAL`) and return it; raise
    `VQVAEMissingExtraError` naming the extra that installs it when it is missing."""
    try:  # plain imports: the package imports nothing by a computed name (tests/test_security.py)
        if module == "matplotlib":
            import matplotlib
            return matplotlib
        if module == "h5py":
            import h5py
            return h5py
        if module == "skimage":
            import skimage
            return skimage
    except ImportError:
        pip_name, extra, what = OPTIONAL[module]
        raise VQVAEMissingExtraError(
            f"{pip_name} is not installed; it is needed for {what}: "
            f"pip install \"galsim_vqvae[{extra}]\"") from None
    raise KeyError(f"{module!r} is not an optional dependency of galsim_vqvae")
