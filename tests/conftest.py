"""Fixtures shared by several test modules: a tiny generated two-class dataset with clearly visible
defects, one small model trained on it once per session (used by the end-to-end, export and runtime
tests) and its exported bundle, and the real data set. Builders and fakes live in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import REALAD, TINY_CONFIG, make_tiny_dataset

os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`slow` also marks every test that needs the session's trained model, directly or through another
    fixture (tiny_bundle, calibrate's bundles, ...): training it (tiny_run) and its torch.onnx export
    (tiny_bundle, FP32 + FP16) with the tests that use them take a loaded two-core machine past two
    minutes, the budget of the quick run (`-m "not slow"`)."""
    for item in items:
        if "tiny_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """A model trained on tiny_data with the real default (Lite1) backbone (a few CPU seconds); a test
    using it, or tiny_bundle built on it, is `slow` (see above)."""
    from hgad_edge.training.config import HGADConfig
    from hgad_edge.training.data import open_roots
    from hgad_edge.training.train import train

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    train(HGADConfig.from_dict(TINY_CONFIG), open_roots([tiny_data]), out)
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run, tmp_path_factory):
    """The tiny run exported (FP32 + mixed FP16 ONNX + metadata)."""
    from hgad_edge.export.onnx_export import export_bundle

    return export_bundle(tiny_run, tmp_path_factory.mktemp("bundle") / "b")


@pytest.fixture(scope="session")
def realad() -> Path:
    if not REALAD.is_dir():
        pytest.skip(f"real data not present at {REALAD} (needs ../shared/data/realad beside the repo)")
    return REALAD
