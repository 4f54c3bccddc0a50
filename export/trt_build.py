"""Build TensorRT engines for an exported bundle, on the GPU that will run them.

An engine is tied to one TensorRT version, one GPU (compute capability) and one ONNX file, so it
is built on the target (Jetson or desktop) and recorded in the bundle's metadata.json under
"engines", with exactly the fields the runtime's `choose_engine` checks. Its file name carries
the same three facts (`engine_name`), so engines for several devices can sit side by side in one
bundle and a bundle copied between machines keeps them all.

Precision lives in the ONNX graph (deployment-facts.md): fp16 engines are built from the mixed
`model_fp16.onnx` (backbone and flows in FP16, explicit casts to FP32 before the mixture head) as a
strongly typed network, never with the FP16 builder flag, which would also put the head in FP16
where its squared distances overflow. TensorRT 11 networks are always strongly typed; TensorRT 10
needs NetworkDefinitionCreationFlag.STRONGLY_TYPED. INT8 (TensorRT 10 only) calibrates the
fp32 graph and keeps every layer but convolutions and pooling in FP32, for the same reason.

Order matters: cuda-python checks for a device *before* any TensorRT object exists, because
constructing one without a GPU can crash the process. Loader/runner split as in Polygraphy: the
pure helpers (names, metadata entries, the up-to-date check) are unit-tested without TensorRT.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from hgad_edge.runtime.bundle import load_bundle, sha256_file
from hgad_edge.runtime.errors import BackendUnavailableError, BundleError
from hgad_edge.runtime.backends.tensorrt_backend import (
    CudaError,
    _make_logger,
    compute_capability,
    cuda_call,
    cuda_device_count,
    engine_problems,
    import_cudart,
)

from .calibration import CalibrationBatches, calibration_cache_path, find_images, make_entropy_calibrator

__all__ = [
    "BuildError",
    "BuildOptions",
    "ENGINE_PRECISIONS",
    "build_engines",
    "build_plan",
    "check_batch",
    "engine_entry",
    "engine_name",
    "rebuild_reasons",
    "require_cuda_device",
    "import_tensorrt_builder",
    "source_model",
    "update_metadata",
]

log = logging.getLogger("hgad_edge.export")

ENGINE_PRECISIONS = ("fp16", "fp32", "int8")
ENGINES_DIR = "engines"
TIMING_CACHE = "timing.cache"
NO_DEVICE_FIX = "TensorRT engines are built on the target GPU (Jetson / desktop); copy the bundle there and run hgad-edge build"
NO_TRT_FIX = "pip install 'hgad-edge[tensorrt]' (or JetPack's python3-libnvinfer on Jetson)"
# Layer types that may run in INT8/FP16 in an int8 build; everything else is pinned to FP32.
INT8_LAYER_TYPES = ("CONVOLUTION", "POOLING")


class BuildError(RuntimeError):
    """An engine could not be built; the message names the cause and the fix."""


# ---- pure helpers (unit-tested without TensorRT) -------------------------------------------------
def _version3(version: str) -> str:
    parts = [("".join(c for c in p if c.isdigit()) or "0") for p in str(version).split(".")[:3]]
    return ".".join(parts + ["0"] * (3 - len(parts)))


def _sm(capability: Any) -> str:
    text = str(capability) if not isinstance(capability, (tuple, list)) else f"{capability[0]}.{capability[1]}"
    return text.replace(".", "")


def engine_name(trt_version: str, capability: Any, precision: str, version_compatible: bool = False) -> str:
    """File name of an engine: `trt<major.minor.patch>_sm<cc>_<precision>[_vc].engine`.

    e.g. "trt10.3.0_sm87_fp16.engine" (TensorRT 10.3 on Jetson Orin). The build number is left
    out because the runtime accepts any build of the same major.minor.patch (engine_problems), so a
    rebuild after a patch-level reinstall replaces the file instead of piling up copies.
    """
    if precision not in ENGINE_PRECISIONS:
        raise BuildError(f"precision must be one of {list(ENGINE_PRECISIONS)}, got {precision!r}")
    suffix = "_vc" if version_compatible else ""
    return f"trt{_version3(trt_version)}_sm{_sm(capability)}_{precision}{suffix}.engine"


def source_model(precision: str) -> str:
    """Which ONNX model of the bundle an engine of `precision` is built from ("fp16" / "fp32")."""
    return "fp16" if precision == "fp16" else "fp32"


def check_batch(batch: Sequence[int]) -> tuple[int, int, int]:
    """(min, opt, max) batch of the optimisation profile; a single int n means (1, n, n)."""
    values = [int(batch)] if isinstance(batch, int) else [int(b) for b in batch]
    if len(values) == 1:
        values = [1, values[0], values[0]]
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise BuildError(f"batch must be (min, opt, max) with 1 <= min <= opt <= max, got {tuple(batch) if not isinstance(batch, int) else batch}")
    return values[0], values[1], values[2]


def engine_entry(
    precision: str,
    trt_version: str,
    capability: Any,
    onnx_file: str,
    onnx_sha256: str,
    batch: Sequence[int],
    version_compatible: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """The metadata "engines" entry the runtime's choose_engine/engine_problems read.

    Required by the runtime: precision, trt_version, compute_capability, onnx_sha256, batch
    ([min, opt, max]; the last is the largest batch), version_compatible. The rest is for people.
    """
    entry = {
        "precision": precision,
        "trt_version": str(trt_version),
        "compute_capability": f"{_sm(capability)[:-1]}.{_sm(capability)[-1:]}",
        "onnx": onnx_file,
        "model": source_model(precision),
        "onnx_sha256": onnx_sha256,
        "batch": [int(b) for b in check_batch(batch)],
        "version_compatible": bool(version_compatible),
    }
    entry.update(extra)
    return entry


def rebuild_reasons(
    entry: Optional[dict[str, Any]],
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
    and adds what the runtime cannot see: a missing file, another precision or batch profile.
    """
    if not entry:
        return ["no engine recorded in metadata.json"]
    if not Path(engine_path).is_file():
        return [f"{Path(engine_path).name} is listed in metadata.json but missing"]
    models = {entry.get("precision"): {"sha256": onnx_sha256}}
    reasons = engine_problems(entry, models, trt_version, capability)
    if entry.get("onnx_sha256") != onnx_sha256 and not any("ONNX" in r for r in reasons):
        reasons.append("built from another ONNX model (the bundle was re-exported since)")
    if entry.get("precision") != precision:
        reasons.append(f"recorded precision {entry.get('precision')!r}, {precision!r} requested")
    if list(entry.get("batch") or []) != list(check_batch(batch)):
        reasons.append(f"built for batch {entry.get('batch')}, {list(check_batch(batch))} requested")
    if bool(entry.get("version_compatible")) != bool(version_compatible):
        reasons.append("version-compatible flag differs")
    return reasons


def update_metadata(meta_path: Path, name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Record one engine in metadata.json (re-read, replaced atomically; other engines kept)."""
    meta = json.loads(Path(meta_path).read_text(encoding="utf-8"))
    engines = dict(meta.get("engines") or {})
    engines[name] = entry
    meta["engines"] = engines
    _write_atomic(Path(meta_path), (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    return meta


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file + rename, so a crash never leaves half an engine or metadata."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ---- environment checks ---------------------------------------------------------------------------
def require_cuda_device(device: int = 0, cudart: Any = None) -> tuple[Any, str, str]:
    """(cudart, compute capability "8.7", GPU name) of `device`; BuildError when there is no GPU.

    Runs before TensorRT is touched: building a TensorRT object without a GPU can segfault.
    """
    try:
        cudart = cudart if cudart is not None else import_cudart()
    except BackendUnavailableError as err:
        raise BuildError(f"cuda-python is missing ({err}); {NO_TRT_FIX}") from err
    count, reason = cuda_device_count(cudart)
    if count == 0:
        raise BuildError(f"no CUDA device ({reason}): {NO_DEVICE_FIX}")
    if not 0 <= device < count:
        raise BuildError(f"CUDA device {device} does not exist (this machine has {count}); pass device=0..{count - 1}")
    try:
        cuda_call(cudart.cudaSetDevice(device), cudart, "cudaSetDevice")
        capability = compute_capability(cudart, device)
    except CudaError as err:
        raise BuildError(f"CUDA device {device} is not usable ({err}); check the driver (nvidia-smi / tegrastats)") from err
    return cudart, capability, _gpu_name(cudart, device)


def _gpu_name(cudart: Any, device: int) -> str:
    try:
        props = cuda_call(cudart.cudaGetDeviceProperties(device), cudart, "cudaGetDeviceProperties")
        name = props.name
        return (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).rstrip("\x00")
    except Exception:  # noqa: BLE001 - the name is informative only
        return "unknown GPU"


def import_tensorrt_builder() -> Any:
    """The full `tensorrt` package (the lean runtime cannot build); BuildError naming the install."""
    try:
        import tensorrt as trt
    except ImportError as err:
        raise BuildError(f"TensorRT is not installed ({err}): {NO_TRT_FIX}") from err
    if not hasattr(trt, "Builder"):
        raise BuildError(f"this tensorrt package ({getattr(trt, '__version__', '?')}) is a runtime-only build without the builder: {NO_TRT_FIX}")
    if trt_major(trt) < 10:
        raise BuildError(f"hgad-edge builds with TensorRT 10 or newer, found {trt.__version__} (JetPack 6 ships 10.3): {NO_TRT_FIX}")
    return trt


def trt_major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def _require_int8_support(trt: Any) -> None:
    if trt_major(trt) >= 11 or not hasattr(trt, "IInt8EntropyCalibrator2") or not hasattr(trt.BuilderFlag, "INT8"):
        msg = (
            f"TensorRT {trt.__version__} removed implicit INT8 calibration (IInt8EntropyCalibrator2 / BuilderFlag.INT8): "
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
    workspace_mb: Optional[int] = None
    timing_cache: Optional[Path] = None
    version_compatible: bool = False
    allow_tf32: bool = False


def _check(ok: Any, what: str) -> None:
    """Polygraphy style: every bool-returning TensorRT setter is checked, failures say what."""
    if ok is False or ok is None:
        raise BuildError(f"TensorRT refused {what}")


def _network_flags(trt: Any, precision: str) -> tuple[int, bool]:
    """(create_network flags, strongly typed?) for this TensorRT and precision."""
    if trt_major(trt) >= 11:
        return 0, True  # TensorRT 11: always strongly typed, the flag is gone
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if precision == "int8":
        return 0, False  # implicit INT8 calibration needs a weakly typed network
    if strongly is None:
        if precision == "fp16":
            raise BuildError(f"TensorRT {trt.__version__} lacks STRONGLY_TYPED networks, needed for the mixed fp16 graph; install TensorRT >= 10")
        return 0, False
    return 1 << int(strongly), True


def _parse(trt: Any, builder: Any, logger: Any, options: BuildOptions) -> tuple[Any, Any]:
    flags, _ = _network_flags(trt, options.precision)
    network = builder.create_network(flags)
    if network is None:
        raise BuildError("TensorRT could not create a network definition (out of memory?)")
    parser = trt.OnnxParser(network, logger)
    parsed = parser.parse_from_file(str(options.onnx_path)) if hasattr(parser, "parse_from_file") else parser.parse(
        options.onnx_path.read_bytes(), str(options.onnx_path)
    )
    if not parsed:
        raise BuildError(_parser_message(parser, options.onnx_path, logger))
    return network, parser


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


def _parser_message(parser: Any, path: Path, logger: Any) -> str:
    errors = [_parser_error_text(parser.get_error(i)) for i in range(parser.num_errors)]
    if not errors and getattr(logger, "errors", None):
        errors = list(logger.errors)
    listed = "\n  ".join(errors) or "no details from the parser"
    return (
        f"TensorRT's ONNX parser rejected {path} ({len(errors)} error(s)):\n  {listed}\n"
        "Check the graph on CPU with hgad_edge.export.trt_support.check_trt_support and re-export."
    )


def _check_inputs(trt: Any, network: Any, options: BuildOptions) -> None:
    """The graph must expose the bundle's two inputs with the runtime's dtypes and layout."""
    found = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    wanted = {options.image_input: (trt.DataType.UINT8, 4), options.class_input: (trt.DataType.INT64, 1)}
    if set(found) != set(wanted):
        raise BuildError(f"{options.onnx_path.name} has inputs {sorted(found)}, the bundle expects {sorted(wanted)}; re-export the bundle")
    for name, (dtype, rank) in wanted.items():
        tensor = found[name]
        if tensor.dtype != dtype or len(tensor.shape) != rank:
            msg = f"input {name} is {tensor.dtype} rank {len(tensor.shape)}, expected {dtype} rank {rank}; re-export the bundle"
            raise BuildError(msg)


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
        constraint = getattr(trt.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS", None) or getattr(trt.BuilderFlag, "PREFER_PRECISION_CONSTRAINTS")
        config.set_flag(constraint)


def _pin_fp32(trt: Any, network: Any) -> int:
    """int8 builds: every floating-point layer except convolutions/pooling runs in FP32.

    The mixture head's squared distances reach 1e6-1e9 (deployment-facts.md): in FP16 they
    overflow, in INT8 they lose all resolution. Flows stay FP32 too (their clamp/exp path is
    sensitive); the backbone's convolutions are where INT8 pays off.
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


def _load_timing_cache(config: Any, path: Optional[Path]) -> Any:
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


def _save_timing_cache(config: Any, path: Optional[Path]) -> None:
    if path is None:
        return
    cache = config.get_timing_cache()
    if cache is not None:
        _write_atomic(path, bytes(cache.serialize()))


def build_plan(trt: Any, options: BuildOptions, calibrator: Any = None) -> bytes:
    """Parse, configure and build one serialized engine (the TensorRT part of build_engines)."""
    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    if builder is None:
        raise BuildError("TensorRT could not create a builder (is the GPU usable? see the log)")
    network, _parser = _parse(trt, builder, logger, options)
    _check_inputs(trt, network, options)
    config = builder.create_builder_config()
    _add_profile(builder, config, options, options.batch)
    _set_flags(trt, config, options)
    if options.precision == "int8":
        log.info("int8: %d layers pinned to FP32 (all but %s)", _pin_fp32(trt, network), ", ".join(INT8_LAYER_TYPES))
        config.int8_calibrator = calibrator
        opt = options.batch[1]
        calib_profile = _calibration_profile(builder, options, opt)
        _check(config.set_calibration_profile(calib_profile), "the calibration profile")
    _load_timing_cache(config, options.timing_cache)
    started = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        detail = "; ".join(logger.errors[-5:]) or "no details"
        raise BuildError(f"TensorRT failed to build {options.onnx_path.name} ({options.precision}): {detail}")
    log.info("built %s engine in %.0f s", options.precision, time.perf_counter() - started)
    _save_timing_cache(config, options.timing_cache)
    return bytes(plan)


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
        raise BuildError(f"bundle {bundle.path} has no {key} ONNX model (needed for {precision}); re-export with --precision {key}")
    path = bundle.path / bundle.models[key]["file"]
    if not path.is_file():
        raise BuildError(f"{path} is missing from the bundle; copy the whole bundle folder or re-export it")
    recorded = bundle.models[key].get("sha256")
    actual = sha256_file(path)
    if recorded and recorded != actual:
        raise BuildError(f"{path.name} does not match the sha256 in metadata.json (changed after export?); re-export the bundle")
    return path, actual


def _preflight(onnx_path: Path) -> None:
    """Refuse graphs the static check says TensorRT would mis-import (e.g. ReduceLogSumExp)."""
    from .trt_support import check_trt_support

    report = check_trt_support(onnx_path)
    for warning in report.warnings:
        log.warning("%s: %s", onnx_path.name, warning)
    if not report.ok:
        listed = "\n  ".join(report.errors)
        raise BuildError(f"{onnx_path.name} fails the TensorRT support check:\n  {listed}\nFix the export (or pass check=False to try anyway).")


def _make_calibrator(trt: Any, cudart: Any, bundle: Any, onnx_sha: str, calib_dir: Any, calib_batches: int, opt: int, force: bool) -> Any:
    """Calibrator over calib_dir; without it, the cached scales of this ONNX model (engines/).

    A cache exists per ONNX sha256 and is reused unless `force` (then calib_dir is required).
    """
    cache = calibration_cache_path(bundle.engines_dir(), onnx_sha)
    batches = None
    if calib_dir is not None:
        batches = CalibrationBatches(find_images(calib_dir), bundle.input_size, opt, calib_batches)
    elif not cache.is_file() or force:
        raise BuildError("int8 needs calibration images: pass calib_dir (--calib-dir) with normal images, e.g. <dataset>/<class>/train/good")
    names = (bundle.input_name, bundle.class_input_name)
    return make_entropy_calibrator(trt, cudart, batches, names, cache, use_cache=not force)


def _build_with_calibrator(trt: Any, options: BuildOptions, make_calibrator: Any) -> bytes:
    """build_plan, with the INT8 calibrator (if any) created first and its device memory freed after.

    TensorRT swallows exceptions raised inside calibrator callbacks, so a failed batch is
    re-raised here instead of yielding an engine calibrated on half the data.
    """
    calibrator = make_calibrator() if make_calibrator is not None else None
    try:
        plan = build_plan(trt, options, calibrator)
        if calibrator is not None and calibrator.error is not None:
            raise BuildError(f"INT8 calibration failed: {calibrator.error}") from calibrator.error
        return plan
    finally:
        if calibrator is not None:
            calibrator.free()


def build_engines(
    bundle_dir: Path | str,
    precision: str = "fp16",
    batch: Sequence[int] = (1, 4, 8),
    workspace_mb: Optional[int] = None,
    calib_dir: Optional[Path | str] = None,
    calib_batches: int = 16,
    force: bool = False,
    *,
    device: int = 0,
    version_compatible: bool = False,
    allow_tf32: bool = False,
    check: bool = True,
) -> Path:
    """Build (or reuse) the engine of `precision` for this GPU; returns the engine's path.

    Skips the build when metadata.json already records a current engine for this TensorRT
    version, GPU, ONNX file and batch profile (unless `force`); a stale one is rebuilt in place.
    The timing cache in <bundle>/engines/timing.cache is reused and updated.
    """
    if precision not in ENGINE_PRECISIONS:
        raise BuildError(f"precision must be one of {list(ENGINE_PRECISIONS)}, got {precision!r}")
    batch3 = check_batch(batch)
    bundle = _open_bundle(bundle_dir)
    onnx_path, onnx_sha = _onnx_for(bundle, precision)
    cudart, capability, gpu = require_cuda_device(device)
    trt = import_tensorrt_builder()
    if precision == "int8":
        _require_int8_support(trt)
    name = engine_name(trt.__version__, capability, precision, version_compatible)
    engines_dir = bundle.engines_dir()
    path = engines_dir / name
    recorded = (bundle.metadata.get("engines") or {}).get(name)
    reasons = rebuild_reasons(recorded, path, precision, trt.__version__, capability, onnx_sha, batch3, version_compatible)
    if not reasons and not force:
        log.info("engine %s is up to date (TensorRT %s, %s sm%s); pass force=True to rebuild", name, trt.__version__, gpu, _sm(capability))
        return path
    log.info("building %s on %s: %s", name, gpu, "; ".join(reasons) if not force else "forced")
    if check:
        _preflight(onnx_path)
    engines_dir.mkdir(parents=True, exist_ok=True)
    options = BuildOptions(
        onnx_path=onnx_path, precision=precision, batch=batch3, input_size=bundle.input_size,
        image_input=bundle.input_name, class_input=bundle.class_input_name, workspace_mb=workspace_mb,
        timing_cache=engines_dir / TIMING_CACHE, version_compatible=version_compatible, allow_tf32=allow_tf32,
    )
    calibrate = (lambda: _make_calibrator(trt, cudart, bundle, onnx_sha, calib_dir, calib_batches, batch3[1], force)) if precision == "int8" else None
    plan = _build_with_calibrator(trt, options, calibrate)
    _write_atomic(path, plan)
    entry = engine_entry(
        precision, trt.__version__, capability, onnx_path.name, onnx_sha, batch3, version_compatible,
        gpu=gpu, strongly_typed=_network_flags(trt, precision)[1], tf32=allow_tf32,
        workspace_mb=workspace_mb, size_bytes=len(plan), built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    update_metadata(bundle.path / "metadata.json", name, entry)
    return path
