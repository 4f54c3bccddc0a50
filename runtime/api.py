"""C-style API of the edge runtime: integer handles, `Status` return codes, no exceptions.

It mirrors the C ABI a C++ host would get (create / infer / destroy / last_error), so Python and
C++ integrations share one contract and one set of error codes. Typical use::

    status, handle = create("bundle/")
    status, result = infer(handle, frame_rgb, "auto")
    if status != Status.OK:
        print(last_error(handle))
    destroy(handle)

Threads: one handle serves one call at a time (calls on the same handle from several threads
are serialised by the handle's lock), and every `Result` is owned by its caller. The input and
output buffers are planned in `create` for `max_batch` and reused by each call, so `infer` copies
the outputs into fresh arrays *before* it releases the lock: no later call, from this thread or
another, and no `destroy` can change a Result already returned (copying a map costs microseconds,
inference milliseconds). Separate handles run in parallel.

The graph returns anomaly_map, score and class_pred; PASS/FAIL happens here on the host with the
bundle's per-class thresholds and scales (hgad_edge.core.thresholds), or with the per-class
`thresholds={name: value}` given to `create`, which override the bundle without touching it.
`create`'s keyword arguments make one `RuntimeOptions` (hgad_edge.runtime.options); a caller that
holds one already (the CLI, `Detector.from_options`) passes it to `create_with_options`.
score_normalized and anomalous are computed into fresh arrays per call, so they too are the caller's.

A bundle with `tiling` (hgad_edge.runtime.tiles) scores each frame as tiles: one call takes frames of
one size (any number: the tiles go through the runner in as few max_batch-sized calls as needed), and
the Result holds one stitched map per frame at the frame's resolution, the frame score (max of its
tiles), the frame class (majority of its tiles) and PASS/FAIL decided on the frame score.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from hgad_edge.core import thresholds as decision
from hgad_edge.core.bundle import Bundle, load_bundle
from hgad_edge.core.errors import HgadRuntimeError, InvalidArgumentError, Status
from hgad_edge.runtime.backends import create_runner, is_server_url, open_server
from hgad_edge.runtime.backends.base import Runner
from hgad_edge.runtime.options import RuntimeOptions
from hgad_edge.runtime.preprocess import BatchPacker, as_frame_list, resolve_class_ids
from hgad_edge.runtime.tiles import TiledRunner

__all__ = [
    "Result",
    "Status",
    "create",
    "create_with_options",
    "destroy",
    "infer",
    "info",
    "last_error",
    "set_thresholds",
]

log = logging.getLogger("hgad_edge.runtime")


@dataclass
class Result:
    """Outputs of one batch; the (B, ...) arrays belong to the caller (see module doc)."""

    anomaly_map: np.ndarray  # (B, H, W) float32, in the model's input resolution (tiled bundles: the frames')
    score: np.ndarray  # (B,) float32 image score (tiled bundles: the max of the frame's tile scores)
    score_normalized: np.ndarray  # (B,) float32, 0.5 at the class's threshold
    anomalous: np.ndarray  # (B,) bool: score_normalized >= the bundle's normalized_threshold
    class_pred: np.ndarray  # (B,) int64 class used for scoring (given or predicted)
    class_names: list[str]
    latency_ms: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.score.shape[0])

    def copy(self) -> Result:
        """An independent deep copy (results from `infer` already own their arrays)."""
        arrays = {
            k: getattr(self, k).copy() for k in ("anomaly_map", "score", "score_normalized", "anomalous", "class_pred")
        }
        return replace(self, **arrays, class_names=list(self.class_names), latency_ms=dict(self.latency_ms))


@dataclass
class _Handle:
    bundle: Bundle
    runner: Runner
    packer: BatchPacker
    thresholds: np.ndarray  # (classes,) in effect: the bundle's with the overrides; replaced whole (set_thresholds)
    scales: np.ndarray  # (classes,)
    cuts: np.ndarray  # (classes,) score at which score_normalized reaches the normalized threshold
    tiler: TiledRunner | None = None  # set for a bundle with tiling: frames are scored as tiles
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_error: str = ""
    overrides: dict[str, float] | None = None  # create()'s or set_thresholds' overrides, kept for a server's new bundle


_handles: dict[int, _Handle] = {}
_handles_lock = threading.Lock()
_next_id = itertools.count(1)
_thread_state = threading.local()


def _fail(status: Status, message: str, handle: _Handle | None = None) -> Status:
    """Remember `message` as the last error of this thread (and of the handle, if any)."""
    _thread_state.last_error = message
    if handle is not None:
        handle.last_error = message
    log.debug("%s: %s", status.name, message)
    return status


def _unexpected(err: Exception) -> str:
    return f"unexpected {type(err).__name__}: {err} (a bug in hgad-edge; please report it with this message)"


def effective_thresholds(bundle: Bundle, overrides: dict[str, float] | None) -> np.ndarray:
    """The bundle's per-class thresholds with `overrides` ({class name: threshold}, a RuntimeOptions'
    checked dict) applied."""
    values = np.array(bundle.thresholds, np.float64)
    if overrides is None:
        return values
    for name, value in overrides.items():
        if name not in bundle.classes:
            known = ", ".join(bundle.classes)
            raise InvalidArgumentError(f"threshold for unknown class {name!r}; the bundle's classes are {known}")
        finite = isinstance(value, (int, float, np.floating, np.integer)) and np.isfinite(value)
        if isinstance(value, bool) or not finite:
            raise InvalidArgumentError(f"threshold for class {name!r} must be a finite number, got {value!r}")
        values[bundle.classes.index(name)] = float(value)
    return values


def create(
    bundle: Any,
    backend: str = "auto",
    device: int = 0,
    precision: str = "auto",
    max_batch: int = 8,
    allow_engine_host_code: bool = False,
    thresholds: dict[str, float] | None = None,
) -> tuple[Status, int | None]:
    """Load a bundle on a backend ("auto", "tensorrt", "onnxruntime"), or connect to an inference
    server (bundle="grpc://host:8001[/model]", backend "triton" or "auto"); returns (status, handle).

    allow_engine_host_code=True lets TensorRT load version-compatible engines, which carry host code
    that runs in this process: pass it only for engines you built or trust.
    thresholds: optional {class name: score threshold} used instead of the bundle's for those classes.
    """
    try:
        options = RuntimeOptions(backend, device, precision, max_batch, allow_engine_host_code, thresholds)
    except HgadRuntimeError as err:
        return _fail(err.status, str(err)), None
    return create_with_options(bundle, options)


def create_with_options(bundle: Any, options: RuntimeOptions) -> tuple[Status, int | None]:
    """`create` with its options in one RuntimeOptions; returns (status, handle)."""
    try:
        if not isinstance(options, RuntimeOptions):
            raise InvalidArgumentError(f"options must be a RuntimeOptions, got {type(options).__name__}")
        if is_server_url(bundle):
            loaded, runner = open_server(bundle, options)
            try:
                effective = effective_thresholds(loaded, options.thresholds)
            except HgadRuntimeError:
                runner.deactivate()  # a bad override: nothing stays connected
                raise
        else:
            loaded = load_bundle(bundle)
            # a bad override fails before any backend loads
            effective = effective_thresholds(loaded, options.thresholds)
            runner = create_runner(loaded, options)
    except HgadRuntimeError as err:
        return _fail(err.status, str(err)), None
    except Exception as err:
        return _fail(Status.INTERNAL_ERROR, _unexpected(err)), None
    specs = runner.input_specs
    packer = BatchPacker(runner.inputs[specs[0].name], runner.inputs[specs[1].name], loaded.classes)
    scales = np.array(loaded.scales, np.float64)
    cuts = decision.decision_threshold(effective, scales, loaded.normalized_threshold)
    tiler = None if loaded.tiling is None else TiledRunner(runner, loaded.tiling)
    state = _Handle(loaded, runner, packer, effective, scales, cuts, tiler, overrides=options.thresholds)
    with _handles_lock:
        handle = next(_next_id)
        _handles[handle] = state
    log.info(
        "hgad-edge runtime: backend %s (%s), %s, max_batch %d, bundle %s%s",
        runner.name,
        runner.description,
        runner.precision,
        runner.max_batch,
        loaded.path,
        "" if loaded.tiling is None else f", tiles of {loaded.tiling.tile} px",
    )
    return Status.OK, handle


def _lookup(handle: Any) -> _Handle | None:
    with _handles_lock:
        return _handles.get(handle) if isinstance(handle, int) else None


def _invalid_handle(handle: Any) -> Status:
    return _fail(
        Status.INVALID_HANDLE, f"handle {handle!r} is not valid (destroyed or never created); get one from create()"
    )


def infer(handle: int, frames: Any, class_id: Any = "auto") -> tuple[Status, Result | None]:
    """Score one HxWx3 uint8 RGB frame (any size) or a batch; class_id: int, name, "auto" or a list."""
    state = _lookup(handle)
    if state is None:
        return _invalid_handle(handle), None
    with state.lock:
        if _lookup(handle) is None:  # destroyed while we waited
            return _invalid_handle(handle), None
        try:
            return Status.OK, _infer_locked(state, frames, class_id)
        except HgadRuntimeError as err:
            return _fail(err.status, str(err), state), None
        except Exception as err:
            return _fail(Status.INFERENCE_FAILED, _unexpected(err), state), None


def _infer_locked(state: _Handle, frames: Any, class_id: Any) -> Result:
    """Pack, run, and copy the outputs out of the reused buffers while the caller holds the lock."""
    start = time.perf_counter()
    if state.tiler is not None:
        return _infer_tiled(state, frames, class_id, start)
    batch = state.packer.pack(frames, class_id)
    packed = time.perf_counter()
    out = {name: np.array(value, copy=True) for name, value in state.runner.infer(batch).items()}
    ran = time.perf_counter()
    latency = {"preprocess": (packed - start) * 1e3, "model": (ran - packed) * 1e3}
    return _decide(state, out["anomaly_map"], out["score"], out["class_pred"], latency, start)


def _infer_tiled(state: _Handle, frames: Any, class_id: Any, start: float) -> Result:
    """Tiles of every frame through the runner, stitched per frame (hgad_edge.runtime.tiles)."""
    frame_list = as_frame_list(frames)
    ids = resolve_class_ids(class_id, len(frame_list), state.bundle.classes)
    out = state.tiler.run(frame_list, ids)
    took = out.seconds
    latency = {"preprocess": took["cut"] * 1e3, "model": took["model"] * 1e3, "stitch": took["stitch"] * 1e3}
    latency["tiles"] = float(out.tiles)
    return _decide(state, out.anomaly_map, out.score, out.class_pred, latency, start)


def _decide(
    state: _Handle, amap: np.ndarray, score: np.ndarray, class_pred: np.ndarray, latency: dict, start: float
) -> Result:
    """The host-side PASS/FAIL decision on (frame) scores, the same for tiled and untiled bundles."""
    served = getattr(state.runner, "bundle", state.bundle)  # a server's runner follows its recalibrated bundle
    if served is not state.bundle:
        state.bundle, state.scales = served, np.array(served.scales, np.float64)
        state.thresholds = effective_thresholds(served, state.overrides)
        state.cuts = decision.decision_threshold(state.thresholds, state.scales, served.normalized_threshold)
    classes = state.bundle.classes
    cls = np.clip(class_pred, 0, len(classes) - 1)
    normalized = decision.normalize(score, state.thresholds[cls], state.scales[cls])
    anomalous = decision.is_anomalous(score, state.cuts[cls])
    names = [classes[c] if 0 <= c < len(classes) else "unknown" for c in class_pred.tolist()]
    latency["total"] = (time.perf_counter() - start) * 1e3
    return Result(amap, score, normalized, anomalous, class_pred, names, latency)


def set_thresholds(handle: int, thresholds: dict[str, float] | None) -> Status:
    """Decide with these {class name: threshold} overrides from the handle's next call on (None: the
    bundle's), checked like create's `thresholds`; the bundle is not changed (the live page's slider)."""
    state = _lookup(handle)
    if state is None:
        return _invalid_handle(handle)
    try:
        if thresholds is not None and not isinstance(thresholds, dict):
            kind = type(thresholds).__name__
            raise InvalidArgumentError(f"thresholds must be a dict {{class name: threshold}}, got {kind}")
        effective = effective_thresholds(state.bundle, thresholds)
    except HgadRuntimeError as err:
        return _fail(err.status, str(err), state)
    cuts = decision.decision_threshold(effective, state.scales, state.bundle.normalized_threshold)
    with state.lock:  # a call in flight finishes with the thresholds it started with
        state.thresholds, state.cuts, state.overrides = effective, cuts, thresholds
    return Status.OK


def destroy(handle: int) -> Status:
    """Release the handle's backend and buffers; the handle is invalid afterwards."""
    with _handles_lock:
        state = _handles.pop(handle, None) if isinstance(handle, int) else None
    if state is None:
        return _invalid_handle(handle)
    with state.lock:
        try:
            state.runner.deactivate()
        except Exception as err:
            return _fail(Status.INTERNAL_ERROR, f"releasing handle {handle} failed: {err}")
    return Status.OK


def last_error(handle: int | None = None) -> str:
    """Message of the last failed call on `handle`, or on this thread when handle is None."""
    if handle is not None:
        state = _lookup(handle)
        if state is not None:
            return state.last_error
    return getattr(_thread_state, "last_error", "")


def info(handle: int) -> tuple[Status, dict[str, Any] | None]:
    """What a handle runs: backend, precision, classes, input size, tiling, thresholds, bundle path, the
    model file's sha256, the calibration record and the model's lineage."""
    state = _lookup(handle)
    if state is None:
        return _invalid_handle(handle), None
    bundle, runner = state.bundle, state.runner
    return Status.OK, {
        "backend": runner.name,
        "description": runner.description,
        "precision": runner.precision,
        "max_batch": runner.max_batch,
        "classes": list(bundle.classes),
        "input_size": tuple(bundle.input_size),
        "tiling": None if bundle.tiling is None else bundle.tiling.to_dict(),
        "thresholds": state.thresholds.tolist(),
        "bundle_thresholds": list(bundle.thresholds),
        "scales": state.scales.tolist(),
        "normalized_threshold": bundle.normalized_threshold,
        "display_range": tuple(bundle.display_range),
        "bundle": getattr(runner, "url", str(bundle.path)),
        # what a decision is traced to (hgad_edge.runtime.sinks.message): the model file and the calibration
        "model_sha256": bundle.models.get(runner.precision, {}).get("sha256"),
        "calibration": bundle.calibration,
        "lineage": list(bundle.lineage),  # class changes of the model (train --from), oldest first
    }
