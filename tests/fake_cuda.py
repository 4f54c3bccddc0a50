"""Fakes shared by the TensorRT runtime and builder tests: cuda-python's runtime bindings (host
memory plays device memory, calls return (err, value) tuples like cuda.bindings.runtime) and the
parts of the tensorrt module both TensorRT fakes expose."""

from __future__ import annotations

import ctypes
import enum

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
