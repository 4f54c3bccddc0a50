"""ONNX Runtime's own profiler, summarised per op type."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hgad_edge.bench.rows import OpCost


def ort_op_profile(
    model_path: Path, input_size: Sequence[int], threads: int, warmup: int, iters: int, work_dir: Path, top: int = 10
) -> dict[str, Any]:
    """ONNX Runtime's own profiler (SessionOptions.enable_profiling) at batch 1: kernel time per
    op type, averaged per run, top `top` plus the rest. The raw trace is deleted afterwards."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(work_dir / "ort_profile")
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])
    h, w = input_size
    feeds = {
        "images": np.random.default_rng(0).integers(0, 256, (1, h, w, 3), dtype=np.uint8),
        "class_id": np.full((1,), -1, np.int64),
    }
    for _ in range(warmup + iters):
        session.run(None, feeds)
    trace = Path(session.end_profiling())
    try:
        summary = summarize_ort_profile(json.loads(trace.read_text()), top)
    finally:
        trace.unlink(missing_ok=True)
    return {"model": model_path.name, "batch": 1, "intra_op_threads": threads, **summary}


def summarize_ort_profile(events: list[dict], top: int = 10) -> dict[str, Any]:
    """Aggregate an ORT profile trace: per op type, kernel ms per run, share and node count."""
    runs = sum(1 for e in events if e.get("cat") == "Session" and e.get("name") == "model_run") or 1
    per_op: dict[str, float] = {}
    nodes: dict[str, set] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        op = (e.get("args") or {}).get("op_name", "?")
        per_op[op] = per_op.get(op, 0.0) + float(e.get("dur", 0)) / 1e3
        nodes.setdefault(op, set()).add(e["name"])
    total = sum(per_op.values())
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1])
    rows = [OpCost(op, ms / runs, ms / total if total else None, len(nodes[op])) for op, ms in ranked[:top]]
    rest = sum(ms for _, ms in ranked[top:])
    if rest:
        rows.append(OpCost("(other)", rest / runs, rest / total, sum(len(nodes[o]) for o, _ in ranked[top:])))
    return {"runs": runs, "kernel_ms_per_run": total / runs, "top_ops": rows}
