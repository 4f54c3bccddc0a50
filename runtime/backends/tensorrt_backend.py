"""TensorRT backend: TensorRT 10/11 and TensorRT-RTX engines through one tensor API.

Engines are tied to one TensorRT version, to their GPUs (one compute capability for TensorRT, a
list for TensorRT-RTX) and to one ONNX model, so `choose_engine` picks from the bundle's metadata
before anything is deserialised and names the `hgad-edge build` command when nothing fits (whether
one record fits is `engine_problems`, hgad_edge/core/engine_records.py, shared with the builder). The
CUDA device is checked *before* any TensorRT object exists: constructing one without a GPU can
crash the process. Buffers follow NVIDIA's samples: pinned host + device memory per tensor name,
sized from the optimisation profile's max shape, one stream, execute_async_v3 (cuda-python, or
pycuda where only it is installed: `cuda_api.py`).

Trust: an engine file is opened only under a bare name inside the bundle's engines/ folder
(`Bundle.engine_path`) and only if its bytes match the sha256 recorded at build time.
Version-compatible engines embed host code that runs in this process, so they load only when the
caller passes allow_engine_host_code=True, never because metadata says so.
The TensorRT modules and the CUDA library are imported lazily; this module imports without them.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from hgad_edge.core.cuda_api import CudaError, HostDeviceMem, import_cuda
from hgad_edge.core.engine_records import engine_problems
from hgad_edge.core.errors import BackendUnavailableError, EngineError, InferenceError, InvalidArgumentError, Status
from hgad_edge.core.trt_common import TARGETS, entry_target, import_target, make_logger
from hgad_edge.runtime.backends.base import Runner, TensorSpec

__all__ = [
    "EngineFromPath",
    "TensorRTRunner",
    "build_fix",
    "choose_engine",
    "import_runtime",
    "load_tensorrt_runner",
    "require_device",
]

log = logging.getLogger("hgad_edge.runtime")

# Log lines of a deserialisation that failed for want of a GPU or driver (cudaError 35 / 100).
_NO_GPU = re.compile(r"cudaError (35|100)|no CUDA-capable device|driver version is insufficient|cuInit", re.IGNORECASE)


# ---- engine choice (pure: unit-tested without TensorRT) ------------------------------------------
def build_fix(bundle: Any, precision: str, target: str = "tensorrt") -> str:
    """The command that builds the missing engine."""
    first = f"hgad-edge quantize {bundle} (if not yet), then " if precision == "int8" else ""
    where = "" if target == "tensorrt" else f" --target {target}"
    return f"{first}hgad-edge build {bundle} --precision {precision}{where}"


def choose_engine(
    metadata: dict[str, Any],
    trt_version: str,
    compute_capability: Any,
    precision: str = "auto",
    max_batch: int | None = None,
    bundle: Path | str = "<bundle>",
    target: str = "tensorrt",
    allow_host_code: bool = True,
) -> str:
    """Name of the `target` engine file to load; raises EngineError (ENGINE_NOT_FOUND / ENGINE_STALE).

    precision "auto" prefers fp16 and then fp32 engines; int8 engines are used only when asked for.
    Among fitting engines of one precision the alphabetically first wins, so the choice is reproducible.
    """
    if precision not in ("auto", "fp16", "fp32", "int8"):
        raise InvalidArgumentError(f"precision must be 'auto', 'fp16', 'fp32' or 'int8', got {precision!r}")
    wanted = ["fp16", "fp32"] if precision == "auto" else [precision]
    models = metadata.get("models") or {}
    engines = {
        n: e for n, e in (metadata.get("engines") or {}).items() if isinstance(e, dict) and entry_target(e) == target
    }
    build_precision = precision if precision != "auto" else ("fp16" if "fp16" in models else "fp32")
    fix = build_fix(bundle, build_precision, target)
    candidates = sorted(
        (n for n, e in engines.items() if e.get("precision") in wanted),
        key=lambda n: (wanted.index(engines[n]["precision"]), n),
    )
    label = TARGETS.get(target, TARGETS["tensorrt"]).label
    if not candidates:
        msg = f"bundle {bundle} has no {'/'.join(wanted)} {label} engine; build one: {fix}"
        raise EngineError(msg, Status.ENGINE_NOT_FOUND)
    reasons = []
    for name in candidates:
        problems = engine_problems(engines[name], models, trt_version, compute_capability, max_batch, allow_host_code)
        if not problems:
            return name
        reasons.append(f"{name}: {'; '.join(problems)}")
    msg = f"no {label} engine in {bundle} fits this device ({' | '.join(reasons)}); rebuild it here: {fix}"
    raise EngineError(msg, Status.ENGINE_STALE)


def require_device(cuda: Any, device: int) -> None:
    """Raise NO_DEVICE unless CUDA device `device` exists (call before any TensorRT object)."""
    count, reason = cuda.device_count()
    if count == 0:
        msg = (
            f"no CUDA device ({reason}); check the NVIDIA driver (nvidia-smi / tegrastats) or use backend='onnxruntime'"
        )
        raise BackendUnavailableError(msg, Status.NO_DEVICE)
    if not 0 <= device < count:
        msg = f"CUDA device {device} does not exist (this machine has {count}); pass device=0..{count - 1}"
        raise BackendUnavailableError(msg, Status.NO_DEVICE)


# ---- TensorRT ------------------------------------------------------------------------------------
def import_runtime(target: str) -> Any:
    """The module that runs `target` engines (tensorrt, else its lean runtime; tensorrt_rtx_bindings)."""
    return import_target(target)


def _np_dtype(trt: Any, trt_dtype: Any) -> np.dtype:
    table = {
        "FLOAT": np.float32,
        "HALF": np.float16,
        "INT8": np.int8,
        "INT32": np.int32,
        "INT64": np.int64,
        "BOOL": np.bool_,
        "UINT8": np.uint8,
    }
    for name, np_type in table.items():
        if getattr(trt.DataType, name, None) == trt_dtype:
            return np.dtype(np_type)
    raise EngineError(f"engine tensor type {trt_dtype} has no numpy equivalent; re-export and rebuild the bundle")


class EngineFromPath:
    """Loader: check the engine's sha256, deserialise it; returns (runtime, engine), the runtime must outlive it."""

    def __init__(
        self, trt: Any, path: Path, fix: str, sha256: str | None = None, allow_host_code: bool = False
    ) -> None:
        self.trt = trt
        self.path = Path(path)
        self.fix = fix
        self.sha256 = sha256
        self.allow_host_code = allow_host_code

    def read(self) -> bytes:
        """The engine's bytes, hashed in memory so the checked bytes are the deserialised bytes."""
        if not self.path.is_file():
            raise EngineError(
                f"engine {self.path} is listed in metadata.json but missing; rebuild it: {self.fix}",
                Status.ENGINE_NOT_FOUND,
            )
        data = self.path.read_bytes()
        if not self.sha256:
            raise EngineError(
                f"metadata.json records no sha256 for engine {self.path.name}, so it cannot be verified; "
                f"rebuild it: {self.fix}",
                Status.ENGINE_STALE,
            )
        if hashlib.sha256(data).hexdigest() != self.sha256:
            msg = (
                f"engine {self.path} does not match the sha256 recorded when it was built (changed or damaged since); "
                f"rebuild it: {self.fix}"
            )
            raise EngineError(msg, Status.ENGINE_STALE)
        return data

    def __call__(self) -> tuple[Any, Any]:
        data = self.read()
        logger = make_logger(self.trt)
        mark = logger.count
        runtime = self.trt.Runtime(logger)
        if self.allow_host_code and hasattr(runtime, "engine_host_code_allowed"):
            runtime.engine_host_code_allowed = True  # version-compatible plans embed the lean runtime
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            errors = logger.errors_since(mark)
            detail = errors[-1] if errors else "no details"
            if any(_NO_GPU.search(e) for e in errors):
                msg = (
                    f"TensorRT found no usable CUDA GPU/driver to load engine {self.path.name} ({detail}); "
                    "run it on the target GPU or use backend='onnxruntime'"
                )
                raise BackendUnavailableError(msg, Status.NO_DEVICE)
            msg = f"TensorRT rejected engine {self.path} ({detail}); rebuild it on this device: {self.fix}"
            raise EngineError(msg, Status.ENGINE_STALE)
        return runtime, engine


class TensorRTRunner(Runner):
    """Runs one engine with pinned host / device buffers planned for max_batch at activation.

    Result arrays view the pinned output buffers; after `deactivate` they stay readable (the
    memory goes with the last view, see cuda_api.py) but are no longer updated.
    """

    name = "tensorrt"

    def __init__(
        self,
        loader: EngineFromPath,
        input_specs: list[TensorSpec],
        output_names: list[str],
        max_batch: int,
        device: int,
        cuda: Any,
        label: str = "tensorrt",
    ) -> None:
        super().__init__(input_specs, output_names, max_batch)
        self.loader = loader
        self.device = device
        self.cuda = cuda
        self.trt = loader.trt
        self.runtime = self.engine = self.context = self.stream = None
        self.mems: dict[str, HostDeviceMem] = {}
        self._batch_shapes = 0
        self.description = f"{label} {getattr(self.trt, '__version__', '?')} engine {loader.path.name} ({cuda.name})"

    def activate_impl(self) -> None:
        try:
            self.cuda.set_device(self.device)
            self.stream = self.cuda.stream_create()
            self.runtime, self.engine = self.loader()
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise InferenceError("TensorRT could not create an execution context (out of GPU memory?)")
            self._allocate()
        except BaseException:
            self.deactivate_impl()
            raise

    def _io_tensors(self) -> dict[str, bool]:
        """Engine tensor name -> is_input, by name (never by binding index)."""
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        return {n: self.engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT for n in names}

    def _check_io(self, io: dict[str, bool]) -> None:
        wanted = {s.name: True for s in self.input_specs} | {n: False for n in self.output_names}
        wrong = [n for n, is_input in wanted.items() if io.get(n) is not is_input]
        if wrong:
            msg = (
                f"engine {self.loader.path.name} does not have the bundle's tensors {wrong} (has {sorted(io)}); "
                f"rebuild it: {self.loader.fix}"
            )
            raise EngineError(msg, Status.ENGINE_STALE)

    def _allocate(self) -> None:
        io = self._io_tensors()
        self._check_io(io)
        for spec in self.input_specs:
            self._allocate_input(spec)
        self._set_shapes(self.max_batch)
        for name in (n for n, is_input in io.items() if not is_input):
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EngineError(f"output {name} has unresolved shape {shape}; rebuild the engine: {self.loader.fix}")
            self.mems[name] = HostDeviceMem(self.cuda, shape, _np_dtype(self.trt, self.engine.get_tensor_dtype(name)))
        self.outputs = {n: self.mems[n].host for n in self.output_names}
        for name, mem in self.mems.items():
            if not self.context.set_tensor_address(name, mem.device):
                raise InferenceError(f"TensorRT refused the device address of tensor {name}")

    def _allocate_input(self, spec: TensorSpec) -> None:
        max_shape = tuple(int(d) for d in self.engine.get_tensor_profile_shape(spec.name, 0)[2])
        if max_shape[0] < self.max_batch:
            msg = (
                f"engine {self.loader.path.name} takes batches up to {max_shape[0]}; "
                f"create with max_batch<={max_shape[0]} or rebuild: {self.loader.fix}"
            )
            raise EngineError(msg, Status.ENGINE_STALE)
        dtype = _np_dtype(self.trt, self.engine.get_tensor_dtype(spec.name))
        if dtype != spec.dtype or tuple(max_shape[1:]) != spec.shape:
            msg = (
                f"engine input {spec.name} is {dtype}{list(max_shape[1:])}, "
                f"the bundle says {spec.dtype}{list(spec.shape)}; rebuild: {self.loader.fix}"
            )
            raise EngineError(msg, Status.ENGINE_STALE)
        self.mems[spec.name] = HostDeviceMem(self.cuda, (self.max_batch, *spec.shape), dtype)
        self.inputs[spec.name] = self.mems[spec.name].host

    def _set_shapes(self, batch: int) -> None:
        if batch == self._batch_shapes:
            return
        for spec in self.input_specs:
            if not self.context.set_input_shape(spec.name, (batch, *spec.shape)):
                raise InferenceError(f"TensorRT rejected input shape {(batch, *spec.shape)} for {spec.name}")
        self._batch_shapes = batch

    def infer_impl(self, batch: int) -> None:
        cuda = self.cuda
        try:
            self._set_shapes(batch)
            for spec in self.input_specs:
                cuda.copy_htod_async(self.mems[spec.name].device, self.inputs[spec.name][:batch], self.stream)
            if not self.context.execute_async_v3(cuda.stream_handle(self.stream)):
                raise InferenceError(
                    f"TensorRT execute_async_v3 failed on a batch of {batch}; see the TensorRT log above"
                )
            for name in self.output_names:
                cuda.copy_dtoh_async(self.outputs[name][:batch], self.mems[name].device, self.stream)
            cuda.synchronize(self.stream)
        except CudaError as err:
            raise InferenceError(f"TensorRT inference failed: {err}") from err

    def deactivate_impl(self) -> None:
        """Free in reverse order of creation; errors here are logged, never raised over the real one."""
        if self.stream is not None:
            try:
                self.cuda.synchronize(self.stream)
            except CudaError as err:
                log.warning("stream synchronize at release failed: %s", err)
        self.context = self.engine = self.runtime = None
        for mem in self.mems.values():
            mem.free()
        self.mems.clear()
        self.inputs, self.outputs = {}, {}
        if self.stream is not None:
            self.cuda.stream_destroy(self.stream)
            self.stream = None
        self.cuda.release()
        self._batch_shapes = 0


def _bundle_targets(metadata: dict[str, Any]) -> list[str]:
    """Targets with an engine in the bundle, in registry order; every target when there is none."""
    present = {entry_target(e) for e in (metadata.get("engines") or {}).values() if isinstance(e, dict)}
    return [t for t in TARGETS if t in present] or list(TARGETS)


def load_tensorrt_runner(
    bundle: Any,
    input_specs: list[TensorSpec],
    output_names: list[str],
    device: int = 0,
    precision: str = "auto",
    max_batch: int = 8,
    allow_engine_host_code: bool = False,
    cuda: Any = None,
) -> TensorRTRunner:
    """Check the CUDA device, the TensorRT libraries and the engine choice; return an (inactive) runner.

    Engines of every target the bundle has (TensorRT, TensorRT-RTX) are considered, in registry
    order, each with its own runtime module; the first that fits this GPU wins.
    """
    cuda = cuda if cuda is not None else import_cuda()
    require_device(cuda, device)
    capability = cuda.compute_capability(device)
    runtimes, missing = {}, []
    for target in _bundle_targets(bundle.metadata):
        try:
            runtimes[target] = import_runtime(target)
        except BackendUnavailableError as err:
            missing.append(str(err))
    if not runtimes:
        raise BackendUnavailableError("; ".join(missing) + "; or use backend='onnxruntime'")
    errors: list[EngineError] = []
    # A tiled bundle's frames are cut into tiles that the runtime sends in chunks of the runner's batch:
    # any engine fits, and the runner takes at most what the engine's profile does (build --frame).
    tiled = getattr(bundle, "tiling", None) is not None
    for target, trt in runtimes.items():
        try:
            name = choose_engine(
                bundle.metadata,
                trt.__version__,
                capability,
                precision,
                None if tiled else max_batch,
                bundle.path,
                target,
                allow_engine_host_code,
            )
        except EngineError as err:
            errors.append(err)
            continue
        entry = bundle.metadata["engines"][name]
        path = bundle.engine_path(name)  # a bare name under engines/, no link out of the bundle (bundle.py)
        loader = EngineFromPath(
            trt,
            path,
            build_fix(bundle.path, entry["precision"], target),
            entry.get("sha256"),
            allow_engine_host_code and bool(entry.get("version_compatible")),
        )
        loader.read()  # missing file or wrong sha256: refuse before any TensorRT object exists
        limits = entry.get("batch") or []
        batch = min(max_batch, int(limits[-1])) if tiled and limits else max_batch
        runner = TensorRTRunner(loader, input_specs, output_names, batch, device, cuda, TARGETS[target].label)
        runner.precision = entry["precision"]
        return runner
    status = Status.ENGINE_STALE if any(e.status == Status.ENGINE_STALE for e in errors) else Status.ENGINE_NOT_FOUND
    raise EngineError(" | ".join(str(e) for e in errors + [BackendUnavailableError(m) for m in missing]), status)
