"""The package's imports run one way: data -> nn -> train -> emulator -> profile/config -> cli.

Every import of the package's own modules, at the top of a file or inside a function, is read
from the source: a module never imports one of a higher layer, and what a user's simulation runs
(the emulator, its outputs, the GalSim profile and config type) never needs the training code or
the dataset files (`galsim_vqvae.train`, `galsim_vqvae.data`).
"""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "galsim_vqvae")

# The layer of each module (by its first dotted name below the package); a module may import
# its own layer and those below.
LAYERS = {
    0: ("errors", "fileio", "checkpoints", "fitsimage", "devices", "ops", "_C", "_version",
        "extras",
        "plots", "metrics"),
    1: ("data",),
    2: ("nn",),
    3: ("train",),
    4: ("emulator", "outputs", "provenance"),
    5: ("profile", "generate"),
    6: ("config",),
    7: ("validation", "benchmark", "cli", "__init__"),
}
RANK = {name: rank for rank, names in LAYERS.items() for name in names}
RUNTIME = ("nn", "emulator", "outputs", "profile", "generate", "config", "validation.fidelity")


def _modules():
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
                yield rel[:-len(".__init__")] if rel.endswith(".__init__") else rel, path


def _imports(module, path):
    """The package modules that ``module`` imports (dotted names below the package)."""
    tree = ast.parse(open(path).read(), path)
    package = module.split(".")[:-1] if not path.endswith("__init__.py") else module.split(".")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1]
            target = base + (node.module.split(".") if node.module else [])
            if node.module:
                found.add(".".join(target))
            else:
                found.update(".".join(target + [a.name]) for a in node.names)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names]
            found.update(n[len("galsim_vqvae."):] for n in names
                         if n and n.startswith("galsim_vqvae."))
    return found


MODULES = dict(_modules())


def test_every_module_has_a_layer():
    assert sorted(m for m in MODULES if m.split(".")[0] not in RANK) == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_one_way(module):
    mine = RANK[module.split(".")[0]]
    imported = _imports(module, MODULES[module])
    upward = sorted(m for m in imported if RANK.get(m.split(".")[0], 0) > mine)
    assert upward == [], f"{module} imports modules of a higher layer: {upward}"
    if module.startswith(RUNTIME):
        training = sorted(m for m in imported if m.split(".")[0] in ("train", "data"))
        assert training == [], f"{module} needs training code or dataset files: {training}"


def test_the_reader_sees_lazy_imports():
    """The check would see a violation: a function-level import of a higher layer is found."""
    found = _imports("emulator", MODULES["emulator"])
    assert "nn.vqvae" in found and "checkpoints" in found  # top-level and in-function imports
    assert "train.checkpoint" in _imports("cli", MODULES["cli"]) or \
        "train.prior" in _imports("cli", MODULES["cli"])


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("train")))
def test_trainers_set_no_private_attribute_of_the_networks(module):
    """E.g. the data-parallel trainer marks the codebook initialised through the quantizer's
    `mark_initialized`, not by setting its private host-side flag."""
    tree = ast.parse(open(MODULES[module]).read())
    bad = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for t in targets:
            if (isinstance(t, ast.Attribute) and t.attr.startswith("_")
                    and not t.attr.startswith("__")
                    and not (isinstance(t.value, ast.Name) and t.value.id in ("self", "cls"))):
                bad.append(f"line {t.lineno}: {ast.unparse(t)}")
    assert bad == [], f"{module} sets private attributes of other objects: {bad}"
