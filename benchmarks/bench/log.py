"""The benchmark's wall-clock budget and its stage log (what ran, what was skipped, what failed)."""

from __future__ import annotations

import contextlib
import math
import time
import traceback
from dataclasses import dataclass, field
from typing import Any


class Budget:
    """Wall-clock allowance of the whole benchmark; None = unlimited."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - (time.perf_counter() - self.start)

    def spent(self) -> bool:
        return self.left() <= 0


@dataclass
class Log:
    """What ran, what was skipped and why, and the tracebacks of what failed; never raises."""

    budget: Budget
    stages: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)

    def skip(self, what: str, reason: str) -> None:
        self.skipped.append({"what": what, "reason": reason})

    @contextlib.contextmanager
    def stage(self, name: str):
        if self.budget.spent():
            self.skip(name, f"time budget of {self.budget.seconds:.0f} s used up")
            self.stages.append({"name": name, "status": "skipped (budget)", "seconds": 0.0})
            yield False
            return
        t0 = time.perf_counter()
        status = "ok"
        try:
            yield True
        except Exception as err:  # noqa: BLE001 - one failed stage must not lose the report
            status = f"failed: {type(err).__name__}: {err}"
            self.errors.append({"stage": name, "traceback": traceback.format_exc(limit=8)})
        self.stages.append({"name": name, "status": status, "seconds": round(time.perf_counter() - t0, 2)})
