"""Fused ONNX export of a trained run into a bundle the torch-free runtime (and TensorRT) runs.

bundle/
  model_fp32.onnx   everything in FP32
  model_fp16.onnx   mixed precision in the graph: backbone + flows FP16, explicit casts to FP32
                    before the mixture head (TensorRT 11 networks are strongly typed: precision
                    has to be in the graph, not in builder flags)
  model_int8.onnx, model_int8_trt.onnx   with --int8: Q/DQ copies of the FP32 graph, ONNX Runtime's
                    and TensorRT's, from one calibration on normal images (export/int8_quantize.py)
  metadata.json     classes, input size, thresholds + scales, versions, checksums (the exported
                    values are also in metadata_props; `hgad-edge calibrate` rewrites only this file)

Graph I/O: `images` uint8 (B, H, W, 3) RGB at input_size, `class_id` int64 (B,) with -1 = auto;
outputs `anomaly_map` (B, H, W), `score` (B,), `class_pred` (B,) int64. Resize of camera frames to
(H, W) happens on the host (runtime), the rest (cast, normalisation, NHWC->NCHW, pyramid, backbone,
flows, head, scoring, upsampling, smoothing) is inside the graph. The PASS/FAIL decision is not:
the runtime applies the metadata's per-class thresholds and scales on the host
(hgad_edge.core.thresholds), so recalibrating never changes the graph or a TensorRT engine built from it.
A run trained on tiles (config section `tiling`) exports the same tile-sized graph; metadata.json (and
each ONNX file's copy) records its `tiling`, and the runtime cuts frames into tiles and stitches their maps.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from hgad_edge.core.bundle_schema import (
    ENGINES_DIR,
    FLOAT_MODELS,
    INPUT_NAMES,
    METADATA_FILE,
    MODEL_FILES,
    OUTPUT_NAMES,
    BundleMetadata,
    ModelFile,
    SchemaError,
    check_file_name,
    check_lineage,
    onnx_metadata_props,
)
from hgad_edge.export.graph_check import check_graph
from hgad_edge.export.int8_calibration import CalibrationSet

log = logging.getLogger("hgad_edge.export")

OPSET = 18  # what torch 2.14's dynamo exporter emits (asking for 17 silently gives 18)


class ExportError(RuntimeError):
    """The export failed or produced a graph that breaks a deployment rule; the message says which."""


@dataclass
class ExportResult:
    bundle: Path
    files: dict[str, Path]
    metadata: dict


def _example_inputs(cfg, batch: int = 2):
    import torch

    h, w = cfg.input_size
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, h, w, 3), dtype=torch.uint8, generator=gen)
    return images, torch.tensor([0, -1][:batch] + [0] * max(0, batch - 2), dtype=torch.long)


def export_onnx(scorer, path: Path, simplify: bool = True) -> dict:
    """torch.onnx dynamo export with a dynamic batch axis, full checker, optional onnxslim.
    Returns facts about the graph (exporter, opset, node count)."""
    import onnx
    import torch

    example = _example_inputs(scorer.model.cfg)
    batch = torch.export.Dim("batch", min=1, max=64)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            scorer,
            example,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=({0: batch}, {0: batch}),
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    model = program.model_proto
    if simplify:
        model = _slim(model)
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "exporter": f"torch.onnx dynamo (torch {torch.__version__})",
        "opset": opset,
        "nodes": len(model.graph.node),
    }


def _slim(model):
    """onnxslim folds constants (the positional encodings' first-layer products included) and
    removes dead nodes; outputs stay bit-identical on these graphs (deployment notes)."""
    try:
        import onnxslim
    except ImportError:
        return model
    props = {n.name: list(n.metadata_props) for n in model.graph.node}
    slim = onnxslim.slim(model)
    # onnxslim drops per-node metadata; restore it by node name: graph_check needs the module
    # hierarchy to find the head, and it helps anyone reading the graph in Netron.
    for node in slim.graph.node:
        if node.name in props and not node.metadata_props:
            node.metadata_props.extend(props[node.name])
    return slim


def set_metadata_props(path: Path, props: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(path))


def export_bundle(
    run_dir: Path | str,
    out: Path | str,
    precisions: tuple[str, ...] = ("fp32", "fp16"),
    simplify: bool = True,
    int8: CalibrationSet | None = None,
    keep_calibration: Path | str | None = None,
) -> ExportResult:
    """Run folder -> bundle folder (see module docstring). Every graph passes `check_graph`.

    int8: calibrate on these normal images and add the Q/DQ graphs (needs "fp32" in `precisions`).
    keep_calibration: the bundle of the run's parent (or of the run itself), whose `hgad-edge calibrate`
    records of the classes the run's change kept carry over (export/keep_calibration.py); checked
    before any export work. The run's lineage (`train --from`) is recorded in the metadata.
    The bundle is written into a staging folder beside `out` and swapped in at the end: a failed
    or interrupted export leaves the previous bundle as it was (and no empty `out` behind).
    """
    import torch

    from hgad_edge import __version__
    from hgad_edge.core.files import atomic_dir, atomic_write_json, sha256_file
    from hgad_edge.training.checkpoint import WEIGHTS_FILE, load_run

    run_dir, out = Path(run_dir), Path(out)
    unknown = [p for p in precisions if p not in FLOAT_MODELS]
    if unknown:
        raise ExportError(f"unknown precision(s) {unknown}; choose from {', '.join(FLOAT_MODELS)}")
    if int8 is not None and "fp32" not in precisions:
        raise ExportError("--int8 quantizes the FP32 graph: export it too (--precision fp32)")
    _check_out(out)
    scorer, cfg, meta = load_run(run_dir)
    scorer.model.fuse_condition()  # per-position constants instead of 256 condition columns per coupling
    metadata = BundleMetadata(
        classes=tuple(scorer.model.class_names),
        input_size=tuple(int(v) for v in cfg.input_size),
        thresholds=tuple(float(t) for t in scorer.threshold),
        scales=tuple(float(v) for v in scorer.scale),
        models={},
        display_range=_display_range(scorer),
        package_version=__version__,
        tiling=cfg.tiling.setting(),
        extra={
            "checkpoint_sha256": sha256_file(run_dir / WEIGHTS_FILE),
            "backbone": cfg.backbone.name,
            "precision_policy": "fp16: backbone+flows FP16, Cast to FP32 before the mixture head; head/scoring FP32",
        },
    )
    try:
        metadata = replace(metadata, lineage=check_lineage(meta.get("lineage")))
        metadata.check_values()
    except SchemaError as err:
        raise ExportError(f"{run_dir} cannot be exported: {err}") from err
    carried = _kept_calibration(keep_calibration, metadata, meta) if keep_calibration is not None else None
    with atomic_dir(out) as staging:
        models = {}
        for precision in precisions:
            scorer.model.set_body_dtype(torch.float16 if precision == "fp16" else torch.float32)
            path = staging / MODEL_FILES[precision]
            facts = export_onnx(scorer, path, simplify)
            problems = check_graph(path, mixed=precision == "fp16", outputs=OUTPUT_NAMES)
            if problems:
                listed = "\n- ".join(problems)
                raise ExportError(f"{out / path.name} breaks deployment rules (nothing was written):\n- {listed}")
            set_metadata_props(path, onnx_metadata_props(metadata, precision))
            models[precision] = ModelFile(path.name, sha256_file(path), facts)
        scorer.model.set_body_dtype(torch.float32)
        metadata = metadata.with_models(models)
        if int8 is not None:
            from hgad_edge.export.int8_quantize import QuantizeError, add_int8_graphs

            try:
                metadata = add_int8_graphs(staging, metadata, int8)
            except QuantizeError as err:
                raise ExportError(str(err)) from err
        metadata = _carry_over(out, staging, metadata)
        if carried is not None:
            metadata = metadata.with_calibration(*carried)
        atomic_write_json(staging / METADATA_FILE, metadata.to_json())
    return ExportResult(out, {p: out / MODEL_FILES[p] for p in metadata.models}, metadata.to_json())


def _kept_calibration(old_bundle: Path | str, metadata: BundleMetadata, run_meta: dict):
    """(thresholds, scales, record) carried from `old_bundle` (export/keep_calibration.py), or ExportError."""
    from hgad_edge.core.bundle import load_bundle
    from hgad_edge.core.errors import BundleError
    from hgad_edge.export.keep_calibration import (
        KeepCalibrationError,
        carry_calibration,
        check_same_frames,
        kept_classes,
    )

    where = Path(old_bundle)
    try:
        old = load_bundle(where).schema
        check_same_frames(old, metadata.input_size, metadata.tiling, where)
        kept = kept_classes(old, run_meta, metadata.extra["checkpoint_sha256"], where)
        return carry_calibration(old, metadata.classes, metadata.thresholds, metadata.scales, kept, where)
    except BundleError as err:
        raise ExportError(f"--keep-calibration {where}: {err}") from err
    except KeepCalibrationError as err:
        raise ExportError(str(err)) from err


def _check_out(out: Path) -> None:
    """Only a new folder, an empty one or a bundle may be replaced by the export."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; pass a folder for the bundle")
    if out.is_dir() and any(out.iterdir()) and not (out / METADATA_FILE).is_file():
        msg = f"--out {out} is a non-empty folder without {METADATA_FILE} (not a bundle); pick a new or empty folder"
        raise ExportError(msg)


def _carry_over(out: Path, staging: Path, metadata: BundleMetadata) -> BundleMetadata:
    """Keep what the old bundle holds besides the exporter's own files (engines, notes) and its
    engine entries; the builder and the runtime re-check each engine against the new ONNX sha256."""
    if not (out / METADATA_FILE).is_file():
        return metadata
    for entry in out.iterdir():
        if entry.name not in (METADATA_FILE, *MODEL_FILES.values()) and not (staging / entry.name).exists():
            link_tree(entry, staging / entry.name)
    try:
        engines = json.loads((out / METADATA_FILE).read_text(encoding="utf-8")).get("engines") or {}
        kept = {
            check_file_name(n, "engine"): dict(e) for n, e in engines.items() if (staging / ENGINES_DIR / n).is_file()
        }
    except (OSError, ValueError, AttributeError, TypeError) as err:
        log.warning(
            "not keeping the engine list of the old %s (%s); rebuild engines with hgad-edge build",
            out / METADATA_FILE,
            err,
        )
        kept = {}
    return replace(metadata, engines=kept)


def link_tree(src: Path, dst: Path) -> None:
    """Hard links where the file system has them (no copy of large engines), copies elsewhere."""

    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=link_or_copy)
    elif src.is_symlink():
        os.symlink(os.readlink(src), dst)
    else:
        link_or_copy(str(src), str(dst))


def _display_range(scorer) -> tuple[float, float]:
    """Overlay colour range for the runtime: 0 (normal mean) to twice the largest threshold."""
    hi = float(np.max(scorer.threshold.numpy())) * 2.0
    return (0.0, hi if hi > 0 else 1.0)
