"""Status codes and the exceptions behind them.

The C-style API (`api.py`) returns a `Status` instead of raising, so that it maps 1:1 onto a C
ABI later; internally the runtime raises the `HgadRuntimeError` subclasses below and `api.py`
turns them into codes. `Detector` raises them again for Python callers. Every message says what
went wrong *and* what to run or change to fix it.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "BackendUnavailableError",
    "BundleError",
    "EngineError",
    "HgadRuntimeError",
    "InferenceError",
    "InvalidArgumentError",
    "InvalidHandleError",
    "Status",
    "error_for",
]


class Status(IntEnum):
    """Result code of every `api` call. Values are part of the ABI: never renumber, only append."""

    OK = 0
    INVALID_ARGUMENT = 1
    BUNDLE_NOT_FOUND = 2
    BUNDLE_INCOMPATIBLE = 3
    BACKEND_UNAVAILABLE = 4
    NO_DEVICE = 5
    ENGINE_STALE = 6
    INFERENCE_FAILED = 7
    INVALID_HANDLE = 8
    ENGINE_NOT_FOUND = 9
    INTERNAL_ERROR = 10


class HgadRuntimeError(RuntimeError):
    """Base of all runtime errors; `.status` is the code the C-style API returns for it."""

    status = Status.INTERNAL_ERROR

    def __init__(self, message: str, status: Status | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = Status(status)


class InvalidArgumentError(HgadRuntimeError, ValueError):
    """The caller passed something unusable (frame dtype, class name, batch size...)."""

    status = Status.INVALID_ARGUMENT


class BundleError(HgadRuntimeError):
    """The bundle folder is missing, broken, or written by an incompatible exporter."""

    status = Status.BUNDLE_NOT_FOUND


class BackendUnavailableError(HgadRuntimeError):
    """The requested backend cannot run here (library not installed, or no CUDA device)."""

    status = Status.BACKEND_UNAVAILABLE


class EngineError(HgadRuntimeError):
    """No TensorRT engine in the bundle fits this TensorRT version / GPU / model."""

    status = Status.ENGINE_STALE


class InferenceError(HgadRuntimeError):
    """The backend failed while running a batch."""

    status = Status.INFERENCE_FAILED


class InvalidHandleError(HgadRuntimeError):
    """The handle was never created or has been destroyed."""

    status = Status.INVALID_HANDLE


_CLASS_OF = {
    Status.INVALID_ARGUMENT: InvalidArgumentError,
    Status.BUNDLE_NOT_FOUND: BundleError,
    Status.BUNDLE_INCOMPATIBLE: BundleError,
    Status.BACKEND_UNAVAILABLE: BackendUnavailableError,
    Status.NO_DEVICE: BackendUnavailableError,
    Status.ENGINE_STALE: EngineError,
    Status.ENGINE_NOT_FOUND: EngineError,
    Status.INFERENCE_FAILED: InferenceError,
    Status.INVALID_HANDLE: InvalidHandleError,
}


def error_for(status: Status, message: str) -> HgadRuntimeError:
    """The exception a Python caller should see for a non-OK status (used by `Detector`)."""
    cls = _CLASS_OF.get(Status(status), HgadRuntimeError)
    return cls(message, status)
