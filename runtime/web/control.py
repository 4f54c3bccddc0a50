"""Threshold changes from the page: for this run only, or saved into the bundle as `hgad-edge calibrate` saves.

"Apply" changes the running Detector's per-class thresholds (`Detector.set_thresholds`: from the next
frame on, the bundle untouched), like `hgad-edge run --threshold`. "Save" and "Undo" go through the
calibration module's own functions, which the caller hands in as a `ThresholdStore` (the runtime does
not import the top of the package): the write is atomic, recorded in metadata.json with the previous
thresholds, and undone by `hgad-edge calibrate BUNDLE --undo` as well as by the page. After a save or
an undo the run decides with the bundle's new value for that class. A station scoring on an inference
server has no bundle here to save into: the page says to calibrate on the server.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ThresholdControl", "ThresholdStore"]


@dataclass(frozen=True)
class ThresholdStore:
    """The bundle's side: save(class name, threshold) -> record, undo() -> the record undone, and
    read() -> the bundle's metadata (thresholds, calibration), e.g. partials of hgad_edge.threshold_calibration."""

    save: Callable[[str, float], Any]
    undo: Callable[[], dict[str, Any]]
    read: Callable[[], Any]


class ThresholdControl:
    """The run's thresholds as the page changes them; one change at a time (the page may have several viewers)."""

    def __init__(self, detector: Any, store: ThresholdStore | None) -> None:
        self.detector, self.store = detector, store
        self._lock = threading.Lock()
        self.changes: list[dict[str, Any]] = []  # what this run's page did, newest last (shown on the page)
        # the bundle's thresholds and calibration record as loaded, re-read after each save or undo only
        # (reading verifies every model file's sha256: too slow for each poll of the page)
        self._bundle = (list(detector.info["bundle_thresholds"]), detector.info.get("calibration"))

    def view(self) -> dict[str, Any]:
        """The thresholds in effect and in the bundle, per class, and what can be saved or undone."""
        info = self.detector.info
        bundle, calibration = self._bundle
        return {
            "classes": list(info["classes"]),
            "run": dict(zip(info["classes"], info["thresholds"])),
            "bundle": dict(zip(info["classes"], bundle)),
            "scales": dict(zip(info["classes"], info["scales"])),
            "can_save": self.store is not None,
            "calibration": None
            if not calibration
            else {k: calibration.get(k) for k in ("policy", "class", "date", "method")},
            "changes": self.changes[-10:],
        }

    def apply(self, name: str, value: float) -> dict[str, Any]:
        """Decide `name`'s frames with `value` from the next frame on, for this run only."""
        value = self._checked(name, value)
        if self.detector.closed:
            raise ValueError("the run has ended: there is no run to apply a threshold to (save it into the bundle)")
        with self._lock:
            self._set_run(name, value)
            self.changes.append({"action": "apply", "class": name, "threshold": value})
        return self.view()

    def save(self, name: str, value: float) -> dict[str, Any]:
        """Write `value` into the bundle through the calibration code (atomic, recorded, undoable), and use it."""
        value = self._checked(name, value)
        store = self._need_store()
        with self._lock:
            store.save(name, value)
            self._reread()
            self._set_run(name, value)
            self.changes.append({"action": "save", "class": name, "threshold": value})
        return self.view()

    def undo(self) -> dict[str, Any]:
        """Restore the bundle's thresholds from before its last calibration; the run follows the classes it changed."""
        store = self._need_store()
        with self._lock:
            before = self._reread()  # fresh: `hgad-edge calibrate` may have written meanwhile
            record = store.undo()
            after = self._reread()
            info = self.detector.info
            run = dict(zip(info["classes"], info["thresholds"]))
            for name, old, new in zip(info["classes"], before, after):
                if old != new:
                    run[name] = new
            if not self.detector.closed:
                self.detector.set_thresholds(run)
            self.changes.append({"action": "undo", "class": record.get("class"), "date": record.get("date")})
        return self.view()

    def _reread(self) -> list[float]:
        meta = self.store.read()
        self._bundle = (list(meta.thresholds), meta.calibration)
        return self._bundle[0]

    def _set_run(self, name: str, value: float) -> None:
        if self.detector.closed:  # the run ended: the bundle was written, there is nothing else to change
            return
        info = self.detector.info
        run = dict(zip(info["classes"], info["thresholds"]))
        run[name] = value
        self.detector.set_thresholds(run)

    def _checked(self, name: str, value: Any) -> float:
        if name not in self.detector.info["classes"]:
            known = ", ".join(self.detector.info["classes"])
            raise ValueError(f"unknown class {name!r}; the bundle's classes are {known}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"threshold must be a finite number, got {value!r}")
        return float(value)

    def _need_store(self) -> ThresholdStore:
        if self.store is None:
            raise ValueError(
                "this station scores on an inference server: save thresholds where the bundle is, with "
                "`hgad-edge calibrate BUNDLE` on the server (it reloads them and stations follow)"
            )
        return self.store
