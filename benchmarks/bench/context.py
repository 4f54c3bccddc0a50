"""What every stage of a benchmark shares: the run, its scorer, the bundle, the timing settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hgad_edge.bench.log import Log


@dataclass
class Setup:
    run_dir: Path
    folder: Path
    bundle: Path
    scorer: Any
    cfg: Any
    meta: dict
    device: str
    batches: tuple[int, ...]
    warmup: int
    iters: int
    log: Log
    trt_status: tuple[bool, str] | None = None  # (usable, why not), checked once when first asked

    @property
    def max_batch(self) -> int:
        return max(self.batches)
