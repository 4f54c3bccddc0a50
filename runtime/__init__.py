"""Torch-free edge runtime of hgad-edge: TensorRT or ONNX Runtime behind one small API.

Installed as `hgad_edge.runtime`. Nothing here imports torch, timm or FrEIA; TensorRT and
cuda-python are imported only when the TensorRT backend is asked for.

C-style: `create`, `infer`, `destroy`, `last_error` (return `Status` codes).
Pythonic: `Detector` (raises `HgadRuntimeError` subclasses carrying the Status).
Their options, in one checked value: `RuntimeOptions` (`create_with_options`, `Detector.from_options`).
"""

from hgad_edge.core.errors import (
    BackendUnavailableError,
    BundleError,
    EngineError,
    HgadRuntimeError,
    InferenceError,
    InvalidArgumentError,
    InvalidHandleError,
    Status,
)
from hgad_edge.runtime.api import Result, create, create_with_options, destroy, infer, info, last_error
from hgad_edge.runtime.detector import Detector
from hgad_edge.runtime.options import RuntimeOptions

__all__ = [
    "BackendUnavailableError",
    "BundleError",
    "Detector",
    "EngineError",
    "HgadRuntimeError",
    "InferenceError",
    "InvalidArgumentError",
    "InvalidHandleError",
    "Result",
    "RuntimeOptions",
    "Status",
    "create",
    "create_with_options",
    "destroy",
    "infer",
    "info",
    "last_error",
]
