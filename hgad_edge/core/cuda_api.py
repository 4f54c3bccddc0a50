"""CUDA from Python for the TensorRT backend: cuda-python by default, pycuda where only it exists.

Both adapters expose the same few calls (device count and capability, device/pinned memory, one
stream, async copies), so the runner has one buffer plan whichever library is installed:
pinned host + device buffer per tensor, sized for max_batch, one stream. cuda-python (NVIDIA's
`cuda-bindings`, binary wheels) imports without a GPU and reports "no device" cleanly; pycuda is
source-only on PyPI and builds only where the CUDA toolkit is, so it is the fallback.

Pinned host memory outlives `free()` while numpy views of it exist: the runtime hands out result
arrays that view these buffers, and freeing the memory under them (at `destroy`) would turn a late
read into a crash. The memory is released when its last view is garbage-collected (cuda-python:
a finaliser object hanging off the buffer; pycuda: its HostAllocation does the same).
Device memory is freed at once: no view of it ever leaves the runner.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

import numpy as np

from hgad_edge.core.errors import BackendUnavailableError

__all__ = ["CudaError", "CudaPython", "HostDeviceMem", "PyCuda", "cuda_call", "import_cuda", "import_cudart"]

log = logging.getLogger("hgad_edge.runtime")

CUDA_HINT = (
    "pip install cuda-python (NVIDIA's CUDA bindings; pycuda also works where it is installed) "
    "or use backend='onnxruntime'"
)


class CudaError(RuntimeError):
    """A CUDA call returned an error code."""


def import_cudart() -> Any:
    """cuda-python's runtime module: `cuda.bindings.runtime` (12.6+/13) or the older `cuda.cudart`."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError as err:
            raise BackendUnavailableError(f"cuda-python is not installed ({err}); {CUDA_HINT}") from err
    return cudart


def _error_name(cudart: Any, err: Any) -> str:
    try:
        _, name = cudart.cudaGetErrorName(err)
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # noqa: BLE001 - the name is informative only
        return str(err)


def cuda_call(result: Any, cudart: Any = None, what: str = "CUDA call") -> Any:
    """Unpack cuda-python's `(err, *values)` tuple: raise CudaError on error, return the value(s)."""
    err, values = result[0], tuple(result[1:])
    if int(err) != 0:
        raise CudaError(f"{what} failed: {_error_name(cudart, err) if cudart else err}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


class _PinnedOwner:
    """Frees one cudaMallocHost block when the last numpy view of it is gone."""

    def __init__(self, cudart: Any, ptr: int) -> None:
        self.cudart, self.ptr = cudart, ptr

    def __del__(self) -> None:
        try:
            self.cudart.cudaFreeHost(self.ptr)
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to report to
            pass


class CudaPython:
    """cuda-python's runtime API (`cuda.bindings.runtime`); calls return (err, value) tuples."""

    name = "cuda-python"

    def __init__(self, cudart: Any) -> None:
        self.cudart = cudart

    def _call(self, result: Any, what: str) -> Any:
        return cuda_call(result, self.cudart, what)

    def device_count(self) -> tuple[int, str]:
        """(number of CUDA devices, reason when 0). No driver or no GPU both count as 0, never raise."""
        result = self.cudart.cudaGetDeviceCount()
        if int(result[0]) != 0:
            return 0, _error_name(self.cudart, result[0])
        count = int(result[1])
        return count, "" if count else "cudaGetDeviceCount reports 0 devices"

    def set_device(self, device: int) -> None:
        self._call(self.cudart.cudaSetDevice(device), "cudaSetDevice")

    def compute_capability(self, device: int) -> str:
        attr = self.cudart.cudaDeviceAttr
        major = self._call(
            self.cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute"
        )
        minor = self._call(
            self.cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute"
        )
        return f"{int(major)}.{int(minor)}"

    def device_name(self, device: int) -> str:
        try:
            name = self._call(self.cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties").name
            return (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).rstrip("\x00")
        except Exception:  # noqa: BLE001 - the name is informative only
            return "unknown GPU"

    def malloc(self, nbytes: int) -> int:
        return int(self._call(self.cudart.cudaMalloc(nbytes), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        self.cudart.cudaFree(ptr)

    def host_array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """Pinned host array; its memory is freed when the array and all its views are gone."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        ptr = int(self._call(self.cudart.cudaMallocHost(nbytes), "cudaMallocHost"))
        raw = (ctypes.c_uint8 * nbytes).from_address(ptr)
        raw.owner = _PinnedOwner(self.cudart, ptr)  # numpy's base chain keeps it alive
        return np.frombuffer(raw, dtype=dtype).reshape(shape)

    def stream_create(self) -> Any:
        return self._call(self.cudart.cudaStreamCreate(), "cudaStreamCreate")

    def stream_handle(self, stream: Any) -> int:
        return int(stream)

    def copy_htod_async(self, device: int, host: np.ndarray, stream: Any) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(
            self.cudart.cudaMemcpyAsync(device, host.ctypes.data, host.nbytes, kind, stream), "cudaMemcpyAsync H2D"
        )

    def copy_dtoh_async(self, host: np.ndarray, device: int, stream: Any) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(
            self.cudart.cudaMemcpyAsync(host.ctypes.data, device, host.nbytes, kind, stream), "cudaMemcpyAsync D2H"
        )

    def synchronize(self, stream: Any) -> None:
        self._call(self.cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def stream_destroy(self, stream: Any) -> None:
        result = self.cudart.cudaStreamDestroy(stream)
        if int(result[0]) != 0:
            log.warning("cudaStreamDestroy failed: %s", _error_name(self.cudart, result[0]))

    def release(self) -> None:
        """Nothing to undo: the runtime API's primary context belongs to the process."""


class PyCuda:
    """pycuda's driver API, on the device's primary context (the one TensorRT's runtime API uses)."""

    name = "pycuda"

    def __init__(self, driver: Any) -> None:
        self.drv = driver
        self.context = None
        self.allocations: dict[int, Any] = {}

    def _guard(self, fn: Any, what: str) -> Any:
        try:
            return fn()
        except self.drv.Error as err:
            raise CudaError(f"{what} failed: {err}") from err

    def device_count(self) -> tuple[int, str]:
        try:
            self.drv.init()
            count = int(self.drv.Device.count())
        except self.drv.Error as err:
            return 0, str(err)
        return count, "" if count else "cuDeviceGetCount reports 0 devices"

    def set_device(self, device: int) -> None:
        if self.context is None:
            self.context = self._guard(
                lambda: self.drv.Device(device).retain_primary_context(), "retain_primary_context"
            )
            self.context.push()

    def compute_capability(self, device: int) -> str:
        major, minor = self._guard(lambda: self.drv.Device(device).compute_capability(), "compute_capability")
        return f"{int(major)}.{int(minor)}"

    def device_name(self, device: int) -> str:
        try:
            return str(self.drv.Device(device).name())
        except Exception:  # noqa: BLE001
            return "unknown GPU"

    def malloc(self, nbytes: int) -> int:
        allocation = self._guard(lambda: self.drv.mem_alloc(nbytes), "mem_alloc")
        self.allocations[int(allocation)] = allocation
        return int(allocation)

    def free(self, ptr: int) -> None:
        allocation = self.allocations.pop(ptr, None)
        if allocation is not None:
            allocation.free()

    def host_array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return self._guard(lambda: self.drv.pagelocked_empty(shape, dtype), "pagelocked_empty")

    def stream_create(self) -> Any:
        return self._guard(self.drv.Stream, "Stream")

    def stream_handle(self, stream: Any) -> int:
        return int(stream.handle)

    def copy_htod_async(self, device: int, host: np.ndarray, stream: Any) -> None:
        self._guard(lambda: self.drv.memcpy_htod_async(device, host, stream), "memcpy_htod_async")

    def copy_dtoh_async(self, host: np.ndarray, device: int, stream: Any) -> None:
        self._guard(lambda: self.drv.memcpy_dtoh_async(host, device, stream), "memcpy_dtoh_async")

    def synchronize(self, stream: Any) -> None:
        self._guard(stream.synchronize, "Stream.synchronize")

    def stream_destroy(self, stream: Any) -> None:
        """pycuda destroys a stream with its Python object."""

    def release(self) -> None:
        if self.context is not None:
            self.context.pop()
            self.context = None


def import_pycuda() -> Any:
    import pycuda.driver as driver

    return driver


def import_cuda() -> Any:
    """The CUDA adapter: cuda-python when installed, else pycuda; BackendUnavailableError naming both."""
    try:
        return CudaPython(import_cudart())
    except BackendUnavailableError as first:
        try:
            return PyCuda(import_pycuda())
        except ImportError:
            raise first from None


class HostDeviceMem:
    """Pinned host array paired with a device buffer of the same size (one per engine tensor)."""

    def __init__(self, cuda: Any, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.cuda = cuda
        self.host = cuda.host_array(tuple(shape), np.dtype(dtype))
        self.nbytes = int(self.host.nbytes)
        try:
            self.device = cuda.malloc(self.nbytes)
        except CudaError:
            self.host = None
            raise

    def free(self) -> None:
        """Free the device buffer now; the pinned host memory goes with its last view (module doc)."""
        if self.device:
            self.cuda.free(self.device)
            self.device = 0
        self.host = None
