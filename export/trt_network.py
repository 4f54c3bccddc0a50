"""The parsed TensorRT network, checked against what the exporter promised, before anything is built.

Precision lives in the ONNX graph (README, precision policy): the mixed fp16 graph runs backbone and
flows in FP16 and casts to FP32 before the mixture head, whose squared distances (1e6-1e9) overflow
in FP16. So the builder trusts the graph only after TensorRT's own network is checked layer by layer:
each layer is mapped back to its ONNX node(s) and from there to the module the exporter recorded
(export/graph_check.py); no layer of the head or scoring may output HALF or INT8, no dequantized
tensor may feed one (the Q/DQ graph's rule: nothing quantized at or after z - mu), no plugin may be
needed, and the inputs/outputs must be the bundle's, with a dynamic batch axis. Parser errors name
the node that failed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hgad_edge.core.engine_records import BuildError
from hgad_edge.core.trt_common import make_logger
from hgad_edge.export.trt_devices import trt_major

__all__ = [
    "NetworkFacts",
    "ParsedNetwork",
    "check_network",
    "network_facts",
    "network_flags",
    "parse_network",
    "parser_error_text",
    "parser_errors",
    "plugin_layer_types",
]

_QDQ_LAYER_TYPES = ("QUANTIZE", "DEQUANTIZE")
_MOVE_LAYER_TYPES = ("SHUFFLE", "IDENTITY", "SLICE", "CONCATENATION", "GATHER", "CAST")
_PLUGIN_LAYER_TYPES = ("PLUGIN", "PLUGIN_V2", "PLUGIN_V3")
# The ONNX parser tags every layer with the node it came from: "[ONNX Layer: node_Add_12]".
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")


@dataclass
class NetworkFacts:
    """What the parsed network is, checked before building and recorded with the engine."""

    layers: int
    half_layers: list[str] = field(default_factory=list)
    int8_layers: list[str] = field(default_factory=list)  # Q/DQ layers and layers with an INT8 output
    fp32_policy_layers: list[str] = field(default_factory=list)  # made from head/scoring nodes
    violations: list[str] = field(default_factory=list)  # policy layers that output HALF or INT8, or take a DQ output
    unmapped: list[str] = field(default_factory=list)  # non-constant layers with no ONNX node
    plugins: list[str] = field(default_factory=list)
    inputs: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    outputs: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)


def network_flags(trt: Any, precision: str, target: str = "tensorrt") -> tuple[int, bool]:
    """(create_network flags, strongly typed?) for this target, TensorRT version and precision."""
    if target != "tensorrt" or trt_major(trt) >= 11:
        return 0, True  # TensorRT-RTX and TensorRT 11: always strongly typed, the flag is gone
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly is None:
        if precision != "fp32":
            raise BuildError(
                f"TensorRT {trt.__version__} lacks STRONGLY_TYPED networks, needed for the {precision} graph "
                "(its precision is in the graph); install TensorRT >= 10"
            )
        return 0, False
    return 1 << int(strongly), True


# ---- parsing ---------------------------------------------------------------------------------------
@dataclass
class ParsedNetwork:
    """A parsed ONNX model; builder, parser and logger must outlive the network."""

    builder: Any
    network: Any
    parser: Any
    logger: Any


def parse_network(trt: Any, onnx_path: Path, precision: str, target: str = "tensorrt") -> ParsedNetwork:
    """Builder + network + ONNX parser over `onnx_path`; BuildError naming every failed node."""
    onnx_path = Path(onnx_path)
    logger = make_logger(trt)
    mark = logger.count
    builder = trt.Builder(logger)
    if builder is None:
        raise BuildError("TensorRT could not create a builder (is the GPU usable? see the log)")
    flags, _ = network_flags(trt, precision, target)
    network = builder.create_network(flags)
    if network is None:
        raise BuildError("TensorRT could not create a network definition (out of memory?)")
    parser = trt.OnnxParser(network, logger)
    parsed = (
        parser.parse_from_file(str(onnx_path))
        if hasattr(parser, "parse_from_file")
        else parser.parse(onnx_path.read_bytes(), str(onnx_path))
    )
    if not parsed:
        raise BuildError(_parser_message(parser, onnx_path, logger.errors_since(mark)))
    return ParsedNetwork(builder, network, parser, logger)


def parser_error_text(error: Any) -> str:
    """One parser error with its node: name, operator and index where this TensorRT reports them."""

    def get(attr: str) -> Any:
        fn = getattr(error, attr, None)
        try:
            return fn() if callable(fn) else None
        except Exception:  # noqa: BLE001 - older parsers lack some fields
            return None

    node_name, operator, index = get("node_name"), get("node_operator"), get("node")
    where = node_name or (f"#{index}" if index not in (None, -1) else "")
    label = " ".join(filter(None, [operator, f"node {where}" if where else ""]))
    return f"{label}: {get('desc')}" if label else str(get("desc"))


def parser_errors(parser: Any) -> list[str]:
    return [parser_error_text(parser.get_error(i)) for i in range(parser.num_errors)]


def _parser_message(parser: Any, path: Path, logged: list[str]) -> str:
    errors = parser_errors(parser) or logged
    listed = "\n  ".join(errors) or "no details from the parser"
    return (
        f"TensorRT's ONNX parser rejected {path} ({len(errors)} error(s)):\n  {listed}\n"
        "Check the graph with hgad-edge check-trt and re-export."
    )


# ---- facts and checks ------------------------------------------------------------------------------
def plugin_layer_types(trt: Any) -> set[Any]:
    """The plugin layer types this TensorRT knows (hgad-edge engines must contain none)."""
    return {getattr(trt.LayerType, n) for n in _PLUGIN_LAYER_TYPES if hasattr(trt.LayerType, n)}


def _tensor_facts(tensor: Any) -> tuple[str, tuple[int, ...]]:
    return getattr(tensor.dtype, "name", str(tensor.dtype)), tuple(int(d) for d in tensor.shape)


def _layer_nodes(network: Any) -> list[list[str]]:
    """ONNX node names each layer came from.

    The parser tags a layer with its node ("[ONNX Layer: node_Add_12]"); helper layers it inserts
    (broadcast reshapes, shape arithmetic: "ONNXTRT_Broadcast") carry no tag and are attributed to
    the nodes of the layers that consume their outputs, transitively.
    """
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    tagged = [_ONNX_LAYER.findall(str(getattr(layer, "metadata", "") or "")) for layer in layers]
    consumers: dict[str, list[int]] = {}
    for index, layer in enumerate(layers):
        for k in range(getattr(layer, "num_inputs", 0)):
            tensor = layer.get_input(k)
            if tensor is not None:
                consumers.setdefault(tensor.name, []).append(index)
    resolved: dict[int, list[str]] = {}

    def nodes_of(index: int, seen: set[int]) -> list[str]:
        if tagged[index]:
            return tagged[index]
        if index in resolved:
            return resolved[index]
        seen.add(index)
        found: list[str] = []
        layer = layers[index]
        for k in range(layer.num_outputs):
            for user in consumers.get(layer.get_output(k).name, []):
                if user not in seen:
                    found += [n for n in nodes_of(user, seen) if n not in found]
        resolved[index] = found
        return found

    return [nodes_of(i, set()) for i in range(len(layers))]


def _dequantized_tensors(trt: Any, network: Any, dequantize: Any) -> set[str]:
    """Tensors a DEQUANTIZE layer wrote, followed through layers that only move data (the network's
    layers are in topological order): a head or scoring layer must read none of them."""
    moving = {getattr(trt.LayerType, n) for n in _MOVE_LAYER_TYPES if hasattr(trt.LayerType, n)}
    found: set[str] = set()
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        inputs = [layer.get_input(k) for k in range(getattr(layer, "num_inputs", 0))]
        if layer.type == dequantize or (
            layer.type in moving and any(t is not None and t.name in found for t in inputs)
        ):
            found.update(layer.get_output(k).name for k in range(layer.num_outputs))
    return found


def network_facts(trt: Any, network: Any, parser: Any, onnx_model: Any) -> NetworkFacts:
    """Layer-by-layer facts of a parsed network against the exporter's precision policy.

    Each layer is mapped to its ONNX node(s) (`_layer_nodes`), and a node to the module hierarchy
    the exporter recorded (export/graph_check.py): a layer made for a node of the mixture head or
    the scoring must not output HALF.
    """
    import onnx

    from hgad_edge.export.graph_check import fp32_node_names

    model = onnx.load(str(onnx_model), load_external_data=False) if isinstance(onnx_model, (str, Path)) else onnx_model
    policy = fp32_node_names(model)
    half, int8 = trt.DataType.HALF, getattr(trt.DataType, "INT8", None)
    plugin_types = plugin_layer_types(trt)
    qdq_types = {getattr(trt.LayerType, n) for n in _QDQ_LAYER_TYPES if hasattr(trt.LayerType, n)}
    dequantize = getattr(trt.LayerType, "DEQUANTIZE", None)
    constant = getattr(trt.LayerType, "CONSTANT", None)
    facts = NetworkFacts(layers=network.num_layers)
    layer_nodes = _layer_nodes(network)
    dequantized = _dequantized_tensors(trt, network, dequantize)
    for i, nodes in enumerate(layer_nodes):
        layer = network.get_layer(i)
        name = str(getattr(layer, "name", f"#{i}"))
        kind = getattr(layer.type, "name", layer.type)
        dtypes = [layer.get_output(k).dtype for k in range(layer.num_outputs)]
        is_half = half in dtypes
        is_int8 = layer.type in qdq_types or (int8 is not None and int8 in dtypes)
        if is_half:
            facts.half_layers.append(name)
        if is_int8:
            facts.int8_layers.append(name)
        if layer.type in plugin_types:
            facts.plugins.append(f"plugin layer {name}")
        if not nodes and layer.type != constant:
            facts.unmapped.append(name)
        if any(n in policy for n in nodes):
            facts.fp32_policy_layers.append(name)
            node = next(n for n in nodes if n in policy)
            if is_half or is_int8:
                what = "HALF" if is_half else "INT8"
                facts.violations.append(f"layer {name} ({kind}) of head/scoring node {node} outputs {what}")
            inputs = [layer.get_input(k) for k in range(getattr(layer, "num_inputs", 0))]
            if any(t is not None and t.name in dequantized for t in inputs):
                facts.violations.append(f"layer {name} ({kind}) of head/scoring node {node} reads a dequantized tensor")
    used = getattr(parser, "get_used_vc_plugin_libraries", lambda: [])()
    facts.plugins += [f"plugin library {lib}" for lib in (used or [])]
    facts.inputs = {network.get_input(i).name: _tensor_facts(network.get_input(i)) for i in range(network.num_inputs)}
    facts.outputs = {
        network.get_output(i).name: _tensor_facts(network.get_output(i)) for i in range(network.num_outputs)
    }
    return facts


def check_network(
    trt: Any,
    network: Any,
    facts: NetworkFacts,
    onnx_name: str,
    image_input: str,
    class_input: str,
    outputs: Sequence[str] | None = None,
) -> None:
    """The network must expose the bundle's tensors with the runtime's dtypes, a dynamic batch axis,
    no plugin, and keep the head/scoring out of HALF (`outputs`: metadata's list, None = not checked)."""
    found = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    wanted = {image_input: (trt.DataType.UINT8, 4), class_input: (trt.DataType.INT64, 1)}
    if set(found) != set(wanted):
        raise BuildError(
            f"{onnx_name} has inputs {sorted(found)}, the bundle expects {sorted(wanted)}; re-export the bundle"
        )
    for name, (dtype, rank) in wanted.items():
        tensor = found[name]
        if tensor.dtype != dtype or len(tensor.shape) != rank:
            msg = (
                f"input {name} is {tensor.dtype} rank {len(tensor.shape)}, expected {dtype} rank {rank}; "
                "re-export the bundle"
            )
            raise BuildError(msg)
    if outputs is not None and list(facts.outputs) != list(outputs):
        raise BuildError(
            f"{onnx_name} has outputs {list(facts.outputs)}, metadata.json lists {list(outputs)}; re-export the bundle"
        )
    static = [n for n, (_, shape) in {**facts.inputs, **facts.outputs}.items() if not shape or shape[0] != -1]
    if static:
        raise BuildError(f"{onnx_name}: tensors {static} have no dynamic batch axis; re-export the bundle")
    if facts.plugins:
        plugins = "; ".join(facts.plugins)
        raise BuildError(f"{onnx_name} needed TensorRT plugins ({plugins}); hgad-edge engines must not")
    if facts.violations:
        listed = "\n  ".join(facts.violations[:10])
        raise BuildError(
            f"{onnx_name} breaks the precision policy (head and scoring FP32):\n  {listed}\nRe-export the bundle."
        )
