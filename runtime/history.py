"""Inspection history: every decision in a database, for "which parts failed last Tuesday, with
which model and threshold" weeks later (`hgad-edge run --history DB`, read by `hgad-edge history DB`).

Two stores, one schema (`DECISIONS`, `RUNS`; the SQL is written once, with :named parameters that
sqlite3 and SQLAlchemy both take):

* a file path: an embedded SQLite database (stdlib, so the base install has it), WAL journal (the
  CLI reads while a run writes), one writer thread, one commit per batch;
* a postgresql:// URL: a plant-wide PostgreSQL through SQLAlchemy (psycopg 3; extra `[line]`). The
  network can fail, so rows first go to a disk queue beside the sinks' (--spool) and reach the
  server in order when it answers, exactly like a sink's messages. The password: the URL's, or
  libpq's PGPASSWORD.

`decisions` holds one row per message (hgad_edge.runtime.sinks.message: the evidence image path,
the model's sha256, the thresholds' version, ...), unique by the message id, so a batch re-sent
after an outage adds nothing twice; `runs` holds one row per run with the bundle, thresholds and the
`hgad-edge calibrate` record in effect. Retention: `?keep_days=N` and/or `?keep_rows=N` on the
target (`--history runs.db?keep_days=90`) prune at the start and end of a run and every RETENTION_EVERY rows;
`hgad-edge history DB --keep-days N --keep-rows N` prunes by hand. Torch-free.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl, urlencode

from hgad_edge.core.redact import redact_url
from hgad_edge.runtime.sinks.base import LINE_EXTRA, Sink, SinkDown, SinkError
from hgad_edge.runtime.sinks.delivery import Delivery
from hgad_edge.runtime.sinks.message import RUN_SCHEMA, RunContext
from hgad_edge.runtime.sinks.spool import DiskQueue, default_spool

__all__ = [
    "DECISIONS",
    "RUNS",
    "History",
    "HistoryError",
    "Retention",
    "count",
    "open_store",
    "prune",
    "query",
    "query_runs",
    "write_csv",
]

SCHEMA_VERSION = 1
DOUBLE = "DOUBLE PRECISION"
# column -> SQL type, in the message's field order (hgad_edge.runtime.sinks.message.FIELDS)
DECISIONS = {
    "id": "TEXT NOT NULL UNIQUE",
    "run": "TEXT NOT NULL",
    "station": "TEXT",
    "frame": "BIGINT",
    "time": "TEXT",
    "timestamp": DOUBLE,
    "source": "TEXT",
    "class": "TEXT",
    "class_id": "INTEGER",
    "score": DOUBLE,
    "score_normalized": DOUBLE,
    "decision": "TEXT",
    "threshold": DOUBLE,
    "thresholds_version": "TEXT",
    "model_sha256": "TEXT",
    "evidence": "TEXT",
    "latency_ms": DOUBLE,
}
RUNS = {
    "run": "TEXT PRIMARY KEY",
    "station": "TEXT",
    "started": "TEXT",
    "bundle": "TEXT",
    "source": "TEXT",
    "backend": "TEXT",
    "precision": "TEXT",
    "classes": "TEXT",  # JSON
    "thresholds": "TEXT",  # JSON
    "thresholds_version": "TEXT",
    "model_sha256": "TEXT",
    "calibration": "TEXT",  # JSON: the `hgad-edge calibrate` record, or null
    "package_version": "TEXT",
}
RETENTION_EVERY = 5000  # rows written between two retention passes during a run
_POSTGRES = ("postgresql://", "postgres://", "postgresql+")


class HistoryError(SinkError):
    """The history cannot be used as given; the message names the database (masked) and the fix."""


@dataclass(frozen=True)
class Retention:
    """Keep decisions at most `days` old and/or at most `rows` of them (None: no limit)."""

    days: float | None = None
    rows: int | None = None

    def __post_init__(self) -> None:
        if self.days is not None and not self.days > 0:
            raise HistoryError(f"keep_days must be > 0, got {self.days}")
        if self.rows is not None and not self.rows > 0:
            raise HistoryError(f"keep_rows must be > 0, got {self.rows}")

    @property
    def active(self) -> bool:
        return self.days is not None or self.rows is not None


def _q(name: str) -> str:
    return f'"{name}"'  # quoted: "class", "time", "timestamp", "precision" are SQL words


def is_postgres(target: str | Path) -> bool:
    return str(target).startswith(_POSTGRES)


def split_target(target: str | Path) -> tuple[str, Retention]:
    """'runs.db?keep_days=90' -> ('runs.db', Retention(90, None)); the options leave a URL's own query alone."""
    text = str(target)
    base, sep, query = text.partition("?")
    if not sep:
        return text, Retention()
    pairs = parse_qsl(query, keep_blank_values=True)
    ours = {k: v for k, v in pairs if k in ("keep_days", "keep_rows")}
    try:
        retention = Retention(
            float(ours["keep_days"]) if "keep_days" in ours else None,
            int(ours["keep_rows"]) if "keep_rows" in ours else None,
        )
    except ValueError as err:
        raise HistoryError(f"history {redact_url(text)}: keep_days / keep_rows must be numbers ({err})") from err
    rest = [(k, v) for k, v in pairs if k not in ours]
    return (base + ("?" + urlencode(rest) if rest else "")), retention


class Store:
    """One connection to a history database; SQL text with :named parameters runs on either store."""

    def __init__(self, target: str | Path, create: bool) -> None:
        self.target = str(target)
        self.shown = redact_url(self.target)
        self.postgres = is_postgres(self.target)
        self._conn: Any = None
        self._in_transaction = False
        if self.postgres:
            self._open_postgres()
        else:
            self._open_sqlite(Path(self.target), create)
        if create:
            self._create()
        else:
            self._check()

    def _open_sqlite(self, path: Path, create: bool) -> None:
        if path.is_dir():
            raise HistoryError(f"history {path} is a folder; give a database file, e.g. {path / 'history.db'}")
        if not create and not path.is_file():
            raise HistoryError(f"history {path} does not exist (hgad-edge run --history {path} writes one)")
        if create:
            parent = path.parent
            while not parent.exists() and parent != parent.parent:
                parent = parent.parent
            if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
                raise HistoryError(f"cannot write the history {path} (not writable); pick a writable path")
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
            self._conn.execute("PRAGMA journal_mode=WAL")  # readers (the CLI) never block the writer
            self._conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as err:
            raise HistoryError(f"cannot use {path} as the history: {err}; pick another file") from err

    def _open_postgres(self) -> None:
        try:
            import sqlalchemy
        except ImportError as err:
            raise HistoryError(f"a PostgreSQL history needs SQLAlchemy and psycopg: {LINE_EXTRA}") from err
        url = self.target
        for plain in ("postgresql://", "postgres://"):
            if url.startswith(plain):
                url = "postgresql+psycopg://" + url[len(plain) :]  # psycopg 3 (SQLAlchemy's default is psycopg2)
        try:
            self._engine = sqlalchemy.create_engine(url, pool_pre_ping=True)
            self._conn = self._engine.connect()
        except sqlalchemy.exc.ArgumentError as err:
            raise HistoryError(f"bad history URL {self.shown}: {err}") from err
        except sqlalchemy.exc.NoSuchModuleError as err:
            raise HistoryError(f"history {self.shown}: {err}; {LINE_EXTRA}") from err
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as err:
            raise SinkDown(f"cannot reach the history database {self.shown}: {_first_line(err)}") from err

    # ---- SQL ----------------------------------------------------------------------------------
    def rows(self, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        if self.postgres:
            from sqlalchemy import text

            result = [dict(r) for r in self._conn.execute(text(sql), params or {}).mappings()]
            if not self._in_transaction:
                self._conn.rollback()  # end the read's own transaction
            return result
        cursor = self._conn.execute(sql, params or {})
        names = [d[0] for d in cursor.description or ()]
        return [dict(zip(names, row)) for row in cursor.fetchall()]

    def run(self, sql: str, params: dict[str, Any] | list[dict[str, Any]] | None = None) -> int:
        """Execute (a list of parameter dicts: once per dict); returns the rows changed."""
        if self.postgres:
            from sqlalchemy import text

            return self._conn.execute(text(sql), params or {}).rowcount
        if isinstance(params, list):
            return self._conn.executemany(sql, params).rowcount
        return self._conn.execute(sql, params or {}).rowcount

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        if not self.postgres:
            self._conn.execute("BEGIN IMMEDIATE")
        self._in_transaction = True
        try:
            yield
        except BaseException:
            self._conn.rollback() if self.postgres else self._conn.execute("ROLLBACK")
            raise
        finally:
            self._in_transaction = False
        self._conn.commit() if self.postgres else self._conn.execute("COMMIT")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self.postgres:
            self._engine.dispose()

    # ---- schema -------------------------------------------------------------------------------
    def _create(self) -> None:
        seq = "BIGSERIAL PRIMARY KEY" if self.postgres else "INTEGER PRIMARY KEY AUTOINCREMENT"
        columns = ", ".join(f"{_q(n)} {t}" for n, t in DECISIONS.items())
        run_columns = ", ".join(f"{_q(n)} {t}" for n, t in RUNS.items())
        try:
            with self.transaction():
                self.run(f"CREATE TABLE IF NOT EXISTS decisions (seq {seq}, {columns})")
                self.run(f"CREATE TABLE IF NOT EXISTS runs ({run_columns})")
                self.run("CREATE TABLE IF NOT EXISTS hgad_edge_meta (key TEXT PRIMARY KEY, value TEXT)")
                for index, cols in (("time", "timestamp"), ("class", "class"), ("decision", "decision")):
                    self.run(f"CREATE INDEX IF NOT EXISTS decisions_{index} ON decisions ({_q(cols)})")
                self.run(
                    "INSERT INTO hgad_edge_meta (key, value) VALUES ('schema_version', :v) "
                    "ON CONFLICT (key) DO NOTHING",
                    {"v": str(SCHEMA_VERSION)},
                )
        except sqlite3.DatabaseError as err:
            raise HistoryError(f"{self.shown} is not an hgad-edge history ({err}); pick another file") from err
        self._check()

    def _check(self) -> None:
        try:
            version = self.rows("SELECT value FROM hgad_edge_meta WHERE key = 'schema_version'")
        except Exception as err:
            raise HistoryError(f"{self.shown} is not an hgad-edge history ({_first_line(err)})") from err
        if not version or int(version[0]["value"]) != SCHEMA_VERSION:
            found = version[0]["value"] if version else "none"
            raise HistoryError(
                f"{self.shown} has history schema version {found}; this hgad-edge reads {SCHEMA_VERSION}"
            )

    # ---- writing ------------------------------------------------------------------------------
    def write(self, messages: list[dict[str, Any]]) -> None:
        """Runs and decisions of one batch in one transaction; a decision already stored is skipped."""
        runs = [_run_row(m) for m in messages if m.get("schema") == RUN_SCHEMA]
        decisions = [{n: m.get(n) for n in DECISIONS} for m in messages if m.get("schema") != RUN_SCHEMA]
        with self.transaction():
            if runs:
                names = ", ".join(_q(n) for n in RUNS)
                values = ", ".join(f":{n}" for n in RUNS)
                self.run(f"INSERT INTO runs ({names}) VALUES ({values}) ON CONFLICT (run) DO NOTHING", runs)
            if decisions:
                names = ", ".join(_q(n) for n in DECISIONS)
                values = ", ".join(f":{n}" for n in DECISIONS)
                self.run(f'INSERT INTO decisions ({names}) VALUES ({values}) ON CONFLICT ("id") DO NOTHING', decisions)

    def prune(self, retention: Retention) -> int:
        """Delete decisions beyond the retention, and runs left without decisions; returns decisions deleted."""
        deleted = 0
        with self.transaction():
            if retention.days is not None:
                cut = time.time() - retention.days * 86400.0
                deleted += self.run('DELETE FROM decisions WHERE "timestamp" < :cut', {"cut": cut})
            if retention.rows is not None:
                deleted += self.run(
                    "DELETE FROM decisions WHERE seq <= "
                    "(SELECT seq FROM decisions ORDER BY seq DESC LIMIT 1 OFFSET :keep)",
                    {"keep": retention.rows},
                )
            if deleted:
                oldest = self.rows('SELECT MIN("time") AS t FROM decisions')[0]["t"] or "9999"
                self.run(
                    "DELETE FROM runs WHERE started < :oldest AND run NOT IN (SELECT DISTINCT run FROM decisions)",
                    {"oldest": oldest},
                )
        return max(deleted, 0)


def _run_row(message: dict[str, Any]) -> dict[str, Any]:
    row = {n: message.get(n) for n in RUNS}
    for name in ("classes", "thresholds", "calibration"):
        row[name] = json.dumps(message.get(name))
    return row


def _first_line(err: BaseException) -> str:
    return redact_url(str(err).strip().splitlines()[0]) if str(err).strip() else type(err).__name__


def open_store(target: str | Path) -> Store:
    """An existing history, for reading and pruning (the CLI); HistoryError when it cannot be used."""
    base, _ = split_target(target)
    try:
        return Store(base, create=False)
    except SinkDown as err:
        raise HistoryError(str(err)) from err


# ---- the writer -------------------------------------------------------------------------------
class _Writer(Sink):
    """The history as the delivery's receiver: each batch is one transaction."""

    spooled = False
    kind = "HISTORY"

    def __init__(self, target: str, retention: Retention, store: Store | None) -> None:  # noqa: D107
        self.target, self.retention, self.store = target, retention, store
        self.shown = redact_url(target)
        self.queue_max = 1_000_000
        self.flush_s = 30.0  # a local database: let the last batch in
        self.timeout_s = 10.0
        self.written = 0
        self._since_prune = 0

    @property
    def name(self) -> str:
        return f"history {self.shown}"

    @property
    def key(self) -> str:
        return "history-" + hashlib.sha256(self.target.encode()).hexdigest()[:12]

    def connect(self) -> None:
        if self.store is None:
            self.store = Store(self.target, create=True)
            if self.retention.active:
                self.store.prune(self.retention)

    def send(self, payloads: list[str]) -> int:
        try:
            self.connect()
            messages = [json.loads(p) for p in payloads]
            self.store.write(messages)
        except SinkDown:
            raise
        except Exception as err:  # a lost server, a locked or full disk: an outage, retried in order
            self._drop()
            raise SinkDown(f"cannot write the history {self.shown}: {_first_line(err)}") from err
        self.written += sum(m.get("schema") != RUN_SCHEMA for m in messages)
        self._since_prune += len(payloads)
        if self.retention.active and self._since_prune >= RETENTION_EVERY:
            self._since_prune = 0
            self.store.prune(self.retention)
        return len(payloads)

    def _drop(self) -> None:
        store, self.store = self.store, None
        if store is not None:
            with contextlib.suppress(Exception):
                store.close()

    def close(self) -> None:
        if self.store is not None and self.retention.active:
            with contextlib.suppress(Exception):  # the rows are in; pruning can wait for the next run
                self.store.prune(self.retention)
        self._drop()


class History:
    """Where a run's decisions are kept. `History("runs.db")` checks (and creates) the database now,
    before any work; `open(context)` starts the writer thread, `put(message)` hands a decision over
    (never blocks), `close()` writes what is left and returns the counts."""

    def __init__(self, target: str | Path, spool: str | Path | None = None) -> None:
        self.target, self.retention = split_target(target)
        self.shown = redact_url(self.target)
        self.postgres = is_postgres(self.target)
        try:  # a bad path, URL or a missing driver is refused now; a server that is away is an outage
            store = Store(self.target, create=True)
        except SinkDown:
            store = None
        self._writer = _Writer(self.target, self.retention, store)
        if self.postgres:
            self._writer.spooled = True
        self._spool_dir = Path(spool) if spool is not None else default_spool()
        self.delivery: Delivery | None = None

    def open(self, context: RunContext) -> History:
        queue = None
        if self.postgres:
            queue = DiskQueue(self._spool_dir / f"{self._writer.key}.queue", self._writer.queue_max, self._writer.name)
        elif self.retention.active:
            self._writer.store.prune(self.retention)
        self.delivery = Delivery(self._writer, queue)
        self.delivery.start()
        self.delivery.put(context.run_record())
        return self

    def put(self, message: dict[str, Any]) -> None:
        self.delivery.put(message)

    def close(self) -> dict[str, Any]:
        if self.delivery is None:
            self._writer.close()
            return {"written": 0, "queued": 0, "dropped": 0}
        counts = self.delivery.close()
        return {"written": self._writer.written, "queued": counts["queued"], "dropped": counts["dropped"]}


# ---- reading ----------------------------------------------------------------------------------
def _where(**filters: Any) -> tuple[str, dict[str, Any]]:
    """The WHERE clause of the filters that are set (since/until: seconds since 1970)."""
    ops = {"since": ("timestamp", ">="), "until": ("timestamp", "<"), "class_name": ("class", "=")}
    ops.update({"decision": ("decision", "="), "run": ("run", "=")})
    clauses, params = [], {}
    for name, value in filters.items():
        if value is not None:
            column, op = ops[name]
            clauses.append(f"{_q(column)} {op} :{name}")
            params[name] = value
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def query(
    store: Store,
    since: float | None = None,
    until: float | None = None,
    class_name: str | None = None,
    decision: str | None = None,
    run: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Decisions in time order, filtered; only the newest `limit` when given."""
    where, params = _where(since=since, until=until, class_name=class_name, decision=decision, run=run)
    sql = "SELECT " + ", ".join(_q(n) for n in DECISIONS) + " FROM decisions" + where
    if limit is None:
        return store.rows(sql + ' ORDER BY "timestamp", seq', params)
    params["limit"] = int(limit)
    return store.rows(sql + ' ORDER BY "timestamp" DESC, seq DESC LIMIT :limit', params)[::-1]


def count(store: Store, **filters: Any) -> dict[str, int]:
    """{decision: rows} of the decisions the filters (as `query` takes them) select."""
    where, params = _where(**filters)
    rows = store.rows(f"SELECT decision, COUNT(*) AS n FROM decisions{where} GROUP BY decision", params)
    return {row["decision"]: int(row["n"]) for row in rows}


def query_runs(store: Store) -> list[dict[str, Any]]:
    rows = store.rows("SELECT " + ", ".join(_q(n) for n in RUNS) + " FROM runs ORDER BY started")
    for row in rows:
        for name in ("classes", "thresholds", "calibration"):
            row[name] = json.loads(row[name]) if row[name] else None
    return rows


def prune(store: Store, retention: Retention) -> int:
    return store.prune(retention)


def write_csv(rows: list[dict[str, Any]], fh: IO[str]) -> None:
    writer = csv.DictWriter(fh, fieldnames=list(DECISIONS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
