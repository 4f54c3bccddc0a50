"""Benchmark report of a trained run: what it costs, how fast it runs where, and what precision costs.

`run_bench(run_dir, out_dir, ...)` writes one folder per machine, `<out>/<machine_name()>/`:

  report.md         the report a person reads (tables, targets PASS/MISS, where the time goes)
  report.json       the same numbers, machine-readable (schema rows.SCHEMA, the rows of rows.py)
  throughput.png    images/s per backend / precision / batch, end to end and model only
  breakdown.png     torch eager latency per component + ONNX Runtime time per op type
  bundle/           the run exported for the runtime (unless `bundle=` names an existing one)

What is measured, module by module:
- machine: CPU, board, cores, GPU, versions and load (a busy machine is flagged in the report).
- flops / components: FLOPs and parameters per component (backbone, each flow level,
  head+scoring) from one forward on fake tensors (FlopCounterMode's module hierarchy), for the run
  and for the official HGAD configuration beside the paper's Tab. 5; per-component eager latency
  from forward hooks on the model's own modules.
- engines / latency: p50/p90/p99 and throughput per engine (torch eager, torch CUDA graph, every
  runtime backend through the torch-free Detector), precision and batch, after warm-up: end to
  end (host resize of a 640x480 camera frame, inference, outputs on the host) and model only.
- accuracy: image / pixel AUROC per engine on real data, and the largest score / map drift
  against PyTorch FP32.
- official: the paper's configuration (random weights: timing only) in PyTorch eager FP32 in the
  same run, so speed-ups are ratios measured side by side (targets).
- ort_profile: ONNX Runtime's own profiler per op type.
- report / plots: report.md and the PNGs, from the JSON-shaped report.
Front-ends, all with the options of the `hgad-edge bench` verb: the verb itself, benchmarks/bench.py
and benchmarks/gpu_check.py (GPU-session defaults).
"""

from __future__ import annotations

import importlib

# Each public name -> the stage that defines it, imported on first use (PEP 562), so light callers
# (the CLI's choices in hgad_edge.bench.choices) do not load every stage and torch.
_HOMES = {
    "BACKENDS": "choices",
    "BenchError": "run",
    "CAMERA_FRAME": "latency",
    "DEFAULT_BACKENDS": "choices",
    "ENGINES": "engines",
    "LatencyRow": "rows",
    "LatencyStats": "rows",
    "PAPER_CONFIG": "official",
    "PRECISIONS": "choices",
    "REST": "components",
    "SCHEMA": "rows",
    "bench_accuracy": "accuracy",
    "build_scorer": "official",
    "bundle_problem": "run",
    "cap_samples": "accuracy",
    "check_targets": "targets",
    "component_clock": "components",
    "component_latency": "components",
    "component_modules": "components",
    "compute_ratios": "targets",
    "count_complexity": "flops",
    "cpu_model": "machine",
    "latency_stats": "latency",
    "machine_info": "machine",
    "machine_name": "machine",
    "open_engine": "engines",
    "ort_op_profile": "ort_profile",
    "physical_cores": "machine",
    "run_bench": "run",
    "skip_reason": "engines",
    "summarize_ort_profile": "ort_profile",
    "tensorrt_status": "engines",
    "time_engine": "latency",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
