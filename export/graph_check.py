"""Deployment rules every exported graph must satisfy, checked on CPU from the ONNX alone.

1. No ReduceLogSumExp: TensorRT imports it as log(sum(exp(x))) without the max shift (-inf on
   these distances); the model writes the shifted form by hand.
2. Dynamic batch: dim 0 of every input and output is symbolic.
3. Mixed graph: FP16 exists (backbone + flows), but nothing of the mixture head or the scoring
   computes in FP16: from z - mu onward everything is FP32 (|z - mu|^2 reaches 1e6-1e9).
   Head and scoring nodes are found by the module hierarchy the dynamo exporter records per node.
4. Outputs (when the exporter names them): exactly those, in order. In particular no thresholded
   output: PASS/FAIL is decided on the host from the metadata, so recalibration needs no rebuild.
5. Quantized (Q/DQ) graph: Q/DQ nodes exist, and none sits at or after z - mu: none downstream of a
   mixture-head node, and no dequantized tensor reaches a head, scoring or glue node (directly or
   through nodes that only move data). INT8 cannot resolve distances of 1e6-1e9, and the scoring's
   per-position statistics were fitted in FP32. A graph for TensorRT must be symmetric: int8 zero
   points, all zero, and no int32 (bias) dequantization: TensorRT's parser refuses anything else.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

FLOAT16 = 10  # onnx.TensorProto.FLOAT16
INT8 = 3  # onnx.TensorProto.INT8
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
FORBIDDEN_OPS = ("ReduceLogSumExp",)
# The module paths the exporter records; bundles exported before the training side moved into
# hgad_edge.training carry the old paths, and `build` still checks their graphs.
HEAD_CLASSES = ("hgad_edge.training.head.MixtureHead", "hgad_edge.head.MixtureHead")
MODEL_CLASSES = (
    "hgad_edge.training.scoring.AnomalyScorer",
    "hgad_edge.training.model.HGADModel",
    "hgad_edge.scoring.AnomalyScorer",
    "hgad_edge.model.HGADModel",
)
HIERARCHY_KEY = "pkg.torch.onnx.class_hierarchy"
# Ops that only move or re-type data: allowed on FP16 in the model-level glue between modules.
DATA_MOVEMENT = {
    "Cast",
    "Reshape",
    "Transpose",
    "Tile",
    "Concat",
    "Expand",
    "Squeeze",
    "Unsqueeze",
    "Slice",
    "Gather",
    "Split",
    "Identity",
    "Shape",
    "Flatten",
}


def _tensor_types(model) -> dict[str, int]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.input, *g.output, *g.value_info]}
    types.update({init.name: init.data_type for init in g.initializer})
    return types


def _hierarchy(node) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == HIERARCHY_KEY:
            return [c.strip(" '\"") for c in prop.value.strip("[]").split(",")]
    return []


def _in_head(hierarchy: list[str]) -> bool:
    return any(c in HEAD_CLASSES for c in hierarchy)


def _must_be_fp32(node) -> bool:
    """Every head node, and every arithmetic node outside the backbone and flows (scoring and the
    glue between modules; moving FP16 data there before its Cast is fine)."""
    h = _hierarchy(node)
    if _in_head(h):
        return True
    classes = [c for c in h if c.startswith("hgad_edge.") or c.startswith("FrEIA.") or c.startswith("timm.")]
    return (
        bool(classes)
        and classes[-1] in MODEL_CLASSES
        and node.op_type not in DATA_MOVEMENT
    )


def fp32_node_names(model) -> set[str]:
    """Names of the nodes that must compute in FP32 (head, scoring, glue): the policy of rule 3,
    also used to check the layers TensorRT's parser made of them (export/trt_network.py)."""
    return {n.name for n in model.graph.node if _must_be_fp32(n)}


def check_graph(
    path_or_model, mixed: bool, outputs: Sequence[str] | None = None, quantized: bool = False, symmetric: bool = False
) -> list[str]:
    """-> list of broken rules (empty = deployable). quantized: a Q/DQ graph (rule 5); symmetric: for TensorRT."""
    import onnx

    model = onnx.load(str(path_or_model)) if isinstance(path_or_model, (str, Path)) else path_or_model
    problems = []
    for node in model.graph.node:
        if node.op_type in FORBIDDEN_OPS:
            problems.append(f"{node.op_type} node {node.name}: TensorRT imports it without max-shift")
    for vi in [*model.graph.input, *model.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if not dims or not dims[0].dim_param:
            problems.append(f"{vi.name}: batch axis is not dynamic")
    got = [o.name for o in model.graph.output]
    if outputs is not None and got != list(outputs):
        problems.append(f"graph outputs are {got}, expected {list(outputs)} (no threshold belongs in the graph)")
    if mixed:
        problems += _check_mixed(model)
    if quantized:
        problems += _check_quantized(model, symmetric)
    return problems


def _check_mixed(model) -> list[str]:
    types = _tensor_types(model)
    if FLOAT16 not in types.values():
        return ["mixed graph has no FP16 tensor: backbone and flows were not exported in FP16"]
    problems = [f"output {o.name} is FP16" for o in model.graph.output if types.get(o.name) == FLOAT16]
    head_nodes = [n for n in model.graph.node if _must_be_fp32(n)]
    if not any(_in_head(_hierarchy(n)) for n in head_nodes):
        problems.append("no node carries the mixture-head hierarchy metadata: cannot prove the head is FP32")
    for node in head_nodes:
        fp16 = [t for t in [*node.input, *node.output] if t and types.get(t) == FLOAT16]
        if fp16:
            problems.append(f"{node.op_type} node {node.name} of the head/scoring touches FP16 tensor(s) {fp16[:3]}")
    return problems


def _head_descendants(model) -> set[str]:
    """Names of every node downstream of a mixture-head node (the head's own nodes included)."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    frontier = [n for n in model.graph.node if _in_head(_hierarchy(n))]
    seen: set[str] = set()
    while frontier:
        node = frontier.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        for out in node.output:
            frontier.extend(consumers.get(out, []))
    return seen


def quantized_policy_violations(model) -> list[str]:
    """Q/DQ nodes at or after z - mu (rule 5), one line each; also used on TensorRT's parsed network."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    after_head = _head_descendants(model)
    problems = []
    for node in (n for n in model.graph.node if n.op_type in QDQ_OPS):
        if node.name in after_head:
            problems.append(f"{node.op_type} node {node.name} is downstream of the mixture head")
            continue
        frontier, seen = list(node.output), set()
        while frontier:  # follow the (de)quantized tensor through data movement to its first arithmetic
            tensor = frontier.pop()
            for user in consumers.get(tensor, []):
                if user.name in seen:
                    continue
                seen.add(user.name)
                if _must_be_fp32(user):
                    problems.append(
                        f"{node.op_type} node {node.name} feeds {user.op_type} node {user.name} of the head/scoring"
                    )
                    frontier = []
                    break
                if user.op_type in DATA_MOVEMENT:
                    frontier.extend(user.output)
    return problems


def _check_quantized(model, symmetric: bool) -> list[str]:
    qdq = [n for n in model.graph.node if n.op_type in QDQ_OPS]
    if not qdq:
        return ["quantized graph has no QuantizeLinear/DequantizeLinear node"]
    problems = []
    if not any(_in_head(_hierarchy(n)) for n in model.graph.node):
        problems.append("no node carries the mixture-head hierarchy metadata: cannot prove the head is not quantized")
    problems += quantized_policy_violations(model)
    if symmetric:
        problems += _asymmetric(model, qdq)
    return problems


def _asymmetric(model, qdq) -> list[str]:
    """TensorRT takes int8 Q/DQ with zero points of 0 only (and no int32 bias dequantization)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    problems = []
    for node in qdq:
        zero = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zero is None:
            pass  # no zero point: 0 and uint8 by the ONNX default (a QuantizeLinear is caught below)
        elif zero.data_type != INT8:
            problems.append(f"{node.op_type} node {node.name} has a non-int8 zero point (TensorRT takes int8 only)")
        elif numpy_helper.to_array(zero).any():
            problems.append(f"{node.op_type} node {node.name} has a non-zero zero point (TensorRT: symmetric only)")
        data = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if data is not None and data.data_type != INT8:
            problems.append(f"DequantizeLinear node {node.name} dequantizes a non-int8 constant (e.g. an int32 bias)")
    for node in (n for n in qdq if n.op_type == "QuantizeLinear" and (len(n.input) < 3 or not n.input[2])):
        problems.append(f"QuantizeLinear node {node.name} has no int8 zero point (defaults to uint8)")
    return problems
