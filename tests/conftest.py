"""Shared fixtures for the whole test suite."""

import pytest

from tiny_model import save_tiny_emulator, tiny_label_table  # noqa: F401


@pytest.fixture(scope="session")
def tiny_emulator(tmp_path_factory):
    """A small random-weight `Emulator` (32x32 stamps at 0.03"/pixel, 8x8 code maps, 32 codes,
    a Gated PixelCNN conditioned on ``mag`` and ``hlr``), saved to a temporary directory and
    loaded back from there: ``tiny_emulator.path`` is its ``model.safetensors``.

    Its weights are random (seeded), so its galaxies are smooth positive blobs, not realistic
    ones; it exercises every code path at a fraction of the cost of the real model.
    """
    from galsim_vqvae.emulator import Emulator

    path = tmp_path_factory.mktemp("tiny_model") / "model.safetensors"
    save_tiny_emulator(path)
    return Emulator.load(path)


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored afterwards: the tiny tensors of most tests run as
    fast on one thread and never stall in OpenMP barriers on a busy machine. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")`` (the op tests keep every thread, so
    that ``at::parallel_for`` is exercised)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
