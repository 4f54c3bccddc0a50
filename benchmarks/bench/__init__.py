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

from hgad_edge.bench.accuracy import bench_accuracy, cap_samples
from hgad_edge.bench.components import REST, component_clock, component_latency, component_modules
from hgad_edge.bench.engines import (
    BACKENDS,
    DEFAULT_BACKENDS,
    ENGINES,
    PRECISIONS,
    open_engine,
    skip_reason,
    tensorrt_status,
)
from hgad_edge.bench.flops import count_complexity
from hgad_edge.bench.latency import CAMERA_FRAME, latency_stats, time_engine
from hgad_edge.bench.machine import cpu_model, machine_info, machine_name, physical_cores
from hgad_edge.bench.official import PAPER_CONFIG, build_scorer
from hgad_edge.bench.ort_profile import ort_op_profile, summarize_ort_profile
from hgad_edge.bench.rows import SCHEMA, LatencyRow, LatencyStats
from hgad_edge.bench.run import BenchError, bundle_problem, run_bench
from hgad_edge.bench.targets import check_targets, compute_ratios

__all__ = [
    "BACKENDS",
    "CAMERA_FRAME",
    "DEFAULT_BACKENDS",
    "ENGINES",
    "PAPER_CONFIG",
    "PRECISIONS",
    "REST",
    "SCHEMA",
    "BenchError",
    "LatencyRow",
    "LatencyStats",
    "bench_accuracy",
    "build_scorer",
    "bundle_problem",
    "cap_samples",
    "check_targets",
    "component_clock",
    "component_latency",
    "component_modules",
    "compute_ratios",
    "count_complexity",
    "cpu_model",
    "latency_stats",
    "machine_info",
    "machine_name",
    "open_engine",
    "ort_op_profile",
    "physical_cores",
    "run_bench",
    "skip_reason",
    "summarize_ort_profile",
    "tensorrt_status",
    "time_engine",
]
