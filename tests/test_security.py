"""Security: loading never unpickles, nothing touches the network, config paths are only data.

- Statically: no module of the package unpickles (``pickle.load``, ``torch.load`` without
  ``weights_only=True``, ``np.load(allow_pickle=True)``, unsafe ``yaml.load``...), runs code
  from strings or imports modules by name (``eval``, ``exec``, ``__import__``,
  ``importlib.import_module``...), or opens network connections (``urllib``, ``http``,
  ``requests``, ``socket.create_connection``...).
- At run time: files that would run code if unpickled or imported (a pickle "bomb" and a Python
  file) are refused through every entry point, and the code does not run; loading the shipped
  model, sampling, drawing through a GalSim config and the command all work with every network
  connection refused.
"""

import ast
import os
import socket

import galsim
import numpy as np
import pytest
import torch

import galsim_vqvae
from galsim_vqvae.cli import EXIT_BAD_INPUT, main
from galsim_vqvae.emulator import Emulator
from galsim_vqvae.errors import VQVAEFormatError
from galsim_vqvae.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

PACKAGE = os.path.dirname(os.path.abspath(galsim_vqvae.__file__))
FORBIDDEN_CALLS = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "cPickle.loads",
    "marshal.load", "marshal.loads", "shelve.open", "dill.load", "dill.loads", "joblib.load",
    "eval", "exec", "compile", "__import__", "importlib.import_module", "importlib.__import__",
    "runpy.run_path", "runpy.run_module", "imp.load_source",
    "socket.create_connection", "socket.socket", "urllib.request.urlopen", "urlopen",
    "http.client.HTTPConnection", "http.client.HTTPSConnection", "requests.get",
    "requests.post", "ftplib.FTP",
}
FORBIDDEN_IMPORTS = {"dill", "joblib", "marshal", "shelve", "requests", "urllib.request",
                     "http.client", "ftplib", "runpy", "imp"}


def package_sources():
    for root, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path) as f:
                    yield os.path.relpath(path, PACKAGE), ast.parse(f.read(), path)


def dotted(node):
    """``a.b.c`` of a Name/Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id] + parts[::-1])
    return None


def keyword(call, name):
    return next((k.value for k in call.keywords if k.arg == name), None)


def is_true(node):
    return isinstance(node, ast.Constant) and node.value is True


def test_no_unpickling_code_execution_or_network_in_the_package():
    problems = []
    n_files = 0
    for name, tree in package_sources():
        n_files += 1
        for node in ast.walk(tree):
            where = f"{name}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                problems += [f"{where} imports {a.name}" for a in node.names
                             if a.name in FORBIDDEN_IMPORTS]
            elif isinstance(node, ast.ImportFrom):
                if node.module in FORBIDDEN_IMPORTS:
                    problems.append(f"{where} imports from {node.module}")
            elif isinstance(node, ast.Call):
                fn = dotted(node.func) or ""
                short = fn.split(".", 1)[-1] if fn.startswith(("np.", "numpy.")) else fn
                if fn in FORBIDDEN_CALLS:
                    problems.append(f"{where} calls {fn}")
                elif fn == "torch.load" and not is_true(keyword(node, "weights_only")):
                    problems.append(f"{where} calls torch.load without weights_only=True")
                elif short == "load" and fn.startswith(("np.", "numpy.")) and \
                        is_true(keyword(node, "allow_pickle")):
                    problems.append(f"{where} calls {fn} with allow_pickle=True")
                elif fn == "yaml.load" and "Safe" not in ast.dump(node):
                    problems.append(f"{where} calls yaml.load without a safe loader")
    assert n_files > 10
    assert not problems, problems


def test_torch_load_is_only_called_with_weights_only():
    """The one torch.load of the package (checkpoints) passes weights_only=True."""
    calls = [(name, node) for name, tree in package_sources() for node in ast.walk(tree)
             if isinstance(node, ast.Call) and dotted(node.func) == "torch.load"]
    assert calls and all(is_true(keyword(node, "weights_only")) for _, node in calls)


# ------------------------------------------------------------------------------------------------
# Files that would run code
class Bomb:
    """Unpickling it creates the folder ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


@pytest.fixture
def bomb(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "bomb.pt"
    torch.save({"model": Bomb(str(marker)), "config": {}, "step": 1}, path)
    yield path
    assert not marker.exists(), "a pickle was unpickled"


@pytest.fixture
def python_file(tmp_path):
    """A Python file that creates a folder if it is imported or executed."""
    marker = tmp_path / "EXECUTED"
    path = tmp_path / "model.py"
    path.write_text(f"import os\nos.makedirs({str(marker)!r})\n")
    yield path
    assert not marker.exists(), "a config path was executed"


def test_pickle_bearing_checkpoint_is_refused(bomb, tmp_path, capsys):
    with pytest.raises(VQVAEFormatError, match="pickled Python objects.*refused"):
        load_checkpoint(bomb)
    with pytest.raises(VQVAEFormatError):
        Emulator.from_checkpoints(bomb, bomb, np.ones((4, 4)))
    with pytest.raises(VQVAEFormatError, match="training checkpoint, not a model bundle"):
        Emulator.load(bomb)  # not a safetensors file: only its zip listing is read, no pickle
    # --resume of a run whose checkpoint was replaced by a bomb
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(bomb.read_bytes())
    from test_errors import TINY_VQVAE, write_dataset

    data = write_dataset(os.fspath(tmp_path / "d.h5"))
    code = main(["train-vqvae", "--data", data, "--out", str(run), "--steps", "2", "--resume",
                 *TINY_VQVAE])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and "pickled Python objects" in err


def test_config_paths_are_never_imported_or_executed(bomb, python_file, tiny_emulator):
    for path in (python_file, bomb):
        cfg = {"modules": ["galsim_vqvae"], "input": {"vqvae_model": {"file_name": str(path)}},
               "gal": {"type": "VQVAEGalaxy", "conditions": {"mag": 22.0, "hlr": 0.5}},
               "image": {"type": "Single", "size": 16, "pixel_scale": 0.2}}
        error = "corrupt or truncated" if path == python_file else "training checkpoint"
        with pytest.raises(galsim.GalSimValueError, match=error):
            galsim.config.BuildImage(cfg)
        with pytest.raises(galsim.GalSimValueError, match=error):
            galsim_vqvae.VQVAEGalaxy(str(path), conditions={"mag": 22.0, "hlr": 0.5})


# ------------------------------------------------------------------------------------------------
# No network
@pytest.fixture
def no_network(monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access is not allowed in this test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts
    assert attempts == [], "something tried to open a network connection"


def test_runs_without_network(no_network, tiny_emulator, tmp_path, capsys):
    emulator = Emulator.load("default")  # the shipped model is in the package
    image = emulator.sample(1, {k: v for k, v in zip(
        emulator.condition_names, np.mean([emulator.metadata["conditions"]["min"],
                                           emulator.metadata["conditions"]["max"]], axis=0))},
        seed=3)
    assert np.isfinite(image).all()
    cfg = {"modules": ["galsim_vqvae"],
           "input": {"vqvae_model": {"file_name": tiny_emulator.path}},
           "gal": {"type": "VQVAEGalaxy", "conditions": {"mag": 22.0, "hlr": 0.5}},
           "psf": {"type": "Gaussian", "fwhm": 0.7},
           "image": {"type": "Single", "size": 16, "pixel_scale": 0.2, "random_seed": 2}}
    assert galsim.config.BuildImage(cfg).array.sum() > 0
    assert main(["sample", "--model", tiny_emulator.path, "--n", "1", "--conditions",
                 "mag=22,hlr=0.5", "--out", str(tmp_path / "s.fits"), "--quiet"]) == 0
    assert "wrote 1 galaxies" in capsys.readouterr().out
