"""Opening an exported bundle (`hgad-edge export` output) without torch, trusting nothing in it.

A bundle is a folder with `metadata.json`, ONNX models and optional `engines/*.engine`; its format
lives in `hgad_edge.core.bundle_schema`. On load, before any backend is touched:
  1. metadata.json is parsed by the schema: format/version, and every value that decides PASS/FAIL
     (classes, input size, thresholds, scales, normalised threshold, tiling) type- and range-checked;
  2. every file it names is a bare file name inside the bundle (no folders, no links out);
  3. every ONNX model's sha256 equals the one recorded at export;
  4. classes, input size, tiling (and, unless metadata.json records a recalibration, thresholds and
     scales) equal the copy the exporter wrote into each ONNX file's own metadata_props.
Any failure is a BundleError that says how to get a good bundle again. Thresholds and scales are
read from metadata.json, never from a graph: the graphs output scores, the runtime decides PASS/FAIL
on the host, so `hgad-edge calibrate` rewrites metadata.json and graphs and engines stay byte-identical.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hgad_edge.core.bundle_schema import (
    ENGINES_DIR,
    METADATA_FILE,
    OUTPUT_NAMES,
    BundleMetadata,
    SchemaError,
    check_onnx_copy,
    read_onnx_metadata_props,
    resolve_in,
)
from hgad_edge.core.errors import BundleError, Status
from hgad_edge.core.files import sha256_file
from hgad_edge.core.tiling import Tiling

__all__ = ["OUTPUT_NAMES", "Bundle", "load_bundle", "sha256_file"]

_REEXPORT = "re-export it with this hgad-edge version (hgad-edge export RUN --out BUNDLE)"
_RECOPY = "copy the whole bundle folder again from the training PC, or re-export it (hgad-edge export RUN --out BUNDLE)"


@dataclass(frozen=True)
class Bundle:
    """A verified bundle folder; `metadata` keeps the raw dict for the TensorRT engine choice."""

    path: Path
    metadata: dict[str, Any]
    schema: BundleMetadata

    @property
    def classes(self) -> tuple[str, ...]:
        return self.schema.classes

    @property
    def input_size(self) -> tuple[int, int]:
        return self.schema.input_size

    @property
    def input_name(self) -> str:
        return self.schema.input_name

    @property
    def class_input_name(self) -> str:
        return self.schema.class_input_name

    @property
    def thresholds(self) -> tuple[float, ...]:
        return self.schema.thresholds

    @property
    def scales(self) -> tuple[float, ...]:
        """Per-class sigmoid slopes of score_normalized (the host-side decision, hgad_edge.core.thresholds)."""
        return self.schema.scales

    @property
    def normalized_threshold(self) -> float:
        return self.schema.normalized_threshold

    @property
    def display_range(self) -> tuple[float, float]:
        return self.schema.display_range

    @property
    def tiling(self) -> Tiling | None:
        """How frames are cut into tiles (hgad_edge.core.tiling), or None: each frame resized whole."""
        return self.schema.tiling

    @property
    def lineage(self) -> tuple[dict[str, Any], ...]:
        """The class changes the model went through (`hgad-edge train --from`), oldest first; () from scratch."""
        return self.schema.lineage

    @property
    def calibration(self) -> dict[str, Any] | None:
        """The recalibration record (`hgad-edge calibrate`), or None for the thresholds of the export."""
        return self.schema.calibration

    @property
    def models(self) -> dict[str, dict[str, Any]]:
        """precision -> {"file", "sha256", ...} as in metadata.json (file names already checked)."""
        return {p: m.to_json() for p, m in self.schema.models.items()}

    def model_path(self, precision: str) -> Path:
        """Path of the ONNX model of `precision` ("fp32"/"fp16"); raises if the bundle has none."""
        if precision not in self.schema.models:
            msg = (
                f"bundle {self.path} has no {precision} model (it has {sorted(self.schema.models)}); "
                f"pick precision={sorted(self.schema.models)[0]!r} or re-export with that precision"
            )
            raise BundleError(msg, Status.BUNDLE_INCOMPATIBLE)
        return self.path / self.schema.models[precision].file

    def engines_dir(self) -> Path:
        return self.path / ENGINES_DIR

    def engine_path(self, name: str) -> Path:
        """engines/<name>, refusing names with folders and links that point out of the bundle."""
        try:
            resolve_in(self.path, ENGINES_DIR, "engines folder")
            return resolve_in(self.engines_dir(), name, "engine")
        except SchemaError as err:
            raise BundleError(f"{self.path}/{METADATA_FILE}: {err}; {_REEXPORT}", Status.BUNDLE_INCOMPATIBLE) from err


def load_bundle(path: Path | str) -> Bundle:
    """Open a bundle folder (or its metadata.json) and verify it (see the module docstring)."""
    folder = _bundle_folder(Path(path))
    meta = _read_metadata(folder / METADATA_FILE)
    try:
        schema = BundleMetadata.from_json(meta)
    except SchemaError as err:
        raise BundleError(f"{folder}/{METADATA_FILE}: {err}; {_REEXPORT}", Status.BUNDLE_INCOMPATIBLE) from err
    for precision in schema.models:
        _verify_model(folder, schema, precision)
    return Bundle(folder, meta, schema)


def _bundle_folder(path: Path) -> Path:
    if path.is_file() and path.name == METADATA_FILE:
        return path.parent
    if not path.exists():
        msg = f"bundle {path} does not exist; pass the folder written by `hgad-edge export`"
        raise BundleError(msg, Status.BUNDLE_NOT_FOUND)
    if not path.is_dir():
        msg = f"bundle {path} is not a folder; pass the folder written by `hgad-edge export` (it holds {METADATA_FILE})"
        raise BundleError(msg, Status.BUNDLE_NOT_FOUND)
    return path


def _read_metadata(path: Path) -> dict[str, Any]:
    if not path.is_file():
        msg = f"{path} is missing, so {path.parent} is not a bundle; create one with `hgad-edge export`"
        raise BundleError(msg, Status.BUNDLE_NOT_FOUND)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        msg = f"cannot read {path}: {err}; the bundle is damaged, {_RECOPY}"
        raise BundleError(msg, Status.BUNDLE_INCOMPATIBLE) from err
    if not isinstance(meta, dict):
        msg = f"{path} does not hold a JSON object; the bundle is damaged, {_RECOPY}"
        raise BundleError(msg, Status.BUNDLE_INCOMPATIBLE)
    return meta


def _verify_model(folder: Path, schema: BundleMetadata, precision: str) -> None:
    """Bare name inside the bundle, sha256 as recorded at export, ONNX copy equal to metadata.json."""
    entry = schema.models[precision]
    bad = Status.BUNDLE_INCOMPATIBLE
    try:
        path = resolve_in(folder, entry.file, f"models.{precision}.file")
    except SchemaError as err:
        raise BundleError(f"{folder}/{METADATA_FILE}: {err}; {_REEXPORT}", bad) from err
    if not path.is_file():
        raise BundleError(f"{path} is listed in {METADATA_FILE} but missing; {_RECOPY}", Status.BUNDLE_NOT_FOUND)
    if sha256_file(path) != entry.sha256:
        msg = (
            f"{path} does not match the sha256 recorded at export (replaced or damaged since); "
            f"do not run it: {_RECOPY}"
        )
        raise BundleError(msg, bad)
    try:
        check_onnx_copy(schema, read_onnx_metadata_props(path), path.name)
    except SchemaError as err:
        msg = (
            f"{folder}/{METADATA_FILE} disagrees with its model: {err}; metadata.json was edited or belongs to "
            f"another export: {_RECOPY} (a deliberate recalibration goes through `hgad-edge calibrate`)"
        )
        raise BundleError(msg, bad) from err
