"""INT8 as explicitly quantized graphs: QuantizeLinear/DequantizeLinear (Q/DQ) nodes written into
copies of the FP32 graph, the only INT8 that TensorRT 11 and TensorRT-RTX take and what ONNX Runtime
runs with integer kernels on a CPU.

Tool: ONNX Runtime's static quantization (`onnxruntime.quantization`, QDQ format). It is installed
with the runtime already, runs on any CPU, and writes both graphs below from one calibration cache;
NVIDIA ModelOpt's ONNX PTQ writes only the symmetric TensorRT graph (and places Q/DQ by its own rules,
not by the parts this policy measured), so it could not give the ONNX Runtime graph.

Two graphs, because one cannot serve both (measured on these machines): TensorRT's parser refuses a
non-zero zero point ("Non-zero zero point is not supported": symmetric Q/DQ only, int8), while ONNX
Runtime's x86 integer kernels are fast with asymmetric uint8 activations (U8S8) and ran a symmetric
int8 graph slower than FP32. So one calibration (export/int8_calibration.py) writes
  model_int8.onnx      uint8 asymmetric activations, int8 symmetric per-channel weights: ONNX Runtime
  model_int8_trt.onnx  int8 symmetric activations and weights, float biases: TensorRT / TensorRT-RTX
each recorded in metadata.json like the other graphs (sha256, the ONNX copy of the deciding values).

What is quantized is a policy over named *parts* of the graph, found from the module scopes the
exporter records per node: the backbone, and per flow level its coupling subnets (the MLP's two
matrix products and what lies between), its couplings' scale (x2 * exp(s)) and its fixed soft
permutations. POLICY follows the per-part table of benchmarks/int8_study.py (export/README.md):
quantized alone, the backbone moved magnetic_tile's pixel AUROC by -5.5 points, every flow part
stayed within 0.25, and of those only the subnets' matrix products bought speed. The mixture head
and scoring never are: nothing from z - mu on may be quantized (export/graph_check.py proves it on
every graph, export/trt_network.py on TensorRT's parsed network).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hgad_edge.export.int8_calibration import CalibrationSet, calibrate_ranges

__all__ = [
    "INT8_GRAPHS",
    "POLICY",
    "Int8Graph",
    "QuantizeError",
    "add_int8_graphs",
    "graph_parts",
    "part_names",
    "quantize_bundle",
    "quantize_graph",
    "write_int8_graphs",
]

log = logging.getLogger("hgad_edge.export")

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
BACKBONE_SCOPE = "model.backbone"
FLOW_SCOPE = "model.fused_flows."
# Op types ONNX Runtime quantizes (QDQ registry and the binary ops) that occur in the parts.
QUANTIZABLE = ("Conv", "Clip", "Relu", "Add", "Mul", "MatMul", "Gemm", "AveragePool", "Concat", "Split", "Slice")


class QuantizeError(RuntimeError):
    """A Q/DQ graph could not be written or breaks a deployment rule; the message says which."""


@dataclass(frozen=True)
class Int8Graph:
    """One Q/DQ graph of the bundle: its models key, file, what runs it and its quantization types."""

    key: str
    file: str
    runs_on: str
    symmetric_activations: bool
    quantize_bias: bool  # int32 biases: ONNX Runtime's integer kernels want them, TensorRT's parser does not

    @property
    def facts(self) -> dict[str, Any]:
        acts = "int8 symmetric" if self.symmetric_activations else "uint8 asymmetric"
        return {
            "runs_on": self.runs_on,
            "activations": f"{acts} per tensor",
            "weights": "int8 symmetric per channel",
            "biases": "int32" if self.quantize_bias else "float",
        }


INT8_GRAPHS: dict[str, Int8Graph] = {
    g.key: g
    for g in (
        Int8Graph("int8", "model_int8.onnx", "onnxruntime", symmetric_activations=False, quantize_bias=True),
        Int8Graph("int8_trt", "model_int8_trt.onnx", "tensorrt", symmetric_activations=True, quantize_bias=False),
    )
}

# The parts quantized by default (names or per-level suffixes, part_names): every level's coupling subnets.
POLICY: tuple[str, ...] = ("subnets",)


# ---- the parts of a graph --------------------------------------------------------------------------
def _scopes(node: Any) -> str:
    return next((p.value for p in node.metadata_props if p.key == SCOPES_KEY), "")


def _flow_level(scope: str) -> int | None:
    start = scope.find(FLOW_SCOPE)
    if start < 0:
        return None
    digits = ""
    for ch in scope[start + len(FLOW_SCOPE) :]:
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else None


def _subnet_chains(nodes: Sequence[Any], consumers: dict[str, list[Any]]) -> set[str]:
    """The subnet MLP of every coupling: from its first matrix product (a MatMul, the positional part
    was folded into a per-position constant at export) through what follows (the constant's Add, the
    ReLU, reshapes) to its second layer (the Gemm of `subnet.2`), inclusive."""
    chain: set[str] = set()
    for start in (n for n in nodes if n.op_type == "MatMul"):
        seen, frontier, path = set(), [start], []
        while frontier:
            node = frontier.pop()
            if node.name in seen:
                continue
            seen.add(node.name)
            path.append(node.name)
            if node.op_type == "Gemm" and "subnet" in _scopes(node):
                continue
            if len(path) > 12:  # no second layer within reach: not a subnet
                break
            for out in node.output:
                frontier.extend(consumers.get(out, []))
        else:
            chain.update(path)
    return chain


def graph_parts(model: Any) -> dict[str, list[str]]:
    """part name -> names of its nodes. "backbone"; per flow level k: "flow{k}.subnets" (the coupling
    MLPs), "flow{k}.scale" (x2 * exp(s)), "flow{k}.permutations" (the fixed soft permutations)."""
    nodes = list(model.graph.node)
    consumers: dict[str, list[Any]] = {}
    producers: dict[str, Any] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        for name in node.output:
            producers[name] = node
    parts: dict[str, list[str]] = {"backbone": [n.name for n in nodes if BACKBONE_SCOPE in _scopes(n)]}
    levels: dict[int, list[Any]] = {}
    for node in nodes:
        level = _flow_level(_scopes(node))
        if level is not None:
            levels.setdefault(level, []).append(node)
    for level, members in sorted(levels.items()):
        subnets = _subnet_chains(members, consumers)
        parts[f"flow{level}.subnets"] = [n.name for n in members if n.name in subnets]
        parts[f"flow{level}.scale"] = [
            n.name
            for n in members
            if n.op_type == "Mul" and any(getattr(producers.get(i), "op_type", "") == "Exp" for i in n.input)
        ]
        parts[f"flow{level}.permutations"] = [n.name for n in members if n.op_type == "Gemm" and n.name not in subnets]
    return {name: names for name, names in parts.items() if names}


def part_names(parts: dict[str, list[str]], selection: Iterable[str]) -> list[str]:
    """Expand a selection: a part's name, or a suffix shared by every level ("subnets" = every
    flow{k}.subnets, "scale", "permutations"); "flows" = every flow part. Unknown names raise."""
    chosen: list[str] = []
    for item in selection:
        if item in parts:
            matches = [item]
        elif item == "flows":
            matches = [p for p in parts if p.startswith("flow")]
        else:
            matches = [p for p in parts if p.startswith("flow") and p.split(".", 1)[1] == item]
        if not matches:
            raise QuantizeError(f"no part {item!r} in this graph; parts: {', '.join(parts)}")
        chosen += [m for m in matches if m not in chosen]
    return chosen


# ---- writing the graphs ----------------------------------------------------------------------------
def _no_preprocess_hint(record: logging.LogRecord) -> bool:
    """ONNX Runtime's quantizer logs "consider pre-processing" twice per graph on the root logger. Its
    pre-processing (quant_pre_process) fails on these graphs in its symbolic shape inference (ORT 1.32:
    TypeError), and the graph is already simplified at export (onnxslim folded the constants), so it is
    left out and the hint dropped."""
    return "pre-process" not in record.getMessage()


def quantize_graph(fp32_onnx: Path, ranges: Path, out: Path, graph: Int8Graph, nodes: Sequence[str]) -> dict[str, Any]:
    """Write `graph`'s Q/DQ copy of `fp32_onnx` with `nodes` quantized, scales from the calibration
    cache `ranges` (no new calibration). Returns facts for metadata.json."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationMethod

    from hgad_edge.export.int8_calibration import CALIBRATION_METHOD

    model = onnx.load(str(fp32_onnx))
    wanted = set(nodes)
    op_types = sorted({n.op_type for n in model.graph.node if n.name in wanted})
    root = logging.getLogger()
    root.addFilter(_no_preprocess_hint)
    try:
        quantize_static(
            str(fp32_onnx),
            str(out),
            None,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=op_types,
            nodes_to_quantize=list(nodes),
            per_channel=True,
            activation_type=QuantType.QInt8 if graph.symmetric_activations else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHOD),
            calibration_cache_path=str(ranges),
            extra_options={
                "ActivationSymmetric": graph.symmetric_activations,
                "WeightSymmetric": True,
                "QuantizeBias": graph.quantize_bias,
            },
        )
    finally:
        root.removeFilter(_no_preprocess_hint)
    written = onnx.load(str(out), load_external_data=False)
    qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in written.graph.node)
    return {**graph.facts, "nodes": len(written.graph.node), "quantized_nodes": len(wanted), "qdq_nodes": qdq}


def write_int8_graphs(
    fp32_onnx: Path,
    folder: Path,
    calibration: CalibrationSet,
    input_size: Sequence[int],
    tiling: Any = None,
    policy: Sequence[str] = POLICY,
    graphs: Sequence[str] = tuple(INT8_GRAPHS),
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Calibrate once and write every graph of `graphs` into `folder` (each checked by graph_check).

    Returns ({models key: facts}, the quantization record for metadata.json).
    """
    import onnx
    import onnxruntime

    from hgad_edge.export.graph_check import check_graph

    model = onnx.load(str(fp32_onnx), load_external_data=False)
    parts = graph_parts(model)
    chosen = part_names(parts, policy)
    nodes = [n for part in chosen for n in parts[part]]
    op_types = sorted({n.op_type for n in model.graph.node if n.name in set(nodes)} & set(QUANTIZABLE))
    facts: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="hgad-int8-") as work:
        ranges = Path(work) / "ranges.json"
        calibrated = calibrate_ranges(fp32_onnx, calibration, ranges, op_types, input_size, tiling)
        for key in graphs:
            spec = INT8_GRAPHS[key]
            path = Path(folder) / spec.file
            facts[key] = quantize_graph(fp32_onnx, ranges, path, spec, nodes)
            problems = check_graph(path, mixed=False, quantized=True)
            if problems:
                listed = "\n- ".join(problems)
                raise QuantizeError(f"{spec.file} breaks deployment rules (nothing was written):\n- {listed}")
    record = {
        "tool": f"onnxruntime.quantization {onnxruntime.__version__} (static, QDQ)",
        "calibration": {**calibration.record(), **calibrated},
        "parts": {name: name in chosen for name in parts},
        "policy": list(policy),
        "graphs": {key: INT8_GRAPHS[key].file for key in graphs},
    }
    return facts, record


# ---- into a bundle ---------------------------------------------------------------------------------
def add_int8_graphs(
    folder: Path,
    metadata: Any,
    calibration: CalibrationSet,
    policy: Sequence[str] = POLICY,
) -> Any:
    """Write the Q/DQ graphs beside `folder`'s model_fp32.onnx; -> `metadata` (a BundleMetadata) with
    their models entries and the `quantization` record.

    Each graph gets the FP32 file's own copy of the deciding values (metadata_props) with its own
    precision, so the copies agree with each other whatever metadata.json holds after a recalibration.
    """
    from dataclasses import replace

    from hgad_edge.core.bundle_schema import ModelFile, read_onnx_metadata_props
    from hgad_edge.core.files import sha256_file
    from hgad_edge.export.onnx_export import set_metadata_props

    fp32 = Path(folder) / metadata.models["fp32"].file if "fp32" in metadata.models else None
    if fp32 is None or not fp32.is_file():
        raise QuantizeError(f"{folder} has no FP32 graph to quantize; export it with --precision fp32")
    props = read_onnx_metadata_props(fp32)
    facts, record = write_int8_graphs(fp32, folder, calibration, metadata.input_size, metadata.tiling, policy)
    models = dict(metadata.models)
    for key, graph_facts in facts.items():
        path = Path(folder) / INT8_GRAPHS[key].file
        set_metadata_props(path, {**props, "precision": json.dumps(key)})
        models[key] = ModelFile(path.name, sha256_file(path), graph_facts)
    return replace(metadata, models=models, extra={**metadata.extra, "quantization": record})


def quantize_bundle(
    bundle_dir: Path | str, calibration: CalibrationSet, policy: Sequence[str] = POLICY
) -> dict[str, Any]:
    """`hgad-edge quantize`: add (or replace) the Q/DQ graphs of an exported bundle; -> its new metadata.

    Written into a staging copy (hard links, no copy of the large files) swapped in at the end, so a
    failed or interrupted run leaves the bundle as it was. Engines stay; one built from an older
    int8_trt graph no longer matches its sha256 and is rebuilt by `hgad-edge build --precision int8`.
    """
    from hgad_edge.core.bundle import load_bundle
    from hgad_edge.core.bundle_schema import METADATA_FILE, BundleMetadata
    from hgad_edge.core.errors import BundleError
    from hgad_edge.core.files import atomic_dir, atomic_write_json
    from hgad_edge.export.onnx_export import link_tree

    try:
        bundle = load_bundle(bundle_dir)
    except BundleError as err:
        raise QuantizeError(str(err)) from err
    metadata = BundleMetadata.from_json(bundle.metadata)
    rewritten = {METADATA_FILE, *(g.file for g in INT8_GRAPHS.values())}
    with atomic_dir(bundle.path) as staging:
        for entry in bundle.path.iterdir():
            if entry.name not in rewritten:
                link_tree(entry, staging / entry.name)
        metadata = add_int8_graphs(staging, metadata, calibration, policy)
        atomic_write_json(staging / METADATA_FILE, metadata.to_json())
    return metadata.to_json()
