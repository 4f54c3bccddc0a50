"""Engine records: the metadata.json "engines" entries the builder writes and the runtime checks.

An engine is tied to one TensorRT version, its GPUs and one ONNX file. The builder records those
facts under "engines" (`engine_entry`, `update_metadata`) and names the file after them
(`engine_name`), so engines for several devices and targets sit side by side; the runtime reads the
same entries to decide whether one can run here (`engine_problems`). Both sides share this module so
that "current" means the same to both: the builder skips a build only when the runtime would load
the recorded engine (`rebuild_reasons` starts from `engine_problems`). Pure: no TensorRT, no torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hgad_edge.core.files import atomic_write_json, sha256_file
from hgad_edge.core.trt_common import TARGETS, cc_text, entry_target, get_target, sm_text, version3, version_tuple

__all__ = [
    "HOST_CODE_FIX",
    "BuildError",
    "check_batch",
    "engine_entry",
    "engine_name",
    "engine_problems",
    "rebuild_reasons",
    "source_model",
    "update_metadata",
]

HOST_CODE_FIX = (
    "pass allow_engine_host_code=True to create() (hgad-edge run --allow-engine-host-code) if you trust it, "
    "or rebuild it without version compatibility"
)


class BuildError(RuntimeError):
    """An engine could not be built; the message names the cause and the fix."""


# ---- what the builder writes -----------------------------------------------------------------------
def _capability_list(capability: Any) -> list[str]:
    """One compute capability ("8.7", (8, 7)) or a list of them (["8.6", "8.9"]) as ["8.6", ...]."""
    if isinstance(capability, (list, tuple)) and capability and all(isinstance(c, str) for c in capability):
        return [cc_text(c) for c in capability]
    return [cc_text(capability)]


def engine_name(
    trt_version: str, capability: Any, precision: str, version_compatible: bool = False, target: str = "tensorrt"
) -> str:
    """File name of an engine: `<trt|rtx><major.minor.patch>_sm<cc>[-<cc>...]_<precision>[_vc].engine`.

    e.g. "trt10.3.0_sm87_fp16.engine" (TensorRT 10.3 on Jetson Orin) or
    "rtx1.7.1_sm86-89_fp16.engine" (TensorRT-RTX for Ampere + Ada RTX cards). The build number is
    left out because the runtime accepts any build of the same major.minor.patch, so a rebuild after
    a patch-level reinstall replaces the file instead of piling up copies.
    """
    spec = get_target(target)
    if precision not in spec.precisions:
        raise BuildError(f"precision must be one of {list(spec.precisions)} for --target {target}, got {precision!r}")
    suffix = "_vc" if version_compatible else ""
    gpus = "-".join(sm_text(c) for c in _capability_list(capability))
    return f"{spec.file_prefix}{version3(trt_version)}_sm{gpus}_{precision}{suffix}.engine"


def source_model(precision: str) -> str:
    """Which ONNX model of the bundle an engine of `precision` is built from ("fp16", "fp32", and for
    int8 the symmetric Q/DQ graph "int8_trt"; int8 engines of before Q/DQ recorded "fp32" themselves)."""
    return {"fp16": "fp16", "int8": "int8_trt"}.get(precision, "fp32")


def check_batch(batch: Sequence[int]) -> tuple[int, int, int]:
    """(min, opt, max) batch of the optimisation profile; a single int n means (1, n, n)."""
    values = [int(batch)] if isinstance(batch, int) else [int(b) for b in batch]
    if len(values) == 1:
        values = [1, values[0], values[0]]
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise BuildError(
            "batch must be (min, opt, max) with 1 <= min <= opt <= max, "
            f"got {tuple(batch) if not isinstance(batch, int) else batch}"
        )
    return values[0], values[1], values[2]


def engine_entry(
    precision: str,
    trt_version: str,
    capability: Any,
    onnx_file: str,
    onnx_sha256: str,
    batch: Sequence[int],
    version_compatible: bool = False,
    target: str = "tensorrt",
    **extra: Any,
) -> dict[str, Any]:
    """The metadata "engines" entry the runtime's choose_engine/engine_problems read.

    Required by the runtime: target, precision, trt_version, compute_capabilities (TensorRT also
    keeps the single compute_capability), onnx_sha256, batch ([min, opt, max]; the last is the
    largest batch), version_compatible, sha256 (of the engine file, in `extra`). The rest is for people.
    """
    gpus = _capability_list(capability)
    entry = {
        "target": target,
        "precision": precision,
        "trt_version": str(trt_version),
        **({"compute_capability": gpus[0]} if target == "tensorrt" else {}),
        "compute_capabilities": gpus,
        "onnx": onnx_file,
        "model": source_model(precision),
        "onnx_sha256": onnx_sha256,
        "batch": [int(b) for b in check_batch(batch)],
        "version_compatible": bool(version_compatible),
    }
    entry.update(extra)
    return entry


def update_metadata(meta_path: Path, name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Record one engine in metadata.json (re-read, replaced atomically; other engines kept)."""
    meta = json.loads(Path(meta_path).read_text(encoding="utf-8"))
    engines = dict(meta.get("engines") or {})
    engines[name] = entry
    meta["engines"] = engines
    atomic_write_json(meta_path, meta)
    return meta


# ---- what the runtime checks -------------------------------------------------------------------------
def _engine_capabilities(entry: dict[str, Any]) -> list[str]:
    values = entry.get("compute_capabilities") or [entry.get("compute_capability", "?")]
    out = []
    for value in values:
        try:
            out.append(cc_text(value))
        except (TypeError, ValueError):
            out.append(str(value))
    return out


def engine_problems(
    entry: dict[str, Any],
    models: dict[str, Any],
    trt_version: str,
    compute_capability: Any,
    max_batch: int | None = None,
    allow_host_code: bool = True,
) -> list[str]:
    """Why one engine (a metadata `engines` entry) cannot run here; empty when it fits."""
    problems = []
    label = TARGETS.get(entry_target(entry), TARGETS["tensorrt"]).label
    built = str(entry.get("trt_version", "?"))
    if entry.get("version_compatible"):
        if version_tuple(built, 1) != version_tuple(trt_version, 1) or version_tuple(trt_version, 3) < version_tuple(
            built, 3
        ):
            problems.append(f"built with {label} {built} (version-compatible), this runtime has {trt_version}")
        if not allow_host_code:
            problems.append(f"version-compatible: it embeds host code that would run in this process; {HOST_CODE_FIX}")
    elif version_tuple(built, 3) != version_tuple(trt_version, 3):
        problems.append(f"built with {label} {built}, this runtime has {trt_version}")
    gpus = _engine_capabilities(entry)
    if cc_text(compute_capability) not in gpus:
        what = "compute capability" if len(gpus) == 1 else "compute capabilities"
        problems.append(f"built for {what} {', '.join(gpus)}, this GPU is {cc_text(compute_capability)}")
    model_sha = (models.get(entry.get("model", entry.get("precision")), {}) or {}).get(
        "sha256"
    )  # the entry names its ONNX model (int8 engines: int8_trt)
    if model_sha and entry.get("onnx_sha256") != model_sha:
        problems.append("built from another ONNX model (the bundle was re-exported since)")
    limits = entry.get("batch") or []
    if max_batch is not None and limits and int(limits[-1]) < max_batch:
        problems.append(
            f"built for batch <= {limits[-1]}, max_batch={max_batch} was requested (pass max_batch<={limits[-1]})"
        )
    return problems


def rebuild_reasons(
    entry: dict[str, Any] | None,
    engine_path: Path,
    precision: str,
    trt_version: str,
    capability: Any,
    onnx_sha256: str,
    batch: Sequence[int],
    version_compatible: bool = False,
) -> list[str]:
    """Why the engine must be (re)built; empty when the recorded one is current.

    Uses the runtime's own `engine_problems` so "current" here means "the runtime will load it",
    and adds what the runtime cannot see: a missing or changed file, another precision, batch
    profile or list of compute capabilities.
    """
    if not entry:
        return ["no engine recorded in metadata.json"]
    if not Path(engine_path).is_file():
        return [f"{Path(engine_path).name} is listed in metadata.json but missing"]
    wanted = _capability_list(capability)
    models = {entry.get("precision"): {"sha256": onnx_sha256}}
    reasons = engine_problems(entry, models, trt_version, wanted[0])
    recorded = [cc_text(c) for c in (entry.get("compute_capabilities") or [entry.get("compute_capability", "0.0")])]
    if len(wanted) > 1 or len(recorded) > 1:
        reasons = [r for r in reasons if "compute capabilit" not in r]
        if sorted(recorded) != sorted(wanted):
            reasons.append(f"built for compute capabilities {', '.join(recorded)}, {', '.join(wanted)} requested")
    if entry.get("onnx_sha256") != onnx_sha256 and not any("ONNX" in r for r in reasons):
        reasons.append("built from another ONNX model (the bundle was re-exported since)")
    if entry.get("precision") != precision:
        reasons.append(f"recorded precision {entry.get('precision')!r}, {precision!r} requested")
    if list(entry.get("batch") or []) != list(check_batch(batch)):
        reasons.append(f"built for batch {entry.get('batch')}, {list(check_batch(batch))} requested")
    if bool(entry.get("version_compatible")) != bool(version_compatible):
        reasons.append("version-compatible flag differs")
    if entry.get("sha256") and entry["sha256"] != sha256_file(engine_path):
        reasons.append(f"{Path(engine_path).name} changed since it was built (sha256 differs)")
    return reasons
