"""The folders are the architecture: imports follow the data flow, and the core and runtime stay torch-free.

Layers (setup.cfg maps each folder into the `hgad_edge` name):

    hgad_edge/core/      torch-free, shared by everything below it        imports: core
    hgad_edge/training/  the PyTorch side                                 imports: core, training
    export/              fused ONNX, TensorRT engines                     imports: core, training, export
    runtime/             torch-free runtime, serving (runtime/triton/)    imports: core, runtime
    benchmarks/bench/, and the top (cli/, demo, info, threshold_calibration) sit on all of them.

Data flows training -> export -> runtime -> serving; the exporter hands the runtime a bundle on disk,
never an import, so the runtime needs neither torch nor the exporter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import NOT_IN_BASE_INSTALL, REPO

# folder on disk -> the package it installs as
FOLDERS = {
    "hgad_edge": "hgad_edge",
    "export": "hgad_edge.export",
    "runtime": "hgad_edge.runtime",
    "benchmarks/bench": "hgad_edge.bench",
}
ANY = None
# layer -> the layers it may import (ANY: all of them)
ALLOWED: dict[str, set[str] | None] = {
    "root": {"root"},  # hgad_edge/__init__.py: the version
    "core": {"root", "core"},
    "training": {"root", "core", "training"},
    "export": {"root", "core", "training", "export"},
    "runtime": {"root", "core", "runtime"},
    "bench": ANY,
    "top": ANY,
}
TORCH_FREE = ("core", "runtime")


def layer_of(module: str) -> str:
    parts = module.split(".")
    if module == "hgad_edge":
        return "root"
    second = parts[1]
    return second if second in ("core", "training", "export", "runtime", "bench") else "top"


def all_modules() -> dict[str, Path]:
    """Every module of the installed package, by its import name."""
    found: dict[str, Path] = {}
    for folder, package in FOLDERS.items():
        base = REPO / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("").parts
            if folder == "hgad_edge" and rel[0] in ("export", "runtime", "bench"):
                continue  # not folders of hgad_edge/ (mapped from the top)
            parts = [p for p in rel if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imported_modules(path: Path) -> set[str]:
    """Every hgad_edge module a file imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import (absolute imports only)"
            names.add(node.module or "")
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n == "hgad_edge" or n.startswith("hgad_edge.")}


def test_every_folder_is_seen():
    modules = all_modules()
    for layer in ("core", "training", "export", "runtime", "bench"):
        assert any(layer_of(m) == layer for m in modules), layer
    assert "hgad_edge.runtime.triton.client" in modules and "hgad_edge.core.bundle" in modules


def test_imports_follow_the_layers():
    modules = all_modules()
    arrows = []
    for module, path in modules.items():
        allowed = ALLOWED[layer_of(module)]
        if allowed is ANY:
            continue
        for target in imported_modules(path):
            # `from hgad_edge.core import files` names a module; `from hgad_edge.core.files import x`
            # names an object: judge the longest name that is a module (or the package itself)
            if target not in modules and target.rsplit(".", 1)[0] in modules:
                target = target.rsplit(".", 1)[0]
            if layer_of(target) not in allowed:
                arrows.append(f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})")
    assert not arrows, "imports against the data flow:\n" + "\n".join(sorted(set(arrows)))


def test_layer_rule_catches_a_back_arrow(tmp_path):
    """The check itself: a runtime module importing the training side is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from hgad_edge.training.model import HGADModel\n")
    targets = imported_modules(bad)
    assert "hgad_edge.training.model" in targets
    assert layer_of("hgad_edge.training.model") not in ALLOWED["runtime"]
    (tmp_path / "rel.py").write_text("from . import x\n")
    with pytest.raises(AssertionError, match="relative import"):
        imported_modules(tmp_path / "rel.py")


def test_core_and_runtime_import_without_torch_or_training():
    """Every module of the core and the runtime imports with the train extra and the training side
    blocked (a blocked name raises ImportError on import), and loads none of them."""
    names = sorted(m for m in all_modules() if layer_of(m) in TORCH_FREE)
    blocked = [*NOT_IN_BASE_INSTALL, "hgad_edge.training", "hgad_edge.export"]
    code = f"""
import importlib, sys
for name in {blocked!r}:
    sys.modules[name] = None
for name in {names!r}:
    importlib.import_module(name)
base = {tuple(NOT_IN_BASE_INSTALL)!r}
loaded = sorted(m for m in sys.modules if m.split(".")[0] in base and sys.modules[m] is not None)
assert not loaded, loaded
print("imported", len({names!r}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert f"imported {len(names)}" in done.stdout


def test_tests_share_code_through_helpers_and_import_no_private_names():
    """Test modules share builders and fakes through tests/helpers.py (fixtures through conftest.py,
    which pytest injects): none imports another test module or conftest, and none imports a `_private`
    name of the package (a tested unit is public, or tested through the public API that uses it)."""
    other_tests = ("tests.test_", "tests.conftest")
    wrong = []
    for path in sorted((REPO / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.name}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                wrong += [f"{where}: {a.name}" for a in node.names if a.name.startswith(other_tests)]
            elif isinstance(node, ast.ImportFrom) and node.module:
                if node.module.startswith(other_tests):
                    wrong.append(f"{where}: {node.module}")
                if node.module.split(".")[0] == "hgad_edge":
                    private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                    wrong += [f"{where}: {node.module}.{name}" for name in private]
    assert not wrong, "import tests.helpers (or a public name) instead:\n" + "\n".join(wrong)
