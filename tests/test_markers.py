"""Markers that mean something (docs/testing.md): each marker pyproject.toml declares is on at least
one test, no test uses an undeclared one (--strict-markers in addopts also stops that at collection),
and every test that reads the real data set (../shared/data/realad: the `realad` fixture, or REALAD
itself) is marked `realdata`. Read from the test files' source, so any subset of the suite checks it."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

TESTS = Path(__file__).resolve().parent
# pytest's own marks: not declared in pyproject.toml
BUILTIN = {"parametrize", "skip", "skipif", "xfail", "usefixtures", "filterwarnings"}


def pytest_ini() -> dict:
    """[tool.pytest.ini_options] of pyproject.toml (pytest's getini("markers") adds its plugins' own)."""
    return tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]


def declared() -> set[str]:
    return {line.split(":", 1)[0].strip() for line in pytest_ini()["markers"]}


def marks_in(node: ast.AST) -> set[str]:
    """Names X of every `pytest.mark.X` under node (decorators, pytestmark, pytest.param(marks=...))."""
    return {
        n.attr
        for n in ast.walk(node)
        if isinstance(n, ast.Attribute) and ast.unparse(n.value) == "pytest.mark" and n.attr not in BUILTIN
    }


def module_marks(tree: ast.Module) -> set[str]:
    """The marks of a module-level `pytestmark = ...` (they apply to every test in the module)."""
    return {
        name
        for node in tree.body
        if isinstance(node, ast.Assign) and any(ast.unparse(t) == "pytestmark" for t in node.targets)
        for name in marks_in(node.value)
    }


def realad_tests(tree: ast.Module) -> dict[str, set[str]]:
    """Tests that read the real data (taking `realad`, a fixture of the module built on it, or naming
    REALAD), each with its own marks."""
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    reads = {"realad"}
    grew = True
    while grew:  # module fixtures built on the real data read it too
        found = {
            f.name
            for f in functions
            if not f.name.startswith("test_")
            and any("fixture" in ast.unparse(d) for d in f.decorator_list)
            and {a.arg for a in f.args.args} & reads
        }
        grew, reads = not found <= reads, reads | found
    return {
        f.name: marks_in(ast.Module(body=list(f.decorator_list), type_ignores=[]))
        for f in functions
        if f.name.startswith("test_")
        and (
            {a.arg for a in f.args.args} & reads
            or any(isinstance(n, ast.Name) and n.id == "REALAD" for n in ast.walk(f))
        )
    }


@functools.cache
def suite_modules() -> dict[str, ast.Module]:
    return {p.name: ast.parse(p.read_text(), str(p)) for p in sorted(TESTS.glob("test_*.py"))}



def test_every_declared_marker_is_used_and_every_used_one_declared():
    names = declared()
    used = {name: {m for m, tree in suite_modules().items() if name in marks_in(tree)} for name in names}
    unused = sorted(name for name, where in used.items() if not where)
    assert not unused, f"markers declared in pyproject.toml that no test carries: {unused}"
    undeclared = {m: sorted(marks_in(tree) - names) for m, tree in suite_modules().items() if marks_in(tree) - names}
    assert not undeclared, f"markers pyproject.toml does not declare: {undeclared}"
    assert "--strict-markers" in pytest_ini().get("addopts", "").split()


def test_tests_reading_the_real_data_are_marked_realdata():
    found, unmarked = [], []
    for name, tree in suite_modules().items():
        whole_module = "realdata" in module_marks(tree)
        for test, marks in realad_tests(tree).items():
            found.append(f"{name}::{test}")
            if not whole_module and "realdata" not in marks:
                unmarked.append(f"{name}::{test}")
    assert found, "no test reads ../shared/data/realad: is the check still looking at the right fixture?"
    assert not unmarked, f"tests reading ../shared/data/realad without @pytest.mark.realdata: {unmarked}"


def test_the_checks_see_marks_where_pytest_applies_them():
    """The checks themselves, on a made-up module: decorator, pytestmark and pytest.param marks are
    found, pytest's own marks are not markers, and a test reading the data through a fixture counts."""
    tree = ast.parse(
        "import pytest\n"
        "pytestmark = [pytest.mark.slow]\n"
        "@pytest.fixture\n"
        "def cls_dir(realad):\n"
        "    return realad / 'x'\n"
        "@pytest.mark.parametrize('x', [pytest.param(1, marks=pytest.mark.gpu)])\n"
        "@pytest.mark.skipif(True, reason='')\n"
        "def test_a(x, cls_dir):\n"
        "    pass\n"
        "@pytest.mark.realdata\n"
        "def test_b():\n"
        "    assert REALAD.is_dir()\n"
        "def test_c(tmp_path):\n"
        "    pass\n"
    )
    assert marks_in(tree) == {"slow", "gpu", "realdata"} and module_marks(tree) == {"slow"}
    assert realad_tests(tree) == {"test_a": {"gpu"}, "test_b": {"realdata"}}
