"""Build TensorRT engines for an exported bundle: TensorRT 10/11 on the target GPU, or TensorRT-RTX
ahead of time on any machine (a CPU is enough).

An engine is tied to one TensorRT version, its GPUs and one ONNX file, so it is recorded in the
bundle's metadata.json under "engines" with exactly the fields the runtime's `choose_engine`
checks, plus its own sha256 (checked before the runtime deserialises it). Its file name carries the
same facts (`engine_name`), so engines for several devices and targets sit side by side.

Targets (hgad_edge/core/trt_common.py, TARGETS): one builder code path where the APIs agree
(parse, profile, flags, build_serialized_network), small adapters where they differ:
* where the compute capability comes from: TensorRT builds for the GPU it runs on (checked with
  cuda-python *before* any TensorRT object exists: constructing one without a GPU can crash the
  process); TensorRT-RTX builds for a list (--compute-capability, default its portable set), no GPU;
* strong typing: TensorRT 10 needs NetworkDefinitionCreationFlag.STRONGLY_TYPED, TensorRT 11 and
  TensorRT-RTX networks always are;
* timing cache: TensorRT reuses <bundle>/engines/timing.cache; TensorRT-RTX has none (no-op since 1.2);
* INT8 calibration: TensorRT 10 only.

Precision lives in the ONNX graph (README, precision policy): fp16 engines are built from the mixed
`model_fp16.onnx` (backbone and flows in FP16, explicit casts to FP32 before the mixture head) as a
strongly typed network, never with the FP16 builder flag, which would also put the head in FP16
where its squared distances (1e6-1e9) overflow. Before building, the parsed network is checked
layer by layer: no layer made from a head/scoring node may output HALF, and no plugin was needed.
INT8 calibrates the fp32 graph and keeps every layer but convolutions and pooling in FP32.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hgad_edge.core.bundle import load_bundle
from hgad_edge.core.cuda_api import CudaError, CudaPython, import_cudart
from hgad_edge.core.errors import BackendUnavailableError, BundleError
from hgad_edge.core.files import atomic_write_bytes, atomic_write_json, sha256_file
from hgad_edge.core.trt_common import (
    ENGINE_PRECISIONS,
    TARGETS,
    TrtTarget,
    cc_text,
    get_target,
    import_target,
    make_logger,
    rtx_capabilities,
    sm_text,
    version3,
    version_tuple,
)
from hgad_edge.export.int8_calibration import (
    CalibrationBatches,
    calibration_cache_path,
    find_images,
    make_entropy_calibrator,
)
from hgad_edge.runtime.backends.tensorrt_backend import engine_problems

__all__ = [
    "BuildError",
    "BuildOptions",
    "ENGINE_PRECISIONS",
    "NetworkFacts",
    "build_engines",
    "build_plan",
    "check_batch",
    "engine_entry",
    "engine_name",
    "import_builder",
    "import_tensorrt_builder",
    "network_facts",
    "parse_network",
    "rebuild_reasons",
    "require_cuda_device",
    "source_model",
    "target_capabilities",
    "update_metadata",
]

log = logging.getLogger("hgad_edge.export")

ENGINES_DIR = "engines"
TIMING_CACHE = "timing.cache"
NO_DEVICE_FIX = (
    "TensorRT engines are built on the target GPU (Jetson / desktop): copy the bundle there and run hgad-edge build, "
    "or build a TensorRT-RTX engine here for RTX GPUs (--target rtx)"
)
NO_TRT_FIX = TARGETS["tensorrt"].install
# Layer types that may run in INT8/FP16 in an int8 build; everything else is pinned to FP32.
INT8_LAYER_TYPES = ("CONVOLUTION", "POOLING")
PLUGIN_LAYER_TYPES = ("PLUGIN", "PLUGIN_V2", "PLUGIN_V3")
# The ONNX parser tags every layer with the node it came from: "[ONNX Layer: node_Add_12]".
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")
# Why a compute capability is not a TensorRT-RTX target, and what to use instead.
_RTX_ELSEWHERE = {
    "8.7": "Jetson Orin: use --target tensorrt with JetPack's TensorRT",
    "7.2": "Jetson Xavier: use --target tensorrt",
    "9.0": "Hopper (data-centre): use --target tensorrt (TensorRT 10/11) or Triton",
}


class BuildError(RuntimeError):
    """An engine could not be built; the message names the cause and the fix."""


# ---- pure helpers (unit-tested without TensorRT) -------------------------------------------------
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
    """Which ONNX model of the bundle an engine of `precision` is built from ("fp16" / "fp32")."""
    return "fp16" if precision == "fp16" else "fp32"


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


def update_metadata(meta_path: Path, name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Record one engine in metadata.json (re-read, replaced atomically; other engines kept)."""
    import json

    meta = json.loads(Path(meta_path).read_text(encoding="utf-8"))
    engines = dict(meta.get("engines") or {})
    engines[name] = entry
    meta["engines"] = engines
    atomic_write_json(meta_path, meta)
    return meta


# ---- environment checks ---------------------------------------------------------------------------
def require_cuda_device(device: int = 0, cudart: Any = None) -> tuple[Any, str, str]:
    """(cudart, compute capability "8.7", GPU name) of `device`; BuildError when there is no GPU.

    Runs before TensorRT is touched: building a TensorRT object without a GPU can segfault.
    """
    try:
        cudart = cudart if cudart is not None else import_cudart()
    except BackendUnavailableError as err:
        raise BuildError(f"cuda-python is missing ({err}); {NO_TRT_FIX}") from err
    cuda = CudaPython(cudart)
    count, reason = cuda.device_count()
    if count == 0:
        raise BuildError(f"no CUDA device ({reason}): {NO_DEVICE_FIX}")
    if not 0 <= device < count:
        raise BuildError(f"CUDA device {device} does not exist (this machine has {count}); pass device=0..{count - 1}")
    try:
        cuda.set_device(device)
        capability = cuda.compute_capability(device)
    except CudaError as err:
        raise BuildError(
            f"CUDA device {device} is not usable ({err}); check the driver (nvidia-smi / tegrastats)"
        ) from err
    return cudart, capability, cuda.device_name(device)


def import_tensorrt_builder() -> Any:
    """The full `tensorrt` package (the lean runtime cannot build); BuildError naming the install."""
    try:
        import tensorrt as trt
    except ImportError as err:
        raise BuildError(f"TensorRT is not installed ({err}): {NO_TRT_FIX}") from err
    if not hasattr(trt, "Builder"):
        raise BuildError(
            f"this tensorrt package ({getattr(trt, '__version__', '?')}) is a runtime-only build without the builder: "
            f"{NO_TRT_FIX}"
        )
    if trt_major(trt) < 10:
        raise BuildError(
            f"hgad-edge builds with TensorRT 10 or newer, found {trt.__version__} (JetPack 6 ships 10.3): {NO_TRT_FIX}"
        )
    return trt


def import_builder(target: str) -> Any:
    """The builder module of `target`; BuildError naming the install when it is missing."""
    if target == "tensorrt":
        return import_tensorrt_builder()
    try:
        return import_target(target, build=True)
    except BackendUnavailableError as err:
        raise BuildError(str(err)) from err


def target_capabilities(trt: Any, target: TrtTarget, requested: Sequence[str] | None) -> tuple[list[str], bool]:
    """(compute capabilities the engine is for, whether they were requested explicitly) of an
    ahead-of-time target; BuildError naming the supported list for anything else."""
    every, default = rtx_capabilities(trt)
    if not requested:
        return list(default), False
    wanted = []
    for value in requested:
        try:
            cc = cc_text(value)
        except (TypeError, ValueError):
            raise BuildError(f"--compute-capability {value!r} is not a compute capability like 8.6") from None
        if cc not in every:
            why = _RTX_ELSEWHERE.get(cc, "not an RTX-class GPU")
            raise BuildError(
                f"{target.label} cannot target compute capability {cc} ({why}); it supports {', '.join(every)}"
            )
        wanted.append(cc)
    return sorted(set(wanted), key=lambda c: version_tuple(c, 2)), True


def trt_major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def _require_int8_support(trt: Any) -> None:
    if trt_major(trt) >= 11 or not hasattr(trt, "IInt8EntropyCalibrator2") or not hasattr(trt.BuilderFlag, "INT8"):
        msg = (
            f"TensorRT {trt.__version__} removed implicit INT8 calibration "
            "(IInt8EntropyCalibrator2 / BuilderFlag.INT8): "
            "INT8 needs explicit quantization, i.e. Q/DQ nodes in the ONNX graph (NVIDIA TensorRT Model Optimizer); "
            "build --precision fp16 instead"
        )
        raise BuildError(msg)


# ---- the build -------------------------------------------------------------------------------------
@dataclass
class BuildOptions:
    """Everything one engine build needs besides the libraries."""

    onnx_path: Path
    precision: str
    batch: tuple[int, int, int]
    input_size: tuple[int, int]
    image_input: str
    class_input: str
    workspace_mb: int | None = None
    timing_cache: Path | None = None
    version_compatible: bool = False
    allow_tf32: bool = False
    target: str = "tensorrt"
    capabilities: list[str] | None = None  # explicit TensorRT-RTX targets; None = its default set
    outputs: tuple[str, ...] | None = None  # the bundle's graph outputs (metadata), checked on the network


@dataclass
class NetworkFacts:
    """What the parsed network is, checked before building and recorded with the engine."""

    layers: int
    half_layers: list[str] = field(default_factory=list)
    fp32_policy_layers: list[str] = field(default_factory=list)  # made from head/scoring nodes
    violations: list[str] = field(default_factory=list)  # policy layers that output HALF
    unmapped: list[str] = field(default_factory=list)  # non-constant layers with no ONNX node
    plugins: list[str] = field(default_factory=list)
    inputs: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    outputs: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)


def _check(ok: Any, what: str) -> None:
    """Polygraphy style: every bool-returning TensorRT setter is checked, failures say what."""
    if ok is False or ok is None:
        raise BuildError(f"TensorRT refused {what}")


def _network_flags(trt: Any, precision: str, target: str = "tensorrt") -> tuple[int, bool]:
    """(create_network flags, strongly typed?) for this target, TensorRT version and precision."""
    if target != "tensorrt" or trt_major(trt) >= 11:
        return 0, True  # TensorRT-RTX and TensorRT 11: always strongly typed, the flag is gone
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if precision == "int8":
        return 0, False  # implicit INT8 calibration needs a weakly typed network
    if strongly is None:
        if precision == "fp16":
            raise BuildError(
                f"TensorRT {trt.__version__} lacks STRONGLY_TYPED networks, needed for the mixed fp16 graph; "
                "install TensorRT >= 10"
            )
        return 0, False
    return 1 << int(strongly), True


@dataclass
class ParsedNetwork:
    """A parsed ONNX model; builder, parser and logger must outlive the network."""

    builder: Any
    network: Any
    parser: Any
    logger: Any


def parse_network(trt: Any, options: BuildOptions) -> ParsedNetwork:
    """Builder + network + ONNX parser over options.onnx_path; BuildError naming every failed node."""
    logger = make_logger(trt)
    mark = logger.count
    builder = trt.Builder(logger)
    if builder is None:
        raise BuildError("TensorRT could not create a builder (is the GPU usable? see the log)")
    flags, _ = _network_flags(trt, options.precision, options.target)
    network = builder.create_network(flags)
    if network is None:
        raise BuildError("TensorRT could not create a network definition (out of memory?)")
    parser = trt.OnnxParser(network, logger)
    parsed = (
        parser.parse_from_file(str(options.onnx_path))
        if hasattr(parser, "parse_from_file")
        else parser.parse(options.onnx_path.read_bytes(), str(options.onnx_path))
    )
    if not parsed:
        raise BuildError(_parser_message(parser, options.onnx_path, logger.errors_since(mark)))
    return ParsedNetwork(builder, network, parser, logger)


def _parser_error_text(error: Any) -> str:
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
    return [_parser_error_text(parser.get_error(i)) for i in range(parser.num_errors)]


def _parser_message(parser: Any, path: Path, logged: list[str]) -> str:
    errors = parser_errors(parser) or logged
    listed = "\n  ".join(errors) or "no details from the parser"
    return (
        f"TensorRT's ONNX parser rejected {path} ({len(errors)} error(s)):\n  {listed}\n"
        "Check the graph with hgad-edge check-trt and re-export."
    )


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
    half = trt.DataType.HALF
    plugin_types = {getattr(trt.LayerType, n) for n in PLUGIN_LAYER_TYPES if hasattr(trt.LayerType, n)}
    constant = getattr(trt.LayerType, "CONSTANT", None)
    facts = NetworkFacts(layers=network.num_layers)
    for i, nodes in enumerate(_layer_nodes(network)):
        layer = network.get_layer(i)
        name = str(getattr(layer, "name", f"#{i}"))
        is_half = any(layer.get_output(k).dtype == half for k in range(layer.num_outputs))
        if is_half:
            facts.half_layers.append(name)
        if layer.type in plugin_types:
            facts.plugins.append(f"plugin layer {name}")
        if not nodes and layer.type != constant:
            facts.unmapped.append(name)
        if any(n in policy for n in nodes):
            facts.fp32_policy_layers.append(name)
            if is_half:
                node = next(n for n in nodes if n in policy)
                facts.violations.append(
                    f"layer {name} ({getattr(layer.type, 'name', layer.type)}) of head/scoring node {node} outputs HALF"
                )
    used = getattr(parser, "get_used_vc_plugin_libraries", lambda: [])()
    facts.plugins += [f"plugin library {lib}" for lib in (used or [])]
    facts.inputs = {network.get_input(i).name: _tensor_facts(network.get_input(i)) for i in range(network.num_inputs)}
    facts.outputs = {
        network.get_output(i).name: _tensor_facts(network.get_output(i)) for i in range(network.num_outputs)
    }
    return facts


def _check_network(trt: Any, network: Any, facts: NetworkFacts, options: BuildOptions) -> None:
    """The network must expose the bundle's tensors with the runtime's dtypes, a dynamic batch axis,
    no plugin, and keep the head/scoring out of HALF."""
    found = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    wanted = {options.image_input: (trt.DataType.UINT8, 4), options.class_input: (trt.DataType.INT64, 1)}
    if set(found) != set(wanted):
        raise BuildError(
            f"{options.onnx_path.name} has inputs {sorted(found)}, the bundle expects {sorted(wanted)}; "
            "re-export the bundle"
        )
    for name, (dtype, rank) in wanted.items():
        tensor = found[name]
        if tensor.dtype != dtype or len(tensor.shape) != rank:
            msg = (
                f"input {name} is {tensor.dtype} rank {len(tensor.shape)}, expected {dtype} rank {rank}; "
                "re-export the bundle"
            )
            raise BuildError(msg)
    if options.outputs is not None and list(facts.outputs) != list(options.outputs):
        raise BuildError(
            f"{options.onnx_path.name} has outputs {list(facts.outputs)}, metadata.json lists {list(options.outputs)}; "
            "re-export the bundle"
        )
    static = [n for n, (_, shape) in {**facts.inputs, **facts.outputs}.items() if not shape or shape[0] != -1]
    if static:
        raise BuildError(f"{options.onnx_path.name}: tensors {static} have no dynamic batch axis; re-export the bundle")
    if facts.plugins:
        raise BuildError(
            f"{options.onnx_path.name} needed TensorRT plugins ({'; '.join(facts.plugins)}); hgad-edge engines must not"
        )
    if facts.violations:
        listed = "\n  ".join(facts.violations[:10])
        raise BuildError(
            f"{options.onnx_path.name} breaks the precision policy (head and scoring FP32):\n  {listed}\n"
            "Re-export the bundle."
        )


def _set_shapes(profile: Any, options: BuildOptions, batch: Sequence[int]) -> Any:
    """min/opt/max shapes of both inputs for batch sizes `batch` (set_shape is void in most
    TensorRT bindings, so only an explicit False counts as a refusal)."""
    height, width = options.input_size
    shapes = {options.image_input: lambda b: (b, height, width, 3), options.class_input: lambda b: (b,)}
    for name, shape in shapes.items():
        if profile.set_shape(name, *(shape(b) for b in batch)) is False:
            raise BuildError(f"TensorRT refused profile shapes for batch {tuple(batch)} on input {name}")
    return profile


def _add_profile(builder: Any, config: Any, options: BuildOptions, batch: tuple[int, int, int]) -> Any:
    profile = _set_shapes(builder.create_optimization_profile(), options, batch)
    _check(config.add_optimization_profile(profile) >= 0, f"the optimisation profile (batch {batch})")
    return profile


def _set_flags(trt: Any, config: Any, options: BuildOptions) -> None:
    if options.workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_mb) << 20)
    if not options.allow_tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # FP32 layers stay IEEE FP32, like PyTorch's default matmul
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if options.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        if hasattr(trt.BuilderFlag, "FP16"):
            config.set_flag(trt.BuilderFlag.FP16)  # convolutions may fall back to FP16 where INT8 is slower
        constraint = (
            getattr(trt.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS", None) or trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS
        )
        config.set_flag(constraint)


def _set_capabilities(trt: Any, config: Any, options: BuildOptions) -> None:
    """TensorRT-RTX: the GPUs the engine is for (left to its default set unless asked)."""
    if not options.capabilities:
        return
    config.num_compute_capabilities = len(options.capabilities)
    for index, cc in enumerate(options.capabilities):
        _check(
            config.set_compute_capability(getattr(trt.ComputeCapability, f"SM{sm_text(cc)}"), index),
            f"compute capability {cc}",
        )


def _pin_fp32(trt: Any, network: Any) -> int:
    """int8 builds: every floating-point layer except convolutions/pooling runs in FP32.

    The mixture head's squared distances reach 1e6-1e9: in FP16 they overflow, in INT8 they lose
    all resolution. Flows stay FP32 too (their clamp/exp path is sensitive); the backbone's
    convolutions are where INT8 pays off.
    """
    floating = {trt.DataType.FLOAT, trt.DataType.HALF}
    keep = {getattr(trt.LayerType, name) for name in INT8_LAYER_TYPES}
    skip = {getattr(trt.LayerType, name, None) for name in ("CAST", "CONSTANT", "SHAPE", "IDENTITY")}
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outputs = [layer.get_output(k) for k in range(layer.num_outputs)]
        if layer.type in keep or layer.type in skip or not outputs or any(o.dtype not in floating for o in outputs):
            continue
        layer.precision = trt.float32
        for k in range(layer.num_outputs):
            layer.set_output_type(k, trt.float32)
        pinned += 1
    return pinned


def _load_timing_cache(config: Any, path: Path | None) -> Any:
    """Start from the bundle's timing cache (makes rebuilds minutes faster); a bad one is ignored."""
    data = path.read_bytes() if path is not None and path.is_file() else b""
    try:
        cache = config.create_timing_cache(data)
    except Exception:  # noqa: BLE001 - TensorRT raises or returns None on a foreign cache
        cache = None
    if cache is None and data:
        log.warning("timing cache %s is unreadable (another TensorRT version?); starting a new one", path)
        cache = config.create_timing_cache(b"")
    _check(cache is not None, "to create a timing cache")
    _check(config.set_timing_cache(cache, ignore_mismatch=False), f"the timing cache {path}")
    return cache


def _save_timing_cache(config: Any, path: Path | None) -> None:
    if path is None:
        return
    cache = config.get_timing_cache()
    if cache is not None:
        atomic_write_bytes(path, bytes(cache.serialize()))


@dataclass
class BuiltPlan:
    plan: bytes
    facts: NetworkFacts
    seconds: float


def build_plan(trt: Any, options: BuildOptions, calibrator: Any = None) -> BuiltPlan:
    """Parse, check, configure and build one serialized engine (the TensorRT part of build_engines)."""
    parsed = parse_network(trt, options)
    builder, network, logger = parsed.builder, parsed.network, parsed.logger
    facts = network_facts(trt, network, parsed.parser, options.onnx_path)
    _check_network(trt, network, facts, options)
    config = builder.create_builder_config()
    _add_profile(builder, config, options, options.batch)
    _set_flags(trt, config, options)
    _set_capabilities(trt, config, options)
    if options.precision == "int8":
        log.info("int8: %d layers pinned to FP32 (all but %s)", _pin_fp32(trt, network), ", ".join(INT8_LAYER_TYPES))
        config.int8_calibrator = calibrator
        opt = options.batch[1]
        calib_profile = _calibration_profile(builder, options, opt)
        _check(config.set_calibration_profile(calib_profile), "the calibration profile")
    if get_target(options.target).timing_cache:
        _load_timing_cache(config, options.timing_cache)
    started, mark = time.perf_counter(), logger.count
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        detail = "; ".join(logger.errors_since(mark)[-5:]) or "no details"
        raise BuildError(f"TensorRT failed to build {options.onnx_path.name} ({options.precision}): {detail}")
    seconds = time.perf_counter() - started
    log.info("built %s engine in %.1f s", options.precision, seconds)
    if get_target(options.target).timing_cache:
        _save_timing_cache(config, options.timing_cache)
    return BuiltPlan(bytes(plan), facts, seconds)


def _calibration_profile(builder: Any, options: BuildOptions, batch: int) -> Any:
    """Calibration runs at one fixed shape: the profile's opt batch."""
    return _set_shapes(builder.create_optimization_profile(), options, (batch, batch, batch))


# ---- entry point ----------------------------------------------------------------------------------
def _open_bundle(bundle_dir: Path | str) -> Any:
    try:
        return load_bundle(bundle_dir)
    except BundleError as err:
        raise BuildError(str(err)) from err


def _onnx_for(bundle: Any, precision: str) -> tuple[Path, str]:
    """(ONNX path, sha256 recorded by the exporter) for an engine of `precision`; verified on disk."""
    key = source_model(precision)
    if key not in bundle.models:
        raise BuildError(
            f"bundle {bundle.path} has no {key} ONNX model (needed for {precision}); re-export with --precision {key}"
        )
    path = bundle.path / bundle.models[key]["file"]
    if not path.is_file():
        raise BuildError(f"{path} is missing from the bundle; copy the whole bundle folder or re-export it")
    recorded = bundle.models[key].get("sha256")
    actual = sha256_file(path)
    if recorded and recorded != actual:
        raise BuildError(
            f"{path.name} does not match the sha256 in metadata.json (changed after export?); re-export the bundle"
        )
    return path, actual


def _preflight(onnx_path: Path) -> None:
    """Refuse graphs the static check says TensorRT would mis-import (e.g. ReduceLogSumExp)."""
    from hgad_edge.export.trt_support import check_trt_support

    report = check_trt_support(onnx_path)
    for warning in report.warnings:
        log.warning("%s: %s", onnx_path.name, warning)
    if not report.ok:
        listed = "\n  ".join(report.errors)
        raise BuildError(
            f"{onnx_path.name} fails the TensorRT support check:\n  {listed}\n"
            "Fix the export (or pass check=False to try anyway)."
        )


def _make_calibrator(
    trt: Any, cudart: Any, bundle: Any, onnx_sha: str, calib_dir: Any, calib_batches: int, opt: int, force: bool
) -> Any:
    """Calibrator over calib_dir; without it, the cached scales of this ONNX model (engines/).

    A cache exists per ONNX sha256 and is reused unless `force` (then calib_dir is required).
    """
    cache = calibration_cache_path(bundle.engines_dir(), onnx_sha)
    batches = None
    if calib_dir is not None:
        batches = CalibrationBatches(find_images(calib_dir), bundle.input_size, opt, calib_batches)
    elif not cache.is_file() or force:
        raise BuildError(
            "int8 needs calibration images: pass calib_dir (--calib-dir) with normal images, "
            "e.g. <dataset>/<class>/train/good"
        )
    names = (bundle.input_name, bundle.class_input_name)
    return make_entropy_calibrator(trt, cudart, batches, names, cache, use_cache=not force)


def _build_with_calibrator(trt: Any, options: BuildOptions, make_calibrator: Any) -> BuiltPlan:
    """build_plan, with the INT8 calibrator (if any) created first and its device memory freed after.

    TensorRT swallows exceptions raised inside calibrator callbacks, so a failed batch is
    re-raised here instead of yielding an engine calibrated on half the data.
    """
    calibrator = make_calibrator() if make_calibrator is not None else None
    try:
        built = build_plan(trt, options, calibrator)
        if calibrator is not None and calibrator.error is not None:
            raise BuildError(f"INT8 calibration failed: {calibrator.error}") from calibrator.error
        return built
    finally:
        if calibrator is not None:
            calibrator.free()


def _check_request(
    target: str, precision: str, compute_capabilities: Sequence[str] | None, version_compatible: bool
) -> TrtTarget:
    """Bad option combinations fail before the bundle or any library is touched."""
    try:
        spec = get_target(target)
    except ValueError as err:
        raise BuildError(str(err)) from None
    if precision not in spec.precisions:
        hint = " (INT8 calibration exists only in TensorRT 10: --target tensorrt)" if precision == "int8" else ""
        raise BuildError(f"--target {target} builds {'/'.join(spec.precisions)}, not {precision!r}{hint}")
    if compute_capabilities and not spec.selectable_capabilities:
        raise BuildError(
            "--compute-capability applies to ahead-of-time targets (--target rtx); "
            f"{spec.label} builds for the GPU it runs on"
        )
    if version_compatible and target != "tensorrt":
        raise BuildError(f"version-compatible engines are a TensorRT 10/11 feature, not {spec.label}'s")
    return spec


def build_engines(
    bundle_dir: Path | str,
    precision: str = "fp16",
    batch: Sequence[int] = (1, 4, 8),
    workspace_mb: int | None = None,
    calib_dir: Path | str | None = None,
    calib_batches: int = 16,
    force: bool = False,
    *,
    target: str = "tensorrt",
    compute_capabilities: Sequence[str] | None = None,
    device: int = 0,
    version_compatible: bool = False,
    allow_tf32: bool = False,
    check: bool = True,
) -> Path:
    """Build (or reuse) the engine of `precision` for `target`; returns the engine's path.

    TensorRT builds for CUDA device `device`; TensorRT-RTX for `compute_capabilities` (default its
    portable set) without needing a GPU. Skips the build when metadata.json already records a
    current engine (same library version, GPUs, ONNX sha256, batch profile, engine sha256) unless
    `force`; a stale one is rebuilt in place. TensorRT reuses and updates <bundle>/engines/timing.cache.
    """
    spec = _check_request(target, precision, compute_capabilities, version_compatible)
    batch3 = check_batch(batch)
    bundle = _open_bundle(bundle_dir)
    onnx_path, onnx_sha = _onnx_for(bundle, precision)
    cudart, gpu, explicit = None, None, False
    if spec.builds_without_gpu:
        trt = import_builder(target)
        capabilities, explicit = target_capabilities(trt, spec, compute_capabilities)
    else:
        cudart, capability, gpu = require_cuda_device(device)
        trt = import_builder(target)
        capabilities = [capability]
    if precision == "int8":
        _require_int8_support(trt)
    name = engine_name(trt.__version__, capabilities, precision, version_compatible, target)
    engines_dir = bundle.engines_dir()
    path = engines_dir / name
    recorded = (bundle.metadata.get("engines") or {}).get(name)
    reasons = rebuild_reasons(
        recorded, path, precision, trt.__version__, capabilities, onnx_sha, batch3, version_compatible
    )
    where = gpu or f"sm{'/'.join(sm_text(c) for c in capabilities)} (ahead of time)"
    if not reasons and not force:
        log.info(
            "engine %s is up to date (%s %s, %s); pass force=True to rebuild", name, spec.label, trt.__version__, where
        )
        return path
    log.info("building %s for %s: %s", name, where, "; ".join(reasons) if not force else "forced")
    if check:
        _preflight(onnx_path)
    engines_dir.mkdir(parents=True, exist_ok=True)
    options = BuildOptions(
        onnx_path=onnx_path,
        precision=precision,
        batch=batch3,
        input_size=bundle.input_size,
        image_input=bundle.input_name,
        class_input=bundle.class_input_name,
        workspace_mb=workspace_mb,
        timing_cache=engines_dir / TIMING_CACHE,
        version_compatible=version_compatible,
        allow_tf32=allow_tf32,
        target=target,
        capabilities=capabilities if explicit else None,
        outputs=tuple(bundle.metadata.get("outputs") or ()) or None,
    )
    calibrate = (
        (lambda: _make_calibrator(trt, cudart, bundle, onnx_sha, calib_dir, calib_batches, batch3[1], force))
        if precision == "int8"
        else None
    )
    built = _build_with_calibrator(trt, options, calibrate)
    atomic_write_bytes(path, built.plan)
    facts = built.facts
    entry = engine_entry(
        precision,
        trt.__version__,
        capabilities,
        onnx_path.name,
        onnx_sha,
        batch3,
        version_compatible,
        target,
        sha256=sha256_file(path),
        size_bytes=len(built.plan),
        build_seconds=round(built.seconds, 2),
        gpu=gpu or "none (built ahead of time on the CPU)",
        compute_capabilities_explicit=explicit,
        strongly_typed=_network_flags(trt, precision, target)[1],
        tf32=allow_tf32,
        workspace_mb=workspace_mb,
        layers=facts.layers,
        half_layers=len(facts.half_layers),
        fp32_policy_layers=len(facts.fp32_policy_layers),
        plugins=facts.plugins,
        built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    update_metadata(bundle.path / "metadata.json", name, entry)
    return path
