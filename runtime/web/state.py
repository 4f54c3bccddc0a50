"""What the live page knows about the run, fed by the run loop at the cost of a few appends per frame.

The run loop's thread calls `LiveState.add` once per scored frame: it puts the frame and its map into
the latest-frame slot (replacing the one before: frames the page has not shown yet are dropped, never
queued), counts the frame for its class, keeps its score among the recent ones and, for a FAIL, keeps
frame and map for the gallery. Nothing is encoded or copied there; the web thread reads under the same
short lock and does the drawing (hgad_edge.runtime.web.render). Frames and maps are the run's own
arrays, which nobody changes after they were scored (Results and frames belong to their caller).
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hgad_edge.core.redact import redact_url

__all__ = ["LATENCY_BUCKETS_S", "MARKS", "LiveState", "Shot"]

# /metrics latency histogram buckets (seconds): an edge GPU scores in milliseconds, a CPU in tens to hundreds
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
MARKS = ("good", "defect")  # what an operator can say about a FAIL: a good part (a false reject), or a real defect


@dataclass
class Shot:
    """One FAIL of the gallery: the run's arrays until the web thread has drawn its thumbnail."""

    seq: int
    record: dict[str, Any]
    image: np.ndarray | None
    amap: np.ndarray | None
    jpeg: bytes | None = None


@dataclass
class _ClassCounts:
    frames: int = 0
    fails: int = 0
    marks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MARKS, 0))


class LiveState:
    """The run as the page shows it; `add` is the run loop's side, everything else the web thread's."""

    def __init__(self, recent: int = 2000, gallery: int = 12) -> None:
        self._lock = threading.Lock()
        self.seq = 0  # frames added so far (also the id of the latest one)
        self.run: dict[str, Any] = {"state": "waiting"}  # run id, source, backend, classes...: set by `begin`
        self._classes: dict[str, _ClassCounts] = {}
        self._recent: deque[tuple[int, int, str, float, bool]] = deque(maxlen=recent)
        self._latest: tuple[int, np.ndarray, np.ndarray, dict[str, Any]] | None = None
        self._gallery: deque[Shot] = deque(maxlen=gallery)
        self._marks: dict[int, tuple[str, str]] = {}  # seq -> (class, mark)
        self.latency_counts = [0] * (len(LATENCY_BUCKETS_S) + 1)  # the last one: above the largest bucket
        self.latency_sum_s = 0.0
        self.started = time.time()

    # ---- the run loop's side ------------------------------------------------------------------
    def begin(self, run: dict[str, Any]) -> None:
        """A run started: its id, source, backend, bundle, classes (what the page's header shows)."""
        with self._lock:
            self.run = {**run, "state": "live"}
            for name in run["classes"]:
                self._classes.setdefault(name, _ClassCounts())

    def add(self, image: np.ndarray, amap: np.ndarray, record: dict[str, Any]) -> None:
        """One scored frame (the run's JSON-line record): constant work, no copy, no encoding."""
        latency_s = record["latency_ms"] / 1e3
        bucket = bisect.bisect_left(LATENCY_BUCKETS_S, latency_s)
        anomalous = record["anomalous"]
        with self._lock:
            self.seq += 1
            self._latest = (self.seq, image, amap, record)
            counts = self._classes.get(record["class"])
            if counts is None:
                counts = self._classes[record["class"]] = _ClassCounts()
            counts.frames += 1
            counts.fails += anomalous
            self._recent.append((self.seq, record["frame"], record["class"], record["score"], anomalous))
            self.latency_counts[bucket] += 1
            self.latency_sum_s += latency_s
            if anomalous:
                self._gallery.append(Shot(self.seq, record, image, amap))

    def end(self) -> None:
        with self._lock:
            self.run = {**self.run, "state": "ended"}

    # ---- the web thread's side ----------------------------------------------------------------
    def latest(self) -> tuple[int, np.ndarray, np.ndarray, dict[str, Any]] | None:
        with self._lock:
            return self._latest

    def undrawn(self, limit: int) -> list[Shot]:
        """Up to `limit` gallery FAILs without a thumbnail yet, newest first (older ones may drop out unseen)."""
        with self._lock:
            return [s for s in reversed(self._gallery) if s.jpeg is None][:limit]

    def drawn(self, shot: Shot, jpeg: bytes) -> None:
        """The thumbnail is there: the full-size frame and map are let go."""
        with self._lock:
            shot.jpeg, shot.image, shot.amap = jpeg, None, None

    def shot(self, seq: int) -> Shot | None:
        with self._lock:
            return next((s for s in self._gallery if s.seq == seq), None)

    def mark(self, seq: int, mark: str | None) -> dict[str, Any]:
        """An operator's word on a FAIL still in the gallery: "good" (a false reject), "defect", or None
        to take it back. KeyError when the frame is no longer in the gallery, ValueError for another word."""
        if mark is not None and mark not in MARKS:
            raise ValueError(f"mark must be one of {', '.join(MARKS)} or null, got {mark!r}")
        with self._lock:
            shot = next((s for s in self._gallery if s.seq == seq), None)
            if shot is None:
                raise KeyError(seq)
            name = shot.record["class"]
            before = self._marks.pop(seq, None)
            if before is not None:
                self._classes[before[0]].marks[before[1]] -= 1
            if mark is not None:
                self._marks[seq] = (name, mark)
                self._classes[name].marks[mark] += 1
            return {"id": seq, "mark": mark}

    def counts(self) -> dict[str, dict[str, Any]]:
        """Per class: frames, fails and the operator's marks (what /metrics exports)."""
        with self._lock:
            return {
                name: {"frames": c.frames, "fails": c.fails, "marks": dict(c.marks)}
                for name, c in self._classes.items()
            }

    def latency(self) -> tuple[list[int], float]:
        with self._lock:
            return list(self.latency_counts), self.latency_sum_s

    def snapshot(self, since: int = 0) -> dict[str, Any]:
        """The page's poll: run, per-class counts with the false-reject estimate, the recent scores after
        `since` (the page keeps its own window), the latest record and the gallery."""
        with self._lock:  # copies of references only: the run loop waits for no dict building
            latest = self._latest
            new = min(max(self.seq - since, 0), len(self._recent))  # the newest `new` entries are after `since`
            recent = list(itertools.islice(reversed(self._recent), new))[::-1]
            shots = [(s.seq, s.record, s.jpeg is not None) for s in reversed(self._gallery)]
            marks = {seq: mark for seq, (_, mark) in self._marks.items()}
            classes = {name: _class_view(c) for name, c in self._classes.items()}
            seq, run = self.seq, dict(self.run)
        return {
            "seq": seq,
            "run": run,
            "classes": classes,
            "latest": None if latest is None else {"id": latest[0], **_public(latest[3])},
            "recent": [
                {"id": i, "frame": frame, "class": name, "score": round(score, 6), "fail": fail}
                for i, frame, name, score, fail in recent
            ],
            "recent_max": self._recent.maxlen,
            "gallery": [
                {"id": i, **_public(record), "mark": marks.get(i), "ready": ready} for i, record, ready in shots
            ],
        }


def _public(record: dict[str, Any]) -> dict[str, Any]:
    """A record as the page may show it: a stream's URL without its user info or password parameters."""
    return {**record, "source": redact_url(record["source"])}


def _class_view(c: _ClassCounts) -> dict[str, Any]:
    """Counts plus the false-reject rate estimated from the marked FAILs: the FAIL rate times the share of
    marked FAILs that were good parts (None until a FAIL is marked)."""
    marked = sum(c.marks.values())
    rate = None
    if marked and c.frames:
        rate = (c.fails / c.frames) * (c.marks["good"] / marked)
    return {"frames": c.frames, "fails": c.fails, "marks": dict(c.marks), "false_reject_rate": rate}
