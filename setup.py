"""Build and install galsim_vqvae.

The C++ (and, where torch has CUDA and nvcc exists, CUDA) ops in csrc/ are compiled only when
torch is importable at build time, i.e. with ``pip install --no-build-isolation .``. A failed
optional build prints a warning and installs the pure-Python package, whose ops fall back to
PyTorch (announced by ``galsim_vqvae.ops.backend()``).
"""

from setuptools import find_packages, setup

exec(open("galsim_vqvae/_version.py").read())

setup(
    name="galsim_vqvae",
    version=__version__,  # noqa: F821
    description="A learned (VQ-VAE + Gated PixelCNN) galaxy model for GalSim",
    packages=find_packages(include=["galsim_vqvae", "galsim_vqvae.*"]),
    package_data={"galsim_vqvae": ["models/default/*"]},
    python_requires=">=3.9",
    install_requires=[
        "galsim>=2.5", "torch>=2.1", "astropy", "numpy", "scipy", "tqdm", "matplotlib",
        "safetensors", "h5py", "pyyaml",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis", "scikit-image"]},
    entry_points={"console_scripts": ["galsim-vqvae = galsim_vqvae.cli:main"]},
)
