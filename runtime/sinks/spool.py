"""The bounded on-disk queue in front of each sink: what a down receiver has not confirmed yet.

One SQLite file per sink (`<spool>/<sink key>.queue`, WAL journal, `synchronous=NORMAL`: a commit
survives the process being killed, and the last few commits of a power cut may not). Messages keep
their order by an ever-growing sequence number; the delivery thread reads from the head and removes
only what the receiver confirmed, so a message is sent again rather than lost (at-least-once).
Beyond `max_messages` the OLDEST are removed and counted (`dropped`): on a line, the newest
decisions are the ones a reject gate still acts on.

The file is locked (flock) while a run uses it: two runs sending to the same receiver from the same
spool would interleave one queue, so the second one stops with an error that names the fix. The
file keeps the umask's mode, like every file hgad-edge writes. Torch-free, stdlib only.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from pathlib import Path

from hgad_edge.runtime.sinks.base import SinkError

__all__ = ["DiskQueue", "default_spool"]


def default_spool() -> Path:
    """$HGAD_EDGE_SPOOL, else $XDG_STATE_HOME/hgad-edge/spool (~/.local/state/hgad-edge/spool)."""
    if os.environ.get("HGAD_EDGE_SPOOL"):
        return Path(os.environ["HGAD_EDGE_SPOOL"])
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "hgad-edge" / "spool"


class DiskQueue:
    """A FIFO of text messages in one SQLite file, bounded by count; thread-safe (one lock)."""

    def __init__(self, path: Path | str, max_messages: int, owner: str = "") -> None:
        self.path, self.max_messages = Path(path), int(max_messages)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lockfile = open(f"{self.path}.lock", "a+")  # noqa: SIM115 - held for the queue's life
        except OSError as err:
            raise SinkError(
                f"cannot keep the queue of {owner or self.path} in {self.path.parent}: {err.strerror or err}; "
                "give a writable --spool folder"
            ) from err
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            self._lockfile.close()
            raise SinkError(
                f"the queue of {owner or self.path} ({self.path}) is in use by another hgad-edge run; "
                "give each run its own --spool folder"
            ) from err
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS queue (seq INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL)"
            )
            self._count = self._db.execute("SELECT COUNT(*) FROM queue").fetchone()[0]
        except sqlite3.Error as err:
            self._release()
            raise SinkError(
                f"cannot open the queue {self.path} of {owner}: {err}; delete it or pick another --spool"
            ) from err
        self.backlog = self._count  # what an earlier run left to send
        self.dropped = 0
        self._closed = False

    def __len__(self) -> int:
        return self._count

    def put_many(self, bodies: list[str]) -> int:
        """Append in order (one transaction); returns how many of the oldest were dropped to stay bounded."""
        if not bodies:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT INTO queue (body) VALUES (?)", [(b,) for b in bodies])
                over = self._count + len(bodies) - self.max_messages
                if over > 0:
                    self._db.execute(
                        "DELETE FROM queue WHERE seq IN (SELECT seq FROM queue ORDER BY seq LIMIT ?)", (over,)
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            over = max(over, 0)
            self._count += len(bodies) - over
            self.dropped += over
            return over

    def peek(self, n: int) -> list[tuple[int, str]]:
        """The n oldest (sequence number, body), without removing them."""
        with self._lock:
            if self._closed:
                return []
            return self._db.execute("SELECT seq, body FROM queue ORDER BY seq LIMIT ?", (n,)).fetchall()

    def ack(self, upto_seq: int, delivered: int) -> int:
        """Remove the `delivered` oldest messages, up to and including `upto_seq`: the receiver has them.
        Those the bound dropped while they were being sent did arrive, so they are not counted as dropped."""
        with self._lock:
            if self._closed:
                return 0
            removed = self._db.execute("DELETE FROM queue WHERE seq <= ?", (upto_seq,)).rowcount
            self._count -= removed
            self.dropped -= max(delivered - removed, 0)
            return removed

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._db.close()
            self._release()

    def _release(self) -> None:
        fcntl.flock(self._lockfile, fcntl.LOCK_UN)
        self._lockfile.close()
