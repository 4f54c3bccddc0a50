"""The engines a benchmark times, one interface over torch and the torch-free runtime:
`run(frames, class_ids) -> (maps, scores, model-only ms)`; wall time around run() is end to end.

ENGINES is the registry of what the benchmark's backend choices name (hgad_edge.bench.choices,
torch-free so that the CLI's help needs no bench import): torch eager, torch replaying a CUDA graph,
and every local runtime backend (hgad_edge.runtime.backends.REGISTRY) through the runtime's Detector.
Each entry says which precisions it runs and why it cannot run here (None: it can).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# the verb's choices, re-exported here (run.py, the package): the engines' names and precisions
from hgad_edge.bench.choices import BACKENDS as BACKENDS
from hgad_edge.bench.choices import DEFAULT_BACKENDS as DEFAULT_BACKENDS
from hgad_edge.bench.choices import PRECISIONS as PRECISIONS
from hgad_edge.bench.choices import RUNTIME_ENGINES, TORCH_ENGINES
from hgad_edge.bench.context import Setup
from hgad_edge.core.trt_common import tensorrt_status
from hgad_edge.runtime.backends import REGISTRY as RUNTIME_BACKENDS


class TorchEngine:
    """PyTorch eager on `device`: host resize (the runtime's own resize) -> tensor -> forward -> host."""

    backend = "torch"

    def __init__(self, scorer, device: str, precision: str = "fp32") -> None:
        self.scorer, self.device, self.precision = scorer, device, precision
        self.size = tuple(scorer.model.cfg.input_size)
        self.description = f"torch {__import__('torch').__version__} eager on {device}"

    def _sync(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def run(self, frames: Sequence[np.ndarray], class_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray, float]:
        """-> (anomaly maps, scores, model-only ms). Wall time around this call is end to end."""
        import torch

        from hgad_edge.training.data import resize_image

        batch = np.stack([f if f.shape[:2] == self.size else resize_image(f, self.size) for f in frames])
        images = torch.from_numpy(batch).to(self.device)
        cls = torch.as_tensor(np.asarray(class_ids, dtype=np.int64)).to(self.device)
        self._sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.scorer(images, cls)
        self._sync()
        model_ms = (time.perf_counter() - t0) * 1e3
        host = [o.float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy() for o in out]
        return host[0], host[1], model_ms

    def close(self) -> None:
        self.scorer = None


class TorchGraphEngine(TorchEngine):
    """PyTorch on CUDA with the forward replayed as a CUDA graph over static input buffers (one
    graph per batch size, captured on first use): what eager costs in kernel launches."""

    backend = "torch-cudagraph"

    def __init__(self, scorer, device: str, precision: str = "fp32") -> None:
        super().__init__(scorer, device, precision)
        self.description = f"torch {__import__('torch').__version__} CUDA graph replay on {device}"
        self.graphs: dict[int, tuple] = {}

    def _capture(self, batch: int) -> tuple:
        """Warm-up on a side stream (cuDNN/cuBLAS choose algorithms and allocate outside capture),
        then capture one forward; returns (graph, static images, static class ids, outputs)."""
        import torch

        h, w = self.size
        images = torch.zeros(batch, h, w, 3, dtype=torch.uint8, device=self.device)
        cls = torch.full((batch,), -1, dtype=torch.int64, device=self.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(3):
                self.scorer(images, cls)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            outputs = self.scorer(images, cls)
        return graph, images, cls, outputs

    def run(self, frames: Sequence[np.ndarray], class_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray, float]:
        import torch

        from hgad_edge.training.data import resize_image

        batch = np.stack([f if f.shape[:2] == self.size else resize_image(f, self.size) for f in frames])
        if len(frames) not in self.graphs:
            self.graphs[len(frames)] = self._capture(len(frames))
        graph, images, cls, outputs = self.graphs[len(frames)]
        images.copy_(torch.from_numpy(batch))
        cls.copy_(torch.as_tensor(np.asarray(class_ids, dtype=np.int64)))
        self._sync()
        t0 = time.perf_counter()
        graph.replay()
        self._sync()
        model_ms = (time.perf_counter() - t0) * 1e3
        return outputs[0].float().cpu().numpy(), outputs[1].float().cpu().numpy(), model_ms

    def close(self) -> None:
        self.graphs.clear()
        super().close()


class RuntimeEngine:
    """The torch-free runtime's Detector (ONNX Runtime or TensorRT); latency_ms['model'] is model only."""

    def __init__(self, detector, backend: str, precision: str) -> None:
        self.detector, self.backend, self.precision = detector, backend, precision
        self.description = detector.info["description"]
        gpu = backend == "tensorrt" or "CUDA" in self.description or "Tensorrt" in self.description
        self.device = "cuda" if gpu else "cpu"

    def run(self, frames: Sequence[np.ndarray], class_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray, float]:
        result = self.detector.infer(list(frames), list(class_ids))
        return result.anomaly_map.copy(), result.score.copy(), float(result.latency_ms["model"])

    def close(self) -> None:
        self.detector.close()


def _torch_scorer(setup: Setup, precision: str):
    scorer = setup.scorer
    if precision == "fp16":  # mixed: backbone + flows FP16, heads FP32 (as the FP16 graph)
        scorer = copy.deepcopy(scorer)
        scorer.model.set_body_dtype(__import__("torch").float16)
    return scorer


def _torch_needs(setup: Setup, precision: str) -> str | None:
    if precision == "fp16" and not setup.device.startswith("cuda"):
        return "torch fp16 on CPU skipped: CPU half precision is not a deployment target"
    return None


def _graph_needs(setup: Setup, precision: str) -> str | None:
    return None if setup.device.startswith("cuda") else "CUDA graphs need a CUDA device"


def _runtime_engine(name: str) -> Callable[[Setup, str], RuntimeEngine]:
    def open_(setup: Setup, precision: str) -> RuntimeEngine:
        from hgad_edge.runtime import Detector

        det = Detector(setup.bundle, backend=name, precision=precision, max_batch=setup.max_batch)
        return RuntimeEngine(det, name, precision)

    return open_


def _tensorrt_engine(setup: Setup, precision: str):
    """Build (or reuse) the engine for this GPU first (int8: from the bundle's Q/DQ graph)."""
    _build_trt(setup, precision)
    return _runtime_engine("tensorrt")(setup, precision)


def _tensorrt_needs(setup: Setup, precision: str) -> str | None:
    if setup.trt_status is None:
        setup.trt_status = tensorrt_status("tensorrt")
    ok, reason = setup.trt_status
    if not ok:
        return f"TensorRT unavailable: {reason}"
    return None


def _build_trt(setup: Setup, precision: str) -> Path:
    from hgad_edge.export.trt_build import build_engines

    top = setup.max_batch
    return build_engines(setup.bundle, precision, batch=(1, max(1, top // 2), top))


@dataclass(frozen=True)
class EngineKind:
    """How the benchmark opens a backend at a precision, and why it cannot run here."""

    open: Callable[[Setup, str], object]
    precisions: tuple[str, ...]
    needs: Callable[[Setup, str], str | None] = lambda setup, precision: None
    torch: bool = False  # runs the PyTorch model in-process (needs no bundle)


def _runtime_kind(name: str) -> EngineKind:
    special = {"tensorrt": (_tensorrt_engine, _tensorrt_needs)}
    open_, needs = special.get(name, (_runtime_engine(name), lambda setup, precision: None))
    return EngineKind(open_, tuple(RUNTIME_BACKENDS[name].precisions), needs)


# Keyed by the verb's choices (hgad_edge.bench.choices: BACKENDS, PRECISIONS, DEFAULT_BACKENDS).
ENGINES: dict[str, EngineKind] = {
    "torch": EngineKind(
        lambda s, p: TorchEngine(_torch_scorer(s, p), s.device, p), TORCH_ENGINES["torch"], _torch_needs, True
    ),
    "torch-cudagraph": EngineKind(
        lambda s, p: TorchGraphEngine(_torch_scorer(s, p), s.device, p),
        TORCH_ENGINES["torch-cudagraph"],
        _graph_needs,
        True,
    ),
    **{name: _runtime_kind(name) for name in RUNTIME_ENGINES},
}


def skip_reason(setup: Setup, backend: str, precision: str) -> str | None:
    """Why (backend, precision) is not measured here, or None when it is."""
    kind = ENGINES[backend]
    if precision not in kind.precisions:
        return f"no {precision} path for {backend} (it runs {', '.join(kind.precisions)})"
    return kind.needs(setup, precision)


def open_engine(setup: Setup, backend: str, precision: str):
    """An engine for (backend, precision), building what it needs first (a TensorRT engine)."""
    return ENGINES[backend].open(setup, precision)
