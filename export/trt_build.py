"""Build TensorRT engines for an exported bundle: TensorRT 10/11 on the target GPU, or TensorRT-RTX
ahead of time on any machine (a CPU is enough).

This module is the builder: it decides whether a build is needed, configures TensorRT (profile,
flags, compute capabilities, timing cache), builds and records the engine. Its neighbours each do
one job: hgad_edge/core/engine_records.py names and records engines in metadata.json the way the
runtime checks them (so "up to date" means "the runtime will load it"); export/trt_devices.py finds
what can build here before any TensorRT object exists; export/trt_network.py parses the ONNX and
checks the network against the exporter's promises (I/O, no plugin, head and scoring never HALF).

Targets (hgad_edge/core/trt_common.py, TARGETS): one builder code path where the APIs agree
(parse, profile, flags, build_serialized_network), small adapters where they differ:
* where the compute capability comes from: TensorRT builds for the GPU it runs on; TensorRT-RTX
  builds for a list (--compute-capability, default its portable set), no GPU;
* strong typing: TensorRT 10 needs NetworkDefinitionCreationFlag.STRONGLY_TYPED, TensorRT 11 and
  TensorRT-RTX networks always are;
* timing cache: TensorRT reuses <bundle>/engines/timing.cache; TensorRT-RTX has none (no-op since 1.2).

Tiled bundles (metadata `tiling`): the graph takes tiles, and one camera frame is a batch of them, so
`frame_hw` (--frame WIDTHxHEIGHT) sizes the profile to the tile count of such a frame: (1, tiles, tiles)
unless a batch is given (`frame_tiles`); the runtime then scores a frame in one engine call.

Precision lives in the ONNX graph (README, precision policy): fp16 engines are built from the mixed
`model_fp16.onnx` as a strongly typed network, never with the FP16 builder flag, which would also put
the mixture head in FP16 where its squared distances overflow. int8 engines likewise, from the
explicitly quantized `model_int8_trt.onnx` (symmetric Q/DQ, `hgad-edge quantize`): no calibrator and
no INT8 flag, TensorRT 10 (STRONGLY_TYPED), TensorRT 11 and TensorRT-RTX alike.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hgad_edge.core.bundle import load_bundle
from hgad_edge.core.engine_records import (
    BuildError,
    check_batch,
    engine_entry,
    engine_name,
    rebuild_reasons,
    source_model,
    update_metadata,
)
from hgad_edge.core.errors import BundleError
from hgad_edge.core.files import atomic_write_bytes, sha256_file
from hgad_edge.core.tiling import Tiling, TilingError, plan_tiles
from hgad_edge.core.trt_common import TrtTarget, get_target, sm_text
from hgad_edge.export.trt_devices import import_builder, require_cuda_device, target_capabilities
from hgad_edge.export.trt_network import NetworkFacts, check_network, network_facts, network_flags, parse_network

__all__ = ["DEFAULT_BATCH", "TIMING_CACHE", "BuildOptions", "BuiltPlan", "build_engines", "build_plan", "frame_tiles"]

log = logging.getLogger("hgad_edge.export")

TIMING_CACHE = "timing.cache"
DEFAULT_BATCH = (1, 4, 8)  # min, opt, max of the profile when neither a batch nor a frame is given


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


# ---- builder configuration -------------------------------------------------------------------------
def _check(ok: Any, what: str) -> None:
    """Polygraphy style: every bool-returning TensorRT setter is checked, failures say what."""
    if ok is False or ok is None:
        raise BuildError(f"TensorRT refused {what}")


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


# ---- timing cache (TensorRT only) ----------------------------------------------------------------
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


# ---- the build -------------------------------------------------------------------------------------
@dataclass
class BuiltPlan:
    plan: bytes
    facts: NetworkFacts
    seconds: float


def build_plan(trt: Any, options: BuildOptions) -> BuiltPlan:
    """Parse, check, configure and build one serialized engine (the TensorRT part of build_engines)."""
    parsed = parse_network(trt, options.onnx_path, options.precision, options.target)
    builder, network, logger = parsed.builder, parsed.network, parsed.logger
    facts = network_facts(trt, network, parsed.parser, options.onnx_path)
    name = options.onnx_path.name
    check_network(trt, network, facts, name, options.image_input, options.class_input, options.outputs)
    config = builder.create_builder_config()
    _add_profile(builder, config, options, options.batch)
    _set_flags(trt, config, options)
    _set_capabilities(trt, config, options)
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
        fix = f"hgad-edge quantize {bundle.path}" if precision == "int8" else f"re-export with --precision {key}"
        raise BuildError(f"bundle {bundle.path} has no {key} ONNX model (needed for {precision}); {fix}")
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


def frame_tiles(tiling: Tiling | None, frame_hw: Sequence[int], bundle: Any = "the bundle") -> int:
    """Tiles of one (H, W) frame for a tiled bundle's `tiling`; BuildError for an untiled bundle or a bad frame."""
    height, width = (int(v) for v in frame_hw)
    if tiling is None:
        raise BuildError(
            f"--frame {width}x{height} sizes the profile to the tiles of a frame, but {bundle} is not tiled "
            "(each frame is resized whole to the model input, one batch row per frame): drop --frame and give "
            "--batch min:opt:max"
        )
    try:
        return plan_tiles((height, width), tiling).count
    except TilingError as err:
        raise BuildError(f"--frame {width}x{height}: {err}") from None


def _profile_batch(
    bundle: Any, batch: Sequence[int] | None, frame_hw: Sequence[int] | None
) -> tuple[tuple[int, int, int], dict[str, Any]]:
    """The profile's (min, opt, max) and what to record about the frame (tiled bundles, module doc)."""
    if frame_hw is None:
        return check_batch(DEFAULT_BATCH if batch is None else batch), {}
    tiles = frame_tiles(bundle.tiling, frame_hw, f"bundle {bundle.path}")
    batch3 = check_batch((1, tiles, tiles) if batch is None else batch)
    if batch3[2] < tiles:
        log.warning("max batch %d < %d tiles a frame: the runtime scores a frame in several calls", batch3[2], tiles)
    return batch3, {"frame": f"{int(frame_hw[1])}x{int(frame_hw[0])}", "tiles_per_frame": tiles}


def _check_request(
    target: str, precision: str, compute_capabilities: Sequence[str] | None, version_compatible: bool
) -> TrtTarget:
    """Bad option combinations fail before the bundle or any library is touched."""
    try:
        spec = get_target(target)
    except ValueError as err:
        raise BuildError(str(err)) from None
    if precision not in spec.precisions:
        raise BuildError(f"--target {target} builds {'/'.join(spec.precisions)}, not {precision!r}")
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
    batch: Sequence[int] | None = DEFAULT_BATCH,
    workspace_mb: int | None = None,
    force: bool = False,
    *,
    target: str = "tensorrt",
    compute_capabilities: Sequence[str] | None = None,
    device: int = 0,
    version_compatible: bool = False,
    allow_tf32: bool = False,
    check: bool = True,
    frame_hw: Sequence[int] | None = None,
) -> Path:
    """Build (or reuse) the engine of `precision` for `target`; returns the engine's path.

    TensorRT builds for CUDA device `device`; TensorRT-RTX for `compute_capabilities` (default its
    portable set) without needing a GPU. Skips the build when metadata.json already records a
    current engine (same library version, GPUs, ONNX sha256, batch profile, engine sha256) unless
    `force`; a stale one is rebuilt in place. TensorRT reuses and updates <bundle>/engines/timing.cache.
    batch: (min, opt, max) of the profile, or None for the default: (1, tiles, tiles) for the (H, W)
    `frame_hw` of a tiled bundle (refused for an untiled one), DEFAULT_BATCH without a frame.
    """
    spec = _check_request(target, precision, compute_capabilities, version_compatible)
    if batch is not None:
        check_batch(batch)
    bundle = _open_bundle(bundle_dir)
    batch3, frame_record = _profile_batch(bundle, batch, frame_hw)
    onnx_path, onnx_sha = _onnx_for(bundle, precision)
    gpu, explicit = None, False
    if spec.builds_without_gpu:
        trt = import_builder(target)
        capabilities, explicit = target_capabilities(trt, spec, compute_capabilities)
    else:
        _, capability, gpu = require_cuda_device(device)
        trt = import_builder(target)
        capabilities = [capability]
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
    built = build_plan(trt, options)
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
        strongly_typed=network_flags(trt, precision, target)[1],
        tf32=allow_tf32,
        workspace_mb=workspace_mb,
        layers=facts.layers,
        half_layers=len(facts.half_layers),
        int8_layers=len(facts.int8_layers),
        fp32_policy_layers=len(facts.fp32_policy_layers),
        plugins=facts.plugins,
        built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **frame_record,
    )
    update_metadata(bundle.path / "metadata.json", name, entry)
    return path
