"""The Emulator bundle: round trip, reproducible sampling, conditions, and bad model files."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from scipy.signal import fftconvolve

from galsim_vqvae.emulator import Emulator
from galsim_vqvae.errors import VQVAEFormatError, VQVAEInputError

COND = {"mag": [20.5, 22.0, 24.5], "hlr": [0.3, 0.5, 1.1]}


def _rewrite(src, dst, edit_metadata=None, edit_tensors=None):
    with safe_open(str(src), framework="pt") as f:
        header = dict(f.metadata())
    tensors = load_file(str(src))
    meta = json.loads(header["galsim_vqvae"])
    if edit_metadata:
        edit_metadata(meta)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(dst), metadata={"galsim_vqvae": json.dumps(meta)})
    return dst


def test_round_trip_keeps_weights_and_metadata(tiny_emulator, tmp_path):
    path = tmp_path / "copy.safetensors"
    tiny_emulator.save(path)
    again = Emulator.load(path)
    assert again.metadata == tiny_emulator.metadata
    for a, b in zip(tiny_emulator.vqvae.state_dict().values(), again.vqvae.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(tiny_emulator.prior.state_dict().values(), again.prior.state_dict().values()):
        assert torch.equal(a, b)
    np.testing.assert_array_equal(again.psf_image, tiny_emulator.psf_image)
    np.testing.assert_array_equal(again.sample(3, COND, seed=11), tiny_emulator.sample(3, COND, seed=11))


def test_same_seed_same_galaxies_and_batch_independence(tiny_emulator):
    a = tiny_emulator.sample_codes(3, COND, seed=123)
    b = tiny_emulator.sample_codes(3, COND, seed=123)
    np.testing.assert_array_equal(a, b)
    c = tiny_emulator.sample_codes(3, COND, seed=124)
    assert not np.array_equal(a, c)
    # Sample 1 drawn alone with its own seed equals sample 1 of the batch.
    seeds = tiny_emulator._seeds(123, 3)
    alone = tiny_emulator.sample_codes(1, {k: [v[1]] for k, v in COND.items()}, seed=[seeds[1]])
    np.testing.assert_array_equal(alone[0], a[1])
    # Batch size of the network calls does not change anything either.
    np.testing.assert_array_equal(tiny_emulator.sample_codes(3, COND, seed=123, batch_size=2), a)


def test_sample_is_decode_of_sample_codes(tiny_emulator):
    codes = tiny_emulator.sample_codes(2, {"mag": 21.0, "hlr": 0.4}, seed=3)
    images = tiny_emulator.sample(2, {"mag": 21.0, "hlr": 0.4}, seed=3)
    s = tiny_emulator.stamp_size
    assert images.shape == (2, s, s) and images.dtype == np.float32
    assert (images >= 0).all() and images.sum() > 0
    np.testing.assert_array_equal(images, tiny_emulator.decode(codes))
    # in chunks, each decoded where it is drawn: the same codes whatever the chunk size, so the
    # same images up to the float32 decoder's rounding at other batch sizes (exactly the same
    # where the chunks are whole blocks of decode's 256)
    cond = {"mag": np.linspace(20.0, 25.0, 7), "hlr": np.linspace(0.2, 1.2, 7)}
    whole = tiny_emulator.sample(7, cond, seed=5, batch_size=7)
    np.testing.assert_array_equal(whole, tiny_emulator.decode(
        tiny_emulator.sample_codes(7, cond, seed=5)))
    np.testing.assert_allclose(tiny_emulator.sample(7, cond, seed=5, batch_size=3), whole,
                               rtol=1e-5, atol=1e-5 * whole.max())
    with pytest.raises(VQVAEInputError, match=r"unknown keyword arguments \['colour'\]"):
        tiny_emulator.sample(2, {"mag": 21.0, "hlr": 0.4}, seed=3, colour="red")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_sample_pipeline_is_decode_of_sample_codes(tiny_emulator):
    """On the GPU, Emulator.sample decodes each chunk on a side stream into pinned buffers while
    the next chunk is sampled: the same images as decode(sample_codes) there, for chunk counts
    that reuse both buffers, and the same codes as on the CPU."""
    from galsim_vqvae.emulator import Emulator
    gpu = Emulator.load(tiny_emulator.path, device="cuda")
    n = 11
    cond = {"mag": np.linspace(20.0, 25.0, n), "hlr": np.linspace(0.2, 1.2, n)}
    codes = gpu.sample_codes(n, cond, seed=8)
    np.testing.assert_array_equal(codes, tiny_emulator.sample_codes(n, cond, seed=8))
    reference = gpu.decode(codes)
    for batch in (n, None):
        np.testing.assert_array_equal(gpu.sample(n, cond, seed=8, batch_size=batch), reference)
    for batch in (2, 5):  # the decoder's float32 rounding may differ at other batch sizes
        np.testing.assert_allclose(gpu.sample(n, cond, seed=8, batch_size=batch), reference,
                                   rtol=1e-5, atol=1e-5 * reference.max())


def test_conditions_checks(tiny_emulator):
    with pytest.raises(VQVAEInputError, match="'mag' = 30 is outside the training range"):
        tiny_emulator.sample_codes(1, {"mag": 30.0, "hlr": 0.4}, seed=1)
    with pytest.warns(UserWarning, match="clipped"):
        clipped = tiny_emulator.sample_codes(1, {"mag": 30.0, "hlr": 0.4}, seed=1,
                                             out_of_range="clip")
    np.testing.assert_array_equal(
        clipped, tiny_emulator.sample_codes(1, {"mag": 25.5, "hlr": 0.4}, seed=1))
    with pytest.raises(VQVAEInputError, match="unknown label\\(s\\) \\['size'\\]"):
        tiny_emulator.sample_codes(1, {"mag": 22.0, "size": 0.4})
    with pytest.raises(VQVAEInputError, match="shape"):
        tiny_emulator.sample_codes(2, {"mag": [22.0, 23.0, 24.0], "hlr": 0.4})
    with pytest.raises(VQVAEInputError, match="non-finite"):
        tiny_emulator.sample_codes(1, {"mag": float("nan"), "hlr": 0.4})
    for n in (0, -1, 2.5, True):
        with pytest.raises(VQVAEInputError, match="positive integer"):
            tiny_emulator.sample_codes(n, {"mag": 22.0, "hlr": 0.4})
    with pytest.raises(VQVAEInputError, match="temperature"):
        tiny_emulator.sample_codes(1, {"mag": 22.0, "hlr": 0.4}, temperature=0)
    with pytest.raises(VQVAEInputError, match="sampling method 'magic'"):
        tiny_emulator.sample_codes(1, {"mag": 22.0, "hlr": 0.4}, method="magic")


def test_encode_decode_and_reconstruct(tiny_emulator):
    rng = np.random.default_rng(7)
    s = tiny_emulator.stamp_size
    observed = rng.normal(0.0, 0.1, (2, s, s)).astype(np.float32)
    observed[:, s // 2 - 3:s // 2 + 3, s // 2 - 3:s // 2 + 3] += rng.uniform(1, 3, (2, 6, 6))
    codes = tiny_emulator.encode(observed, noise_sigma=0.1)
    assert codes.shape == (2, s // 4, s // 4)
    # codes are unit-free: the reconstruction is the decoded image over the input factor
    decoded = tiny_emulator.decode(codes) / tiny_emulator.input_scale(observed, 0.1)[:, None, None]
    pre, chi_pre = tiny_emulator.reconstruct(observed, tiny_emulator.psf_image, 0.1)
    np.testing.assert_allclose(pre, decoded, rtol=1e-6)
    conv, chi = tiny_emulator.reconstruct(observed, tiny_emulator.psf_image, 0.1, convolved=True)
    c = s // 2  # the PSF is centred at pixel (S//2, S//2), as GalSim draws it
    ref = np.stack([fftconvolve(d.astype(np.float64), tiny_emulator.psf_image.astype(np.float64),
                                mode="full")[c:c + s, c:c + s] for d in decoded])
    np.testing.assert_allclose(conv, ref, atol=1e-5 * np.abs(ref).max())
    expected_chi = ((conv - observed) ** 2).mean(axis=(1, 2)) / 0.1 ** 2
    np.testing.assert_allclose(chi, expected_chi, rtol=1e-4)
    np.testing.assert_array_equal(chi_pre, chi)
    with pytest.raises(VQVAEInputError, match="observed must have shape"):
        tiny_emulator.encode(np.ones((2, s + 1, s)))
    with pytest.raises(VQVAEInputError, match="NaN"):
        tiny_emulator.encode(np.full((1, s, s), np.nan))
    with pytest.raises(VQVAEInputError, match="code values"):
        tiny_emulator.decode(np.full((1, s // 4, s // 4), 99))
    with pytest.raises(VQVAEInputError, match="noise_sigma"):
        tiny_emulator.reconstruct(observed, tiny_emulator.psf_image, -1.0)
    with pytest.raises(VQVAEInputError, match="positive sum"):
        tiny_emulator.reconstruct(observed, -tiny_emulator.psf_image, 0.1)


def test_bad_model_files(tiny_emulator, tmp_path):
    src = tiny_emulator.path
    with pytest.raises(VQVAEFormatError, match="not found"):
        Emulator.load(tmp_path / "nope.safetensors")
    data = open(src, "rb").read()
    for cut in (10, 400, len(data) // 2, len(data) - 8):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(VQVAEFormatError, match="corrupt or truncated"):
            Emulator.load(bad)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(VQVAEFormatError):
        Emulator.load(garbage)

    def version(m):
        m["format_version"] = 99
    with pytest.raises(VQVAEFormatError, match="format_version 99"):
        Emulator.load(_rewrite(src, tmp_path / "v99.safetensors", version))

    def codes(m):
        m["num_codes"] = 2 * m["num_codes"]
    with pytest.raises(VQVAEFormatError, match="num_codes 64 contradicts"):
        Emulator.load(_rewrite(src, tmp_path / "k.safetensors", codes))

    def channels(m):
        m["prior_config"]["channels"] *= 2
    with pytest.raises(VQVAEFormatError, match="has shape"):
        Emulator.load(_rewrite(src, tmp_path / "c.safetensors", channels))

    def drop(m):
        del m["pixel_scale"]
    with pytest.raises(VQVAEFormatError, match="lacks \\['pixel_scale'\\]"):
        Emulator.load(_rewrite(src, tmp_path / "p.safetensors", drop))

    def labels(m):
        m["conditions"]["names"] = ["mag"]
    with pytest.raises(VQVAEFormatError, match="condition labels"):
        Emulator.load(_rewrite(src, tmp_path / "l.safetensors", labels))

    def no_psf(t):
        del t["psf_image"]
    with pytest.raises(VQVAEFormatError, match="psf_image"):
        Emulator.load(_rewrite(src, tmp_path / "np.safetensors", edit_tensors=no_psf))

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.ones(2)}, str(plain))
    with pytest.raises(VQVAEFormatError, match="not a galsim_vqvae model"):
        Emulator.load(plain)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_clear_error(tiny_emulator):
    with pytest.raises(VQVAEInputError, match="no usable CUDA GPU"):
        Emulator.load(tiny_emulator.path, device="cuda")


def test_save_is_atomic(tiny_emulator, tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    tiny_emulator.save(path)
    before = path.read_bytes()
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save", broken)
    with pytest.raises(OSError, match="No space left"):
        tiny_emulator.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_fast_sampler_is_the_default_and_equals_the_naive_oracle(tiny_emulator, monkeypatch):
    import galsim_vqvae.emulator as gemulator

    ran = []
    for name, sampler in list(gemulator._SAMPLERS.items()):
        def spy(*args, _name=name, _sampler=sampler, **kwargs):
            ran.append(_name)
            return _sampler(*args, **kwargs)
        monkeypatch.setitem(gemulator._SAMPLERS, name, spy)
    cond = {"mag": [20.0, 23.0, 25.5, 21.0], "hlr": [0.2, 0.6, 1.5, 0.1]}
    fast = tiny_emulator.sample_codes(4, cond, seed=99)
    assert ran and set(ran) == {"fast"}, ran  # the default ran the fast sampler, only it
    np.testing.assert_array_equal(fast, tiny_emulator.sample_codes(4, cond, seed=99,
                                                                   method="fast"))
    np.testing.assert_array_equal(fast, tiny_emulator.sample_codes(4, cond, seed=99,
                                                                   method="naive"))
