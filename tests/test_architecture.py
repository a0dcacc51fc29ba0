"""The import rule of docs/architecture.md: every import inside the package (also one inside a function) goes to
its own layer or a lower one, so the layers can be read, and changed, from the bottom up."""
import ast
import os

import pytest

from helpers import ROOT

PACKAGE = "fairseq_stablemoe"
# lowest first; a module's layer is that of its first name under the package (its folder or its file)
LAYERS = [
    {"options", "atomic", "safe_config", "checkpoints", "run_lock", "dictionaries", "distributed_wait",
     "environment", "quiet", "hub"},
    {"moe"},
    {"checks", "legacy_optimizer_state"},
    {"models"},
    {"criterions"},
    {"tasks"},
    {"analysis", "reshard_checkpoint"},
]


def layer_of(unit: str) -> int:
    found = [i for i, layer in enumerate(LAYERS) if unit in layer]
    assert found, f"{PACKAGE}.{unit} is in no layer of this test (and of docs/architecture.md): place it"
    return found[0]


def package_imports():
    """(importing module, imported module) for every import of a package module, relative ones resolved."""
    base = os.path.join(ROOT, PACKAGE)
    for folder, _, files in os.walk(base):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            parts = [PACKAGE] + os.path.relpath(path, base)[:-3].split(os.sep)
            package = parts[:-1]  # what `from .` names, in a module and in an __init__ alike
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.ImportFrom):
                    target = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                        if node.level else node.module or ""
                    names = [target] if node.module or not node.level else [f"{target}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                for target in names:
                    if target.split(".")[0] == PACKAGE:
                        yield ".".join(parts), target


def unit(module: str):
    parts = module.split(".")
    # None: the package's own __init__, which registers everything
    return parts[1] if len(parts) > 1 and parts[1] != "__init__" else None


def test_imports_go_one_way():
    climbing = [(source, target) for source, target in package_imports()
                if unit(source) and unit(target) and layer_of(unit(target)) > layer_of(unit(source))]
    assert not climbing, f"imports that climb a layer: {climbing}"


def test_every_module_has_a_layer():
    for name in os.listdir(os.path.join(ROOT, PACKAGE)):
        if name.endswith(".py") and name != "__init__.py" or os.path.isdir(os.path.join(ROOT, PACKAGE, name)) \
                and os.path.exists(os.path.join(ROOT, PACKAGE, name, "__init__.py")):
            layer_of(name[:-3] if name.endswith(".py") else name)


def test_the_rule_catches_a_climbing_import(monkeypatch):
    # moe imports checkpoints (a lower layer) lazily; were checkpoints above moe, that import would climb
    monkeypatch.setattr(__import__(__name__), "LAYERS", [{"moe"}] + [layer - {"checkpoints"} for layer in LAYERS]
                        + [{"checkpoints"}])
    with pytest.raises(AssertionError, match="climb"):
        test_imports_go_one_way()
