"""The one message every sink sends and the history stores: a decision, versioned, in one place.

    {"schema": "hgad-edge.decision", "schema_version": 1, "id": "20260520-101112-4242-1/17",
     "run": "20260520-101112-4242-1", "station": "line1-pc", "frame": 17,
     "time": "2026-05-20T08:11:12.345678Z", "timestamp": 1779264672.345678, "source": "shots/0017.png",
     "class": "bottle", "class_id": 0, "score": 1.93, "score_normalized": 0.71, "decision": "FAIL",
     "threshold": 1.8, "thresholds_version": "3f2a9c0d1b7e", "model_sha256": "9e1c...", "evidence":
     "fails/20260520-101112-4242-1_000017_0017_overlay.png", "latency_ms": 6.2}

`FIELDS` says what each field means (docs/line.md prints the same table). A change that renames or
removes a field, or changes its meaning, raises SCHEMA_VERSION; adding a field does not. `id` is
unique per decision: delivery is at-least-once (a message whose acknowledgement was lost in an
outage is sent again), so a receiver that must count each part once keeps the ids it has seen.
`thresholds_version` is a short hash of the thresholds, scales and normalised threshold in effect
(bundle, `hgad-edge calibrate` and `--threshold` overrides alike): two decisions with the same
version were made against the same thresholds. Torch-free, stdlib only.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import socket
from dataclasses import dataclass
from typing import Any

from hgad_edge import __version__
from hgad_edge.core.redact import redact_url

__all__ = ["FIELDS", "RUN_SCHEMA", "SCHEMA", "SCHEMA_VERSION", "RunContext", "decision_message", "thresholds_version"]

SCHEMA = "hgad-edge.decision"
RUN_SCHEMA = "hgad-edge.run"  # the history's record of a run (bundle, thresholds, calibration); not sent to sinks
SCHEMA_VERSION = 1
FIELDS = {
    "schema": 'always "hgad-edge.decision"',
    "schema_version": "this layout's version (1); raised only when a field is renamed, removed or changes meaning",
    "id": "unique per decision: run/frame (receivers deduplicate on it: delivery is at-least-once)",
    "run": "the run that made it: local start time, process id, run number (names its saved images too)",
    "station": "host name of the machine that ran it",
    "frame": "the frame's index in its source (0, 1, ...)",
    "time": "when the frame was captured, ISO 8601 UTC",
    "timestamp": "the same as seconds since 1970 (UTC)",
    "source": "the image file (relative to the folder), video, camera or stream (credentials masked)",
    "class": "the product class scored (given, or predicted by the model)",
    "class_id": "its index in the bundle's classes",
    "score": "the anomaly score, in the class's own units",
    "score_normalized": "0..1; 0.5 is the class's threshold",
    "decision": '"PASS" or "FAIL"',
    "threshold": "the class's score threshold in effect",
    "thresholds_version": "hash of every class's threshold, scale and the normalised threshold in effect",
    "model_sha256": "sha256 of the model file that scored it (as recorded in the bundle), or null",
    "evidence": "path of the saved overlay image of a FAIL (--save-anomalies), or null",
    "latency_ms": "time to score the frame",
}


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def thresholds_version(thresholds: list[float], scales: list[float], normalized_threshold: float) -> str:
    """12 hex digits naming the decision rule in effect (see the module docstring)."""
    rule = {"thresholds": [float(t) for t in thresholds], "scales": [float(s) for s in scales]}
    rule["normalized_threshold"] = float(normalized_threshold)
    return hashlib.sha256(json.dumps(rule, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class RunContext:
    """What every decision of one run shares: who made it, with which model and thresholds."""

    run: str
    bundle: str
    classes: tuple[str, ...]
    thresholds: tuple[float, ...]
    thresholds_version: str
    model_sha256: str | None
    calibration: dict[str, Any] | None
    backend: str = ""
    precision: str = ""
    source: str = ""
    station: str = ""

    @classmethod
    def of(cls, detector: Any, run: str, source: str = "") -> RunContext:
        """The context of a run with `detector` (a Detector, or anything with its `info` dict)."""
        info = detector.info
        version = thresholds_version(info["thresholds"], info["scales"], info["normalized_threshold"])
        return cls(
            run=run,
            bundle=redact_url(str(info["bundle"])),
            classes=tuple(info["classes"]),
            thresholds=tuple(float(t) for t in info["thresholds"]),
            thresholds_version=version,
            model_sha256=info.get("model_sha256"),
            calibration=info.get("calibration"),
            backend=str(info.get("backend", "")),
            precision=str(info.get("precision", "")),
            source=redact_url(str(source)),
            station=socket.gethostname(),
        )

    def run_record(self) -> dict[str, Any]:
        """The history's row for the run (the calibration record travels here, once per run)."""
        return {
            "schema": RUN_SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "run": self.run,
            "station": self.station,
            "started": _iso(dt.datetime.now(dt.timezone.utc).timestamp()),
            "bundle": self.bundle,
            "source": self.source,
            "backend": self.backend,
            "precision": self.precision,
            "classes": list(self.classes),
            "thresholds": list(self.thresholds),
            "thresholds_version": self.thresholds_version,
            "model_sha256": self.model_sha256,
            "calibration": self.calibration,
            "package_version": __version__,
        }


def decision_message(record: dict[str, Any], context: RunContext, evidence: str | None = None) -> dict[str, Any]:
    """The message for one scored frame: `record` is the run's JSON line (hgad_edge.runtime.app)."""
    class_id = int(record["class_id"])
    threshold = context.thresholds[class_id] if 0 <= class_id < len(context.thresholds) else None
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "id": f"{context.run}/{record['frame']}",
        "run": context.run,
        "station": context.station,
        "frame": int(record["frame"]),
        "time": _iso(record["timestamp"]),
        "timestamp": record["timestamp"],
        "source": record["source"],
        "class": record["class"],
        "class_id": class_id,
        "score": record["score"],
        "score_normalized": record["score_normalized"],
        "decision": "FAIL" if record["anomalous"] else "PASS",
        "threshold": threshold,
        "thresholds_version": context.thresholds_version,
        "model_sha256": context.model_sha256,
        "evidence": None if evidence is None else str(evidence),
        "latency_ms": record.get("latency_ms"),
    }
