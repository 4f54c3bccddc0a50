"""Static check, on CPU, that TensorRT 10's ONNX parser can import every node of a graph.

The fallback of `hgad-edge check-trt` (export/trt_check.py) when no TensorRT / TensorRT-RTX parser is
importable; with one, the real parser answers and this table is only compared with it.

Why: engines are built on the target GPU (a Jetson on the factory floor), so a graph that
TensorRT cannot parse, or parses into something numerically wrong, should be caught on the
training machine, before the bundle travels. Nothing here needs TensorRT or a GPU.

The operator table (`trt_operators.md`, package data next to this module) is onnx-tensorrt's
`docs/operators.md` as shipped with TensorRT 10.15 (opset 9 to 24; TensorRT 10.0's copy documents
opset 9 to 20). Operators that onnx-tensorrt's changelog says arrived later in 10.x carry the
version that added them. Beyond the table the check knows:

* ReduceLogSumExp is imported as log(sum(exp(x))) without the max shift, which overflowed to
  -inf on our model (deployment-facts.md): an error for hgad-edge graphs.
* uint8 tensors are network I/O only; TensorRT's DataType docs require a Cast to float32 /
  float16 before any other layer, so the `images` input must go straight into a Cast.
* Attribute restrictions from the table that a graph can violate statically (Resize modes,
  constant `axes`, pooling dilations, TopK `sorted`/`K`, ScatterND reduction, Dropout).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from hgad_edge.core.trt_common import version_tuple

__all__ = ["TABLE_SOURCE", "TRT_OPS", "Issue", "OpSupport", "Report", "check_trt_support", "format_report", "op_info"]

TABLE_SOURCE = "onnx/onnx-tensorrt docs/operators.md (TensorRT 10.15; changelog for ops added within 10.x)"
OPSET_RANGE_10_0 = (9, 20)  # "TensorRT 10.0 supports operators in the inclusive range of opset 9 to opset 20"
OPSET_RANGE_LATEST = (9, 24)  # "TensorRT 10.15 supports ... opset 9 to opset 24"
UINT8_NOTE = "uint8 is network I/O only: TensorRT needs a Cast to float32/float16 before any other layer"

# Operator | supported | types | restrictions, one op a line, transcribed from operators.md (TensorRT 10.15);
# a package data file, verbatim, so that it diffs against upstream without Python around it.
_TABLE_FILE = "trt_operators.md"

# TensorRT release that first imported the op (onnx-tensorrt changelog); absent = all of 10.x.
_SINCE = {
    "DeformConv": (10, 1),
    "BlackmanWindow": (10, 4),
    "HammingWindow": (10, 4),
    "HannWindow": (10, 4),
    "STFT": (10, 5),
    "Attention": (10, 14),
    "RotaryEmbedding": (10, 15),
    "RMSNormalization": (10, 15),
    "TensorScatter": (10, 15),
}

# Ops TensorRT imports but hgad-edge graphs must not contain (deployment-facts.md).
KNOWN_PROBLEMS = {
    "ReduceLogSumExp": (
        "imported as log(sum(exp(x))) without the max shift: overflowed to -inf on ~4k pixels and cut image "
        "AUROC from 1.00 to 0.80; export log-sum-exp by hand (max, subtract, exp, sum, log, add back)"
    ),
}

_TYPE_CODES = {
    "FP32": TensorProto.FLOAT,
    "FP16": TensorProto.FLOAT16,
    "BF16": TensorProto.BFLOAT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "INT8": TensorProto.INT8,
    "INT4": TensorProto.INT4,
    "FP8": TensorProto.FLOAT8E4M3FN,
    "FP4": getattr(TensorProto, "FLOAT4E2M1", -1),
}


@dataclass(frozen=True)
class OpInfo:
    """One row of the operator table."""

    op_type: str
    supported: bool
    types: tuple[str, ...]
    restriction: str
    since: tuple[int, int] | None = None


def _parse_table(text: str) -> dict[str, OpInfo]:
    table = {}
    for line in filter(None, (raw.strip() for raw in text.splitlines())):
        name, flag, types, restriction = line.split("|")
        kinds = tuple(t.strip() for t in types.split(",") if t.strip())
        table[name] = OpInfo(name, flag == "Y", kinds, restriction.strip(), _SINCE.get(name))
    return table


TRT_OPS: dict[str, OpInfo] = _parse_table((files("hgad_edge.export") / _TABLE_FILE).read_text(encoding="utf-8"))


def op_info(op_type: str) -> OpInfo | None:
    """The table row of an ONNX op type (default domain), or None when onnx-tensorrt does not list it."""
    return TRT_OPS.get(op_type)


# ---- report ---------------------------------------------------------------------------------------
LEVELS = ("ok", "note", "warning", "error")


@dataclass
class Issue:
    """One finding; `level` is "note", "warning" or "error" (errors make the report fail)."""

    level: str
    message: str
    nodes: list[str] = field(default_factory=list)


@dataclass
class OpSupport:
    """Per op type: how often it occurs, whether TensorRT 10 imports it, and what to watch."""

    op_type: str
    domain: str
    count: int
    supported: bool
    level: str
    note: str
    nodes: list[str] = field(default_factory=list)


@dataclass
class Report:
    """Result of `check_trt_support`; `ok` is False as soon as one error-level finding exists."""

    source: str
    opset: int | None
    ops: list[OpSupport]
    issues: list[Issue]
    table: str = TABLE_SOURCE

    @property
    def errors(self) -> list[str]:
        found = [f"{o.op_type}: {o.note}" for o in self.ops if o.level == "error"]
        return found + [i.message for i in self.issues if i.level == "error"]

    @property
    def warnings(self) -> list[str]:
        found = [f"{o.op_type}: {o.note}" for o in self.ops if o.level == "warning"]
        return found + [i.message for i in self.issues if i.level == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors


def _worse(a: str, b: str) -> str:
    return a if LEVELS.index(a) >= LEVELS.index(b) else b


# ---- graph walking --------------------------------------------------------------------------------
def _load(model: str | Path | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        return model, model.graph.name or "<model>"
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist; export a bundle first (hgad-edge export)")
    return onnx.load(str(path), load_external_data=False), str(path)


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _walk(nodes: Iterable[onnx.NodeProto], functions: dict, seen: set) -> Iterator[onnx.NodeProto]:
    """Every node TensorRT's parser will import: subgraphs (If/Loop/Scan) and the bodies of
    model-local functions (which the parser inlines since TensorRT 9) included."""
    for node in nodes:
        key = (node.domain, node.op_type)
        if key in functions:
            if key not in seen:  # one body per function is enough to know its ops
                seen.add(key)
                yield from _walk(functions[key].node, functions, seen)
            continue
        yield node
        for graph in _subgraphs(node):
            yield from _walk(graph.node, functions, seen)


def _default_opset(model: onnx.ModelProto) -> int | None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None


def _node_label(node: onnx.NodeProto) -> str:
    return node.name or f"<{node.op_type} -> {node.output[0] if node.output else '?'}>"


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


# ---- per-node attribute rules ---------------------------------------------------------------------
_RESIZE_COORD = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
_RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}
_AXES_INPUT_SINCE = {  # op: opset from which `axes` is an input (index 1) instead of an attribute
    **{f"Reduce{k}": 18 for k in ("L1", "L2", "LogSum", "LogSumExp", "Max", "Mean", "Min", "Prod", "SumSquare")},
    "ReduceSum": 13,
    "Squeeze": 13,
    "Unsqueeze": 13,
}


class _Context:
    """What the rules need to know about the graph: constants and the opset."""

    def __init__(self, model: onnx.ModelProto, opset: int | None) -> None:
        self.opset = opset or 0
        self.constants: dict[str, onnx.TensorProto | None] = {}
        for graph in _all_graphs(model.graph):
            for init in graph.initializer:
                self.constants[init.name] = init
            for node in graph.node:
                if node.op_type == "Constant" and node.output:
                    value = _attr(node, "value")
                    self.constants[node.output[0]] = value if isinstance(value, onnx.TensorProto) else None

    def is_constant(self, name: str) -> bool:
        return name in self.constants

    def value(self, name: str) -> Any:
        tensor = self.constants.get(name)
        return None if tensor is None else onnx.numpy_helper.to_array(tensor)


def _all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from _all_graphs(sub)


def _rule_resize(node: onnx.NodeProto, ctx: _Context) -> list[tuple[str, str]]:
    problems = []
    mode = _text(_attr(node, "mode", b"nearest"))
    coord = _text(_attr(node, "coordinate_transformation_mode", b"half_pixel"))
    nearest = _text(_attr(node, "nearest_mode", b"round_prefer_floor"))
    if mode not in ("nearest", "linear"):
        problems.append(("error", f"Resize mode={mode!r} unsupported (nearest or linear only)"))
    if coord not in _RESIZE_COORD:
        problems.append(("error", f"Resize coordinate_transformation_mode={coord!r} unsupported"))
    if mode == "nearest" and nearest not in _RESIZE_NEAREST:
        problems.append(("error", f"Resize nearest_mode={nearest!r} unsupported"))
    if int(_attr(node, "antialias", 0) or 0):
        problems.append(("error", "Resize antialias=1 unsupported"))
    if _text(_attr(node, "keep_aspect_ratio_policy", b"stretch")) != "stretch":
        problems.append(("error", "Resize keep_aspect_ratio_policy must be 'stretch'"))
    return problems


def _rule_axes(node: onnx.NodeProto, ctx: _Context) -> list[tuple[str, str]]:
    since = _AXES_INPUT_SINCE.get(node.op_type)
    if since is None or ctx.opset < since or len(node.input) < 2 or not node.input[1]:
        return []
    if ctx.is_constant(node.input[1]):
        return []
    level = "warning" if node.op_type in ("Squeeze", "Unsqueeze") else "error"  # 10.7+ resolves folded axes
    return [(level, f"{node.op_type} axes input {node.input[1]!r} is computed at run time; TensorRT needs a constant")]


def _rule_pool(node: onnx.NodeProto, ctx: _Context) -> list[tuple[str, str]]:
    dilations = _attr(node, "dilations") or []
    if any(int(d) != 1 for d in dilations):
        return [("error", f"{node.op_type} dilations={list(dilations)} unsupported (must be all ones)")]
    return []


def _rule_topk(node: onnx.NodeProto, ctx: _Context) -> list[tuple[str, str]]:
    problems = []
    if int(_attr(node, "sorted", 1)) != 1:
        problems.append(("error", "TopK sorted=0 unsupported"))
    k = ctx.value(node.input[1]) if len(node.input) > 1 else None
    if k is not None and int(k.reshape(-1)[0]) >= 3840:
        problems.append(("error", f"TopK K={int(k.reshape(-1)[0])} too large (TensorRT needs K < 3840)"))
    elif k is None:
        problems.append(("warning", "TopK K is computed at run time; TensorRT needs K < 3840"))
    return problems


def _rule_scatter_nd(node: onnx.NodeProto, ctx: _Context) -> list[tuple[str, str]]:
    reduction = _text(_attr(node, "reduction", b"none"))
    return [] if reduction == "none" else [("error", f"ScatterND reduction={reduction!r} unsupported")]


def _rule_cumsum(node: onnx.NodeProto, ctx: _Context) -> list[tuple[str, str]]:
    if len(node.input) > 1 and not ctx.is_constant(node.input[1]):
        return [("error", "CumSum axis must be a build-time constant")]
    return []


def _rule_dropout(node: onnx.NodeProto, ctx: _Context) -> list[tuple[str, str]]:
    if len(node.input) < 3 or not node.input[2]:
        return []
    value = ctx.value(node.input[2])
    if value is None or bool(value):
        return [("error", "Dropout training_mode must be an initializer equal to False")]
    return []


_RULES = {
    "Resize": _rule_resize,
    "AveragePool": _rule_pool,
    "MaxPool": _rule_pool,
    "LpPool": _rule_pool,
    "TopK": _rule_topk,
    "ScatterND": _rule_scatter_nd,
    "CumSum": _rule_cumsum,
    "Dropout": _rule_dropout,
    **{name: _rule_axes for name in _AXES_INPUT_SINCE},
}


# ---- the check -----------------------------------------------------------------------------------
def _op_verdict(domain: str, op_type: str, trt_version: tuple[int, int] | None) -> tuple[bool, str, str]:
    """(supported, level, note) for one op type, from the table and the known-problem list."""
    if domain not in ("", "ai.onnx"):
        return False, "error", f"custom domain {domain!r}: no TensorRT importer (would need a TensorRT plugin)"
    info = op_info(op_type)
    if info is None:
        return False, "error", "not in onnx-tensorrt's operator table: the parser has no importer"
    if not info.supported:
        return (
            False,
            "error",
            "onnx-tensorrt lists it as unsupported" + (f" ({info.restriction})" if info.restriction else ""),
        )
    if op_type in KNOWN_PROBLEMS:
        return True, "error", f"supported but {KNOWN_PROBLEMS[op_type]}"
    note = info.restriction
    if info.since is not None:
        needs = f"needs TensorRT >= {info.since[0]}.{info.since[1]}"
        if trt_version is not None and trt_version < info.since:
            return False, "error", f"{needs}, checking against {trt_version[0]}.{trt_version[1]}"
        level = "ok" if trt_version is not None else "warning"
        return True, level, "; ".join(filter(None, [needs, note]))
    return True, "ok", note


def _opset_issues(opset: int | None) -> list[Issue]:
    if opset is None:
        return [Issue("error", "the model imports no default (ai.onnx) opset")]
    low, high = OPSET_RANGE_LATEST
    if opset < low or opset > high:
        return [
            Issue("error", f"opset {opset} is outside TensorRT 10's range ({low}..{high}); re-export at opset 17-20")
        ]
    if opset > OPSET_RANGE_10_0[1]:
        msg = (
            f"opset {opset} needs a recent TensorRT 10 (10.0 documents opset 9..20, 10.15 9..24); "
            "opset 18 works everywhere"
        )
        return [Issue("warning", msg)]
    return []


def _check_nodes(nodes: list[onnx.NodeProto], ctx: _Context, functions: dict, trt_version) -> list[OpSupport]:
    groups: dict[tuple[str, str], list[onnx.NodeProto]] = defaultdict(list)
    for node in nodes:
        groups[(node.domain or "", node.op_type)].append(node)
    ops = []
    for (domain, op_type), members in sorted(groups.items(), key=lambda kv: kv[0][1]):
        supported, level, note = _op_verdict(domain, op_type, trt_version)
        flagged: list[str] = []
        findings: Counter = Counter()
        for node in members:
            for node_level, message in _RULES.get(op_type, lambda n, c: [])(node, ctx):
                level = _worse(level, node_level)
                findings[message] += 1
                flagged.append(_node_label(node))
        extra = [f"{m} (x{n})" if n > 1 else m for m, n in findings.items()]
        note = "; ".join(filter(None, [note, *extra]))
        ops.append(OpSupport(op_type, domain, len(members), supported, level, note, (flagged or [])[:5]))
    return ops


def _elem_type(value_info: onnx.ValueInfoProto) -> int:
    return value_info.type.tensor_type.elem_type


def _io_issues(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> list[Issue]:
    """Network inputs/outputs: uint8 must meet a Cast first; int64/float16 are fine (notes)."""
    issues = []
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in nodes:
        for name in node.input:
            consumers[name].append(node)
    for value in model.graph.input:
        issues += _input_issues(value, consumers.get(value.name, []))
    for value in model.graph.output:
        issues += _output_issues(value)
    return issues


def _input_issues(value: onnx.ValueInfoProto, users: list[onnx.NodeProto]) -> list[Issue]:
    kind = _elem_type(value)
    name = value.name
    if kind == TensorProto.UINT8:
        bad = [n for n in users if not _casts_to_float(n) and n.op_type not in ("Shape", "Size")]
        dims_only = [n for n in users if n.op_type in ("Shape", "Size")]
        issues = []
        if bad:
            what = ", ".join(f"{n.op_type} {_node_label(n)}" for n in bad)
            msg = (
                f"input {name!r} is uint8 and feeds {what}: {UINT8_NOTE}; "
                "cast it first (images.to(float) before permute)"
            )
            issues.append(Issue("error", msg, [_node_label(n) for n in bad]))
        if dims_only:
            users = ", ".join(n.op_type for n in dims_only)
            msg = (
                f"input {name!r} (uint8) feeds {users}, which reads only its dimensions; "
                f"{UINT8_NOTE}, so cast first to be safe"
            )
            issues.append(Issue("warning", msg, [_node_label(n) for n in dims_only]))
        if not issues:
            issues.append(Issue("note", f"input {name!r} is uint8 and goes straight into a Cast to float: supported"))
        return issues
    return _dtype_note("input", name, kind)


def _casts_to_float(node: onnx.NodeProto) -> bool:
    return node.op_type == "Cast" and _attr(node, "to") in (TensorProto.FLOAT, TensorProto.FLOAT16)


def _output_issues(value: onnx.ValueInfoProto) -> list[Issue]:
    kind = _elem_type(value)
    if kind == TensorProto.UINT8:
        return [Issue("note", f"output {value.name!r} is uint8: it must come from a Cast of float32/float16")]
    return _dtype_note("output", value.name, kind)


def _dtype_note(role: str, name: str, kind: int) -> list[Issue]:
    if kind == TensorProto.INT64:
        return [Issue("note", f"{role} {name!r} is int64: native since TensorRT 9 (bind int64 buffers)")]
    if kind == TensorProto.FLOAT16:
        return [Issue("note", f"{role} {name!r} is float16: supported")]
    if kind == TensorProto.DOUBLE:
        return [Issue("warning", f"{role} {name!r} is double: TensorRT casts it to float32")]
    if kind not in (TensorProto.FLOAT, TensorProto.INT32, TensorProto.BOOL, TensorProto.BFLOAT16, 0):
        label = TensorProto.DataType.Name(kind)
        return [Issue("error", f"{role} {name!r} has type {label}, which TensorRT cannot bind")]
    return []


def _type_issues(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> list[Issue]:
    """First-input dtype of each node against the table's type column (via ONNX shape inference).

    A documentation check, so mismatches are warnings; uint8 is handled by `_io_issues`.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as err:  # noqa: BLE001 - inference is a bonus; the op check still stands
        return [Issue("note", f"dtype check skipped: ONNX shape inference failed ({err})")]
    types = {v.name: _elem_type(v) for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    found: dict[tuple[str, str], list[str]] = defaultdict(list)
    for node in nodes:
        info = op_info(node.op_type)
        kind = types.get(node.input[0]) if node.input and node.input[0] else None
        if info is None or not info.supported or not kind or kind == TensorProto.UINT8 or not info.types:
            continue
        if kind == TensorProto.DOUBLE:
            found[(node.op_type, "DOUBLE (cast to float32 by TensorRT)")].append(_node_label(node))
        elif kind not in {_TYPE_CODES.get(t, -1) for t in info.types}:
            found[(node.op_type, TensorProto.DataType.Name(kind))].append(_node_label(node))
    issues = []
    for (op_type, label), names in sorted(found.items()):
        msg = f"{op_type} on {label} input ({len(names)} node(s)); the table lists {', '.join(op_info(op_type).types)}"
        issues.append(Issue("warning", msg, names[:5]))
    return issues


def check_trt_support(model: str | Path | onnx.ModelProto, trt_version: str | None = None) -> Report:
    """Check every node of an ONNX model against TensorRT 10's ONNX parser support.

    `trt_version` ("10.3.0") turns "added in 10.x" ops into hard errors for older releases; without
    it they are warnings. The report is a pure function of the graph: no TensorRT, no GPU.
    """
    proto, source = _load(model)
    opset = _default_opset(proto)
    functions = {(f.domain, f.name): f for f in proto.functions}
    nodes = list(_walk(proto.graph.node, functions, set()))
    ctx = _Context(proto, opset)
    ops = _check_nodes(nodes, ctx, functions, version_tuple(trt_version, 2) if trt_version else None)
    issues = _opset_issues(opset) + _io_issues(proto, nodes) + _type_issues(proto, nodes)
    return Report(source=source, opset=opset, ops=ops, issues=issues)


# ---- markdown --------------------------------------------------------------------------------------
def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def format_report(report: Report) -> str:
    """Markdown: a verdict line, one table row per op type, then the graph-level findings."""
    verdict = "OK" if report.ok else f"{len(report.errors)} error(s)"
    lines = [
        f"## TensorRT 10 ONNX-parser check: {verdict}",
        "",
        f"- model: `{report.source}`",
        f"- opset: {report.opset if report.opset is not None else 'missing'}",
        f"- operator table: {report.table}",
        f"- {sum(o.count for o in report.ops)} nodes, {len(report.ops)} op types, {len(report.warnings)} warning(s)",
        "",
        "| Op | Count | Supported | Level | Note |",
        "|---|---:|:---:|---|---|",
    ]
    for op in sorted(report.ops, key=lambda o: (-LEVELS.index(o.level), o.op_type)):
        name = op.op_type if not op.domain else f"{op.domain}::{op.op_type}"
        where = f" (e.g. {', '.join(op.nodes[:3])})" if op.nodes else ""
        lines.append(
            f"| {_cell(name)} | {op.count} | {'yes' if op.supported else 'no'} | {op.level} "
            f"| {_cell(op.note + where)} |"
        )
    if report.issues:
        lines += ["", "### Graph-level findings", ""]
        for issue in sorted(report.issues, key=lambda i: -LEVELS.index(i.level)):
            where = f" (nodes: {', '.join(issue.nodes[:5])})" if issue.nodes else ""
            lines.append(f"- **{issue.level}**: {issue.message}{where}")
    return "\n".join(lines) + "\n"
