"""Reading and checking an exported bundle (`hgad-edge export` output) without torch.

A bundle is a folder with `metadata.json`, ONNX models and optional `engines/*.engine`. Everything
the runtime needs (input size, class names, thresholds, tensor names) comes from the metadata, so
a check here catches a bundle from another exporter version before any backend is touched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .. import __version__ as PACKAGE_VERSION
from ..files import sha256_file
from .errors import BundleError, Status

__all__ = ["BUNDLE_FORMAT", "FORMAT_VERSIONS", "OUTPUT_NAMES", "Bundle", "load_bundle", "sha256_file"]

BUNDLE_FORMAT = "hgad-edge-bundle"
FORMAT_VERSIONS = (1,)
OUTPUT_NAMES = ("anomaly_map", "score", "score_normalized", "class_pred")
PRECISIONS = ("fp32", "fp16")
_REEXPORT = "re-export it with this hgad-edge version (hgad-edge export)"


@dataclass(frozen=True)
class Bundle:
    """Validated view of a bundle folder; `metadata` keeps the raw dict for the engine check."""

    path: Path
    metadata: dict[str, Any]
    classes: tuple[str, ...]
    input_size: tuple[int, int]
    input_name: str
    class_input_name: str
    thresholds: tuple[float, ...]
    normalized_threshold: float
    models: dict[str, dict[str, str]]
    display_range: tuple[float, float]

    def model_path(self, precision: str) -> Path:
        """Path of the ONNX model of `precision` ("fp32"/"fp16"); raises if the bundle has none."""
        if precision not in self.models:
            msg = (
                f"bundle {self.path} has no {precision} model (it has {sorted(self.models)}); "
                f"pick precision={sorted(self.models)[0]!r} or re-export with that precision"
            )
            raise BundleError(msg, Status.BUNDLE_INCOMPATIBLE)
        return self.path / self.models[precision]["file"]

    def engines_dir(self) -> Path:
        return self.path / "engines"


def load_bundle(path: Path | str) -> Bundle:
    """Open a bundle folder (or its metadata.json) and check it was written for this runtime."""
    folder = _bundle_folder(Path(path))
    meta = _read_metadata(folder / "metadata.json")
    check_compatible(meta, folder)
    return _to_bundle(folder, meta)


def _bundle_folder(path: Path) -> Path:
    if path.is_file() and path.name == "metadata.json":
        return path.parent
    if not path.exists():
        msg = f"bundle {path} does not exist; pass the folder written by `hgad-edge export`"
        raise BundleError(msg, Status.BUNDLE_NOT_FOUND)
    if not path.is_dir():
        msg = f"bundle {path} is not a folder; pass the folder written by `hgad-edge export` (it holds metadata.json)"
        raise BundleError(msg, Status.BUNDLE_NOT_FOUND)
    return path


def _read_metadata(path: Path) -> dict[str, Any]:
    if not path.is_file():
        msg = f"{path} is missing, so {path.parent} is not a bundle; create one with `hgad-edge export`"
        raise BundleError(msg, Status.BUNDLE_NOT_FOUND)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        msg = f"cannot read {path}: {err}; the bundle is damaged, copy it again or {_REEXPORT}"
        raise BundleError(msg, Status.BUNDLE_INCOMPATIBLE) from err
    if not isinstance(meta, dict):
        msg = f"{path} does not hold a JSON object; the bundle is damaged, {_REEXPORT}"
        raise BundleError(msg, Status.BUNDLE_INCOMPATIBLE)
    return meta


def _major(version: str) -> Optional[int]:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def check_compatible(meta: dict[str, Any], folder: Path | str = "<bundle>") -> None:
    """Refuse bundles of another format, format version or package major version."""
    incompatible = Status.BUNDLE_INCOMPATIBLE
    if meta.get("format") != BUNDLE_FORMAT:
        msg = f"{folder} is not an hgad-edge bundle (format={meta.get('format')!r}, expected {BUNDLE_FORMAT!r}); {_REEXPORT}"
        raise BundleError(msg, incompatible)
    if meta.get("format_version") not in FORMAT_VERSIONS:
        msg = (
            f"bundle {folder} has format_version {meta.get('format_version')!r}; this runtime "
            f"(hgad-edge {PACKAGE_VERSION}) reads {list(FORMAT_VERSIONS)}: {_REEXPORT}, or install the "
            f"hgad-edge version that wrote it ({meta.get('package_version', 'unknown')})"
        )
        raise BundleError(msg, incompatible)
    theirs, ours = _major(meta.get("package_version", "")), _major(PACKAGE_VERSION)
    if theirs != ours:
        msg = (
            f"bundle {folder} was exported by hgad-edge {meta.get('package_version')!r}, this runtime is "
            f"{PACKAGE_VERSION} (major versions differ): {_REEXPORT}"
        )
        raise BundleError(msg, incompatible)


def _require(meta: dict[str, Any], key: str, folder: Path) -> Any:
    if key not in meta:
        msg = f"{folder}/metadata.json has no {key!r} entry; {_REEXPORT}"
        raise BundleError(msg, Status.BUNDLE_INCOMPATIBLE)
    return meta[key]


def _to_bundle(folder: Path, meta: dict[str, Any]) -> Bundle:
    bad = Status.BUNDLE_INCOMPATIBLE
    classes = _require(meta, "classes", folder)
    size = _require(meta, "input_size", folder)
    thresholds = _require(meta, "thresholds", folder)
    outputs = _require(meta, "outputs", folder)
    models = _check_models(_require(meta, "models", folder), folder)
    if not classes or not all(isinstance(c, str) for c in classes):
        raise BundleError(f"{folder}/metadata.json: 'classes' must be a non-empty list of names; {_REEXPORT}", bad)
    if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
        raise BundleError(f"{folder}/metadata.json: 'input_size' must be [H, W], got {size!r}; {_REEXPORT}", bad)
    if len(thresholds) != len(classes):
        msg = f"{folder}/metadata.json: {len(thresholds)} thresholds for {len(classes)} classes; {_REEXPORT}"
        raise BundleError(msg, bad)
    missing = [name for name in OUTPUT_NAMES if name not in outputs]
    if missing:
        raise BundleError(f"{folder}/metadata.json: outputs lack {missing}; {_REEXPORT}", bad)
    return Bundle(
        path=folder,
        metadata=meta,
        classes=tuple(classes),
        input_size=(int(size[0]), int(size[1])),
        input_name=str(meta.get("input", {}).get("name", "images")),
        class_input_name=str(meta.get("class_input", {}).get("name", "class_id")),
        thresholds=tuple(float(t) for t in thresholds),
        normalized_threshold=float(meta.get("normalized_threshold", 0.5)),
        models=models,
        display_range=_display_range(meta),
    )


def _check_models(models: Any, folder: Path) -> dict[str, dict[str, str]]:
    if not isinstance(models, dict) or not any(p in models for p in PRECISIONS):
        msg = f"{folder}/metadata.json: 'models' lists no fp32/fp16 ONNX model; {_REEXPORT}"
        raise BundleError(msg, Status.BUNDLE_INCOMPATIBLE)
    return {p: dict(models[p]) for p in PRECISIONS if p in models}


def _display_range(meta: dict[str, Any]) -> tuple[float, float]:
    """Colour range of the heat-map overlay; the fused scorer's maps live in [0, 1]."""
    lo, hi = meta.get("display_range", (0.0, 1.0))
    return (float(lo), float(hi)) if float(hi) > float(lo) else (0.0, 1.0)
