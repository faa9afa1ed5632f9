"""Data-parallel training: ``torchrun`` with 2 gloo processes on the CPU, through the real CLI.

Two ranks of per-process batch B must do what one process does with the global batch 2B (the
same stamps each step, gradients and codebook statistics combined), hold bit-identical weights
and codebooks (the trainers check this at every checkpoint and fail otherwise), write their
outputs once, and resume with another number of processes.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from galsim_vqvae.errors import VQVAEInputError
from galsim_vqvae.train import distributed
from galsim_vqvae.train.checkpoint import load_checkpoint
from galsim_vqvae.train.prior import train_prior
from galsim_vqvae.train.core import BatchSchedule
from galsim_vqvae.train.vqvae import train_vqvae

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not torch.distributed.is_available(),
                                 reason="torch without torch.distributed")]

MODEL = dict(hidden=16, embed_dim=8, num_codes=32)  # what VQ_ARGS give the CLI
VQ_ARGS = ["--hidden", "16", "--embed-dim", "8", "--num-codes", "32", "--lr", "2e-3",
           "--warmup", "4", "--ae-warmup", "4", "--quiet"]


@pytest.fixture(scope="module")
def toy_file(tmp_path_factory):
    """80 toy stamps (72 for training) with mag and hlr labels, as a dataset file."""
    from galsim_vqvae.data.dataset import DatasetWriter
    from test_train_vqvae import toy_dataset

    d = toy_dataset(n=80)
    rng = np.random.default_rng(5)
    path = tmp_path_factory.mktemp("ddp") / "toy.h5"
    with DatasetWriter(path, stamp_size=32, pixel_scale=0.1, band="toy", zeropoint=25.0,
                       source="synthetic", seed=1) as w:
        w.add_psfs(d["psf_bank"])
        w.append(observed=d["observed"], sigma=d["sigma"], psf_index=d["psf_index"],
                 params={"mag": rng.uniform(20, 24, 80), "hlr": rng.uniform(0.2, 1.0, 80)})
    return path


def torchrun(*args, nproc=2):
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m galsim_vqvae.cli``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "galsim_vqvae.cli", *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def read_log(run):
    with open(run / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def assert_same_training(a, b, lr):
    """State dicts of two runs that differ by floating-point rounding only: integer buffers
    equal, nearly all values within 1e-6. Rounding can flip a near-tie of the nearest-code
    search (moving a few EMA counts), and Adam turns rounding-level differences of a near-zero
    gradient into steps of up to lr, so a few values differ by more."""
    assert a.keys() == b.keys()
    diffs = []
    for k in a:
        if a[k].is_floating_point():
            d = (a[k] - b[k]).abs().double()
            assert d.max() <= 2 * lr + 0.01 * a[k].abs().max(), (k, d.max())
            diffs.append(d.flatten())
        else:
            assert torch.equal(a[k], b[k]), k
    d = torch.cat(diffs)
    assert d.median() < 1e-6 and d.quantile(0.99) < 1e-4, (d.median(), d.quantile(0.99))


def test_rank_slices_tile_the_global_batch():
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(1))
    for world in (1, 2, 3):
        schedules = [BatchSchedule(100, 8, seed=4, device="cpu", rank=r, world_size=world)
                     for r in range(world)]
        one = BatchSchedule(100, 8 * world, seed=4, device="cpu")
        for step in (0, 3, 11, 40):  # across epochs
            parts = torch.cat([s.indices(step) for s in schedules])
            assert torch.equal(parts, one.indices(step))  # rank r: r-th slice of the global batch
        assert schedules[0].per_epoch == 100 // (8 * world)
    assert perm[distributed.rank_slice(2, 5, 1, 3)].tolist() == perm[35:40].tolist()
    with pytest.raises(VQVAEInputError, match="batch_size 8 x 2 processes exceeds the 10"):
        BatchSchedule(10, 8, 0, "cpu", rank=0, world_size=2)


@pytest.fixture(scope="module")
def two_rank_vqvae(toy_file, tmp_path_factory):
    """A 2-rank ``train-vqvae`` run of 40 steps (dead-code restarts every 3 updates):
    (run directory, what the command printed)."""
    run = tmp_path_factory.mktemp("vq") / "two"
    out = torchrun("train-vqvae", "--data", toy_file, "--out", run, "--steps", 40,
                   "--batch-size", 8, "--restart-every", 3, "--log-every", 4,
                   "--checkpoint-every", 5, *VQ_ARGS)
    return run, out


def test_vqvae_two_ranks(toy_file, two_rank_vqvae, tmp_path):
    """2 ranks x 8 stamps: the ranks stay bit-identical (the trainer checks it at every
    checkpoint and fails otherwise), they compute what one process computes with 16 stamps
    (k-means initialisation and dead-code restarts included: the logged chi^2 agree to rounding
    until code-assignment near-ties, flipped by rounding, make the runs drift apart after about
    25 steps), the loss falls, and the run resumes on one process."""
    two, out = two_rank_vqvae
    assert out.count("trained VQ-VAE to step 40") == 1  # rank 0 reports
    state = load_checkpoint(two / "checkpoint.pt")
    assert state["step"] == 40 and state["world_size"] == 2
    assert int(state["model"]["quantizer.restarted"]) > 0
    log2 = read_log(two)
    assert [r["step"] for r in log2] == list(range(4, 41, 4))  # one log, written once
    assert log2[-1]["chi2"] < 0.6 * log2[0]["chi2"], [r["chi2"] for r in log2]
    assert (two / "gallery.png").exists()

    train_vqvae(toy_file, tmp_path / "one", 20, batch_size=16, lr=2e-3, warmup=4, ae_warmup=4,
                model=dict(MODEL, restart_every=3), log_every=4, progress=False)
    log1 = read_log(tmp_path / "one")
    np.testing.assert_allclose([r["chi2"] for r in log2[:5]], [r["chi2"] for r in log1],
                               rtol=2e-4)
    assert [r["perplexity"] for r in log2[:3]] == [r["perplexity"] for r in log1[:3]]

    # a 2-process checkpoint resumes on one process (global batch 16 -> 8)
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    summary = train_vqvae(toy_file, resumed, 44, batch_size=8, lr=2e-3, warmup=4, ae_warmup=4,
                          model=dict(MODEL, restart_every=3), resume=True, progress=False,
                          log_every=4)
    assert summary["step"] == 44 and np.isfinite(summary["loss"])
    assert load_checkpoint(resumed / "checkpoint.pt")["world_size"] == 1
    assert [r["step"] for r in read_log(resumed)] == list(range(4, 45, 4))


def test_prior_two_ranks_equal_one_process_then_resume(toy_file, two_rank_vqvae, tmp_path):
    """The prior has no discontinuity: 2 ranks x 8 code maps give the weights of one process
    x 16 to rounding; the bundle is written once; the run resumes on one process."""
    vq = two_rank_vqvae[0] / "checkpoint.pt"
    common = dict(lr=3e-3, seed=2, model=dict(channels=8, layers=2, kernel_size=3))
    out = torchrun("train-prior", "--data", toy_file, "--vqvae", vq, "--out", tmp_path / "two",
                   "--steps", 12, "--batch-size", 8, "--lr", 3e-3, "--seed", 2,
                   "--channels", 8, "--layers", 2, "--kernel-size", 3, "--quiet")
    assert out.count("model bundle written") == 1
    train_prior(toy_file, vq, tmp_path / "one", 12, batch_size=16, progress=False, **common)
    two = load_checkpoint(tmp_path / "two" / "checkpoint.pt")
    one = load_checkpoint(tmp_path / "one" / "checkpoint.pt")
    assert_same_training(two["model_raw"], one["model_raw"], lr=3e-3)
    assert_same_training(two["model"], one["model"], lr=3e-3)
    assert two["test_bits_per_code"] == pytest.approx(one["test_bits_per_code"], rel=1e-4)
    assert (tmp_path / "two" / "model.safetensors").exists()
    # a 2-process checkpoint resumes on one process
    summary = train_prior(toy_file, vq, tmp_path / "two", 16, batch_size=8, resume=True,
                          progress=False, **common)
    assert summary["step"] == 16 and summary["test_bits_per_code"] > 0


def test_two_rank_runs_resume_exactly(tmp_path):
    """2-rank runs split in two halves end bit for bit where straight 2-rank runs do: the
    VQ-VAE with independent noise, the truth term, augmentation and codebook restarts on either
    side of the break; the prior with dropout, a moving average and a class label
    (tests/ddp_resume.py runs the four of each in one process group)."""
    import h5py

    from galsim_vqvae.data.dataset import DatasetWriter
    from test_train_vqvae import toy_dataset

    d = toy_dataset(n=80)
    data = tmp_path / "toy.h5"
    with DatasetWriter(data, stamp_size=32, pixel_scale=0.1, band="toy", zeropoint=25.0,
                       source="synthetic", seed=1) as w:
        w.add_psfs(d["psf_bank"])
        w.append(observed=d["observed"], sigma=d["sigma"], psf_index=d["psf_index"],
                 truth=d["truth"], params={"mag": np.linspace(20, 24, 80),
                                           "hlr": np.linspace(1.0, 0.2, 80),
                                           "morph_class": np.arange(80) % 3})
    with h5py.File(data, "a") as f:
        f.attrs["class_names"] = json.dumps(["disk", "bulge", "irregular"])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_resume.py")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", script, str(data), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for kind, keys in (("vq", ("model", "optimizer")), ("prior", ("model", "model_raw",
                                                                   "optimizer"))):
        a = load_checkpoint(tmp_path / f"{kind}_straight" / "checkpoint.pt")
        b = load_checkpoint(tmp_path / f"{kind}_halves" / "checkpoint.pt")
        assert a["step"] == b["step"] == (16 if kind == "vq" else 12)
        for key in keys:
            if key == "optimizer":
                for x, y in zip(a[key]["state"].values(), b[key]["state"].values()):
                    assert all(torch.equal(x[n], y[n]) for n in x), (kind, key)
            else:
                for name in a[key]:
                    assert torch.equal(a[key][name], b[key][name]), (kind, key, name)
        # the logged figures of the steps both logged agree (timings aside)
        for name in ("loss", "chi2", "truth_chi2") if kind == "vq" else ("train_bits_per_code",
                                                                          "test_bits_per_code"):
            logged = dict(zip(a["history"]["step"], a["history"][name]))
            both = [s for s in b["history"]["step"] if s in logged]
            assert len(both) >= 3
            assert [logged[s] for s in both] == \
                [v for s, v in zip(b["history"]["step"], b["history"][name]) if s in logged]
    vq = load_checkpoint(tmp_path / "vq_straight" / "checkpoint.pt")
    assert vq["world_size"] == 2 and vq["train"]["augment"] and vq["train"]["truth_weight"]
    assert int(vq["model"]["quantizer.restarted"]) > 0
    prior = load_checkpoint(tmp_path / "prior_straight" / "checkpoint.pt")
    assert prior["config"]["dropout"] == 0.2 and prior["config"]["num_classes"] == 3


# ------------------------------------------------------------------------------------------------
# The plumbing itself, in 2 spawned gloo processes
def _plumbing_worker(rank, port, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = distributed.setup("cpu")
    out = {"rank": ctx.rank, "world": ctx.world_size, "active": ctx.active}
    try:
        same = {"a": torch.arange(5.0), "b": torch.tensor(3)}
        ctx.check_identical(same, "test tensors")
        differ = dict(same, c=torch.tensor([1.0, 2.0 + rank]))
        try:
            ctx.check_identical(differ, "test tensors")
        except RuntimeError as err:
            out["differ"] = str(err)

        def fails_on_main():
            raise VQVAEInputError("the run directory is in use")
        try:
            ctx.on_main(fails_on_main)
        except VQVAEInputError as err:
            out["on_main"] = str(err)
        out["mean"] = ctx.mean(torch.tensor([float(rank), 2.0])).tolist()
        # the codebook update of the global batch (z: 2 x 50 rows), restart candidates included
        from galsim_vqvae.nn.quantizer import VectorQuantizer

        z = torch.randn(100, 4, generator=torch.Generator().manual_seed(9))
        mine = z[rank * 50:(rank + 1) * 50]
        quantizers = [VectorQuantizer(16, 4, restart_every=1, kmeans_iters=5, seed=3)
                      for _ in range(2)]
        codes = torch.cdist(z, quantizers[0].codebook).argmin(1)
        one = quantizers[0].batch_statistics(z, codes)  # one process, the whole batch
        ctx.share_codebook(quantizers[1])
        reduced = quantizers[1].stats_reducer(
            quantizers[1].batch_statistics(mine, codes[rank * 50:(rank + 1) * 50]))
        out["counts"] = torch.equal(reduced["count"], one["count"])
        out["sums"] = torch.allclose(reduced["sum"], one["sum"], rtol=1e-6, atol=1e-6)
        out["candidates"] = torch.equal(reduced["candidates"], one["candidates"])
        quantizers[0].kmeans_init(z)
        ctx.init_codebook(quantizers[1], mine)
        out["kmeans"] = all(torch.equal(getattr(quantizers[0], k), getattr(quantizers[1], k))
                            for k in ("codebook", "ema_count", "ema_sum", "initialized"))
    finally:
        ctx.close()
    results.put(out)


def test_plumbing_in_two_processes():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    mp.start_processes(_plumbing_worker, args=(port, results), nprocs=2, start_method="spawn")
    got = sorted((results.get(timeout=60) for _ in range(2)), key=lambda r: r["rank"])
    for r in got:
        assert r["world"] == 2 and r["active"]
        assert "different test tensors: ['c'] differ" in r["differ"]
        assert r["on_main"].startswith("the run directory is in use")
        assert r["mean"] == [0.5, 2.0]
        assert r["counts"] and r["sums"] and r["candidates"] and r["kmeans"]
    assert got[1]["on_main"].endswith("(raised on rank 0)")


def test_single_process_context(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = distributed.setup("cpu")
    assert (ctx.rank, ctx.world_size, ctx.active, ctx.is_main) == (0, 1, False, True)
    from galsim_vqvae.nn.quantizer import VectorQuantizer

    q = VectorQuantizer(8, 2)
    ctx.share_codebook(q)
    assert q.stats_reducer is None and q.shard == (0, 1)
    net = torch.nn.Linear(2, 2)
    assert ctx.wrap(net) is net
    t = torch.ones(2)
    assert ctx.mean(t) is t
    assert ctx.main_first(lambda: 7) == 7
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(VQVAEInputError, match="RANK=5, WORLD_SIZE=2"):
        distributed.setup("cpu")
