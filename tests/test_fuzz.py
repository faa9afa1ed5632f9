"""Property-based fuzzing of everything that reads user files or configs.

The FITS reader, the dataset reader, the model loader and the GalSim config builder get random
and mutated inputs (truncated, bit-flipped, re-typed, random fields and values). Each either
works or raises one of the documented errors (`VQVAEInputError` and its subclass
`VQVAEFormatError`; GalSim's errors from the config types), never anything else.

The budget is small by default (a few seconds per reader); ``HYPOTHESIS_PROFILE=long`` runs
``LONG_FACTOR`` times more inputs. ``pytest --hypothesis-show-statistics`` reports how many
inputs each test tried.
"""

import io
import json
import os
import shutil

import galsim
import h5py
import numpy as np
import pytest
import torch
from astropy.io import fits
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from galsim_vqvae.data.dataset import GalaxyDataset, load_arrays, read_header
from galsim_vqvae.data.fits import image_scale, read_image
from galsim_vqvae.emulator import Emulator
from galsim_vqvae.errors import VQVAEInputError
from galsim_vqvae.outputs import read_stamps
from test_errors import write_dataset

# A damaged FITS file makes astropy warn (truncated file, bad header cards) before our error is
# raised: expected here, so not reported.
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::astropy.utils.exceptions.AstropyUserWarning")]

LONG_FACTOR = 20
_LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
_CHECKS = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
           HealthCheck.data_too_large, HealthCheck.filter_too_much]


def budget(n):
    """Hypothesis settings for ``n`` inputs (``LONG_FACTOR`` times more in the long profile)."""
    return settings(max_examples=n * (LONG_FACTOR if _LONG else 1), deadline=None,
                    database=None, suppress_health_check=_CHECKS)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def scratch(work, name):
    """A fresh path in ``work`` (hypothesis reuses the module's folder between inputs)."""
    path = os.path.join(work, name)
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)
    return path


# ------------------------------------------------------------------------------------------------
# Byte-level mutations, shared by the readers
@st.composite
def mutated(draw, data):
    """``data`` truncated, with bytes overwritten, or both."""
    data = bytearray(data)
    kind = draw(st.sampled_from(["truncate", "flip", "both", "splice"]))
    if kind in ("flip", "both"):
        for _ in range(draw(st.integers(1, 12))):
            # half the edits land in the first 4 kB, where the headers are
            limit = min(len(data), 4096) if draw(st.booleans()) else len(data)
            pos = draw(st.integers(0, limit - 1))
            data[pos] = draw(st.integers(0, 255))
    if kind == "splice":
        pos = draw(st.integers(0, len(data)))
        data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
    if kind in ("truncate", "both"):
        data = data[:draw(st.integers(0, len(data) - 1))]
    return bytes(data)


# ------------------------------------------------------------------------------------------------
# FITS reader
def read_fits_everywhere(path):
    """The FITS reader as make-dataset (2-D image + pixel scale) and the command (stamps) use it."""
    try:
        data, header = read_image(path)
        assert data.ndim == 2 and np.isfinite(data).all()
        image_scale(header, None, path, default=0.06)
    except VQVAEInputError:
        pass
    try:
        stamps = read_stamps(path, "--input", stamp_size=8, pixel_scale=0.03, psf=True)
        assert stamps.ndim == 3 and stamps.shape[1:] == (8, 8)
        assert (stamps.sum(axis=(1, 2)) > 0).all()
    except VQVAEInputError:
        pass


header_values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=32), st.integers(-10 ** 6, 10 ** 6),
    st.booleans(), st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126),
                           max_size=12))
header_keys = st.sampled_from(["PIXSCALE", "PIXSCAL", "GS_SCALE", "CD1_1", "CD1_2", "CD2_1",
                               "CD2_2", "CDELT1", "CDELT2", "CTYPE1", "CTYPE2", "CUNIT1",
                               "BSCALE", "BZERO", "OBJECT"])


@st.composite
def fits_files(draw):
    """The HDUs of a random FITS file: arrays of random shapes, types and values, random
    headers, tables before or instead of images."""
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.int16, np.int32, np.uint8]))
    array = None
    if ndim:
        values = draw(st.sampled_from(["noise", "zeros", "negative", "nan", "inf", "ones"]))
        rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
        array = rng.normal(1.0, 1.0, shape)
        array = {"zeros": 0 * array, "negative": -abs(array), "ones": 1 + 0 * array}.get(
            values, array)
        if values in ("nan", "inf") and array.size:
            array.flat[rng.integers(array.size)] = np.nan if values == "nan" else np.inf
        if np.issubdtype(dtype, np.integer):
            array = np.nan_to_num(array, posinf=9, neginf=-9)
        array = array.astype(dtype)
    header = fits.Header()
    for key, value in draw(st.dictionaries(header_keys, header_values, max_size=5)).items():
        header[key] = value
    layout = draw(st.sampled_from(["primary", "extension", "table-first", "table-only"]))
    table = fits.BinTableHDU.from_columns([fits.Column(name="x", format="D", array=[1.0, 2.0])])
    if layout == "primary":
        return [fits.PrimaryHDU(array, header=header)]
    if layout == "extension":
        return [fits.PrimaryHDU(), fits.ImageHDU(array, header=header)]
    if layout == "table-first":
        return [fits.PrimaryHDU(), table, fits.ImageHDU(array, header=header)]
    return [fits.PrimaryHDU(), table]


@budget(120)
@given(hdus=fits_files())
def test_fits_reader_on_random_files(work, hdus):
    path = scratch(work, "random.fits")
    try:
        fits.HDUList(hdus).writeto(path)
    except Exception:  # noqa: BLE001 - astropy refuses to write it: not an input we can make
        assume(False)
    read_fits_everywhere(path)


def _valid_fits():
    buffer = io.BytesIO()
    y, x = np.mgrid[:8, :8] - 4
    image = np.exp(-(x ** 2 + y ** 2) / 4.0)
    header = fits.Header({"PIXSCALE": 0.03, "CD1_1": 8e-6, "CD2_2": 8e-6, "CTYPE1": "RA---TAN"})
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.stack([image, image]),
                                                   header=header)]).writeto(buffer)
    return buffer.getvalue()


VALID_FITS = _valid_fits()


@budget(120)
@given(data=mutated(VALID_FITS))
def test_fits_reader_on_mutated_files(work, data):
    path = scratch(work, "mutated.fits")
    with open(path, "wb") as f:
        f.write(data)
    read_fits_everywhere(path)


# ------------------------------------------------------------------------------------------------
# Dataset reader
def read_dataset_everywhere(path):
    """Every reader of dataset files: header, arrays (all, some rows), the torch Dataset, and the
    training loop's split loader."""
    from galsim_vqvae.train.vqvae import TRAIN_KEYS, load_split

    try:
        header = read_header(path)
    except VQVAEInputError:
        return
    n = header["n"]
    for call in (lambda: load_arrays(path),
                 lambda: load_arrays(path, indices=[0, n - 1, 0] if n else []),
                 lambda: load_split(path, "train", TRAIN_KEYS),
                 lambda: [GalaxyDataset(path)[k] for k in range(min(n, 3))]):
        try:
            call()
        except VQVAEInputError:
            pass


@pytest.fixture(scope="module")
def valid_datasets(work):
    out = {}
    for compression in (None, "gzip"):
        path = write_dataset(os.path.join(work, f"valid_{compression}.h5"), size=8, n=12,
                             compression=compression)
        with open(path, "rb") as f:
            out[compression] = f.read()
    return out


@budget(100)
@given(data=st.data(), compression=st.sampled_from([None, "gzip"]))
def test_dataset_reader_on_mutated_files(work, valid_datasets, data, compression):
    path = scratch(work, "mutated.h5")
    with open(path, "wb") as f:
        f.write(data.draw(mutated(valid_datasets[compression])))
    read_dataset_everywhere(path)


# Dict keys are never empty: GalSim's own config code indexes key[0] while it walks a config
# (galsim.config.util.RemoveCurrent, PropagateIndexKeyRNGNum), before any of ours runs.
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2 ** 40, 2 ** 40),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(min_size=1, max_size=6), inner, max_size=4)),
    max_leaves=8)
DATASET_NAMES = ["observed", "truth", "psf_bank", "psf_index", "sigma", "params", "params/mag",
                 "params/hlr"]


@st.composite
def dataset_edits(draw):
    """A list of structural edits of a dataset file: attributes re-typed or removed, arrays
    removed, replaced by arrays of other shapes and types, or by groups."""
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["attr", "del-attr", "del", "array", "group"]))
        if kind == "attr":
            value = draw(st.one_of(st.integers(-10 ** 9, 10 ** 9), st.floats(), st.text(max_size=8),
                                   st.booleans(), st.lists(st.integers(0, 99), min_size=1,
                                                           max_size=3)))
            edits.append((kind, draw(st.sampled_from(
                ["format_version", "stamp_size", "pixel_scale", "zeropoint", "band", "source",
                 "format"])), value))
        elif kind == "del-attr":
            edits.append((kind, draw(st.sampled_from(["stamp_size", "pixel_scale", "band"])),
                          None))
        elif kind == "del":
            edits.append((kind, draw(st.sampled_from(DATASET_NAMES)), None))
        else:
            shape = tuple(draw(st.lists(st.integers(0, 13), min_size=0, max_size=3)))
            dtype = draw(st.sampled_from(["f4", "f8", "i4", "i8", "u1", "S4"]))
            fill = draw(st.sampled_from([0, 1, -1, 99, np.nan]))
            edits.append((kind, draw(st.sampled_from(DATASET_NAMES)), (shape, dtype, fill)))
    return edits


def apply_edits(path, edits):
    with h5py.File(path, "r+") as f:
        for kind, name, value in edits:
            if kind == "attr":
                if name in f.attrs:
                    del f.attrs[name]
                f.attrs[name] = value
            elif kind == "del-attr":
                if name in f.attrs:
                    del f.attrs[name]
            elif name in f:
                del f[name]
            if kind == "array":
                shape, dtype, fill = value
                if dtype == "S4":
                    f.create_dataset(name, data=np.full(shape, b"ab", dtype="S4"))
                else:
                    with np.errstate(invalid="ignore"):
                        array = np.full(shape, fill, dtype=np.float64).astype(dtype)
                    f.create_dataset(name, data=array)
            elif kind == "group":
                f.create_group(name)


@budget(100)
@given(edits=dataset_edits())
def test_dataset_reader_on_edited_files(work, valid_datasets, edits):
    path = scratch(work, "edited.h5")
    with open(path, "wb") as f:
        f.write(valid_datasets[None])
    try:
        apply_edits(path, edits)
    except (ValueError, TypeError, KeyError, OSError):
        assume(False)  # h5py cannot make this edit
    read_dataset_everywhere(path)


# ------------------------------------------------------------------------------------------------
# Model loader
def load_and_use(path, conditions=None):
    """Load a model bundle; if it loads, sample a galaxy from it."""
    try:
        emulator = Emulator.load(path)
    except VQVAEInputError:  # VQVAEFormatError
        return
    info = emulator.metadata["conditions"]
    names = emulator.condition_names
    if conditions is None and names:
        conditions = {k: 0.5 * (lo + hi) for k, lo, hi in zip(names, info["min"], info["max"])}
    try:
        images = emulator.sample(1, conditions, seed=0)
    except VQVAEInputError:
        return
    assert images.shape == (1, emulator.stamp_size, emulator.stamp_size)


@pytest.fixture(scope="module")
def model_bytes(tiny_emulator):
    with open(tiny_emulator.path, "rb") as f:
        return f.read()


@budget(80)
@given(data=st.data())
def test_model_loader_on_mutated_files(work, model_bytes, data):
    path = scratch(work, "mutated.safetensors")
    with open(path, "wb") as f:
        f.write(data.draw(mutated(model_bytes)))
    load_and_use(path)


def _metadata_paths(meta, prefix=()):
    for key, value in meta.items():
        yield prefix + (key,)
        if isinstance(value, dict):
            yield from _metadata_paths(value, prefix + (key,))


@st.composite
def metadata_edits(draw, meta):
    """The metadata of a bundle with 1-3 fields (at any depth) removed or given random values."""
    meta = json.loads(json.dumps(meta))
    paths = sorted(_metadata_paths(meta))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        parent = meta
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue
        if draw(st.booleans()) and path[-1] in parent:
            del parent[path[-1]]
        else:
            old = parent.get(path[-1])
            similar = st.integers(-3, 3).map(lambda d: old + d) if isinstance(old, int) \
                and not isinstance(old, bool) else json_values
            parent[path[-1]] = draw(st.one_of(json_values, similar))
    return meta


@pytest.fixture(scope="module")
def bundle(tiny_emulator):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(tiny_emulator.path, framework="pt") as f:
        meta = json.loads(f.metadata()["galsim_vqvae"])
    return meta, load_file(tiny_emulator.path)


@budget(100)
@given(data=st.data())
def test_model_loader_on_edited_metadata(work, bundle, data):
    from safetensors.torch import save_file

    meta, tensors = bundle
    edited = data.draw(metadata_edits(meta))
    path = scratch(work, "edited.safetensors")
    save_file(tensors, path, metadata={"galsim_vqvae": json.dumps(edited)})
    load_and_use(path)


@budget(40)
@given(data=st.data())
def test_model_loader_on_edited_tensors(work, bundle, data):
    from safetensors.torch import save_file

    meta, tensors = bundle
    tensors = dict(tensors)
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(tensors)))
        kind = data.draw(st.sampled_from(["drop", "reshape", "retype", "extra", "nan"]))
        t = tensors.pop(key)
        if kind == "reshape":
            tensors[key] = torch.zeros(data.draw(st.lists(st.integers(0, 5), max_size=3)))
        elif kind == "retype":
            tensors[key] = t.to(data.draw(st.sampled_from([torch.int8, torch.float16,
                                                           torch.bool, torch.int64])))
        elif kind == "extra":
            tensors[key] = t
            tensors[key + ".extra"] = torch.ones(2)
        elif kind == "nan":
            tensors[key] = t.float().fill_(float("nan")) if t.numel() else t
    path = scratch(work, "tensors.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, path,
              metadata={"galsim_vqvae": json.dumps(meta)})
    load_and_use(path)


# ------------------------------------------------------------------------------------------------
# Config builder
GALAXY_FIELDS = ["conditions", "index", "flux", "flux_rescale", "x_interpolant", "k_interpolant",
                 "pad_factor", "conditons", "fluxx", "indx", "seed", "mag"]
MODEL_FIELDS = ["file_name", "device", "batch_size", "resolution_policy", "out_of_range",
                "num_threads", "file_nam", "devices", "batchsize"]
config_values = st.one_of(
    json_values, st.floats(-5, 30), st.integers(-3, 40),
    st.sampled_from(["cpu", "cuda", "mps", "meta", "cuda:3", "gpu", "warn", "raise", "clip",
                     "error", "lanczos3", "quintic", "nope", "$1+1", "@gal.flux"]),
    st.fixed_dictionaries({"type": st.sampled_from(["Random", "Sequence", "Nope"]),
                           "min": st.floats(15, 30), "max": st.floats(15, 30)}))


@st.composite
def conditions(draw):
    keys = draw(st.lists(st.sampled_from(["mag", "hlr", "size", "MAG"]), max_size=3,
                         unique=True))
    return {k: draw(st.one_of(st.floats(19, 26) if k == "mag" else st.floats(0, 2),
                              config_values)) for k in keys}


@budget(100)
@given(data=st.data())
def test_config_builder_on_random_blocks(tiny_emulator, work, data):
    gal = {"type": "VQVAEGalaxy"}
    for key in data.draw(st.lists(st.sampled_from(GALAXY_FIELDS), max_size=4, unique=True)):
        gal[key] = data.draw(conditions() if key in ("conditions", "conditons")
                             else config_values)
    model = {"file_name": tiny_emulator.path}
    for key in data.draw(st.lists(st.sampled_from(MODEL_FIELDS), max_size=3, unique=True)):
        model[key] = data.draw(st.one_of(config_values, st.just(tiny_emulator.path),
                                         st.just(os.path.join(work, "absent.safetensors"))))
    config = {"modules": ["galsim_vqvae"], "input": {"vqvae_model": model}, "gal": gal,
              "psf": {"type": "Gaussian", "fwhm": 0.7},
              "image": {"type": "Single", "size": 16, "pixel_scale": 0.2, "random_seed": 3}}
    try:
        image = galsim.config.BuildImage(config)
    except galsim.GalSimError:
        return
    assert np.isfinite(image.array).all()


def test_dataset_files_carry_checksums(work):
    """Dataset files are written with HDF5 1.10 structures (checksummed metadata) and fletcher32
    on every array: bit flips in the headers, which crashed libhdf5 itself in about 1 in 400
    mutated files of the older layout, are refused with the documented error."""
    import h5py

    path = write_dataset(os.path.join(work, "checksummed.h5"), size=8, n=12)
    with h5py.File(path, "r") as f:
        assert f.id.get_create_plist().get_version()[0] >= 3  # superblock v3: checksummed
        assert all(f[k].fletcher32 for k in ("observed", "sigma", "psf_bank"))
    data0 = open(path, "rb").read()
    refused = 0
    for seed in range(150):
        rng = np.random.default_rng(seed)
        data = bytearray(data0)
        for _ in range(rng.integers(1, 13)):
            data[rng.integers(0, min(len(data), 4096))] = rng.integers(0, 256)
        target = scratch(work, "flipped.h5")
        with open(target, "wb") as f:
            f.write(data)
        try:
            read_header(target)
            load_arrays(target)
        except VQVAEInputError:
            refused += 1
    assert refused > 100  # nearly every header edit is caught


def test_damaged_pixel_scale_card(work):
    """Found by the long fuzz run: astropy parses a card only when it is read, so a damaged
    PIXSCALE card raised astropy's VerifyError from deep inside the scale lookup."""
    path = scratch(work, "damaged_card.fits")
    hdu = fits.PrimaryHDU(np.random.default_rng(3).normal(size=(8, 8)).astype(np.float32))
    hdu.header["PIXSCALE"] = 0.03
    hdu.writeto(path)
    raw = bytearray(open(path, "rb").read())
    at = raw.index(b"PIXSCALE=") + 10
    raw[at:at + 20] = b"     0.0x3#!'junk'  "
    with open(path, "wb") as f:
        f.write(raw)
    _, header = read_image(path)
    with pytest.raises(VQVAEInputError, match="damaged_card.fits.*cannot be parsed"):
        image_scale(header, None, path)
    with pytest.raises(VQVAEInputError, match="damaged_card.fits"):
        read_stamps(path, "--input", stamp_size=8, pixel_scale=0.03)
