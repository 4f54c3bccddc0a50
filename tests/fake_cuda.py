"""Fakes shared by the TensorRT runtime and builder tests: cuda-python's runtime bindings (host
memory plays device memory, calls return (err, value) tuples like cuda.bindings.runtime) and the
parts of the tensorrt module both TensorRT fakes expose."""

from __future__ import annotations

import ctypes
import enum
import weakref

import numpy as np


class FakeTrtModule:
    """The tensorrt module's enums and logger base, identical for the builder and runtime fakes."""

    DataType = enum.Enum("DataType", "FLOAT HALF INT8 INT32 INT64 BOOL UINT8")

    class ILogger:
        Severity = enum.Enum("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE")

        def __init__(self) -> None:
            pass


class FakeCudart:
    """cuda.bindings.runtime stand-in: host memory plays device memory; calls return (err, value)."""

    class cudaError_t(enum.IntEnum):
        cudaSuccess = 0
        cudaErrorNoDevice = 100

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    class cudaDeviceAttr(enum.IntEnum):
        cudaDevAttrComputeCapabilityMajor = 75
        cudaDevAttrComputeCapabilityMinor = 76

    def __init__(self, devices: int = 1, cc=(8, 7)) -> None:
        self.devices, self.cc = devices, cc
        self.blocks: dict[int, np.ndarray] = {}
        self.pinned: set[int] = set()
        self.copies: list[tuple[str, int]] = []
        self.ok = self.cudaError_t.cudaSuccess

    def cudaGetDeviceCount(self):
        return (self.ok, self.devices) if self.devices else (self.cudaError_t.cudaErrorNoDevice, 0)

    def cudaGetErrorName(self, err):
        return self.ok, err.name.encode()

    def cudaSetDevice(self, device):
        return (self.ok,)

    def cudaDeviceGetAttribute(self, attr, device):
        return self.ok, self.cc[0] if attr == self.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor else self.cc[1]

    def cudaStreamCreate(self):
        return self.ok, 7

    def cudaStreamSynchronize(self, stream):
        return (self.ok,)

    def cudaStreamDestroy(self, stream):
        return (self.ok,)

    def cudaGetDeviceProperties(self, device):
        return self.ok, type("Props", (), {"name": b"Fake Orin"})()

    def cudaMalloc(self, nbytes):
        block = np.zeros(nbytes, np.uint8)
        self.blocks[block.ctypes.data] = block
        return self.ok, block.ctypes.data

    def cudaMallocHost(self, nbytes):
        err, ptr = self.cudaMalloc(nbytes)
        self.pinned.add(ptr)
        return err, ptr

    def cudaFree(self, ptr):
        self.blocks.pop(ptr)
        self.pinned.discard(ptr)  # the address may be handed out again
        return (self.ok,)

    cudaFreeHost = cudaFree

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        assert isinstance(dst, int) and isinstance(src, int) and stream == 7
        ctypes.memmove(dst, src, nbytes)
        self.copies.append((kind.name, nbytes))
        return (self.ok,)

    def cudaMemcpy(self, dst, src, nbytes, kind):
        ctypes.memmove(dst, src, nbytes)
        return (self.ok,)


class FakePyCuda:
    """pycuda.driver stand-in on the same model: host memory plays device memory, errors raise."""

    class Error(Exception):
        pass

    def __init__(self, devices: int = 1, cc=(8, 6)) -> None:
        self.devices, self.cc = devices, cc
        self.blocks: dict[int, np.ndarray] = {}
        self.pinned: set[int] = set()
        self.copies: list[tuple[str, int]] = []
        self.context_stack: list[int] = []
        driver = self

        class Device:
            def __init__(self, index: int) -> None:
                if not 0 <= index < driver.devices:
                    raise driver.Error(f"invalid device ordinal {index}")
                self.index = index

            @staticmethod
            def count() -> int:
                return driver.devices

            def compute_capability(self):
                return driver.cc

            def name(self) -> str:
                return "Fake RTX"

            def retain_primary_context(self):
                index = self.index

                class Context:
                    def push(self) -> None:
                        driver.context_stack.append(index)

                    def pop(self) -> None:
                        driver.context_stack.pop()

                return Context()

        class Allocation:
            def __init__(self, ptr: int) -> None:
                self.ptr = ptr

            def __int__(self) -> int:
                return self.ptr

            def free(self) -> None:
                driver.blocks.pop(self.ptr)

        class Stream:
            handle = 7

            def synchronize(self) -> None:
                pass

        self.Device, self.Allocation, self.Stream = Device, Allocation, Stream

    def init(self) -> None:
        if not self.devices:
            raise self.Error("cuInit failed: no CUDA-capable device is detected")

    def _require_context(self) -> None:
        if not self.context_stack:
            raise self.Error("no current context (push the primary context first)")

    def mem_alloc(self, nbytes: int):
        self._require_context()
        block = np.zeros(nbytes, np.uint8)
        self.blocks[block.ctypes.data] = block
        return self.Allocation(block.ctypes.data)

    def pagelocked_empty(self, shape, dtype):
        self._require_context()
        array = np.zeros(shape, dtype)
        self.pinned.add(array.ctypes.data)
        weakref.finalize(array, self.pinned.discard, array.ctypes.data)  # like pycuda: freed with the array
        return array

    def memcpy_htod_async(self, dest: int, src: np.ndarray, stream) -> None:
        assert isinstance(dest, int) and dest in self.blocks and src.flags.c_contiguous
        ctypes.memmove(dest, src.ctypes.data, src.nbytes)
        self.copies.append(("htod", src.nbytes))

    def memcpy_dtoh_async(self, dest: np.ndarray, src: int, stream) -> None:
        assert isinstance(src, int) and src in self.blocks and dest.flags.c_contiguous
        ctypes.memmove(dest.ctypes.data, src, dest.nbytes)
        self.copies.append(("dtoh", dest.nbytes))
