"""The performance targets (PASS / MISS / N/A) and speed-ups against the official configuration."""

from __future__ import annotations

from hgad_edge.bench.rows import LatencyRow, Ratio, Target

# (backend, precision) pairs whose speed-up over the official configuration is reported
RATIO_CASES = (
    ("onnxruntime", "fp32"),
    ("torch", "fp32"),
    ("onnxruntime", "fp16"),
    ("tensorrt", "fp16"),
    ("torch", "fp16"),
    ("onnxruntime", "int8"),
    ("tensorrt", "int8"),
)
TARGET_CPU_IPS, TARGET_CPU_VS_TORCH, TARGET_GPU_VS_OFFICIAL = 25.0, 2.0, 20.0
TARGET_INT8_VS_FP32 = 1.8  # ONNX Runtime int8 over fp32 at batch 1, end to end, interleaved in one run


def _best(rows: list[LatencyRow], timing: str = "e2e", **where) -> LatencyRow | None:
    ok = [r for r in rows if r.status == "ok" and all(getattr(r, k) == v for k, v in where.items()) and r.ips(timing)]
    return max(ok, key=lambda r: r.ips(timing)) if ok else None


def _ips(row: LatencyRow | None, timing: str = "e2e") -> float | None:
    return None if row is None else row.ips(timing)


def compute_ratios(rows: list[LatencyRow], official: LatencyRow | None) -> list[Ratio]:
    """Speed-ups against the official configuration's eager FP32 at batch 1, end to end and model only."""
    if official is None:
        return []
    ratios = []
    for timing in ("e2e", "model"):
        ref = official.ips(timing)
        for backend, precision in RATIO_CASES:
            first = _best(rows, timing, backend=backend, precision=precision, batch=1)
            best = _best(rows, timing, backend=backend, precision=precision)
            for name, row in (("batch 1", first), ("best batch", best if best is not first else None)):
                if row is None or not ref:
                    continue
                what = f"ours {backend} {precision} ({name}: {row.batch}) / official eager fp32 (batch 1)"
                ratios.append(Ratio(what, timing, row.ips(timing), ref, row.ips(timing) / ref))
    return ratios


def check_targets(
    rows: list[LatencyRow], official: LatencyRow | None, cfg, machine: dict, int8: dict | None = None
) -> list[Target]:
    """The issue's performance targets, PASS / MISS / N/A with the numbers behind each verdict.
    int8: the interleaved ONNX Runtime int8 vs fp32 measurement (latency.interleaved_speedup), if taken."""
    from hgad_edge.training.config import HGADConfig

    base = HGADConfig()
    default = tuple(cfg.input_size) == tuple(base.input_size) and cfg.backbone.name == base.backbone.name
    why_na = (
        None
        if default
        else f"the run is {cfg.backbone.name} at {list(cfg.input_size)}, the target is for the default "
        f"{base.backbone.name} at {list(base.input_size)}"
    )
    cores_note = f"measured on {machine['cores']} cores" + (
        "" if machine["cores"] == 2 else " (the target is stated for 2)"
    )
    ort_cpu = _best(rows, backend="onnxruntime", precision="fp32", device="cpu")
    torch_cpu = _best(rows, backend="torch", precision="fp32", device="cpu")
    targets = [
        _target(
            "CPU ONNX Runtime fp32 >= 25 images/s end to end (best batch)",
            _ips(ort_cpu),
            TARGET_CPU_IPS,
            why_na or (None if ort_cpu else "no CPU ONNX Runtime fp32 measurement"),
            cores_note,
        ),
        _target(
            "CPU ONNX Runtime fp32 >= 2x PyTorch eager fp32 (best batch each, end to end)",
            _ips(ort_cpu) / _ips(torch_cpu) if ort_cpu and torch_cpu else None,
            TARGET_CPU_VS_TORCH,
            why_na or (None if ort_cpu and torch_cpu else "needs both ONNX Runtime and torch eager fp32 on the CPU"),
            cores_note,
        ),
    ]
    targets.append(
        _target(
            f"CPU ONNX Runtime int8 >= {TARGET_INT8_VS_FP32}x ONNX Runtime fp32 (batch 1, end to end, interleaved)",
            int8["speedup"] if int8 else None,
            TARGET_INT8_VS_FP32,
            why_na or (None if int8 else "int8 not measured (--precisions ...,int8 with the onnxruntime backend)"),
            f"{int8['reference_ms_p50']:.1f} ms -> {int8['ms_p50']:.1f} ms, {int8['pairs']} pairs; {cores_note}"
            if int8
            else "",
        )
    )
    best16 = _best(rows, precision="fp16", device="cuda")
    ref = _ips(official)
    gpu_official = official is not None and str(official.device or "").startswith("cuda")
    na = None
    if not machine.get("gpu"):
        na = "no GPU on this machine"
    elif not (best16 and ref and gpu_official):
        na = "needs a GPU fp16 measurement and the official configuration timed on the GPU"
    detail = f"best: {best16.backend} fp16 batch {best16.batch}" if best16 else ""
    targets.append(
        _target(
            "GPU fp16 >= 20x the official configuration's eager fp32 images/s (end to end)",
            _ips(best16) / ref if best16 and ref else None,
            TARGET_GPU_VS_OFFICIAL,
            na,
            detail,
        )
    )
    return targets


def _target(name: str, value: float | None, threshold: float, not_applicable: str | None, detail: str = "") -> Target:
    status = "N/A" if not_applicable or value is None else ("PASS" if value >= threshold else "MISS")
    return Target(name, value, threshold, status, not_applicable, detail)
