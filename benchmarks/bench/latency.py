"""Latency and throughput of each engine: warm-up, timed calls on camera-size frames, percentiles."""

from __future__ import annotations

import time
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from hgad_edge.bench.context import Setup
from hgad_edge.bench.engines import open_engine, skip_reason
from hgad_edge.bench.log import Budget
from hgad_edge.bench.rows import LatencyRow, LatencyStats

CAMERA_FRAME = (480, 640)  # (H, W) of the simulated camera frame the host resizes


def latency_stats(ms: Sequence[float], batch: int = 1) -> LatencyStats:
    """p50/p90/p99 (linear interpolation), mean, min, max of per-call latencies in ms, and the
    throughput they imply (batch images per mean call). Empty input -> n=0 and None values."""
    values = np.asarray(list(ms), dtype=np.float64)
    if values.size == 0:
        return LatencyStats(n=0)
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    mean = float(values.mean())
    return LatencyStats(
        n=int(values.size),
        mean_ms=mean,
        p50_ms=float(p50),
        p90_ms=float(p90),
        p99_ms=float(p99),
        min_ms=float(values.min()),
        max_ms=float(values.max()),
        images_per_s=batch * 1e3 / mean if mean > 0 else None,
    )


def camera_frames(batch: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return list(rng.integers(0, 256, (batch, *CAMERA_FRAME, 3), dtype=np.uint8))


def time_engine(engine, batch: int, warmup: int, iters: int, budget: Budget, desc: str) -> dict[str, Any]:
    """Warm-up, then `iters` timed calls on camera-size frames (fewer if the budget runs out)."""
    frames, cls = camera_frames(batch), [-1] * batch
    for _ in range(warmup):
        engine.run(frames, cls)
    e2e, model = [], []
    for _ in tqdm(range(iters), desc=desc, leave=False, unit="call"):
        t0 = time.perf_counter()
        _, _, model_ms = engine.run(frames, cls)
        e2e.append((time.perf_counter() - t0) * 1e3)
        model.append(model_ms)
        if budget.spent():
            break
    return {
        "e2e": latency_stats(e2e, batch),
        "model": latency_stats(model, batch),
        "iters": len(e2e),
        "truncated": len(e2e) < iters,
    }


def bench_latency(setup: Setup, backends: Sequence[str], precisions: Sequence[str], budget: Budget) -> list[LatencyRow]:
    rows = []
    for backend in backends:
        for precision in precisions:
            reason = skip_reason(setup, backend, precision)
            if reason:
                rows += [LatencyRow(backend, precision, b, "skipped", reason) for b in setup.batches]
                continue
            rows += _time_case(setup, backend, precision, budget)
    return rows


def _time_case(setup: Setup, backend: str, precision: str, budget: Budget) -> list[LatencyRow]:
    try:
        engine = open_engine(setup, backend, precision)
    except Exception as err:  # noqa: BLE001 - e.g. ORT without fp16 kernels: a note, not a crash
        setup.log.errors.append({"stage": f"open {backend} {precision}", "traceback": traceback.format_exc(limit=6)})
        return [LatencyRow(backend, precision, b, "failed", f"{type(err).__name__}: {err}") for b in setup.batches]
    rows = []
    try:
        for batch in setup.batches:
            row = LatencyRow(backend, precision, batch, "ok", device=engine.device, description=engine.description)
            if budget.spent():
                row.status, row.reason = "skipped", "time budget used up"
            else:
                try:
                    timed = time_engine(
                        engine, batch, setup.warmup, setup.iters, budget, f"{backend} {precision} b{batch}"
                    )
                    row.e2e, row.model, row.iters, row.truncated = (
                        timed["e2e"],
                        timed["model"],
                        timed["iters"],
                        timed["truncated"],
                    )
                except Exception as err:  # noqa: BLE001
                    row.status, row.reason = "failed", f"{type(err).__name__}: {err}"
            rows.append(row)
    finally:
        engine.close()
    return rows


def interleaved_speedup(
    setup: Setup, backend: str, precision: str, reference: str, budget: Budget, batch: int = 1
) -> dict[str, Any]:
    """`precision` against `reference` on one backend, end to end, their calls alternating one by one
    in this process: load from other work on the machine slows both alike, so their ratio holds where
    the absolute numbers of separately timed rows drift (a shared 2-core machine). Median per call."""
    frames, cls = camera_frames(batch), [-1] * batch
    engines = [open_engine(setup, backend, reference)]
    try:
        engines.append(open_engine(setup, backend, precision))
        for engine in engines:
            for _ in range(setup.warmup):
                engine.run(frames, cls)
        times: tuple[list[float], list[float]] = ([], [])
        for _ in tqdm(range(setup.iters), desc=f"{backend} {precision} vs {reference}", leave=False, unit="pair"):
            for k, engine in enumerate(engines):
                t0 = time.perf_counter()
                engine.run(frames, cls)
                times[k].append((time.perf_counter() - t0) * 1e3)
            if budget.spent():
                break
    finally:
        for engine in engines:
            engine.close()
    ref_ms, ms = float(np.median(times[0])), float(np.median(times[1]))
    return {
        "backend": backend,
        "precision": precision,
        "reference": reference,
        "batch": batch,
        "timing": "e2e",
        "pairs": len(times[0]),
        "reference_ms_p50": ref_ms,
        "ms_p50": ms,
        "speedup": ref_ms / ms,
        "description": engines[1].description,
    }
