"""Fused ONNX export of a trained run into a bundle the torch-free runtime (and TensorRT) runs.

bundle/
  model_fp32.onnx   everything in FP32
  model_fp16.onnx   mixed precision in the graph: backbone + flows FP16, explicit casts to FP32
                    before the mixture head (TensorRT 11 networks are strongly typed: precision
                    has to be in the graph, not in builder flags)
  metadata.json     classes, input size, thresholds, versions, checksums (also in metadata_props)

Graph I/O: `images` uint8 (B, H, W, 3) RGB at input_size, `class_id` int64 (B,) with -1 = auto;
outputs `anomaly_map` (B, H, W), `score` (B,), `score_normalized` (B,) (anomalous iff >= 0.5),
`class_pred` (B,) int64. Resize of camera frames to (H, W) happens on the host (runtime), the
rest (cast, normalisation, NHWC->NCHW, pyramid, backbone, flows, head, scoring, upsampling,
smoothing, calibrated normalisation) is inside the graph.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .graph_check import check_graph

BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION = "hgad-edge-bundle", 1
INPUT_NAMES = ("images", "class_id")
OUTPUT_NAMES = ("anomaly_map", "score", "score_normalized", "class_pred")
OPSET = 18  # what torch 2.14's dynamo exporter emits (asking for 17 silently gives 18)
MODEL_FILES = {"fp32": "model_fp32.onnx", "fp16": "model_fp16.onnx"}


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
    return {"exporter": f"torch.onnx dynamo (torch {torch.__version__})", "opset": opset, "nodes": len(model.graph.node)}


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


def _set_metadata_props(path: Path, metadata: dict) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key in ("format", "format_version", "package_version", "classes", "input_size", "thresholds",
                "checkpoint_sha256", "precision", "normalized_threshold"):
        if key in metadata:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, json.dumps(metadata[key])
    onnx.save(model, str(path))


def export_bundle(run_dir: Path | str, out: Path | str, precisions: tuple[str, ...] = ("fp32", "fp16"), simplify: bool = True) -> ExportResult:
    """Run folder -> bundle folder (see module docstring). Every graph passes `check_graph`."""
    import torch

    from hgad_edge import __version__
    from hgad_edge.checkpoint import WEIGHTS_FILE, load_run
    from hgad_edge.files import sha256_file

    run_dir, out = Path(run_dir), Path(out)
    unknown = [p for p in precisions if p not in MODEL_FILES]
    if unknown:
        raise ExportError(f"unknown precision(s) {unknown}; choose from {', '.join(MODEL_FILES)}")
    out.mkdir(parents=True, exist_ok=True)
    scorer, cfg, meta = load_run(run_dir)
    scorer.model.fuse_condition()  # per-position constants instead of 256 condition columns per coupling
    models, files, facts = {}, {}, {}
    for precision in precisions:
        scorer.model.set_body_dtype(torch.float16 if precision == "fp16" else torch.float32)
        path = out / MODEL_FILES[precision]
        facts[precision] = export_onnx(scorer, path, simplify)
        problems = check_graph(path, mixed=precision == "fp16")
        if problems:
            raise ExportError(f"{path} breaks deployment rules:\n- " + "\n- ".join(problems))
        files[precision] = path
    scorer.model.set_body_dtype(torch.float32)
    metadata = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "package_version": __version__,
        "classes": list(scorer.model.class_names),
        "input_size": list(cfg.input_size),
        "input": {"name": "images", "dtype": "uint8", "layout": "NHWC", "channels": "RGB"},
        "class_input": {"name": "class_id", "dtype": "int64", "auto": -1},
        "outputs": list(OUTPUT_NAMES),
        "thresholds": [float(t) for t in scorer.threshold],
        "normalized_threshold": 0.5,
        "display_range": _display_range(scorer),
        "checkpoint_sha256": sha256_file(run_dir / WEIGHTS_FILE),
        "backbone": cfg.backbone.name,
        "precision_policy": "fp16: backbone+flows FP16, Cast to FP32 before the mixture head; head/scoring FP32",
        "models": {},
        "engines": {},
    }
    for precision, path in files.items():
        _set_metadata_props(path, {**metadata, "precision": precision})
        models[precision] = {"file": path.name, "sha256": sha256_file(path), **facts[precision]}
    metadata["models"] = models
    old = out / "metadata.json"
    if old.is_file():  # keep engines built from identical ONNX files; the builder re-checks them anyway
        metadata["engines"] = json.loads(old.read_text()).get("engines", {})
    old.write_text(json.dumps(metadata, indent=2))
    return ExportResult(out, files, metadata)


def _display_range(scorer) -> list[float]:
    """Overlay colour range for the runtime: 0 (normal mean) to twice the largest threshold."""
    hi = float(np.max(scorer.threshold.numpy())) * 2.0
    return [0.0, hi if hi > 0 else 1.0]
