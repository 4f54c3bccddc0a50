"""ONNX Runtime backend: the portable fallback (CPU everywhere, CUDA / TensorRT EPs where present).

Outputs go straight into preallocated numpy buffers through an IOBinding per batch size (bound
once, then reused), so the hot path allocates nothing but ORT's own scratch memory. If a build
of ORT refuses binding caller-owned host memory, the runner falls back to `session.run` plus one
`np.copyto` per output and says so in `description`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hgad_edge.core.errors import BackendUnavailableError, BundleError, InferenceError, Status
from hgad_edge.runtime.backends.base import Runner, TensorSpec

__all__ = ["OnnxRuntimeRunner", "SessionFromOnnx", "available_providers", "choose_providers"]

log = logging.getLogger("hgad_edge.runtime")

_ORT_HINT = "pip install onnxruntime (onnxruntime-gpu for CUDA; on Jetson the wheel from NVIDIA's Jetson Zoo)"
_ORT_DTYPES = {"tensor(uint8)": np.uint8, "tensor(int64)": np.int64, "tensor(float)": np.float32}


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as err:
        raise BackendUnavailableError(f"onnxruntime is not installed ({err}); {_ORT_HINT}") from err
    return onnxruntime


def available_providers() -> list[str]:
    """ORT execution providers of the installed build (empty if ORT is missing)."""
    try:
        return list(_import_ort().get_available_providers())
    except BackendUnavailableError:
        return []


def _trt_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "hgad-edge", "ort-tensorrt")


def choose_providers(available: list[str], device: int = 0) -> list[Any]:
    """GPU providers first (the TensorRT EP caches its engines so restarts stay fast), CPU last."""
    chosen: list[Any] = []
    if "TensorrtExecutionProvider" in available:
        options = {"device_id": device, "trt_engine_cache_enable": True, "trt_engine_cache_path": _trt_cache_dir()}
        chosen.append(("TensorrtExecutionProvider", options))
    if "CUDAExecutionProvider" in available:
        chosen.append(("CUDAExecutionProvider", {"device_id": device}))
    chosen.append("CPUExecutionProvider")
    return chosen


def uses_gpu(providers: list[Any]) -> bool:
    return any((p[0] if isinstance(p, tuple) else p) != "CPUExecutionProvider" for p in providers)


class SessionFromOnnx:
    """Loader: an `onnxruntime.InferenceSession` for one ONNX file and provider list."""

    def __init__(self, path: Path | str, providers: list[Any], threads: int | None = None) -> None:
        self.path = Path(path)
        self.providers = providers
        self.threads = threads

    def __call__(self) -> Any:
        ort = _import_ort()
        if not self.path.is_file():
            msg = (
                f"model file {self.path} is missing from the bundle; copy the whole bundle folder again or re-export it"
            )
            raise BundleError(msg, Status.BUNDLE_NOT_FOUND)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # ORT warnings about EP fallbacks are noise on the edge
        if self.threads:
            opts.intra_op_num_threads = int(self.threads)
        try:
            return ort.InferenceSession(str(self.path), sess_options=opts, providers=self.providers)
        except Exception as err:  # ORT raises several private exception types
            msg = f"onnxruntime cannot load {self.path}: {err}; re-export the bundle with `hgad-edge export`"
            raise BundleError(msg, Status.BUNDLE_INCOMPATIBLE) from err


class OnnxRuntimeRunner(Runner):
    """Runs the bundle's ONNX model; buffers are planned from a batch-1 warm-up run."""

    name = "onnxruntime"

    def __init__(
        self,
        loader: Callable[[], Any],
        input_specs: list[TensorSpec],
        output_names: list[str],
        max_batch: int,
    ) -> None:
        super().__init__(input_specs, output_names, max_batch)
        self.loader = loader
        self.session: Any = None
        self.use_io_binding = False
        self._bindings: dict[int, Any] = {}

    def activate_impl(self) -> None:
        self.session = self.loader()
        self._check_signature()
        self.inputs = {s.name: np.zeros((self.max_batch, *s.shape), s.dtype) for s in self.input_specs}
        reference = self._run_plain(1)
        self.outputs = {
            n: np.empty((self.max_batch, *v.shape[1:]), v.dtype) for n, v in zip(self.output_names, reference)
        }
        self.use_io_binding = self._try_io_binding(reference)
        providers = ",".join(self.session.get_providers())
        how = "io_binding" if self.use_io_binding else "run+copy"
        self.description = f"onnxruntime {_import_ort().__version__} [{providers}] {how}"

    def _check_signature(self) -> None:
        declared = {i.name: i.type for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        for spec in self.input_specs:
            got = _ORT_DTYPES.get(declared.get(spec.name, ""))
            if got is None or np.dtype(got) != spec.dtype:
                msg = (
                    f"the ONNX model has no {spec.dtype} input {spec.name!r} (inputs: {declared}); "
                    "the bundle and its model disagree: re-export it with `hgad-edge export`"
                )
                raise BundleError(msg, Status.BUNDLE_INCOMPATIBLE)
        missing = [n for n in self.output_names if n not in outputs]
        if missing:
            msg = (
                f"the ONNX model lacks outputs {missing} (has {sorted(outputs)}); re-export it with `hgad-edge export`"
            )
            raise BundleError(msg, Status.BUNDLE_INCOMPATIBLE)

    def _run_plain(self, batch: int) -> list[np.ndarray]:
        feeds = {name: buf[:batch] for name, buf in self.inputs.items()}
        try:
            return self.session.run(self.output_names, feeds)
        except Exception as err:
            raise InferenceError(f"onnxruntime failed on a batch of {batch}: {err}") from err

    def _bind(self, batch: int) -> Any:
        binding = self.session.io_binding()
        for name, buf in list(self.inputs.items()) + list(self.outputs.items()):
            view = buf[:batch]
            bind = binding.bind_input if name in self.inputs else binding.bind_output
            bind(name, "cpu", 0, view.dtype, list(view.shape), view.ctypes.data)
        self._bindings[batch] = binding
        return binding

    def _try_io_binding(self, reference: list[np.ndarray]) -> bool:
        """Bind caller-owned output memory and check that ORT really writes into it."""
        try:
            binding = self._bind(1)
            self.session.run_with_iobinding(binding)
            pointers = [value.data_ptr() for value in binding.get_outputs()]
            owned = pointers == [self.outputs[n].ctypes.data for n in self.outputs]
            same = owned and all(np.array_equal(self.outputs[n][:1], r) for n, r in zip(self.output_names, reference))
        except Exception as err:
            log.info("onnxruntime io_binding with preallocated outputs unavailable (%s); using run + copy", err)
            same = False
        if not same:
            self._bindings.clear()
        return same

    def infer_impl(self, batch: int) -> None:
        try:
            if self.use_io_binding:
                binding = self._bindings.get(batch) or self._bind(batch)
                self.session.run_with_iobinding(binding)
                return
            results = self.session.run(self.output_names, {n: b[:batch] for n, b in self.inputs.items()})
        except Exception as err:
            raise InferenceError(f"onnxruntime failed on a batch of {batch}: {err}") from err
        for name, value in zip(self.output_names, results):
            np.copyto(self.outputs[name][:batch], value)

    def deactivate_impl(self) -> None:
        self._bindings.clear()
        self.session = None
