"""Publisher: one run's decisions to every sink and to the history, without slowing inference.

Built from sink URLs and a history target (checked at once, before any model loads), opened with
the run's context once the detector is up, fed one record per scored frame, closed at the end;
`close()` returns the delivery counts the run summary prints. `hgad-edge run --sink/--history` and
`run_app(sinks=, history=)` use it; so can your own loop around a Detector:

    with Detector("bundle/") as det, Publisher(["mqtt://broker/line1"], history="runs.db").open_for(det) as line:
        for i, frame in enumerate(frames):
            line.publish_result(det.infer(frame), frame=i, source="cam0")
    print(line.counts)
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hgad_edge.runtime.sinks.base import Sink, SinkError
from hgad_edge.runtime.sinks.delivery import Delivery
from hgad_edge.runtime.sinks.message import RunContext, decision_message, thresholds_version
from hgad_edge.runtime.sinks.registry import parse_sink
from hgad_edge.runtime.sinks.spool import DiskQueue, default_spool

__all__ = ["Publisher", "delivery_summary", "new_run_id"]

_RUNS = itertools.count(1)


def new_run_id() -> str:
    """Local time to the second, process id and run number in the process (as `hgad-edge run` names runs)."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{next(_RUNS)}"


def delivery_summary(summary: dict[str, Any]) -> str:
    """The run summary's words for the sinks and the history (empty without them)."""
    words = ""
    for name, c in (summary.get("sinks") or {}).items():
        words += f", {name}: {c['sent']} sent, {c['queued']} queued, {c['dropped']} dropped"
        words += f", {c['rejected']} rejected" if c["rejected"] else ""
    history = summary.get("history")
    if history:
        words += f", history: {history['written']} written"
        words += f", {history['queued']} queued" if history["queued"] else ""
    return words


class Publisher:
    """Decisions of one run to sinks (URLs or Sink objects) and a history (a path, URL or History)."""

    def __init__(self, sinks: Sequence[str | Sink] = (), history: Any = None, spool: str | Path | None = None) -> None:
        self.spool = Path(spool) if spool is not None else default_spool()
        self.sinks = [s if isinstance(s, Sink) else parse_sink(s) for s in sinks]
        keys = [s.key for s in self.sinks if s.spooled]
        if len(set(keys)) != len(keys):
            raise SinkError("the same sink is given twice; give each receiver once")
        self.history = None
        if history is not None:
            from hgad_edge.runtime.history import History  # the history module imports this package

            self.history = history if isinstance(history, History) else History(history, spool=self.spool)
        self.context: RunContext | None = None
        self._detector: Any = None  # open_for's: its thresholds are followed (live page, server reload)
        self._deliveries: list[Delivery] = []
        self.counts: dict[str, Any] = {}

    def __bool__(self) -> bool:
        return bool(self.sinks) or self.history is not None

    def open(self, context: RunContext) -> Publisher:
        """Queues locked, receivers tried once, threads started; a refused configuration raises SinkError."""
        self.context = context
        try:
            for sink in self.sinks:
                queue = None
                if sink.spooled:
                    queue = DiskQueue(self.spool / f"{sink.key}.queue", sink.queue_max, sink.name)
                delivery = Delivery(sink, queue)
                self._deliveries.append(delivery)
                delivery.start()
            if self.history is not None:
                self.history.open(context)
        except BaseException:
            self.close()
            raise
        return self

    def open_for(self, detector: Any, run: str | None = None, source: str = "") -> Publisher:
        """`open` with the context of a run with `detector` (a new run id unless given)."""
        self.open(RunContext.of(detector, run or new_run_id(), source))
        self._detector = detector
        return self

    def _follow_thresholds(self) -> None:
        """Messages name the thresholds in effect: a change since the last frame (the live page's slider,
        a served bundle recalibrated) gives the context the new ones and their version."""
        info = self._detector.info
        thresholds = tuple(float(t) for t in info["thresholds"])
        if thresholds != self.context.thresholds:
            version = thresholds_version(info["thresholds"], info["scales"], info["normalized_threshold"])
            self.context = dataclasses.replace(self.context, thresholds=thresholds, thresholds_version=version)

    def publish(self, record: dict[str, Any], evidence: str | Path | None = None) -> dict[str, Any]:
        """Hand one scored frame's record (the run's JSON line) to every receiver; returns the message."""
        if self._detector is not None:
            self._follow_thresholds()
        message = decision_message(record, self.context, None if evidence is None else str(evidence))
        for delivery in self._deliveries:
            delivery.put(message)
        if self.history is not None:
            self.history.put(message)
        return message

    def publish_result(
        self,
        result: Any,
        frame: int,
        source: str = "",
        index: int = 0,
        timestamp: float | None = None,
        evidence: str | Path | None = None,
    ) -> dict[str, Any]:
        """`publish` for row `index` of a Detector's Result."""
        record = {
            "frame": frame,
            "source": source,
            "timestamp": round(time.time() if timestamp is None else timestamp, 6),
            "class": result.class_names[index],
            "class_id": int(result.class_pred[index]),
            "score": float(result.score[index]),
            "score_normalized": float(result.score_normalized[index]),
            "anomalous": bool(result.anomalous[index]),
            "latency_ms": round(float(result.latency_ms.get("total", 0.0)), 3),
        }
        return self.publish(record, evidence)

    def queue_depths(self) -> dict[str, int]:
        """Decisions waiting per sink right now, by sink name (the live page's /metrics); any thread."""
        return {delivery.sink.name: delivery.counts["queued"] for delivery in self._deliveries}

    def close(self) -> dict[str, Any]:
        """Flush or persist every queue; {"sinks": {name: counts}, "history": counts} (also `counts`)."""
        if self.counts:
            return self.counts
        sinks = {d.sink.name: d.close() for d in self._deliveries}
        history = self.history.close() if self.history is not None else None
        self.counts = {"sinks": sinks, "history": history}
        return self.counts

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
