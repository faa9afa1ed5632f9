"""Batch generation (`galsim_vqvae.generate`): the same seed gives the same galaxies, byte for
byte, whatever the number of shards or processes."""

import numpy as np
import pytest
import torch
from astropy.io import fits

from galsim_vqvae import generate as gen
from galsim_vqvae.devices import worker_device
from galsim_vqvae.errors import VQVAEFormatError, VQVAEInputError

pytestmark = pytest.mark.usefixtures("one_thread")


def run_conditions(n, rng):
    return {"mag": rng.uniform(20.5, 25.0, n), "hlr": rng.uniform(0.2, 1.4, n)}


def test_shard_range_tiles_the_blocks():
    rng = np.random.default_rng()
    for _ in range(200):
        n, batch = int(rng.integers(1, 500)), int(rng.integers(1, 40))
        blocks = -(-n // batch)
        shards = int(rng.integers(1, blocks + 1))
        ranges = [gen.shard_range(n, batch, shards, k) for k in range(shards)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        for (a, b), (c, _) in zip(ranges, ranges[1:]):
            assert b == c and a < b and a % batch == 0  # contiguous, whole blocks, none empty
        sizes = [-(-(b - a) // batch) for a, b in ranges]
        assert max(sizes) - min(sizes) <= 1  # near-equal parts
    with pytest.raises(VQVAEInputError, match="num_shards=4 exceeds the 3 block"):
        gen.shard_range(10, 4, 4, 0)
    with pytest.raises(VQVAEInputError, match=r"shard must be an integer in \[0, 1\], got 2"):
        gen.shard_range(10, 4, 2, 2)
    with pytest.raises(VQVAEInputError, match="batch_size must be an integer >= 1"):
        gen.shard_range(10, 0)


def test_shards_merge_to_the_one_process_file(tiny_emulator, tmp_path):
    """Any split, merged in any order, is the one-process file byte for byte; galaxy i is
    galaxy i of Emulator.sample with the same seed."""
    rng = np.random.default_rng()
    n, batch, seed = int(rng.integers(9, 30)), int(rng.integers(2, 5)), int(rng.integers(2**31))
    cond = run_conditions(n, rng)
    one = tmp_path / "one.fits"
    assert gen.generate_stamps(tiny_emulator, n, one, seed, cond, batch_size=batch) == (0, n)
    ref = one.read_bytes()
    blocks = -(-n // batch)
    for shards in sorted({2, 3, blocks}):
        paths = [tmp_path / f"s{shards}_{k}.fits" for k in range(shards)]
        for k in rng.permutation(shards):  # the order the shards are made in does not matter
            gen.generate_stamps(tiny_emulator, n, paths[k], seed, cond, num_shards=shards,
                                shard=int(k), batch_size=batch)
        merged = tmp_path / f"merged{shards}.fits"
        assert gen.merge_shards(list(rng.permutation(paths)), merged) == n
        assert merged.read_bytes() == ref, f"{shards} shards differ from one"

    with fits.open(one) as f:
        h, images, codes, table = f[0].header, f[0].data, f["CODES"].data, f["CONDITIONS"].data
        assert (h["NSAMPLE"], h["NTOTAL"], h["FIRST"], h["SEED"], h["BLOCK"], h["NOISEVER"]) == \
            (n, n, 0, seed, batch, 2)
        np.testing.assert_array_equal(table["mag"], cond["mag"])
        np.testing.assert_array_equal(table["hlr"], cond["hlr"])
        np.testing.assert_array_equal(codes, tiny_emulator.sample_codes(n, cond, seed=seed))
        np.testing.assert_allclose(images, tiny_emulator.sample(n, cond, seed=seed),
                                   rtol=1e-5, atol=1e-6 * np.abs(images).max())
    with fits.open(tmp_path / "s3_1.fits") as f:  # a shard holds its own rows
        first, last = gen.shard_range(n, batch, 3, 1)
        assert (f[0].header["FIRST"], f[0].header["NSAMPLE"]) == (first, last - first)
        np.testing.assert_array_equal(f["CONDITIONS"].data["mag"], cond["mag"][first:last])
        np.testing.assert_array_equal(f["CODES"].data, codes[first:last])


def test_generate_parallel_same_bytes(tiny_emulator, tmp_path):
    """2 spawned worker processes, 3 shards: the file one process writes."""
    rng = np.random.default_rng()
    n, seed = int(rng.integers(9, 20)), int(rng.integers(2**31))
    cond = np.stack([rng.uniform(21, 24, n), np.full(n, 0.5)], axis=1)  # an [n, C] array
    gen.generate_stamps(tiny_emulator, n, tmp_path / "one.fits", seed, cond, batch_size=3)
    shards = gen.generate_parallel(tiny_emulator, n, tmp_path / "par.fits", seed, cond,
                                   processes=2, num_shards=3, batch_size=3)
    assert shards == 3
    assert (tmp_path / "par.fits").read_bytes() == (tmp_path / "one.fits").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.fits", "par.fits"]  # no leftovers


def test_generate_parallel_error_in_a_worker(tiny_emulator, tmp_path):
    """A bad condition stops the run with the worker's error; nothing is left behind."""
    cond = {"mag": np.r_[22.0, 22.0, 22.0, 99.0], "hlr": 0.5}
    with pytest.raises(VQVAEInputError, match="condition 'mag' = 99 is outside"):
        gen.generate_parallel(tiny_emulator.path, 4, tmp_path / "x.fits", 1, cond, processes=2,
                              batch_size=2)
    assert list(tmp_path.iterdir()) == []


def test_merge_refuses_a_bad_set_of_shards(tiny_emulator, tmp_path):
    cond = {"mag": 22.0, "hlr": 0.5}
    p = [tmp_path / f"a{k}.fits" for k in range(3)]
    for k in range(3):
        gen.generate_stamps(tiny_emulator, 6, p[k], 5, cond, num_shards=3, shard=k,
                            batch_size=2)
    other = tmp_path / "other.fits"
    gen.generate_stamps(tiny_emulator, 6, other, 6, cond, num_shards=3, shard=2, batch_size=2)
    out = tmp_path / "out.fits"
    with pytest.raises(VQVAEInputError, match=r"3 shards; missing shard\(s\) \[1\]"):
        gen.merge_shards(p[::2], out)
    with pytest.raises(VQVAEInputError, match="are both shard 0"):
        gen.merge_shards([p[0], p[0], p[1], p[2]], out)
    with pytest.raises(VQVAEInputError, match=r"other.fits is not from the run .*SEED \(6 vs 5\)"):
        gen.merge_shards([p[0], p[1], other], out)
    plain = tmp_path / "plain.fits"
    fits.PrimaryHDU(np.zeros((2, 4, 4), np.float32)).writeto(plain)
    with pytest.raises(VQVAEFormatError, match="plain.fits is not a readable galaxy FITS"):
        gen.merge_shards([plain], out)
    with pytest.raises(VQVAEInputError, match="shard file not found: .*nope.fits"):
        gen.merge_shards([tmp_path / "nope.fits"], out)
    assert not out.exists()
    gen.merge_shards(p, out, remove=True)
    assert out.exists() and not any(q.exists() for q in p)


def test_generate_refuses_bad_arguments(tiny_emulator, tmp_path):
    out = tmp_path / "x.fits"
    with pytest.raises(VQVAEInputError, match="seed must be an integer >= 0, got None"):
        gen.generate_stamps(tiny_emulator, 4, out, None, {"mag": 22.0, "hlr": 0.5})
    with pytest.raises(VQVAEInputError, match=r"condition 'mag' must be a value or an array "
                                              r"of 4 values, got shape \(3,\)"):
        gen.generate_stamps(tiny_emulator, 4, out, 1, {"mag": [22.0] * 3, "hlr": 0.5})
    with pytest.raises(VQVAEInputError, match="output directory does not exist"):
        gen.generate_stamps(tiny_emulator, 4, tmp_path / "no" / "x.fits", 1)
    with pytest.raises(VQVAEInputError, match="model file not found: .*missing.safetensors"):
        gen.generate_parallel(tmp_path / "missing.safetensors", 4, out, 1)
    assert not out.exists()


def test_workers_spread_over_gpus(tiny_emulator, monkeypatch):
    """device='cuda' with several GPUs: worker w on cuda:(w mod count); one GPU, cuda:N or the
    CPU: as asked. Checked through the worker's own device choice with the GPU count patched."""
    assert [worker_device("cuda", w, 3) for w in range(5)] == \
        ["cuda:0", "cuda:1", "cuda:2", "cuda:0", "cuda:1"]
    assert worker_device("cuda", 4, 1) == "cuda"
    assert worker_device("cuda:1", 4, 3) == "cuda:1"
    assert worker_device("cpu", 4, 3) == "cpu"
    loaded = []

    def load(model, device):
        loaded.append(device)
        return tiny_emulator

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(gen, "_load", load)
    monkeypatch.setattr(gen, "generate_stamps", lambda emulator, **kw: None)
    for w in range(6):
        gen._worker(w, "model", "cuda", 0, [(0, "unused")], {})
    assert loaded == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]


def test_cli_sample_processes(tiny_emulator, tmp_path):
    """``galsim-vqvae sample --processes 2`` writes the file of one `generate_stamps` call."""
    from galsim_vqvae.cli import main

    n = 300  # two blocks of 256
    assert main(["sample", "--model", str(tiny_emulator.path), "--n", str(n), "--seed", "11",
                 "--conditions", "mag=22.5,hlr=0.6", "--processes", "2",
                 "--out", str(tmp_path / "cli.fits")]) == 0
    gen.generate_stamps(tiny_emulator, n, tmp_path / "one.fits", 11, {"mag": 22.5, "hlr": 0.6})
    assert (tmp_path / "cli.fits").read_bytes() == (tmp_path / "one.fits").read_bytes()
    assert main(["sample", "--model", str(tiny_emulator.path), "--n", "4", "--processes", "2",
                 "--out", str(tmp_path / "x.fits")]) == 2  # no --seed: one line, exit 2


def test_unconditional_model_shards(tiny_emulator, tmp_path):
    """An unconditional model: no CONDITIONS table, and shards still merge to the same bytes."""
    import copy

    from galsim_vqvae.emulator import Emulator
    from galsim_vqvae.nn.pixelcnn import GatedPixelCNN

    torch.manual_seed(int(np.random.default_rng().integers(2**31)))
    prior = GatedPixelCNN(num_codes=tiny_emulator.metadata["num_codes"], channels=8, layers=2,
                          kernel_size=3)
    metadata = dict(copy.deepcopy(tiny_emulator.metadata), conditions={"names": []},
                    prior_config=prior.config)
    emu = Emulator(copy.deepcopy(tiny_emulator.vqvae), prior, metadata, tiny_emulator.psf_image)
    gen.generate_stamps(emu, 7, tmp_path / "one.fits", 3, batch_size=2)
    paths = [tmp_path / f"s{k}.fits" for k in range(2)]
    for k in range(2):
        gen.generate_stamps(emu, 7, paths[k], 3, num_shards=2, shard=k, batch_size=2)
    gen.merge_shards(paths, tmp_path / "merged.fits")
    assert (tmp_path / "merged.fits").read_bytes() == (tmp_path / "one.fits").read_bytes()
    with fits.open(tmp_path / "one.fits") as f:
        assert "CONDITIONS" not in f and f[0].data.shape[0] == 7
    with pytest.raises(VQVAEInputError, match="this model is unconditional"):
        gen.generate_stamps(emu, 7, tmp_path / "x.fits", 3, {"mag": 22.0})
