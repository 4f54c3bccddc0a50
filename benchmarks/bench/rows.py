"""The typed rows of a benchmark report; report.json holds their dict form (schema SCHEMA).

Stages produce these; the Markdown report and the plots read the JSON-shaped dict, so a stored
report.json renders the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

SCHEMA = "hgad-edge-bench/1"


@dataclass
class LatencyStats:
    """Per-call latency percentiles (ms) and the throughput they imply; None when nothing was timed."""

    n: int
    mean_ms: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    images_per_s: float | None = None


@dataclass
class LatencyRow:
    """One (backend, precision, batch) case: timed ("ok"), "skipped" or "failed" with the reason."""

    backend: str
    precision: str
    batch: int
    status: str
    reason: str | None = None
    device: str | None = None
    description: str | None = None
    e2e: LatencyStats | None = None
    model: LatencyStats | None = None
    iters: int | None = None
    truncated: bool | None = None

    def ips(self, timing: str = "e2e") -> float | None:
        stats = getattr(self, timing)
        return None if stats is None else stats.images_per_s

    def to_dict(self) -> dict[str, Any]:
        """Only the fields this status has (a skipped row has no timings)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyRow:
        stats = {k: LatencyStats(**data[k]) for k in ("e2e", "model") if data.get(k) is not None}
        return cls(**{**data, **stats})


@dataclass
class Component:
    """FLOPs and parameters of one component of the forward."""

    name: str
    flops: int
    gmacs: float
    params: int
    learnable_params: int


@dataclass
class Complexity:
    counter: str
    input_size: list[int]
    batch: int
    components: list[Component]
    sum_components_flops: int
    total_flops: int
    total_gflops: float
    total_gmacs: float
    params: int
    learnable_params: int


@dataclass
class ComponentTime:
    name: str
    p50_ms: float
    share: float | None


@dataclass
class OpCost:
    """ONNX Runtime kernel time of one op type."""

    op_type: str
    ms_per_run: float
    share: float | None
    nodes: int


@dataclass
class Drift:
    """Largest differences of one engine against PyTorch FP32 on the same images and class ids."""

    backend: str
    precision: str
    max_abs_score_diff: float = 0.0
    max_abs_map_diff: float = 0.0
    n_images: int = 0
    nonfinite: int = 0


@dataclass
class Ratio:
    what: str
    timing: str
    ours_images_per_s: float
    official_images_per_s: float
    ratio: float


@dataclass
class Target:
    target: str
    value: float | None
    threshold: float
    status: str  # PASS, MISS or N/A
    reason: str | None
    detail: str = ""


@dataclass
class OfficialResult:
    """The official configuration (random weights): its complexity and batch-1 eager FP32 latency."""

    label: str
    config: dict
    build_s: float
    latency: LatencyRow
    complexity: Complexity | None = None
    random_weights: bool = True

    def to_dict(self) -> dict[str, Any]:
        """The report's "official" entry; the complexity goes to report["complexity"] instead."""
        out = {k: getattr(self, k) for k in ("label", "config", "random_weights", "build_s")}
        return {**out, "latency": self.latency.to_dict()}


def as_dict(obj: Any) -> Any:
    """Rows (also inside dicts and lists) in their report.json form."""
    if isinstance(obj, dict):
        return {k: as_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_dict(x) for x in obj]
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    return obj
