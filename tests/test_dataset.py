"""Dataset file format: round trip, splits, streaming writer, atomicity, validation, torch Dataset."""

import h5py
import numpy as np
import pytest
import torch

from galsim_vqvae.data.dataset import (DatasetWriter, GalaxyDataset, load_arrays, read_header,
                                       split_indices)
from galsim_vqvae.errors import VQVAEFormatError, VQVAEInputError

S = 12


def _random_psfs(rng, p):
    psf = rng.uniform(0.1, 1.0, size=(p, S, S))
    return psf / psf.sum(axis=(1, 2), keepdims=True)


def _write(path, rng, n=37, chunks=(10, 20, 7), truth=True, compression=None):
    psfs = _random_psfs(rng, 3)
    data = dict(observed=rng.normal(size=(n, S, S)), truth=rng.normal(size=(n, S, S)),
                sigma=rng.uniform(0.1, 1, n), psf_index=rng.integers(0, 3, n),
                mag=rng.uniform(20, 25, n), hlr=rng.uniform(0.1, 1, n))
    with DatasetWriter(path, S, 0.06, "F160W", 25.94, "synthetic", description="test", seed=7,
                       compression=compression) as w:
        assert list(w.add_psfs(psfs[:2])) == [0, 1]
        assert list(w.add_psfs(psfs[2])) == [2]
        start = 0
        for c in chunks:
            sl = slice(start, start + c)
            w.append(observed=data["observed"][sl], sigma=data["sigma"][sl],
                     psf_index=data["psf_index"][sl],
                     truth=data["truth"][sl] if truth else None,
                     params={"mag": data["mag"][sl], "hlr": data["hlr"][sl]})
            start += c
    data["psf_bank"] = psfs
    return data


@pytest.mark.parametrize("compression", [None, "lzf", "gzip"])
def test_round_trip(tmp_path, compression):
    rng = np.random.default_rng(1)
    path = tmp_path / "d.h5"
    data = _write(path, rng, compression=compression)
    header = read_header(path)
    assert header["n"] == 37 and header["n_psf"] == 3 and header["has_truth"]
    assert header["format"] == "galsim_vqvae.dataset" and header["format_version"] == 1
    assert header["pixel_scale"] == 0.06 and header["stamp_size"] == S and header["seed"] == 7
    assert header["band"] == "F160W" and header["zeropoint"] == 25.94
    assert header["source"] == "synthetic" and "stamp sum" in header["flux_convention"]
    assert header["params"] == ["hlr", "mag"]
    arrays = load_arrays(path)
    for key in ("observed", "truth", "sigma", "psf_bank"):
        np.testing.assert_array_equal(arrays[key], data[key].astype(np.float32))
        assert arrays[key].dtype == np.float32
    np.testing.assert_array_equal(arrays["psf_index"], data["psf_index"])
    assert arrays["psf_index"].dtype == np.int32
    np.testing.assert_array_equal(arrays["params/mag"], data["mag"].astype(np.float32))
    # indices in any order with repeats, dense and sparse paths
    for idx in ([5, 3, 3, 36, 0], split_indices(37, "train"), np.arange(37)[::-1]):
        part = load_arrays(path, indices=idx, keys=("observed", "params/hlr", "psf_bank"))
        np.testing.assert_array_equal(part["observed"], data["observed"][idx].astype(np.float32))
        np.testing.assert_array_equal(part["params/hlr"], data["hlr"][idx].astype(np.float32))
        assert part["psf_bank"].shape == (3, S, S)
    with pytest.raises(VQVAEInputError, match="out of range"):
        load_arrays(path, indices=[37])
    with pytest.raises(VQVAEInputError, match="no array 'nope'"):
        load_arrays(path, keys=("nope",))


def test_split_rule():
    train, test = split_indices(103, "train"), split_indices(103, "test")
    assert list(test) == [i for i in range(103) if i % 10 == 9]
    assert sorted(np.concatenate([train, test])) == list(range(103))
    assert len(split_indices(103, None)) == 103
    with pytest.raises(VQVAEInputError):
        split_indices(10, "validation")


def test_exception_leaves_nothing(tmp_path):
    path = tmp_path / "d.h5"
    rng = np.random.default_rng(2)
    with pytest.raises(RuntimeError, match="boom"):
        with DatasetWriter(path, S, 0.06, "F160W", 25.94, "fits") as w:
            w.add_psfs(_random_psfs(rng, 1))
            w.append(observed=rng.normal(size=(4, S, S)), sigma=np.ones(4), psf_index=np.zeros(4))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    # a validation error inside the writer also leaves nothing
    with pytest.raises(VQVAEInputError, match="sums to"):
        with DatasetWriter(path, S, 0.06, "F160W", 25.94, "fits") as w:
            w.add_psfs(2 * _random_psfs(rng, 1))
    with pytest.raises(VQVAEInputError, match="psf_index"):
        with DatasetWriter(path, S, 0.06, "F160W", 25.94, "fits") as w:
            w.add_psfs(_random_psfs(rng, 1))
            w.append(observed=rng.normal(size=(2, S, S)), sigma=np.ones(2), psf_index=[0, 1])
    assert list(tmp_path.iterdir()) == []


def test_validation_errors_name_the_file(tmp_path):
    rng = np.random.default_rng(3)
    missing = tmp_path / "missing.h5"
    with pytest.raises(VQVAEFormatError, match="missing.h5"):
        read_header(missing)
    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    with pytest.raises(VQVAEFormatError, match="text.h5.*not a readable HDF5"):
        load_arrays(text)
    good = tmp_path / "good.h5"
    _write(good, rng)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[:3000])
    with pytest.raises(VQVAEFormatError, match="truncated.h5"):
        read_header(truncated)

    def variant(name, edit):
        path = tmp_path / name
        path.write_bytes(good.read_bytes())
        with h5py.File(path, "r+") as f:
            edit(f)
        return path

    cases = [("fmt.h5", lambda f: f.attrs.__setitem__("format", "other"), "format"),
             ("ver.h5", lambda f: f.attrs.__setitem__("format_version", 99), "format_version 99"),
             ("nosigma.h5", lambda f: f.__delitem__("sigma"), "missing dataset 'sigma'"),
             ("short.h5", lambda f: f["sigma"].resize((30,)), "sigma has shape"),
             ("param.h5", lambda f: f["params/mag"].resize((5,)), "params/mag")]
    for name, edit, message in cases:
        with pytest.raises(VQVAEFormatError, match=message):
            GalaxyDataset(variant(name, edit))


def test_galaxy_dataset_with_workers(tmp_path):
    rng = np.random.default_rng(4)
    path = tmp_path / "d.h5"
    data = _write(path, rng, n=30, chunks=(30,))
    ds = GalaxyDataset(path, split="test")
    assert len(ds) == 3
    item = ds[1]
    i = int(item["index"])
    assert i == 19
    assert item["observed"].shape == (1, S, S) and item["psf"].shape == (1, S, S)
    np.testing.assert_array_equal(item["observed"][0].numpy(), data["observed"][i].astype("f4"))
    np.testing.assert_array_equal(item["psf"][0].numpy(),
                                  data["psf_bank"][data["psf_index"][i]].astype("f4"))
    assert item["sigma"].shape == () and float(item["sigma"]) == np.float32(data["sigma"][i])
    assert "truth" in item and set(item["params"]) == {"mag", "hlr"}
    loader = torch.utils.data.DataLoader(GalaxyDataset(path, split="train"), batch_size=4,
                                         num_workers=2, shuffle=False)
    batches = list(loader)
    index = torch.cat([b["index"] for b in batches]).numpy()
    np.testing.assert_array_equal(index, split_indices(30, "train"))
    observed = torch.cat([b["observed"] for b in batches]).numpy()[:, 0]
    np.testing.assert_array_equal(observed, data["observed"][index].astype("f4"))
    assert batches[0]["params"]["mag"].shape == (4,)


def test_no_truth_dataset(tmp_path):
    rng = np.random.default_rng(5)
    path = tmp_path / "d.h5"
    _write(path, rng, n=10, chunks=(10,), truth=False)
    assert not read_header(path)["has_truth"]
    assert "truth" not in load_arrays(path) and "truth" not in GalaxyDataset(path)[0]
