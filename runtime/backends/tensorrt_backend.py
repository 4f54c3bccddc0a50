"""TensorRT backend (TensorRT 10/11 tensor API, CUDA through cuda-python's runtime bindings).

Engines are tied to one TensorRT version, one GPU (compute capability) and one ONNX model, so
`choose_engine` picks from the bundle's metadata before anything is deserialised and names the
`hgad-edge build` command when nothing fits. The CUDA device is checked with cudaGetDeviceCount
*before* any TensorRT object exists: constructing one without a GPU can crash the process.
Buffers follow NVIDIA's samples: pinned host + device memory per tensor name, sized from the
optimisation profile's max shape, one stream, execute_async_v3.
`tensorrt` and `cuda-python` are imported lazily; this module imports without them.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import BackendUnavailableError, EngineError, InferenceError, InvalidArgumentError, Status
from .base import Runner, TensorSpec

__all__ = [
    "CudaError",
    "EngineFromPath",
    "HostDeviceMem",
    "TensorRTRunner",
    "choose_engine",
    "compute_capability",
    "cuda_call",
    "cuda_device_count",
    "engine_problems",
    "import_cudart",
    "import_tensorrt",
    "load_tensorrt_runner",
]

log = logging.getLogger("hgad_edge.runtime")

_TRT_HINT = "install TensorRT's Python package (JetPack ships it; on x86: pip install hgad-edge[tensorrt]) or use backend='onnxruntime'"
_CUDA_HINT = "pip install cuda-python (NVIDIA's CUDA bindings) or use backend='onnxruntime'"


# ---- engine choice (pure: unit-tested without TensorRT) ------------------------------------------
def _version_tuple(version: str, parts: int) -> tuple[int, ...]:
    numbers = []
    for piece in str(version).split(".")[:parts]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        numbers.append(int(digits) if digits else 0)
    return tuple(numbers)


def _cc(value: Any) -> str:
    """Normalise a compute capability ("8.7", "87", 8.7, (8, 7)) to "8.7"."""
    if isinstance(value, (tuple, list)):
        return f"{int(value[0])}.{int(value[1])}"
    text = str(value)
    return text if "." in text else f"{text[:-1]}.{text[-1:]}"


def engine_problems(
    entry: dict[str, Any],
    models: dict[str, Any],
    trt_version: str,
    compute_capability: Any,
    max_batch: Optional[int] = None,
) -> list[str]:
    """Why one engine (a metadata `engines` entry) cannot run here; empty when it fits."""
    problems = []
    built = str(entry.get("trt_version", "?"))
    if entry.get("version_compatible"):
        if _version_tuple(built, 1) != _version_tuple(trt_version, 1) or _version_tuple(trt_version, 3) < _version_tuple(built, 3):
            problems.append(f"built with TensorRT {built} (version-compatible), this runtime has {trt_version}")
    elif _version_tuple(built, 3) != _version_tuple(trt_version, 3):
        problems.append(f"built with TensorRT {built}, this runtime has {trt_version}")
    if _cc(entry.get("compute_capability", "?")) != _cc(compute_capability):
        problems.append(f"built for compute capability {entry.get('compute_capability')}, this GPU is {_cc(compute_capability)}")
    model_sha = (models.get(entry.get("model", entry.get("precision")), {}) or {}).get("sha256")  # int8 engines come from the fp32 ONNX
    if model_sha and entry.get("onnx_sha256") != model_sha:
        problems.append("built from another ONNX model (the bundle was re-exported since)")
    limits = entry.get("batch") or []
    if max_batch is not None and limits and int(limits[-1]) < max_batch:
        problems.append(f"built for batch <= {limits[-1]}, max_batch={max_batch} was requested (pass max_batch<={limits[-1]})")
    return problems


def choose_engine(
    metadata: dict[str, Any],
    trt_version: str,
    compute_capability: Any,
    precision: str = "auto",
    max_batch: Optional[int] = None,
    bundle: Path | str = "<bundle>",
) -> str:
    """Name of the engine file to load; raises EngineError (ENGINE_NOT_FOUND / ENGINE_STALE).

    precision "auto" prefers fp16 and then fp32 engines; int8 engines are used only when asked for. Among fitting engines of one precision
    the alphabetically first wins, so the choice is reproducible.
    """
    if precision not in ("auto", "fp16", "fp32", "int8"):
        raise InvalidArgumentError(f"precision must be 'auto', 'fp16', 'fp32' or 'int8', got {precision!r}")
    wanted = ["fp16", "fp32"] if precision == "auto" else [precision]
    models = metadata.get("models") or {}
    engines = metadata.get("engines") or {}
    build_precision = precision if precision != "auto" else ("fp16" if "fp16" in models else "fp32")
    fix = f"hgad-edge build {bundle} --precision {build_precision}" + (" --calib-dir NORMAL_IMAGES" if precision == "int8" else "")
    candidates = sorted((n for n, e in engines.items() if e.get("precision") in wanted), key=lambda n: (wanted.index(engines[n]["precision"]), n))
    if not candidates:
        msg = f"bundle {bundle} has no {'/'.join(wanted)} TensorRT engine; build one on this device: {fix}"
        raise EngineError(msg, Status.ENGINE_NOT_FOUND)
    reasons = []
    for name in candidates:
        problems = engine_problems(engines[name], models, trt_version, compute_capability, max_batch)
        if not problems:
            return name
        reasons.append(f"{name}: {'; '.join(problems)}")
    msg = f"no TensorRT engine in {bundle} fits this device ({' | '.join(reasons)}); rebuild it here: {fix}"
    raise EngineError(msg, Status.ENGINE_STALE)


# ---- CUDA (cuda-python runtime API) --------------------------------------------------------------
class CudaError(RuntimeError):
    """A CUDA runtime call returned an error code."""


def import_cudart() -> Any:
    """cuda-python's runtime module: `cuda.bindings.runtime` (12.6+/13) or the older `cuda.cudart`."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError as err:
            raise BackendUnavailableError(f"cuda-python is not installed ({err}); {_CUDA_HINT}") from err
    return cudart


def _error_name(cudart: Any, err: Any) -> str:
    try:
        _, name = cudart.cudaGetErrorName(err)
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return str(err)


def cuda_call(result: Any, cudart: Any = None, what: str = "CUDA call") -> Any:
    """Unpack cuda-python's `(err, *values)` tuple: raise CudaError on error, return the value(s)."""
    err, values = result[0], tuple(result[1:])
    if int(err) != 0:
        raise CudaError(f"{what} failed: {_error_name(cudart, err) if cudart else err}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def cuda_device_count(cudart: Any) -> tuple[int, str]:
    """(number of CUDA devices, reason when 0). No driver or no GPU both count as 0, never raise."""
    result = cudart.cudaGetDeviceCount()
    if int(result[0]) != 0:
        return 0, _error_name(cudart, result[0])
    count = int(result[1])
    return count, "" if count else "cudaGetDeviceCount reports 0 devices"


def compute_capability(cudart: Any, device: int) -> str:
    """Compute capability of `device` as "major.minor" (e.g. "8.7" for Jetson Orin)."""
    attr = cudart.cudaDeviceAttr
    major = cuda_call(cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device), cudart)
    minor = cuda_call(cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device), cudart)
    return f"{int(major)}.{int(minor)}"


def require_device(cudart: Any, device: int) -> None:
    """Raise NO_DEVICE unless CUDA device `device` exists (call before any TensorRT object)."""
    count, reason = cuda_device_count(cudart)
    if count == 0:
        msg = f"no CUDA device ({reason}); check the NVIDIA driver (nvidia-smi / tegrastats) or use backend='onnxruntime'"
        raise BackendUnavailableError(msg, Status.NO_DEVICE)
    if not 0 <= device < count:
        msg = f"CUDA device {device} does not exist (this machine has {count}); pass device=0..{count - 1}"
        raise BackendUnavailableError(msg, Status.NO_DEVICE)


class HostDeviceMem:
    """Pinned host buffer (as a numpy array) paired with a device buffer of the same size."""

    def __init__(self, cudart: Any, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.cudart = cudart
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(shape)) * self.dtype.itemsize
        self.row_bytes = self.nbytes // int(shape[0])
        self.host_ptr = int(cuda_call(cudart.cudaMallocHost(self.nbytes), cudart, "cudaMallocHost"))
        try:
            self.device = int(cuda_call(cudart.cudaMalloc(self.nbytes), cudart, "cudaMalloc"))
        except CudaError:
            cudart.cudaFreeHost(self.host_ptr)
            raise
        raw = (ctypes.c_uint8 * self.nbytes).from_address(self.host_ptr)
        self.host = np.frombuffer(raw, dtype=self.dtype).reshape(shape)

    def free(self) -> None:
        """Release both buffers; `host` must not be used afterwards."""
        if self.host_ptr:
            self.cudart.cudaFree(self.device)
            self.cudart.cudaFreeHost(self.host_ptr)
            self.host_ptr = self.device = 0


# ---- TensorRT ------------------------------------------------------------------------------------
def import_tensorrt() -> Any:
    """The full `tensorrt` package, else the lean runtime (which runs version-compatible engines)."""
    try:
        import tensorrt as trt
    except ImportError as err:
        try:
            import tensorrt_lean as trt
        except ImportError:
            raise BackendUnavailableError(f"TensorRT is not installed ({err}); {_TRT_HINT}") from err
    return trt


def _np_dtype(trt: Any, trt_dtype: Any) -> np.dtype:
    table = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_, "UINT8": np.uint8}
    for name, np_type in table.items():
        if getattr(trt.DataType, name, None) == trt_dtype:
            return np.dtype(np_type)
    raise EngineError(f"engine tensor type {trt_dtype} has no numpy equivalent; re-export and rebuild the bundle")


def _make_logger(trt: Any) -> Any:
    """A TensorRT logger that forwards to Python logging and keeps errors for our messages."""
    sev = trt.ILogger.Severity
    levels = {sev.INTERNAL_ERROR: logging.CRITICAL, sev.ERROR: logging.ERROR, sev.WARNING: logging.WARNING, sev.INFO: logging.DEBUG, sev.VERBOSE: logging.DEBUG}

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            level = levels.get(severity, logging.INFO)
            if level >= logging.ERROR:
                self.errors.append(msg)
            log.log(level, "TensorRT: %s", msg)

    return _Logger()


class EngineFromPath:
    """Loader: deserialise one engine file; returns (runtime, engine), the runtime must outlive it."""

    def __init__(self, trt: Any, path: Path, fix: str, version_compatible: bool = False) -> None:
        self.trt = trt
        self.path = Path(path)
        self.fix = fix
        self.version_compatible = version_compatible

    def __call__(self) -> tuple[Any, Any]:
        logger = _make_logger(self.trt)
        runtime = self.trt.Runtime(logger)
        if self.version_compatible and hasattr(runtime, "engine_host_code_allowed"):
            runtime.engine_host_code_allowed = True  # version-compatible plans embed the lean runtime
        engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            detail = logger.errors[-1] if logger.errors else "no details"
            msg = f"TensorRT rejected engine {self.path} ({detail}); rebuild it on this device: {self.fix}"
            raise EngineError(msg, Status.ENGINE_STALE)
        return runtime, engine


class TensorRTRunner(Runner):
    """Runs one engine with pinned host / device buffers planned for max_batch at activation."""

    name = "tensorrt"

    def __init__(
        self,
        loader: EngineFromPath,
        input_specs: list[TensorSpec],
        output_names: list[str],
        max_batch: int,
        device: int,
        cudart: Any,
    ) -> None:
        super().__init__(input_specs, output_names, max_batch)
        self.loader = loader
        self.device = device
        self.cudart = cudart
        self.trt = loader.trt
        self.runtime = self.engine = self.context = self.stream = None
        self.mems: dict[str, HostDeviceMem] = {}
        self._batch_shapes = 0
        self.description = f"tensorrt {getattr(self.trt, '__version__', '?')} engine {loader.path.name}"

    def _call(self, result: Any, what: str) -> Any:
        return cuda_call(result, self.cudart, what)

    def activate_impl(self) -> None:
        try:
            self._call(self.cudart.cudaSetDevice(self.device), "cudaSetDevice")
            self.stream = self._call(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
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
            msg = f"engine {self.loader.path.name} does not have the bundle's tensors {wrong} (has {sorted(io)}); rebuild it: {self.loader.fix}"
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
            self.mems[name] = HostDeviceMem(self.cudart, shape, _np_dtype(self.trt, self.engine.get_tensor_dtype(name)))
        self.outputs = {n: self.mems[n].host for n in self.output_names}
        for name, mem in self.mems.items():
            if not self.context.set_tensor_address(name, mem.device):
                raise InferenceError(f"TensorRT refused the device address of tensor {name}")

    def _allocate_input(self, spec: TensorSpec) -> None:
        max_shape = tuple(int(d) for d in self.engine.get_tensor_profile_shape(spec.name, 0)[2])
        if max_shape[0] < self.max_batch:
            msg = f"engine {self.loader.path.name} takes batches up to {max_shape[0]}; create with max_batch<={max_shape[0]} or rebuild: {self.loader.fix}"
            raise EngineError(msg, Status.ENGINE_STALE)
        dtype = _np_dtype(self.trt, self.engine.get_tensor_dtype(spec.name))
        if dtype != spec.dtype or tuple(max_shape[1:]) != spec.shape:
            msg = f"engine input {spec.name} is {dtype}{list(max_shape[1:])}, the bundle says {spec.dtype}{list(spec.shape)}; rebuild: {self.loader.fix}"
            raise EngineError(msg, Status.ENGINE_STALE)
        self.mems[spec.name] = HostDeviceMem(self.cudart, (self.max_batch, *spec.shape), dtype)
        self.inputs[spec.name] = self.mems[spec.name].host

    def _set_shapes(self, batch: int) -> None:
        if batch == self._batch_shapes:
            return
        for spec in self.input_specs:
            if not self.context.set_input_shape(spec.name, (batch, *spec.shape)):
                raise InferenceError(f"TensorRT rejected input shape {(batch, *spec.shape)} for {spec.name}")
        self._batch_shapes = batch

    def infer_impl(self, batch: int) -> None:
        cudart, kinds = self.cudart, self.cudart.cudaMemcpyKind
        try:
            self._set_shapes(batch)
            for spec in self.input_specs:
                mem = self.mems[spec.name]
                self._call(cudart.cudaMemcpyAsync(mem.device, mem.host_ptr, mem.row_bytes * batch, kinds.cudaMemcpyHostToDevice, self.stream), "cudaMemcpyAsync H2D")
            if not self.context.execute_async_v3(int(self.stream)):
                raise InferenceError(f"TensorRT execute_async_v3 failed on a batch of {batch}; see the TensorRT log above")
            for name in self.output_names:
                mem = self.mems[name]
                self._call(cudart.cudaMemcpyAsync(mem.host_ptr, mem.device, mem.row_bytes * batch, kinds.cudaMemcpyDeviceToHost, self.stream), "cudaMemcpyAsync D2H")
            self._call(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        except CudaError as err:
            raise InferenceError(f"TensorRT inference failed: {err}") from err

    def deactivate_impl(self) -> None:
        """Free in reverse order of creation; errors here are logged, never raised over the real one."""
        if self.stream is not None:
            self.cudart.cudaStreamSynchronize(self.stream)
        self.context = self.engine = self.runtime = None
        for mem in self.mems.values():
            mem.free()
        self.mems.clear()
        self.inputs, self.outputs = {}, {}
        if self.stream is not None:
            result = self.cudart.cudaStreamDestroy(self.stream)
            if int(result[0]) != 0:
                log.warning("cudaStreamDestroy failed: %s", _error_name(self.cudart, result[0]))
            self.stream = None
        self._batch_shapes = 0


def load_tensorrt_runner(
    bundle: Any,
    input_specs: list[TensorSpec],
    output_names: list[str],
    device: int = 0,
    precision: str = "auto",
    max_batch: int = 8,
    trt: Any = None,
    cudart: Any = None,
) -> TensorRTRunner:
    """Check libraries, device and engine choice, then return an (inactive) runner."""
    trt = trt if trt is not None else import_tensorrt()
    cudart = cudart if cudart is not None else import_cudart()
    require_device(cudart, device)
    capability = compute_capability(cudart, device)
    name = choose_engine(bundle.metadata, trt.__version__, capability, precision, max_batch, bundle.path)
    entry = bundle.metadata["engines"][name]
    fix = f"hgad-edge build {bundle.path} --precision {entry['precision']}"
    path = bundle.engine_path(name)  # a bare name under engines/, no link out of the bundle
    if not path.is_file():
        raise EngineError(f"engine {path} is listed in metadata.json but missing; rebuild it: {fix}", Status.ENGINE_NOT_FOUND)
    loader = EngineFromPath(trt, path, fix, bool(entry.get("version_compatible")))
    runner = TensorRTRunner(loader, input_specs, output_names, max_batch, device, cudart)
    runner.precision = entry["precision"]
    return runner
