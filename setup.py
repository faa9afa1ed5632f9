"""Build and install galsim_vqvae.

The C++ ops in csrc/ (module ``galsim_vqvae._C``) are compiled when torch is importable at build
time, i.e. with ``pip install --no-build-isolation .``; the CUDA kernel (module
``galsim_vqvae._C_cuda``) also needs a torch with CUDA and ``nvcc``. Each compiled module is
optional: a failed build prints a warning and the package installs without it; without any, the
ops fall back to PyTorch, announced by ``galsim_vqvae.ops.backend()``. Environment variables:
``GALSIM_VQVAE_NO_EXT=1`` builds no extension, ``GALSIM_VQVAE_NO_CUDA=1`` skips the CUDA one,
``GALSIM_VQVAE_CXXFLAGS`` adds compiler flags (e.g. ``-march=native`` for a local build).
"""

import os
import shutil
import sys

from setuptools import find_packages, setup

exec(open("galsim_vqvae/_version.py").read())


def _warn(message):
    bar = "=" * 78
    print(f"\n{bar}\nWARNING (galsim_vqvae): {message}\n{bar}\n", file=sys.stderr, flush=True)


def _extensions():
    """The compiled modules to build, and the build_ext command that builds them (or none)."""
    if os.environ.get("GALSIM_VQVAE_NO_EXT") == "1":
        _warn("GALSIM_VQVAE_NO_EXT=1: building no compiled ops; the PyTorch fallback will be used.")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # isolated build, or torch missing
        _warn(f"torch is not importable at build time ({exc.__class__.__name__}: {exc}); installing "
              "the pure-Python package (ops fall back to PyTorch). To compile the ops, install torch "
              "first, then `pip install --no-build-isolation .`")
        return [], {}

    here = os.path.dirname(os.path.abspath(__file__))
    extra = os.environ.get("GALSIM_VQVAE_CXXFLAGS", "").split()
    cxx = ["-O3", "-fno-math-errno"] + extra
    if sys.platform != "win32":
        cxx += ["-fvisibility=hidden"]
    # at::parallel_for runs serially unless the extension itself is compiled with OpenMP (ATen's
    # inline parallel_for tests _OPENMP): without it the C++ ops used one thread whatever
    # torch.set_num_threads said. libgomp is torch's own (same soname, already loaded).
    link = []
    if sys.platform.startswith("linux") and getattr(torch._C, "has_openmp", False):
        cxx += ["-fopenmp"]
        link += ["-fopenmp"]
    include = [os.path.join(here, "csrc")]
    exts = [CppExtension("galsim_vqvae._C", ["csrc/ops.cpp", "csrc/cpu/nearest_code.cpp",
                                             "csrc/cpu/pixelcnn_sample.cpp"],
                         include_dirs=include, extra_compile_args={"cxx": cxx},
                         extra_link_args=link)]
    want_cuda = os.environ.get("GALSIM_VQVAE_NO_CUDA") != "1"
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    if want_cuda and torch.version.cuda and nvcc and os.path.exists(nvcc):
        exts.append(CUDAExtension(
            "galsim_vqvae._C_cuda", ["csrc/cuda/register.cpp", "csrc/cuda/nearest_code.cu",
                                     "csrc/cuda/pixelcnn_sample.cu"],
            include_dirs=include,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, extra_link_args=link))
    elif want_cuda and torch.version.cuda:
        _warn("torch has CUDA but nvcc was not found: building the CPU op only.")

    class OptionalBuildExtension(BuildExtension):
        """Builds each extension if it can; a failure is a warning, never a broken install."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                _warn(f"could not build {ext.name} ({exc.__class__.__name__}: {exc}); installing "
                      "without it (see the compiler output above). galsim_vqvae.ops.backend() will "
                      "say which implementation runs.")

    return exts, {"build_ext": OptionalBuildExtension.with_options(use_ninja=bool(shutil.which("ninja")))}


ext_modules, cmdclass = _extensions()

setup(
    name="galsim_vqvae",
    version=__version__,  # noqa: F821
    description="A learned (VQ-VAE + Gated PixelCNN) galaxy model for GalSim",
    packages=find_packages(include=["galsim_vqvae", "galsim_vqvae.*"]),
    package_data={"galsim_vqvae": ["models/default/*"]},
    python_requires=">=3.9",
    # Drawing galaxies needs only these; the extras add what datasets, training, figures and the
    # science report need (galsim_vqvae/extras.py names the extra when one is missing).
    install_requires=[
        "galsim>=2.5", "torch>=2.1", "astropy", "numpy", "scipy", "tqdm", "safetensors",
        "pyyaml",
    ],
    extras_require={
        "plots": ["matplotlib"],
        "train": ["h5py", "matplotlib"],
        "evaluate": ["h5py", "matplotlib", "scikit-image"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "h5py", "matplotlib",
                 "scikit-image"],
    },
    entry_points={"console_scripts": ["galsim-vqvae = galsim_vqvae.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
