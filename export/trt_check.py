"""`hgad-edge check-trt`: will every node of an ONNX graph import into TensorRT? Asked of a real parser.

Where a TensorRT ONNX parser is importable, the graph is parsed for real and every node the parser
rejects is reported with its index, name, operator and the parser's reason: TensorRT-RTX's parser
runs on any CPU; the full TensorRT's only where a CUDA device exists (constructing a TensorRT object
without a GPU can crash the process). Otherwise the hand-kept operator table of `trt_support.py`
answers, and the report says so. Either way the hgad-edge rule that the parser cannot know is kept:
ReduceLogSumExp imports without the max shift and overflows on these distances (an error).
With a parser, the table is run too and the report says whether the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hgad_edge.core.cuda_api import import_cuda
from hgad_edge.core.errors import BackendUnavailableError
from hgad_edge.core.trt_common import TARGETS, import_target, importable, make_logger
from hgad_edge.export.trt_network import parser_error_text, plugin_layer_types
from hgad_edge.export.trt_support import KNOWN_PROBLEMS, TABLE_SOURCE, Report, check_trt_support, format_report

__all__ = ["CheckResult", "NodeFailure", "check_onnx", "check_with_parser", "find_parser"]


@dataclass(frozen=True)
class NodeFailure:
    """One node the parser (or the hgad-edge rules) rejected."""

    index: int
    name: str
    op_type: str
    reason: str


@dataclass
class CheckResult:
    source: str
    checker: str  # what answered: "<label> <version> ONNX parser" or the table
    used_parser: bool
    failures: list[NodeFailure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    table: Report | None = None
    nodes: int = 0

    @property
    def ok(self) -> bool:
        return not self.failures and (self.used_parser or (self.table is not None and self.table.ok))

    @property
    def problems(self) -> list[str]:
        """One line per failure (the parser's), or the table's errors when no parser was used."""
        if not self.used_parser and self.table is not None:
            return list(self.table.errors)
        return [f"{f.op_type} node {f.name}: {f.reason}" for f in self.failures]

    @property
    def markdown(self) -> str:
        if not self.used_parser and self.table is not None:
            return format_report(self.table) + "".join(
                f"- {n}\n" for n in [f"checked with: {self.checker}", *self.notes]
            )
        verdict = "OK" if self.ok else f"{len(self.failures)} node(s) fail"
        lines = [
            f"## TensorRT ONNX-parser check: {verdict}",
            "",
            f"- model: `{self.source}`",
            f"- checked with: {self.checker}",
            f"- {self.nodes} nodes",
            *[f"- {n}" for n in self.notes],
        ]
        if self.failures:
            lines += ["", "| # | Node | Op | Why |", "|---:|---|---|---|"]
            lines += [f"| {f.index} | {f.name} | {f.op_type} | {f.reason.replace('|', '/')} |" for f in self.failures]
        return "\n".join(lines) + "\n"


def find_parser() -> tuple[str | None, list[str]]:
    """(target whose parser can run here, or None; why the others cannot)."""
    skipped = []
    for name, target in TARGETS.items():
        if not importable(name, build=True):
            skipped.append(f"{target.label} is not installed")
            continue
        if not target.builds_without_gpu:
            try:
                count, reason = import_cuda().device_count()
            except BackendUnavailableError as err:
                count, reason = 0, str(err)
            if count == 0:
                skipped.append(f"{target.label}'s parser needs a CUDA device here ({reason})")
                continue
        return name, skipped
    return None, skipped


def _node_table(path: Path) -> tuple[list[Any], int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return list(model.graph.node), len(model.graph.node)


def _known_problems(nodes: list[Any]) -> list[NodeFailure]:
    return [
        NodeFailure(i, n.name, n.op_type, f"imports, but {KNOWN_PROBLEMS[n.op_type]}")
        for i, n in enumerate(nodes)
        if n.op_type in KNOWN_PROBLEMS
    ]


def check_with_parser(onnx_path: Path | str, target: str) -> CheckResult:
    """Parse `onnx_path` with `target`'s ONNX parser; every rejected node with the parser's reason."""
    path = Path(onnx_path)
    trt = import_target(target, build=True)
    spec = TARGETS[target]
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    parsed = parser.parse_from_file(str(path))
    nodes, count = _node_table(path)
    result = CheckResult(str(path), f"{spec.label} {trt.__version__} ONNX parser", True, nodes=count)
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        index = int(error.node()) if error.node() is not None else -1
        node = nodes[index] if 0 <= index < len(nodes) else None
        name = error.node_name() or (node.name if node is not None else "?")
        op_type = error.node_operator() or (node.op_type if node is not None else "?")
        code = getattr(error.code(), "name", str(error.code()))
        result.failures.append(NodeFailure(index, name, op_type, f"{code}: {parser_error_text(error)}"))
    if not parsed and not result.failures:
        result.failures.append(NodeFailure(-1, "?", "?", "the parser failed without naming a node"))
    if parsed:
        used = list(parser.get_used_vc_plugin_libraries() or [])
        plugin_types = plugin_layer_types(trt)
        plugins = [
            network.get_layer(i).name for i in range(network.num_layers) if network.get_layer(i).type in plugin_types
        ]
        result.failures += [
            NodeFailure(-1, n, "plugin", "imported as a TensorRT plugin: hgad-edge engines must not need one")
            for n in plugins + used
        ]
        result.notes.append(
            f"parsed into {network.num_layers} layers, no plugin" if not (plugins or used) else "plugins needed"
        )
    result.failures += _known_problems(nodes)
    return result


def _agreement(result: CheckResult, table: Report) -> str:
    """One line: do the table's op-level errors match the op types the parser rejected?"""
    parser_ops = sorted(
        {f.op_type for f in result.failures if f.op_type not in KNOWN_PROBLEMS and f.op_type != "plugin"}
    )
    table_ops = sorted({o.op_type for o in table.ops if o.level == "error" and o.op_type not in KNOWN_PROBLEMS})
    graph_errors = [i.message for i in table.issues if i.level == "error"]
    if parser_ops == table_ops and not graph_errors:
        extra = f"; the table also warns: {'; '.join(table.warnings)}" if table.warnings else ""
        return f"the operator table ({TABLE_SOURCE}) agrees: it rejects {parser_ops or 'no'} op types{extra}"
    return (
        f"the operator table DISAGREES with the parser: parser rejects {parser_ops or 'nothing'}, table rejects "
        f"{table_ops or 'no op types'}{' and says ' + '; '.join(graph_errors) if graph_errors else ''}"
    )


def check_onnx(onnx_path: Path | str, use_parser: bool = True) -> CheckResult:
    """A real parser's verdict where one can run here, else the operator table's (the result says which)."""
    path = Path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist; export a bundle first (hgad-edge export)")
    table = check_trt_support(path)
    target, skipped = find_parser() if use_parser else (None, ["--table asked for the operator table"])
    if target is None:
        result = CheckResult(str(path), f"the hand-kept operator table ({TABLE_SOURCE})", False, table=table)
        result.notes.append("no TensorRT parser used: " + "; ".join(skipped))
        return result
    result = check_with_parser(path, target)
    result.table = table
    result.notes.append(_agreement(result, table))
    return result
