"""Faults: training killed and resumed, full disks and unwritable folders, two runs in one folder.

- A CPU training run (``train-vqvae``, ``train-prior``) in a subprocess is killed with SIGKILL
  after it has written a checkpoint, and resumed with ``--resume``: its final weights are
  bit-identical to those of an uninterrupted run with the same seed. While the killed run is
  still alive (stopped), a second run pointed at its folder refuses, naming it.
- The disk fills up, or the folder turns unwritable, while a checkpoint or a FITS output is
  written: a clear error, the previous file intact, no temporary file left, and the run resumes.
"""

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from astropy.io import fits

import galsim_vqvae
from galsim_vqvae.cli import EXIT_BAD_INPUT, main
from galsim_vqvae.train import checkpoint as checkpoint_module
from galsim_vqvae.train.checkpoint import load_checkpoint
from test_errors import TINY_VQVAE, full_disk_open, write_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 120          # long enough that the kill always lands mid-run
EVERY = ["--checkpoint-every", "10", "--log-every", "10"]
TINY_PRIOR = ["--channels", "8", "--layers", "2", "--kernel-size", "3", "--batch-size", "4",
              "--conditions", "mag,hlr", "--quiet"]


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def launch(argv):
    """``galsim-vqvae ARGV`` in a subprocess with one torch thread (as the in-process runs)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(galsim_vqvae.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.Popen([sys.executable, "-m", "galsim_vqvae.cli", *map(str, argv)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for_checkpoint(proc, path, timeout=120):
    """Poll until ``path`` exists (it appears complete: it is renamed into place), then stop the
    process where it is (SIGSTOP) a little later, mid-run."""
    start = time.time()
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before its first checkpoint: "
                                 f"{proc.stderr.read().decode()[-2000:]}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError("no checkpoint within the timeout")
        time.sleep(0.002)
    time.sleep(0.03)  # let it run on: the kill lands between checkpoints, or during one
    os.kill(proc.pid, signal.SIGSTOP)


def kill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def assert_same_state(a, b, keys):
    for key in keys:
        assert a[key].keys() == b[key].keys(), key
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for name in sa:
            assert torch.equal(torch.as_tensor(sa[name]), torch.as_tensor(sb[name])), name


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(os.fspath(tmp_path_factory.mktemp("data") / "data.h5"))


def test_killed_vqvae_training_resumes_bit_identical(dataset, tmp_path, capsys):
    args = ["--data", dataset, "--steps", STEPS, *TINY_VQVAE, *EVERY, "--seed", 7,
            "--num-codes", 32, "--restart-every", 5]  # dead codes: restarts draw random vectors
    killed = tmp_path / "killed"
    proc = launch(["train-vqvae", "--out", killed, *args])
    try:
        wait_for_checkpoint(proc, killed / "checkpoint.pt")
        # a second run pointed at the same folder refuses, naming the first
        code, err = cli(capsys, "train-vqvae", "--out", killed, "--resume", *args)
        assert code == EXIT_BAD_INPUT
        assert f"in use by another run (pid {proc.pid} on" in err and "Traceback" not in err
    finally:
        kill(proc)
    at_kill = load_checkpoint(killed / "checkpoint.pt")["step"]
    assert 0 < at_kill < STEPS and at_kill % 10 == 0
    # resume (the dead run's lock is stale and taken over) and compare with a straight run
    assert cli(capsys, "train-vqvae", "--out", killed, "--resume", *args)[0] == 0
    assert cli(capsys, "train-vqvae", "--out", tmp_path / "straight", *args)[0] == 0
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(killed / "checkpoint.pt")
    assert a["step"] == b["step"] == STEPS
    assert a["model"]["quantizer.restarted"].item() > 0  # dead-code restarts were exercised
    assert_same_state(a, b, ["model"])
    for key in ("step", "loss", "chi2", "perplexity", "usage"):  # not the timings
        assert a["history"][key] == b["history"][key], key
    lines = (killed / "log.jsonl").read_text().splitlines()
    assert len(lines) == STEPS // 10  # lines past the last checkpoint were dropped
    assert not (killed / ".lock").exists()


@pytest.fixture(scope="module")
def vqvae_checkpoint(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("vq") / "vq"
    assert main(["train-vqvae", "--data", dataset, "--out", str(out), "--steps", "4",
                 *TINY_VQVAE]) == 0
    return out / "checkpoint.pt"


def test_killed_prior_training_resumes_bit_identical(dataset, vqvae_checkpoint, tmp_path,
                                                      capsys):
    args = ["--data", dataset, "--vqvae", vqvae_checkpoint, "--steps", STEPS, *TINY_PRIOR,
            *EVERY, "--seed", 5]
    killed = tmp_path / "killed"
    proc = launch(["train-prior", "--out", killed, *args])
    try:
        wait_for_checkpoint(proc, killed / "checkpoint.pt")
        code, err = cli(capsys, "train-prior", "--out", killed, "--resume", *args)
        assert code == EXIT_BAD_INPUT and f"(pid {proc.pid} on" in err
    finally:
        kill(proc)
    at_kill = load_checkpoint(killed / "checkpoint.pt")["step"]
    assert 0 < at_kill < STEPS and at_kill % 10 == 0
    assert not (killed / "model.safetensors").exists()
    assert cli(capsys, "train-prior", "--out", killed, "--resume", *args)[0] == 0
    assert cli(capsys, "train-prior", "--out", tmp_path / "straight", *args)[0] == 0
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(killed / "checkpoint.pt")
    assert a["step"] == b["step"] == STEPS
    assert_same_state(a, b, ["model", "model_raw"])
    assert a["history"]["test_bits_per_code"] == b["history"]["test_bits_per_code"]
    from safetensors.torch import load_file

    bundle_a = load_file(tmp_path / "straight" / "model.safetensors")
    bundle_b = load_file(killed / "model.safetensors")
    assert bundle_a.keys() == bundle_b.keys()
    assert all(torch.equal(bundle_a[k], bundle_b[k]) for k in bundle_a)


# ------------------------------------------------------------------------------------------------
# Full disks and unwritable folders
def fail_second_checkpoint(monkeypatch, how):
    """Make the second checkpoint write of a run fail: ``how`` is "full" (the disk fills up
    100 bytes into the file) or "denied" (the folder refuses new files). Returns the bytes of
    the first checkpoint as written."""
    import galsim_vqvae.fileio as fileio
    import galsim_vqvae.train.vqvae as trainer

    real = checkpoint_module.save_checkpoint
    first = {}

    def save(state, path):
        if "bytes" in first:
            if how == "full":
                monkeypatch.setattr(checkpoint_module, "open", full_disk_open, raising=False)
            else:
                def denied(*args, **kwargs):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
                monkeypatch.setattr(fileio.tempfile, "mkstemp", denied)
        real(state, path)
        first.setdefault("bytes", open(path, "rb").read())
    monkeypatch.setattr(trainer, "save_checkpoint", save)
    return first


@pytest.mark.parametrize("how, reason", [("full", "No space left on device"),
                                         ("denied", "Permission denied")])
def test_checkpoint_write_failure_keeps_the_previous_one(dataset, tmp_path, monkeypatch,
                                                         capsys, how, reason):
    args = ["--data", dataset, "--steps", 8, *TINY_VQVAE, "--checkpoint-every", 4]
    run = tmp_path / "run"
    with monkeypatch.context() as mp:
        first = fail_second_checkpoint(mp, how)
        code, err = cli(capsys, "train-vqvae", "--out", run, *args)
    assert code == EXIT_BAD_INPUT and "Traceback" not in err
    assert f"could not write checkpoint {run / 'checkpoint.pt'}: {reason}" in err
    assert "the previous checkpoint, if any, is intact" in err
    assert (run / "checkpoint.pt").read_bytes() == first["bytes"]
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 4
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "log.jsonl"]  # no .tmp
    # the run resumes from it, to the weights of a run that never failed
    assert cli(capsys, "train-vqvae", "--out", run, "--resume", *args)[0] == 0
    assert cli(capsys, "train-vqvae", "--out", tmp_path / "straight", *args)[0] == 0
    assert_same_state(load_checkpoint(tmp_path / "straight" / "checkpoint.pt"),
                      load_checkpoint(run / "checkpoint.pt"), ["model"])


@contextlib.contextmanager
def read_only(folder, monkeypatch):
    """``folder`` refuses new and rewritten files: chmod 555, or, for root (whom the permission
    bits do not stop), every open for writing under it fails with EACCES as the OS would."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    import builtins

    inside = str(folder.resolve()) + os.sep
    real_open, real_os_open = builtins.open, os.open

    def denied(path):
        return OSError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))

    def is_inside(path):
        return isinstance(path, (str, bytes, os.PathLike)) and \
            os.path.abspath(os.fsdecode(path)).startswith(inside)

    def guarded_open(file, mode="r", *args, **kwargs):
        if is_inside(file) and any(c in mode for c in "wax+"):
            raise denied(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if is_inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise denied(path)
        return real_os_open(path, flags, *args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(builtins, "open", guarded_open)
        mp.setattr(os, "open", guarded_os_open)
        yield


def test_read_only_run_folder(dataset, tmp_path, capsys, monkeypatch):
    args = ["--data", dataset, "--steps", 8, *TINY_VQVAE, "--checkpoint-every", 4]
    run = tmp_path / "run"
    assert cli(capsys, "train-vqvae", "--out", run, *args[:2], "--steps", 4, *args[4:])[0] == 0
    before = (run / "checkpoint.pt").read_bytes()
    files = sorted(p.name for p in run.iterdir())
    with read_only(run, monkeypatch):
        code, err = cli(capsys, "train-vqvae", "--out", run, "--resume", *args)
    assert code == EXIT_BAD_INPUT and "Permission denied" in err and "Traceback" not in err
    assert str(run) in err and len(err.strip().splitlines()) == 1, err
    assert (run / "checkpoint.pt").read_bytes() == before
    assert sorted(p.name for p in run.iterdir()) == files  # nothing new, nothing half-written


def test_fits_output_failure_keeps_the_previous_file(tiny_emulator, tmp_path, monkeypatch,
                                                     capsys):
    out = tmp_path / "s.fits"
    argv = ["sample", "--model", tiny_emulator.path, "--n", 2, "--conditions", "mag=22,hlr=0.5",
            "--out", out, "--quiet"]
    assert cli(capsys, *argv, "--seed", 1)[0] == 0
    before = out.read_bytes()
    writeto = fits.HDUList.writeto

    def full_disk(self, fileobj, *args, **kwargs):
        with open(fileobj, "wb") as f:
            f.write(b"SIMPLE  =                    T" + b" " * 50)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(fits.HDUList, "writeto", full_disk)
    code, err = cli(capsys, *argv, "--seed", 2)
    assert code == EXIT_BAD_INPUT
    assert err.strip() == f"galsim-vqvae sample: error: cannot write {out}: No space left on device"
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["s.fits"]
    monkeypatch.setattr(fits.HDUList, "writeto", writeto)
    with fits.open(out) as hdus:
        np.testing.assert_array_equal(hdus[0].data, tiny_emulator.sample(
            2, {"mag": 22.0, "hlr": 0.5}, seed=1))


def test_dataset_output_failure_leaves_nothing(tmp_path, monkeypatch):
    """A dataset file whose writing fails (a full disk) is not left behind, half-written."""
    from galsim_vqvae.data import dataset as dataset_module

    grow = dataset_module.DatasetWriter._grow
    calls = []

    def full_disk(dset, data):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "Can't write data (No space left on device)")
        grow(dset, data)
    monkeypatch.setattr(dataset_module.DatasetWriter, "_grow", staticmethod(full_disk))
    with pytest.raises(OSError, match=r"cannot write .*d\.h5: .*No space left on device"):
        write_dataset(os.fspath(tmp_path / "d.h5"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(tiny_emulator, tmp_path, umask):
    """Every output (FITS, PNG, model bundle, checkpoint, HDF5 dataset) gets the mode a plain
    open() gives: 0666 less the umask (the atomic writer's temporary file starts as 0600)."""
    from galsim_vqvae.train.checkpoint import save_checkpoint

    old = os.umask(umask)
    try:
        assert main(["sample", "--model", str(tiny_emulator.path), "--n", "1", "--conditions",
                     "mag=22,hlr=0.4", "--seed", "1", "--out", str(tmp_path / "s.fits"),
                     "--quiet"]) == 0
        assert main(["gallery", "--model", str(tiny_emulator.path), "--n", "1",
                     "--out", str(tmp_path / "g.png"), "--quiet"]) == 0
        tiny_emulator.save(tmp_path / "m.safetensors")
        save_checkpoint({"model": {}, "config": {}}, tmp_path / "c.pt")
        write_dataset(str(tmp_path / "d.h5"))
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["s.fits", "g.png", "m.safetensors", "c.pt", "d.h5"],
                                  0o666 & ~umask)
