"""The bundle's format, written by `hgad-edge export` and read by the runtime: one schema, torch-free.

A bundle travels over USB sticks and network shares, so nothing in it is trusted: `from_json`
type- and range-checks every value that decides PASS/FAIL, every file it names must be a bare
file name inside the bundle, and the exporter writes a copy of the deciding values into each ONNX
file's own `metadata_props` (see `onnx_metadata_props`) so that an edited metadata.json is caught
(`check_onnx_copy`). Problems raise `SchemaError` naming the field; callers add the fix.

Score semantics: the graph outputs `anomaly_map`, `score` and `class_pred` only; the PASS/FAIL
decision is made on the host from this metadata (hgad_edge.core.thresholds), so recalibrating never
changes a graph or an engine. Per class c, `thresholds[c]` is in score units and `scales[c]` > 0;
score_normalized = sigmoid((score - thresholds[c]) / scales[c]), anomalous iff it is >=
`normalized_threshold`. A `calibration` record (written by `hgad-edge calibrate`) allows
thresholds and scales to differ from the ONNX copy; classes, input size and tiling never may.

INT8 (optional): the Q/DQ graphs `models.int8` (ONNX Runtime) and `models.int8_trt` (TensorRT) are
checked like the others (sha256, the ONNX copy); `quantization` records how (tool, calibration
images and method, the parts quantized); informative, kept as it is.

Tiling (optional, `tiling`: {tile, overlap, blend} or null; absent in older bundles = null): the
runtime cuts each frame into tiles, scores them as one batch and stitches their maps
(hgad_edge.core.tiling); the frame's score is the max of its tiles', and the thresholds were fitted
on such frame scores, so tiling is part of what a score means and is copied into the ONNX files too.

Lineage (optional, `lineage`: a list, oldest first; absent in older bundles and in models trained from
scratch = []): one entry per class change the model went through (`hgad-edge train --from`), each with
the parent model's sha256, the change ({add, retrain, remove}: class names), the date and what the
change did (informative: classes, flows, steps, per-class threshold status). Type-checked, not copied
into the ONNX files: it says where a model came from and decides nothing.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

from hgad_edge import __version__ as PACKAGE_VERSION
from hgad_edge.core.thresholds import NORMALIZED_THRESHOLD
from hgad_edge.core.tiling import Tiling, TilingError

__all__ = [
    "BUNDLE_FORMAT",
    "ENGINES_DIR",
    "FORMAT_VERSION",
    "FORMAT_VERSIONS",
    "INPUT_NAMES",
    "LINEAGE_CHANGES",
    "METADATA_FILE",
    "MODEL_FILES",
    "OUTPUT_NAMES",
    "PRECISIONS",
    "BundleMetadata",
    "ModelFile",
    "SchemaError",
    "check_file_name",
    "check_lineage",
    "check_onnx_copy",
    "describe_lineage",
    "onnx_metadata_props",
    "read_onnx_metadata_props",
    "resolve_in",
]

BUNDLE_FORMAT = "hgad-edge-bundle"
FORMAT_VERSION = 1  # what this exporter writes
FORMAT_VERSIONS = (1,)  # what this runtime reads
METADATA_FILE = "metadata.json"
ENGINES_DIR = "engines"
INPUT_NAMES = ("images", "class_id")  # uint8 (B, H, W, 3) RGB; int64 (B,) with -1 = auto
OUTPUT_NAMES = ("anomaly_map", "score", "class_pred")  # graph outputs, in order (score_normalized is host-side)
# The bundle's ONNX graphs by metadata "models" key. The two INT8 graphs are Q/DQ copies of the FP32 graph
# from one calibration (`hgad-edge quantize`): "int8" for ONNX Runtime (uint8 asymmetric activations), "int8_trt"
# for TensorRT (symmetric int8 only); bundles without them (every bundle before INT8) load as before.
MODEL_FILES = {
    "fp32": "model_fp32.onnx",
    "fp16": "model_fp16.onnx",
    "int8": "model_int8.onnx",
    "int8_trt": "model_int8_trt.onnx",
}
PRECISIONS = tuple(MODEL_FILES)
FLOAT_MODELS = ("fp32", "fp16")  # what `hgad-edge export` writes; every bundle has at least one
INPUT_STRIDE, MIN_INPUT_SIDE = 32, 64  # the backbone downsamples by 32; below 64 px there is no feature map
# Values the exporter copies into each ONNX file's metadata_props (JSON-encoded).
FIXED_IN_ONNX = ("classes", "input_size", "tiling")  # must always equal metadata.json (tiling: when set)
CALIBRATED_IN_ONNX = ("thresholds", "scales", "normalized_threshold")  # may differ after a recalibration
_ONNX_PROPS = ("format", "format_version", "package_version", *FIXED_IN_ONNX, *CALIBRATED_IN_ONNX,
               "checkpoint_sha256", "precision")
_SHA256 = re.compile(r"[0-9a-f]{64}")
LINEAGE_CHANGES = ("add", "retrain", "remove")  # the class changes a lineage entry records


class SchemaError(ValueError):
    """metadata.json (or an ONNX file's metadata copy) breaks the bundle schema; the message names the field."""


# ---- file names -----------------------------------------------------------------------------------
def check_file_name(name: Any, what: str) -> str:
    """A bare file name (no folder part, not absolute, not . or ..): the only kind a bundle may name."""
    if not isinstance(name, str) or not name or name in (".", "..") or "\x00" in name:
        raise SchemaError(f"{what} must be a file name, got {name!r}")
    if "/" in name or "\\" in name or ":" in name or os.path.isabs(name) or Path(name).name != name:
        raise SchemaError(f"{what} {name!r} is not a bare file name inside the bundle (no folders, no absolute paths)")
    try:  # a name no file system can hold would otherwise end in an OSError or UnicodeEncodeError on use
        encoded = os.fsencode(name)
    except UnicodeError:
        raise SchemaError(f"{what} {name!r} is not a file name this system can encode") from None
    if len(encoded) > 255:
        raise SchemaError(f"{what} is {len(encoded)} bytes long; a file name has at most 255")
    return name


def resolve_in(folder: Path, name: str, what: str) -> Path:
    """folder/name after `check_file_name`, refusing a symlink that points outside `folder`."""
    path = Path(folder) / check_file_name(name, what)
    try:
        if path.is_symlink() or path.exists():
            real, root = os.path.realpath(path), os.path.realpath(folder)
            if os.path.commonpath([real, root]) != root:
                raise SchemaError(f"{what} {name!r} is a link to {real}, outside the bundle")
    except OSError as err:  # a link loop, no permission
        raise SchemaError(f"{what} {name!r} cannot be resolved: {err.strerror or err}") from err
    return path


# ---- value checks ---------------------------------------------------------------------------------
def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SchemaError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _numbers(value: Any, what: str, count: int, positive: bool = False) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) != count:
        raise SchemaError(f"{what} must be a list of {count} numbers (one per class), got {value!r}")
    out = tuple(_number(v, f"{what}[{i}]") for i, v in enumerate(value))
    if positive and any(v <= 0 for v in out):
        raise SchemaError(f"{what} must all be > 0, got {list(out)}")
    return out


def _classes(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c.strip() for c in value):
        raise SchemaError(f"'classes' must be a non-empty list of non-empty names, got {value!r}")
    if len(set(value)) != len(value):
        raise SchemaError(f"'classes' names must be distinct, got {value!r}")
    return tuple(value)


def _input_size(value: Any) -> tuple[int, int]:
    ints = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ints or len(value) != 2 or any(v < MIN_INPUT_SIDE or v % INPUT_STRIDE for v in value):
        rule = f"multiples of {INPUT_STRIDE} and >= {MIN_INPUT_SIDE}"
        raise SchemaError(f"'input_size' must be [H, W], {rule}, got {value!r}")
    return int(value[0]), int(value[1])


def _normalized_threshold(value: Any) -> float:
    number = _number(value, "'normalized_threshold'")
    if not 0.0 < number < 1.0:
        msg = (f"'normalized_threshold' must lie between 0 and 1 ({NORMALIZED_THRESHOLD}: the calibrated threshold), "
               f"got {value!r}")
        raise SchemaError(msg)
    return number


def _tiling(value: Any, input_size: tuple[int, int]) -> Tiling | None:
    """The optional tiling: None (null or absent: frames resized whole) or a checked Tiling."""
    fix = "fix the run config's `tiling` section and re-export (tiling: null resizes frames whole)"
    try:
        tiling = Tiling.from_dict(value)
    except (TilingError, TypeError) as err:
        raise SchemaError(f"'tiling' is not usable: {err}; {fix}") from err
    if tiling is not None and input_size[0] != input_size[1]:
        raise SchemaError(f"'tiling' needs a square input_size (tiles are square), got {list(input_size)}; {fix}")
    return tiling


def check_lineage(value: Any) -> tuple[dict[str, Any], ...]:
    """A model's lineage (see the module docstring): () for None (trained from scratch), else each entry
    checked for a parent sha256, a change of class-name lists and a date; other keys kept as they are."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise SchemaError(f"'lineage' must be a list of changes, got {type(value).__name__}")
    for i, entry in enumerate(value):
        what = f"'lineage'[{i}]"
        if not isinstance(entry, dict):
            raise SchemaError(f"{what} must be an object, got {entry!r}")
        sha = entry.get("parent_sha256")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise SchemaError(f"{what}.parent_sha256 must be the parent model's 64-hex-digit sha256, got {sha!r}")
        change = entry.get("change")
        if not isinstance(change, dict) or set(change) - set(LINEAGE_CHANGES) or not any(change.values()):
            raise SchemaError(f"{what}.change must name classes under {'/'.join(LINEAGE_CHANGES)}, got {change!r}")
        for key, names in change.items():
            if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
                raise SchemaError(f"{what}.change.{key} must be a list of class names, got {names!r}")
        if not isinstance(entry.get("date"), str):
            raise SchemaError(f"{what}.date must be the change's date (ISO 8601 text), got {entry.get('date')!r}")
    return tuple(dict(e) for e in value)


def describe_lineage(lineage: Any) -> list[str]:
    """One line per change, oldest first (what `eval`, `info BUNDLE` and the runtime show); a model
    trained from scratch: one line saying so."""
    entries = check_lineage(list(lineage) if lineage else None)
    if not entries:
        return ["trained from scratch (no class changes)"]
    lines = []
    for i, e in enumerate(entries, 1):
        what = "; ".join(f"{k} {', '.join(e['change'][k])}" for k in LINEAGE_CHANGES if e["change"].get(k))
        how = f", flows {e['flows']}, {e.get('steps', 0)} steps" if e.get("flows") not in (None, "unchanged") else ""
        status = e.get("thresholds") or {}
        refit = [c for c, v in status.items() if v == "refitted"]
        kept = [c for c, v in status.items() if v == "kept"]
        checked = ""
        if status:
            checked = f"; thresholds kept: {', '.join(kept) or 'none'}, refitted: {', '.join(refit) or 'none'}"
        lines.append(f"{i}. {e['date']}: {what} (parent model {e['parent_sha256'][:12]}{how}){checked}")
    return lines


def _display_range(value: Any) -> tuple[float, float]:
    if not isinstance(value, list) or len(value) != 2:
        raise SchemaError(f"'display_range' must be [low, high], got {value!r}")
    lo, hi = _number(value[0], "'display_range'[0]"), _number(value[1], "'display_range'[1]")
    if not hi > lo:
        raise SchemaError(f"'display_range' must increase (low < high), got {value!r}")
    return lo, hi


def _tensor_name(value: Any, key: str, default: str) -> str:
    if value is None:
        return default
    name = value.get("name") if isinstance(value, dict) else None
    if not isinstance(name, str) or not name:
        raise SchemaError(f"{key!r} must be an object with a tensor 'name', got {value!r}")
    return name


def _outputs(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SchemaError(f"'outputs' must be a list of tensor names, got {value!r}")
    missing = [name for name in OUTPUT_NAMES if name not in value]
    if missing:
        raise SchemaError(f"'outputs' lacks {missing}")
    return tuple(value)


@dataclass(frozen=True)
class ModelFile:
    """One ONNX model of the bundle: its bare file name and the sha256 recorded at export."""

    file: str
    sha256: str
    facts: dict[str, Any] = field(default_factory=dict)  # exporter, opset, nodes (informative)

    @classmethod
    def from_json(cls, value: Any, precision: str) -> ModelFile:
        what = f"'models'.{precision}"
        if not isinstance(value, dict):
            raise SchemaError(f"{what} must be an object with 'file' and 'sha256', got {value!r}")
        sha = value.get("sha256")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise SchemaError(f"{what}.sha256 must be the 64-hex-digit sha256 recorded at export, got {sha!r}")
        facts = {k: v for k, v in value.items() if k not in ("file", "sha256")}
        return cls(check_file_name(value.get("file"), f"{what}.file"), sha, facts)

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, **self.facts}


def _models(value: Any) -> dict[str, ModelFile]:
    if not isinstance(value, dict) or not value:
        raise SchemaError(f"'models' lists no ONNX model (expected {'/'.join(PRECISIONS)} entries)")
    unknown = [p for p in value if p not in PRECISIONS]
    if unknown:
        raise SchemaError(f"'models' has unknown precision(s) {unknown}; allowed: {list(PRECISIONS)}")
    if not any(p in value for p in FLOAT_MODELS):
        msg = f"'models' has no {' or '.join(FLOAT_MODELS)} graph (INT8 graphs are quantized copies of fp32)"
        raise SchemaError(msg)
    return {p: ModelFile.from_json(value[p], p) for p in PRECISIONS if p in value}


def _engines(value: Any) -> dict[str, dict[str, Any]]:
    """Engine entries (written by `hgad-edge build`): bare file names under engines/, objects as values."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(e, dict) for e in value.values()):
        raise SchemaError(f"'engines' must map engine file names to objects, got {value!r}")
    for name in value:
        check_file_name(name, "engine")
    return {name: dict(entry) for name, entry in value.items()}


def _major(version: Any) -> int | None:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def check_compatible(meta: dict[str, Any]) -> None:
    """Refuse another format, format version or package major version (before reading any value)."""
    if meta.get("format") != BUNDLE_FORMAT:
        raise SchemaError(f"not an hgad-edge bundle (format={meta.get('format')!r}, expected {BUNDLE_FORMAT!r})")
    if meta.get("format_version") not in FORMAT_VERSIONS:
        msg = (
            f"format_version {meta.get('format_version')!r}; this runtime (hgad-edge {PACKAGE_VERSION}) reads "
            f"{list(FORMAT_VERSIONS)} (or install the hgad-edge version that wrote it, "
            f"{meta.get('package_version', 'unknown')})"
        )
        raise SchemaError(msg)
    if _major(meta.get("package_version", "")) != _major(PACKAGE_VERSION):
        theirs = meta.get("package_version")
        raise SchemaError(f"exported by hgad-edge {theirs!r}, this is {PACKAGE_VERSION} (major versions differ)")


_KNOWN = {"format", "format_version", "package_version", "classes", "input_size", "input", "class_input", "outputs",
          "thresholds", "scales", "normalized_threshold", "display_range", "models", "engines", "calibration",
          "tiling", "lineage"}


@dataclass(frozen=True)
class BundleMetadata:
    """Typed, validated metadata.json. `extra` keeps informative keys (checkpoint sha, backbone...)."""

    classes: tuple[str, ...]
    input_size: tuple[int, int]
    thresholds: tuple[float, ...]
    scales: tuple[float, ...]  # sigmoid slope per class (score units), see the module docstring
    models: dict[str, ModelFile]
    normalized_threshold: float = NORMALIZED_THRESHOLD
    display_range: tuple[float, float] = (0.0, 1.0)
    calibration: dict[str, Any] | None = None  # {policy, images, date, expected rates} of `hgad-edge calibrate`
    outputs: tuple[str, ...] = OUTPUT_NAMES
    input_name: str = INPUT_NAMES[0]
    class_input_name: str = INPUT_NAMES[1]
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)
    package_version: str = PACKAGE_VERSION
    tiling: Tiling | None = None  # None: frames resized whole to input_size (every bundle before tiling)
    lineage: tuple[dict[str, Any], ...] = ()  # class changes the model went through, oldest first (none: from scratch)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, meta: Any) -> BundleMetadata:
        """Parse and check a metadata.json object; raises SchemaError naming the first bad field."""
        if not isinstance(meta, dict):
            raise SchemaError(f"metadata must be a JSON object, got {type(meta).__name__}")
        check_compatible(meta)
        for key in ("classes", "input_size", "thresholds", "scales", "models"):
            if key not in meta:
                raise SchemaError(f"no {key!r} entry")
        classes = _classes(meta["classes"])
        calibration = meta.get("calibration")
        if calibration is not None and not isinstance(calibration, dict):
            raise SchemaError(f"'calibration' must be an object (policy, images, date, rates), got {calibration!r}")
        input_size = _input_size(meta["input_size"])
        return cls(
            classes=classes,
            input_size=input_size,
            thresholds=_numbers(meta["thresholds"], "'thresholds'", len(classes)),
            scales=_numbers(meta["scales"], "'scales'", len(classes), positive=True),
            models=_models(meta["models"]),
            normalized_threshold=_normalized_threshold(meta.get("normalized_threshold", NORMALIZED_THRESHOLD)),
            display_range=_display_range(meta.get("display_range", [0.0, 1.0])),
            calibration=None if calibration is None else dict(calibration),
            outputs=_outputs(meta.get("outputs", list(OUTPUT_NAMES))),
            input_name=_tensor_name(meta.get("input"), "input", INPUT_NAMES[0]),
            class_input_name=_tensor_name(meta.get("class_input"), "class_input", INPUT_NAMES[1]),
            engines=_engines(meta.get("engines")),
            package_version=str(meta.get("package_version")),
            tiling=_tiling(meta.get("tiling"), input_size),
            lineage=check_lineage(meta.get("lineage")),
            extra={k: v for k, v in meta.items() if k not in _KNOWN},
        )

    def to_json(self) -> dict[str, Any]:
        """The metadata.json object; checked by `from_json` first, so a bad bundle is never written."""
        meta: dict[str, Any] = {
            "format": BUNDLE_FORMAT,
            "format_version": FORMAT_VERSION,
            "package_version": self.package_version,
            "classes": list(self.classes),
            "input_size": list(self.input_size),
            "input": {"name": self.input_name, "dtype": "uint8", "layout": "NHWC", "channels": "RGB"},
            "class_input": {"name": self.class_input_name, "dtype": "int64", "auto": -1},
            "outputs": list(self.outputs),
            "thresholds": list(self.thresholds),
            "scales": list(self.scales),
            "normalized_threshold": self.normalized_threshold,
            "display_range": list(self.display_range),
            "models": {p: m.to_json() for p, m in self.models.items()},
            "engines": dict(self.engines),
            **self.extra,
        }
        if self.calibration is not None:
            meta["calibration"] = dict(self.calibration)
        if self.tiling is not None:  # untiled bundles keep the metadata.json of before tiling
            meta["tiling"] = self.tiling.to_dict()
        if self.lineage:  # models trained from scratch keep the metadata.json of before lineage
            meta["lineage"] = [dict(e) for e in self.lineage]
        BundleMetadata.from_json(json.loads(json.dumps(meta)))
        return meta

    def check_values(self) -> None:
        """The checks of `from_json` that need no model file: the exporter runs them before any export work."""
        classes = _classes(list(self.classes))
        input_size = _input_size(list(self.input_size))
        _tiling(None if self.tiling is None else self.tiling.to_dict(), input_size)
        _numbers(list(self.thresholds), "'thresholds'", len(classes))
        _numbers(list(self.scales), "'scales'", len(classes), positive=True)
        _normalized_threshold(self.normalized_threshold)
        _display_range(list(self.display_range))
        check_lineage([dict(e) for e in self.lineage] or None)

    def with_models(self, models: dict[str, ModelFile]) -> BundleMetadata:
        return replace(self, models=dict(models))

    def with_calibration(self, thresholds, scales, calibration: dict[str, Any] | None) -> BundleMetadata:
        """New per-class thresholds and scales with the `hgad-edge calibrate` record that lets them differ
        from the ONNX copy (None: back to the exported values, which must then equal that copy)."""
        return replace(self, thresholds=tuple(float(t) for t in thresholds), scales=tuple(float(v) for v in scales),
                       calibration=None if calibration is None else dict(calibration))


# ---- the copy inside each ONNX file ---------------------------------------------------------------
def onnx_metadata_props(meta: BundleMetadata, precision: str) -> dict[str, str]:
    """key -> JSON text the exporter stores in an ONNX file's metadata_props (checked on load)."""
    values = {
        "format": BUNDLE_FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": meta.package_version,
        "classes": list(meta.classes),
        "input_size": list(meta.input_size),
        "thresholds": list(meta.thresholds),
        "scales": list(meta.scales),
        "normalized_threshold": meta.normalized_threshold,
        "tiling": None if meta.tiling is None else meta.tiling.to_dict(),
        "checkpoint_sha256": meta.extra.get("checkpoint_sha256"),
        "precision": precision,
    }
    return {k: json.dumps(values[k]) for k in _ONNX_PROPS if values.get(k) is not None}


def check_onnx_copy(meta: BundleMetadata, props: dict[str, str], file: str) -> None:
    """Raise SchemaError when metadata.json disagrees with the copy inside ONNX `file`.

    Classes, input size and tiling (when either side has one) must always agree; thresholds, scales
    and the normalised threshold may differ only when metadata.json carries a `calibration` record
    (a deliberate recalibration).
    """
    ours = onnx_metadata_props(meta, "")
    keys = FIXED_IN_ONNX if meta.calibration is not None else (*FIXED_IN_ONNX, *CALIBRATED_IN_ONNX)
    for key in keys:
        theirs = props.get(key)
        mine = ours.get(key)
        if theirs is None and mine is None:
            continue
        if theirs is None:
            raise SchemaError(f"{file} carries no copy of {key!r} (not written by `hgad-edge export` of this version)")
        try:
            same = json.loads(theirs) == json.loads(mine) if mine is not None else False
        except json.JSONDecodeError:
            same = False
        if not same:
            shown = "absent" if mine is None else mine
            raise SchemaError(f"{key!r} in metadata.json ({shown}) differs from the copy inside {file} ({theirs})")


def _varint(fh: BinaryIO) -> int | None:
    shift = result = 0
    while True:
        byte = fh.read(1)
        if not byte:
            return None if shift == 0 else -1
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            return -1


def _string_pair(data: bytes) -> tuple[str, str]:
    """StringStringEntryProto {1: key, 2: value} -> (key, value)."""
    fh, out = io.BytesIO(data), {1: "", 2: ""}
    while (tag := _varint(fh)) is not None:
        if tag < 0 or tag & 7 != 2:
            raise SchemaError("malformed metadata_props entry")
        length = _varint(fh)
        if length is None or length < 0:
            raise SchemaError("malformed metadata_props entry")
        out[tag >> 3] = fh.read(length).decode("utf-8", errors="replace")
    return out[1], out[2]


def read_onnx_metadata_props(path: Path | str) -> dict[str, str]:
    """ModelProto.metadata_props (field 14) of an ONNX file, read without the onnx package.

    Walks the top-level protobuf fields and seeks over the others (the graph can be hundreds of MB).
    """
    props: dict[str, str] = {}
    skip = {0: None, 1: 8, 5: 4}  # wire type -> fixed size (None: a varint)
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        while (tag := _varint(fh)) is not None:
            wire, number = (tag & 7, tag >> 3) if tag >= 0 else (-1, 0)
            if wire == 2:
                length = _varint(fh)
                if length is None or length < 0 or fh.tell() + length > size:  # never read or seek past the end
                    raise SchemaError(f"{Path(path).name} is not a complete ONNX file")
                if number == 14:
                    key, value = _string_pair(fh.read(length))
                    props[key] = value
                else:
                    fh.seek(length, os.SEEK_CUR)
            elif wire in skip:
                if skip[wire] is None:
                    _varint(fh)
                else:
                    fh.seek(skip[wire], os.SEEK_CUR)
            else:
                raise SchemaError(f"{Path(path).name} is not an ONNX file (unexpected protobuf wire type {wire})")
    return props
