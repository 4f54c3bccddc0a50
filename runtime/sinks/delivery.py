"""Delivery: one sink's threads, so that a slow or down receiver never slows inference.

    put(message)  -- the run loop's thread: one append to an in-memory queue (no I/O, no lock held)
    spooler       -- its own thread: JSON-encodes and appends to the sink's DiskQueue, one commit per
                     burst, so a decision is on disk within milliseconds of being made
    sender        -- its own thread: sends from the head of the disk queue in batches, removes what
                     the receiver confirmed, and on an outage waits (0.25 s doubling to 10 s) and tries
                     again, in order; the outage and the recovery are logged once each

A sink without a disk queue (a local file, the SQLite history) has no spooler: the sender takes
batches straight from memory, and a failed batch waits in memory (bounded like a disk queue).

`close()` (end of the run, Ctrl-C, SIGTERM) first puts everything still in memory on disk, then gives
the sender up to the sink's `flush` seconds to empty the queue while the receiver answers (one that
was away is tried once more at once; if that fails too, the wait ends); what is left stays on disk
and the next run with the same sink and spool sends it first. A second Ctrl-C skips the wait.
Counts: sent, queued (left on disk), dropped (the oldest, beyond the queue's bound), rejected
(refused for good by the receiver), backlog (left by an earlier run, sent first), outages.
"""

from __future__ import annotations

import collections
import json
import logging
import queue
import threading
import time
from typing import Any

from hgad_edge.core.redact import redact_text
from hgad_edge.runtime.sinks.base import Sink, SinkDown, SinkError, SinkRejected
from hgad_edge.runtime.sinks.spool import DiskQueue

__all__ = ["Delivery"]

log = logging.getLogger("hgad_edge.runtime")

BACKOFF_S, BACKOFF_MAX_S = 0.25, 10.0
BATCH = 100  # messages per send call
_STOP = object()


class Delivery:
    """Feeds one sink from its own threads; see the module docstring."""

    def __init__(self, sink: Sink, spool: DiskQueue | None, batch: int = BATCH) -> None:
        self.sink, self.spool, self.batch = sink, spool, batch
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: collections.deque[str] = collections.deque()  # unspooled: taken from memory, not yet sent
        self._wake = threading.Event()
        self._stopping = threading.Event()  # no more messages will come
        self._abort = threading.Event()  # stop sending now; what is left stays queued
        self._spooled = threading.Event()  # the spooler has put everything on disk and ended
        self._retry = threading.Event()  # end a backoff wait early (close, abort)
        self._failed_closing = 0  # failed attempts since close() began
        self.down: str | None = None  # why the receiver is away, while it is
        self.sent = self.rejected = self.outages = self._memory_dropped = 0
        self._threads: list[threading.Thread] = []
        self._closed: dict[str, Any] | None = None

    # ---- the run loop's side -----------------------------------------------------------------
    def start(self) -> None:
        """Try the receiver once (a refused configuration stops the run here), then start the threads."""
        try:
            self.sink.connect()
        except SinkDown as err:
            self._went_down(err)
        names = ("sender",) if self.spool is None else ("spooler", "sender")
        for name in names:
            target = self._spool_loop if name == "spooler" else self._send_loop
            thread = threading.Thread(target=target, name=f"hgad-edge {name} {self.sink.name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.spool is None:
            self._spooled.set()

    def put(self, message: dict[str, Any]) -> None:
        """Hand one message over (the caller must not change it afterwards); never blocks."""
        self._inbox.put(message)
        if self.spool is None:
            self._wake.set()

    def close(self) -> dict[str, Any]:
        """Persist, flush for up to the sink's `flush` seconds while it answers, stop; the counts."""
        if self._closed is not None:
            return self._closed
        if not self._threads:  # never started
            self._closed = self._finish()
            return self._closed
        try:
            self._inbox.put(_STOP)
            self._stopping.set()
            self._wake.set()
            if self.spool is not None:
                self._threads[0].join()  # local disk writes only: everything in memory is now on disk
            deadline = time.monotonic() + self.sink.flush_s
            sender = self._threads[-1]
            self._retry.set()  # a receiver that was away gets one more try now
            while sender.is_alive() and time.monotonic() < deadline and not self._failed_closing:
                sender.join(0.05)
        except KeyboardInterrupt:
            log.warning(
                "sink %s: flush skipped (interrupted); the queue stays on disk for the next run", self.sink.name
            )
        finally:
            self._abort.set()
            self._wake.set()
            self._retry.set()
            self._threads[-1].join(self.sink.timeout_s + 1.0)
            self._closed = self._finish()
        return self._closed

    @property
    def counts(self) -> dict[str, Any]:
        queued = len(self.spool) if self.spool is not None else len(self._pending) + self._inbox.qsize()
        dropped = (self.spool.dropped if self.spool is not None else 0) + self._memory_dropped
        backlog = self.spool.backlog if self.spool is not None else 0
        counts = {"sent": self.sent, "queued": queued, "dropped": dropped, "rejected": self.rejected}
        return {**counts, "backlog": backlog, "outages": self.outages}

    def _finish(self) -> dict[str, Any]:
        counts = self.counts
        if self.spool is None and counts["queued"]:
            log.warning("%s: %d messages could not be written: %s", self.sink.name, counts["queued"], self.down)
        try:
            self.sink.close()
        except Exception as err:  # saying goodbye must not lose the counts
            log.debug("closing sink %s: %s", self.sink.name, redact_text(str(err)))
        if self.spool is not None:
            self.spool.close()
            if counts["queued"]:
                log.warning(
                    "sink %s: %d messages stay queued in %s and are sent first by the next run",
                    self.sink.name,
                    counts["queued"],
                    self.spool.path,
                )
        return counts

    # ---- threads -----------------------------------------------------------------------------
    def _spool_loop(self) -> None:
        stop = False
        while not stop:
            burst = [self._inbox.get()]
            while len(burst) < 1000:
                try:
                    burst.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            stop = burst[-1] is _STOP
            bodies = [json.dumps(m, separators=(",", ":")) for m in burst if m is not _STOP]
            try:
                dropped = self.spool.put_many(bodies)
            except Exception as err:  # a full disk: the run goes on, and says what could not be kept
                self._memory_dropped += len(bodies)
                log.error("sink %s: could not queue %d messages on disk: %s", self.sink.name, len(bodies), err)
                dropped = 0
            if dropped:
                log.warning(
                    "sink %s: queue full (%d), dropped the %d oldest", self.sink.name, self.spool.max_messages, dropped
                )
            self._wake.set()
        self._spooled.set()

    def _next_batch(self) -> list[tuple[int, str]]:
        if self.spool is not None:
            return self.spool.peek(self.batch)
        while len(self._pending) < self.batch:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                self._pending.append(json.dumps(item, separators=(",", ":")))
        overflow = len(self._pending) - self.sink.queue_max
        for _ in range(max(overflow, 0)):
            self._pending.popleft()
            self._memory_dropped += 1
        return list(enumerate(list(self._pending)[: self.batch]))

    def _done(self, batch: list[tuple[int, str]], n: int) -> None:
        if n <= 0:
            return
        if self.spool is not None:
            self.spool.ack(batch[n - 1][0], n)
        else:
            for _ in range(n):
                self._pending.popleft()

    def _empty(self) -> bool:
        if self.spool is not None:
            return self._spooled.is_set() and len(self.spool) == 0
        return not self._pending and self._inbox.empty()

    def _send_loop(self) -> None:
        backoff = BACKOFF_S
        while not self._abort.is_set():
            batch = self._next_batch()
            if not batch:
                if self._stopping.is_set() and self._empty():
                    return
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                self.sent += self.sink.send([body for _, body in batch])
                self._done(batch, len(batch))
            except SinkRejected as err:
                self.sent += err.delivered
                self.rejected += 1
                self._done(batch, err.delivered + 1)
                log.warning("sink %s refused a message for good, dropped it: %s", self.sink.name, redact_text(str(err)))
                continue
            except (SinkDown, SinkError, OSError) as err:
                self.sent += getattr(err, "delivered", 0)
                self._done(batch, getattr(err, "delivered", 0))
                self._went_down(err)
                backoff = self._back_off(backoff)
                continue
            except Exception as err:  # a bug in a client library must not end delivery: treat it as an outage
                self._went_down(RuntimeError(f"{type(err).__name__}: {err}"))
                backoff = self._back_off(backoff)
                continue
            if self.down is not None:
                log.warning("sink %s is back; sending its queue in order", self.sink.name)
                self.down = None
            backoff = BACKOFF_S

    def _back_off(self, backoff: float) -> float:
        """Wait before the next try (close() cuts it short); the next wait is twice as long."""
        if self._stopping.is_set():
            self._failed_closing += 1
        self._retry.wait(backoff)
        self._retry.clear()
        return min(backoff * 2, BACKOFF_MAX_S)

    def _went_down(self, err: Exception) -> None:
        if self.down is None:
            self.outages += 1
            self.down = redact_text(str(err))
            queued = "queued on disk" if self.spool is not None else "kept in memory"
            log.warning(
                "sink %s is down (%s); messages are %s and sent in order when it is back",
                self.sink.name,
                self.down,
                queued,
            )
