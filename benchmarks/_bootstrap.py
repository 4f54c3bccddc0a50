"""Make `hgad_edge` (with its runtime/, export/ and bench subpackages) importable from a bare checkout.

setup.cfg maps the top-level export/, runtime/ and benchmarks/bench/ folders into the hgad_edge package; a checkout
copied without `pip install -e .` (e.g. to a lent GPU machine) lacks that mapping, so the
benchmark scripts do it by hand.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bootstrap_package() -> None:
    try:
        import hgad_edge.bench  # noqa: F401
        import hgad_edge.export  # noqa: F401
        import hgad_edge.runtime  # noqa: F401

        return
    except ImportError:
        pass
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import hgad_edge

    folders = {"runtime": REPO / "runtime", "export": REPO / "export", "bench": REPO / "benchmarks" / "bench"}
    for sub, folder in folders.items():
        name = f"hgad_edge.{sub}"
        if name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        setattr(hgad_edge, sub, module)
        spec.loader.exec_module(module)
