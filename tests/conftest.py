"""Shared fixtures: a tiny generated two-class dataset with clearly visible defects, and one small
model trained on it once per session (used by the end-to-end, export and runtime tests)."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]


def _train_extra_modules() -> tuple[str, ...]:
    """Import names of setup.cfg's `train` extra: what the base (runtime) install does not have."""
    import configparser
    import re

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    names = [
        re.split(r"[<>=!~ ;\[]", line.strip())[0]
        for line in cfg["options.extras_require"]["train"].splitlines()
        if line.strip()
    ]
    import_names = {"pyyaml": "yaml"}
    return tuple(import_names.get(n.lower(), n.replace("-", "_")) for n in names)


# Made unimportable in the subprocess tests that prove the runtime and the CLI need no train extra.
NOT_IN_BASE_INSTALL = _train_extra_modules()
REALAD = REPO.parent / "shared" / "data" / "realad"

TINY_SIZE = 64
TINY_CONFIG = {
    "input_size": [TINY_SIZE, TINY_SIZE],
    "flow": {"coupling_blocks": 2, "pos_dim": 32},
    "head": {"intra_centers": 3},
    "train": {"epochs": 6, "batch_size": 8, "vectors_per_image": 32, "warmup_epochs": 0.5, "calib_min": 3},
    "score": {"smooth_sigma": 1.0},
}


def _texture(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """'stripes': vertical sinusoidal stripes; 'dots': a regular grid of dark dots. Mild noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    if kind == "stripes":
        img = 128 + 60 * np.sin(xx / 3.0 + phase)
    else:
        img = 170 - 90 * ((np.sin(xx / 2.5 + phase) > 0.7) & (np.sin(yy / 2.5 + phase) > 0.7))
    img = img + rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _defect(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A bright filled square blob: visible, and its mask."""
    size = img.shape[0]
    s = size // 4
    y, x = rng.integers(4, size - s - 4, 2)
    out, mask = img.copy(), np.zeros_like(img)
    out[y : y + s, x : x + s] = 255
    mask[y : y + s, x : x + s] = 255
    return out, mask


def make_tiny_dataset(root: Path, n_train: int = 24, n_good: int = 6, n_bad: int = 6, size: int = TINY_SIZE) -> Path:
    rng = np.random.default_rng(0)
    for kind in ("stripes", "dots"):
        base = root / kind
        for sub in ("train/good", "test/good", "test/blob", "ground_truth/blob"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n_train):
            cv2.imwrite(str(base / "train/good" / f"{i:03d}.png"), _texture(kind, rng, size))
        for i in range(n_good):
            cv2.imwrite(str(base / "test/good" / f"{i:03d}.png"), _texture(kind, rng, size))
        for i in range(n_bad):
            img, mask = _defect(_texture(kind, rng, size), rng)
            cv2.imwrite(str(base / "test/blob" / f"{i:03d}.png"), img)
            cv2.imwrite(str(base / "ground_truth/blob" / f"{i:03d}_mask.png"), mask)
    return root


def load_benchmark(script: str, name: str | None = None):
    """A script of benchmarks/ loaded by path (benchmarks/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name or Path(script).stem, REPO / "benchmarks" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """A model trained on tiny_data with the real default (Lite1) backbone (a few CPU seconds)."""
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
