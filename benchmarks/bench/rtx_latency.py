"""TensorRT-RTX on a lent GPU: build the engine for that GPU when TensorRT-RTX supports it, and time it.

Used by benchmarks/gpu_check.py (its PyTorch FP16 rows sit beside these in one report). On a GPU
TensorRT-RTX does not target (Jetson 8.7, Hopper 9.0, anything before Turing) nothing is built and
the result says why. Timing is the runner itself (host->device copy, execute_async_v3, copy back)
at each batch after warm-up; no preprocessing, so it compares with PyTorch on device-resident inputs
plus the copies.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hgad_edge.core.bundle import load_bundle
from hgad_edge.core.cuda_api import import_cuda
from hgad_edge.core.trt_common import TARGETS, rtx_capabilities, tensorrt_status
from hgad_edge.export.trt_build import build_engines
from hgad_edge.export.trt_devices import RTX_ELSEWHERE
from hgad_edge.runtime.backends import input_specs
from hgad_edge.runtime.backends.tensorrt_backend import (
    EngineFromPath,
    TensorRTRunner,
    build_fix,
    import_runtime,
)

__all__ = ["LatencyRow", "RtxLatency", "time_rtx_engine"]


@dataclass(frozen=True)
class LatencyRow:
    precision: str
    batch: int
    seconds: float  # per batch
    iters: int


@dataclass
class RtxLatency:
    note: str  # what was done, or why nothing was
    rows: list[LatencyRow] = field(default_factory=list)
    engine: Path | None = None


def time_rtx_engine(
    bundle: Path | str,
    batches: Sequence[int] = (1, 8),
    precision: str = "fp16",
    warmup: int = 5,
    min_time: float = 2.0,
    max_iters: int = 200,
    device: int = 0,
) -> RtxLatency:
    """Build (or reuse) the TensorRT-RTX engine for this GPU's compute capability and time it."""
    ok, why = tensorrt_status("rtx")
    if not ok:
        return RtxLatency(f"TensorRT-RTX not measured: {why}")
    cuda = import_cuda()
    cc = cuda.compute_capability(device)
    trt = import_runtime("rtx")
    supported = rtx_capabilities(trt)[0]
    if cc not in supported:
        hint = RTX_ELSEWHERE.get(cc, "not an RTX-class GPU")
        return RtxLatency(
            f"TensorRT-RTX {trt.__version__} not measured: this GPU is compute capability {cc} ({hint}); "
            f"TensorRT-RTX targets {', '.join(supported)}"
        )
    top = max(batches)
    started = time.perf_counter()
    path = build_engines(bundle, precision, (1, max(1, top // 2), top), target="rtx", compute_capabilities=[cc])
    built_s = time.perf_counter() - started
    loaded = load_bundle(bundle)
    entry = loaded.metadata["engines"][path.name]
    loader = EngineFromPath(
        trt, loaded.engine_path(path.name), build_fix(loaded.path, precision, "rtx"), entry["sha256"]
    )
    outputs = list(loaded.metadata.get("outputs") or [])
    runner = TensorRTRunner(loader, input_specs(loaded), outputs, top, device, cuda, TARGETS["rtx"].label)
    started = time.perf_counter()
    runner.activate()
    activate_s = time.perf_counter() - started
    rows = []
    try:
        rng = np.random.default_rng(0)
        runner.inputs[loaded.input_name][...] = rng.integers(
            0, 256, runner.inputs[loaded.input_name].shape, dtype=np.uint8
        )
        runner.inputs[loaded.class_input_name][...] = -1
        for batch in batches:
            for _ in range(warmup):
                runner.infer(batch)
            iters, t0 = 0, time.perf_counter()
            while iters < max_iters and (iters < 3 or time.perf_counter() - t0 < min_time):
                runner.infer(batch)
                iters += 1
            rows.append(LatencyRow(precision, batch, (time.perf_counter() - t0) / iters, iters))
    finally:
        runner.deactivate()
    note = (
        f"TensorRT-RTX {trt.__version__} {precision} engine {path.name} for sm{cc.replace('.', '')}: "
        f"{entry['size_bytes'] / 2**20:.1f} MB, build {built_s:.1f} s (0 = up to date), load + JIT {activate_s:.1f} s"
    )
    return RtxLatency(note, rows, path)
