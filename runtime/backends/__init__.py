"""Backend registry and selection: TensorRT when it can run here, ONNX Runtime otherwise.

REGISTRY maps a backend name to its factory and the precisions it runs; a new backend is one entry
(the CLI's --backend choices and the parametrised tests derive from it). `backend="auto"` tries the
AUTO_ORDER backends in turn (TensorRT or TensorRT-RTX: library importable, CUDA device present, an
engine in the bundle that fits this TensorRT/GPU/model) and falls back to the next, logging why; the
last one's error goes to the caller. An explicitly requested backend never falls back.
A remote backend ("triton") has `connect` instead of `factory`: it scores on an inference server
named by a URL (grpc://host:8001[/model]) in place of a bundle folder, see `open_server`.
Both take the checked options, hgad_edge.runtime.options.RuntimeOptions (which checks the names here).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hgad_edge.core.bundle import OUTPUT_NAMES, Bundle
from hgad_edge.core.cuda_api import CudaError
from hgad_edge.core.errors import BackendUnavailableError, EngineError, InferenceError, InvalidArgumentError, Status
from hgad_edge.runtime.backends.base import Runner, TensorSpec
from hgad_edge.runtime.backends.onnxruntime_backend import (
    OnnxRuntimeRunner,
    SessionFromOnnx,
    available_providers,
    choose_providers,
    uses_gpu,
)
from hgad_edge.runtime.backends.tensorrt_backend import load_tensorrt_runner
from hgad_edge.runtime.triton.client import is_server_url

if TYPE_CHECKING:  # options.py imports BACKENDS and PRECISIONS from here
    from hgad_edge.runtime.options import RuntimeOptions

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "LOCAL_BACKENDS",
    "PRECISIONS",
    "REGISTRY",
    "BackendEntry",
    "Runner",
    "TensorSpec",
    "create_runner",
    "input_specs",
    "is_server_url",
    "open_server",
]

log = logging.getLogger("hgad_edge.runtime")


def input_specs(bundle: Bundle) -> list[TensorSpec]:
    """The two model inputs: uint8 NHWC RGB images and int64 class ids (-1 = auto)."""
    height, width = bundle.input_size
    return [
        TensorSpec(bundle.input_name, (height, width, 3), np.dtype(np.uint8)),
        TensorSpec(bundle.class_input_name, (), np.dtype(np.int64)),
    ]


def _ort_precision(bundle: Bundle, precision: str, gpu: bool) -> str:
    """fp32 on CPU (ORT's CPU kernels gain nothing from fp16); fp16 on GPU when exported. int8 (the Q/DQ graph
    for ONNX Runtime, hgad-edge quantize) only when asked for: "auto" never picks it, its scores differ slightly."""
    if precision == "int8" and "int8" not in bundle.models:
        msg = (
            f"bundle {bundle.path} has no int8 graph; quantize it: hgad-edge quantize {bundle.path} "
            "(or export with --int8), or use fp32"
        )
        raise InvalidArgumentError(msg)
    if precision != "auto":
        return precision
    if gpu and "fp16" in bundle.models:
        return "fp16"
    return "fp32" if "fp32" in bundle.models else "fp16"


def _onnxruntime_runner(bundle: Bundle, options: RuntimeOptions) -> Runner:
    providers = choose_providers(available_providers(), options.device)
    chosen = _ort_precision(bundle, options.precision, uses_gpu(providers))
    if chosen == "int8":
        providers = ["CPUExecutionProvider"]  # uint8 asymmetric Q/DQ: the CPU's integer kernels (TensorRT: int8_trt)
    loader = SessionFromOnnx(bundle.model_path(chosen), providers)
    runner = OnnxRuntimeRunner(loader, input_specs(bundle), list(OUTPUT_NAMES), options.max_batch)
    runner.precision = chosen
    return runner.activate()


def _tensorrt_runner(bundle: Bundle, options: RuntimeOptions) -> Runner:
    try:
        runner = load_tensorrt_runner(
            bundle,
            input_specs(bundle),
            list(OUTPUT_NAMES),
            options.device,
            options.precision,
            options.max_batch,
            options.allow_engine_host_code,
        )
        return runner.activate()
    except CudaError as err:
        msg = (
            f"CUDA device {options.device} is not usable ({err}); check the driver (nvidia-smi / tegrastats) "
            "or use backend='onnxruntime'"
        )
        raise BackendUnavailableError(msg, Status.NO_DEVICE) from err


def _triton_connect(url: str, options: RuntimeOptions) -> tuple[Bundle, Runner]:
    from hgad_edge.runtime.triton import client as triton_backend  # tritonclient is imported only when a server is used

    return triton_backend.connect(url, input_specs, list(OUTPUT_NAMES), options.precision, options.max_batch)


@dataclass(frozen=True)
class BackendEntry:
    """A runtime backend: factory(bundle, options) -> active Runner, or for a remote one
    connect(url, options) -> (Bundle the server describes, Runner); options: a RuntimeOptions."""

    factory: Callable[[Bundle, RuntimeOptions], Runner] | None
    precisions: tuple[str, ...]  # what it runs besides "auto"
    summary: str
    connect: Callable[[str, RuntimeOptions], tuple[Bundle, Runner]] | None = None


REGISTRY: dict[str, BackendEntry] = {
    "tensorrt": BackendEntry(
        _tensorrt_runner, ("fp32", "fp16", "int8"), "TensorRT or TensorRT-RTX engine in the bundle (hgad-edge build)"
    ),
    "onnxruntime": BackendEntry(
        _onnxruntime_runner, ("fp32", "fp16", "int8"), "ONNX Runtime on CPU, or CUDA where available (int8: CPU)"
    ),
    "triton": BackendEntry(
        None,
        ("fp32", "fp16", "int8"),
        "client of a Triton Inference Server (hgad-edge serve): BUNDLE is its URL, grpc://host:8001[/model]",
        connect=_triton_connect,
    ),
}
AUTO_ORDER = ("tensorrt", "onnxruntime")  # what "auto" tries, in turn, for a bundle folder
BACKENDS = ("auto", *REGISTRY)
LOCAL_BACKENDS = ("auto", *(name for name, entry in REGISTRY.items() if entry.factory is not None))  # need a bundle
PRECISIONS = ("auto", *dict.fromkeys(p for entry in REGISTRY.values() for p in entry.precisions))


def open_server(url: str, options: RuntimeOptions) -> tuple[Bundle, Runner]:
    """(Bundle the server describes, runner sending to it) for a server URL; "auto" picks the remote backend."""
    remote = [name for name, entry in REGISTRY.items() if entry.connect is not None]
    backend = remote[0] if options.backend == "auto" else options.backend
    if backend not in remote:
        msg = f"{url} is an inference server: use backend={remote[0]!r} (or 'auto'), not {backend!r}"
        raise InvalidArgumentError(msg)
    return REGISTRY[backend].connect(url, options)


def create_runner(bundle: Bundle, options: RuntimeOptions) -> Runner:
    """An active runner for `bundle`; see the module docstring for what "auto" does.

    options.allow_engine_host_code: load version-compatible TensorRT engines, which run host code
    embedded in the engine file (only for engines you built or trust; metadata alone never enables it).
    """
    entry = REGISTRY.get(options.backend)
    if entry is not None and entry.factory is None:
        msg = (
            f"backend {options.backend!r} scores on an inference server: pass its URL (grpc://host:8001) instead of "
            f"the bundle {bundle.path}, serving the bundle there with `hgad-edge serve`"
        )
        raise InvalidArgumentError(msg)
    if entry is not None:
        return entry.factory(bundle, options)
    *fallible, last = AUTO_ORDER
    for name in fallible:
        try:
            return REGISTRY[name].factory(bundle, options)
        except (EngineError, InferenceError) as err:
            log.warning("not using %s: %s", name, err)
        except BackendUnavailableError as err:
            log.info("not using %s: %s", name, err)
    return REGISTRY[last].factory(bundle, options)
