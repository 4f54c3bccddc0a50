"""The inspection history: one row per decision, equal to the run's JSON lines, with the model's sha256,
the thresholds and the calibration record of the run; `hgad-edge history DB` filters, exports CSV,
lists runs and prunes; retention by age and size; the same schema on a real PostgreSQL started here
(skips where it is not installed), which goes away mid-run and comes back without losing a row."""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from hgad_edge.cli import main
from hgad_edge.runtime.app import run_app
from hgad_edge.runtime.history import DECISIONS, History, HistoryError, Retention, Store, open_store, query
from hgad_edge.runtime.sinks import RunContext, decision_message
from tests.helpers import free_port, image_folder, make_bundle, read_jsonl

N = 12
CALIBRATION = {"date": "2026-05-12T09:30:00", "policy": "target-fpr", "images": {"count": 200}}


@pytest.fixture(autouse=True)
def spool(tmp_path, monkeypatch):
    monkeypatch.setenv("HGAD_EDGE_SPOOL", str(tmp_path / "spool"))


@pytest.fixture
def bundle(tmp_path):
    return make_bundle(tmp_path / "bundle", calibration=CALIBRATION)


@pytest.fixture
def shots(tmp_path):
    return image_folder(tmp_path / "shots", N)


def assert_rows_are_the_json_lines(rows: list[dict], lines: list[dict]) -> None:
    assert len(rows) == len(lines)
    for row, line in zip(rows, lines):
        assert (row["frame"], row["source"], row["class"], row["class_id"]) == (
            line["frame"],
            line["source"],
            line["class"],
            line["class_id"],
        )
        assert row["score"] == line["score"] and row["score_normalized"] == line["score_normalized"]
        assert row["decision"] == ("FAIL" if line["anomalous"] else "PASS") and row["timestamp"] == line["timestamp"]


def model_sha256(bundle: Path) -> str:
    return json.loads((bundle / "metadata.json").read_text())["models"]["fp32"]["sha256"]


# ---- SQLite -------------------------------------------------------------------------------------
def test_every_decision_is_a_row_equal_to_its_json_line_with_model_and_calibration(bundle, shots, tmp_path):
    out, db = tmp_path / "out.jsonl", tmp_path / "runs.db"
    summary = run_app(bundle, str(shots), headless=True, output_jsonl=out, history=db, save_anomalies=tmp_path / "f")
    assert summary["history"] == {"written": N, "queued": 0, "dropped": 0}
    store = open_store(db)
    rows = query(store)
    assert_rows_are_the_json_lines(rows, read_jsonl(out))
    assert {r["model_sha256"] for r in rows} == {model_sha256(bundle)}
    assert all((r["evidence"] is not None) == (r["decision"] == "FAIL") for r in rows)
    (run,) = store.rows("SELECT * FROM runs")
    assert json.loads(run["calibration"]) == CALIBRATION and json.loads(run["thresholds"]) == [0.41, 0.37]
    assert run["model_sha256"] == model_sha256(bundle) and {r["run"] for r in rows} == {run["run"]}
    store.close()
    with sqlite3.connect(db) as conn:  # readers never block the writer
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_cli_lists_filters_exports_csv_and_lists_runs(bundle, shots, tmp_path):
    out, db = tmp_path / "out.jsonl", tmp_path / "runs.db"
    run_app(bundle, str(shots), headless=True, output_jsonl=out, history=db)
    middle = time.time()
    time.sleep(0.05)
    run_app(bundle, str(shots), "b", headless=True, output_jsonl=out, history=db)
    lines = read_jsonl(out)
    cli = CliRunner()

    def history(*args: str):
        result = cli.invoke(main, ["history", str(db), *args])
        assert result.exit_code == 0, result.output
        return result.output

    def csv_rows(*args: str) -> list[dict]:
        return list(csv.DictReader(io.StringIO(history(*args, "--csv", "-"))))

    assert len(csv_rows()) == 2 * N
    fails = csv_rows("--decision", "fail")
    assert [int(r["frame"]) for r in fails] == [line["frame"] for line in lines if line["anomalous"]]
    assert {r["class"] for r in csv_rows("--class", "b")} == {"b"} and len(csv_rows("--class", "b")) == N
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(middle + 1))  # local time, to the second
    assert len(csv_rows("--until", "1d")) == 0 and len(csv_rows("--since", "1h")) == 2 * N
    assert len(csv_rows("--since", since)) in (0, N)  # the second run, if it started in a later second
    assert len(csv_rows("--limit", "5")) == 5 and csv_rows("--limit", "5")[-1]["frame"] == str(N - 1)
    run_ids = [line.split()[0] for line in history("--runs").splitlines()]
    assert len(run_ids) == 2 and len(csv_rows("--run", run_ids[1])) == N
    assert "calibration 2026-05-12T09:30:00" in history("--runs")
    listing = history("--decision", "PASS", "--limit", "3")
    assert f"3 shown of {N} matching ({N} PASS)" in listing and "FAIL" not in listing.splitlines()[1]
    report = tmp_path / "reports" / "fails.csv"
    cli.invoke(main, ["history", str(db), "--decision", "FAIL", "--csv", str(report)])
    with open(report, newline="") as fh:
        assert list(csv.DictReader(fh)) == fails
    assert list(list(csv.DictReader(io.StringIO(report.read_text())))[0]) == list(DECISIONS)


@pytest.mark.parametrize(
    ("target", "words"),
    [
        ("{tmp}", "is a folder"),
        ("{tmp}/garbage.db", "file is not a database"),
        ("postgresql+nodriver://u:pw@127.0.0.1/db", "nodriver"),
        ("{tmp}/h.db?keep_days=soon", "keep_days"),
    ],
)
def test_bad_history_targets_are_refused_before_the_model_loads(bundle, shots, tmp_path, target, words):
    (tmp_path / "garbage.db").write_text("this is no database " * 100)
    out = tmp_path / "out.jsonl"
    args = ["run", str(bundle), str(shots), "--headless", "--output", str(out)]
    result = CliRunner().invoke(main, [*args, "--history", target.format(tmp=tmp_path)])
    assert result.exit_code == 1 and words in result.output and "pw" not in result.output, result.output
    assert not out.exists() and "Traceback" not in result.output


def test_history_cli_refuses_what_is_not_a_history(tmp_path):
    result = CliRunner().invoke(main, ["history", str(tmp_path / "none.db")])
    assert result.exit_code == 1 and "does not exist" in result.output
    with sqlite3.connect(tmp_path / "other.db") as conn:
        conn.execute("CREATE TABLE t (x)")
    result = CliRunner().invoke(main, ["history", str(tmp_path / "other.db")])
    assert result.exit_code == 1 and "not an hgad-edge history" in result.output
    result = CliRunner().invoke(main, ["history", str(tmp_path / "other.db"), "--since", "last week"])
    assert result.exit_code == 2 and "--since" in result.output


def _messages(n: int, start: float, step: float, run: str = "r1") -> list[dict]:
    context = RunContext(run, "bundle", ("a",), (0.5,), "v1", "0" * 64, None)
    records = [
        {"frame": i, "source": f"{i}.png", "timestamp": start + i * step, "class": "a", "class_id": 0, "score": 0.1,
         "score_normalized": 0.2, "anomalous": False, "latency_ms": 1.0}
        for i in range(n)
    ]  # fmt: skip
    return [context.run_record(), *(decision_message(r, context) for r in records)]


def test_retention_by_age_and_by_rows_and_a_repeated_message_is_kept_once(tmp_path):
    store = Store(tmp_path / "h.db", create=True)
    now = time.time()
    store.write(_messages(10, now - 9 * 86400, 86400))  # one a day, the newest today
    store.write(_messages(10, now - 9 * 86400, 86400)[-3:])  # re-sent after an outage: nothing new
    assert len(query(store)) == 10
    assert store.prune(Retention(days=3.5)) == 6  # 4 left: today and the three days before
    assert [r["frame"] for r in query(store)] == [6, 7, 8, 9]
    assert store.prune(Retention(rows=2)) == 2 and [r["frame"] for r in query(store)] == [8, 9]
    store.write(_messages(5, now, 1, run="r2")[1:])
    assert store.prune(Retention(rows=3)) == 4
    assert {r["run"] for r in query(store)} == {"r2"}
    assert [r["run"] for r in store.rows("SELECT run FROM runs")] == []  # r1's decisions are gone, and so is r1
    store.close()
    with pytest.raises(HistoryError, match="keep_rows"):
        Retention(rows=0)


def test_retention_in_the_target_applies_at_the_end_of_a_run_and_the_cli_prunes(bundle, shots, tmp_path):
    db = tmp_path / "h.db"
    run_app(bundle, str(shots), headless=True, history=f"{db}?keep_rows=5")
    store = open_store(db)
    assert [r["frame"] for r in query(store)] == list(range(N - 5, N))
    store.close()
    result = CliRunner().invoke(main, ["history", str(db), "--keep-rows", "2"])
    assert result.exit_code == 0 and "deleted 3 decisions" in result.output, result.output


# ---- PostgreSQL ---------------------------------------------------------------------------------
def _pg_tool(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


class Postgres:
    """A real PostgreSQL server on a loopback port in a temporary cluster. PostgreSQL refuses to run as
    root, so as root it runs as user `postgres` (runuser), in a folder that user owns (a pytest tmp_path
    lies under a 0700 folder); the socket goes to that folder too (-k), never /var/run."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.folder = Path(tempfile.mkdtemp(prefix="hgad-pg-"))
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.folder, "postgres")
        self.data = self.folder / "data"
        init = [_pg_tool("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
        subprocess.run([*self.as_user, *init], check=True, capture_output=True, timeout=120)
        self.url = f"postgresql://postgres:pw-s3cret@127.0.0.1:{port}/postgres"  # trust: any password passes

    def _ctl(self, *args: str) -> None:
        subprocess.run([*self.as_user, _pg_tool("pg_ctl"), "-D", str(self.data), *args], check=True,
                       capture_output=True, timeout=120)  # fmt: skip

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._ctl("-o", options, "-l", str(self.folder / "server.log"), "-w", "start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "-w", "stop")


@pytest.fixture(scope="module")
def postgres():
    if _pg_tool("initdb") is None or _pg_tool("pg_ctl") is None:
        pytest.skip("needs PostgreSQL (Debian: apt-get install postgresql; .ci/run installs it)")
    pytest.importorskip("sqlalchemy", reason="needs SQLAlchemy and psycopg (pip install 'hgad-edge[line]')")
    pytest.importorskip("psycopg", reason="needs psycopg (pip install 'hgad-edge[line]')")
    server = Postgres(free_port())
    server.start()
    try:
        yield server
    finally:
        try:
            server.stop()
        except subprocess.CalledProcessError:
            pass  # already stopped by a test
        shutil.rmtree(server.folder, ignore_errors=True)


@pytest.mark.slow  # a PostgreSQL cluster is created and restarted (~10 s on two loaded cores)
def test_postgres_history_same_schema_and_no_row_lost_while_the_server_restarts(
    bundle, shots, tmp_path, postgres, caplog
):
    out = tmp_path / "out.jsonl"

    def restart(record: dict) -> None:
        if record["frame"] == 3:
            postgres.stop()
        if record["frame"] == 8:
            time.sleep(1.0)  # the writer meets the outage
            postgres.start()

    with caplog.at_level(logging.WARNING, logger="hgad_edge"):
        summary = run_app(bundle, str(shots), headless=True, output_jsonl=out, history=postgres.url, on_record=restart)
    assert summary["history"]["queued"] == 0 and summary["history"]["written"] >= N
    assert "history postgresql://***@127.0.0.1" in caplog.text and "s3cret" not in caplog.text + json.dumps(summary)
    store = open_store(postgres.url)
    assert_rows_are_the_json_lines(query(store, run=store.rows("SELECT run FROM runs")[-1]["run"]), read_jsonl(out))
    (run,) = store.rows("SELECT * FROM runs")
    assert json.loads(run["calibration"]) == CALIBRATION and run["model_sha256"] == model_sha256(bundle)
    store.close()
    listed = CliRunner().invoke(main, ["history", postgres.url, "--decision", "FAIL"])
    assert listed.exit_code == 0 and f"of {N // 2} matching ({N // 2} FAIL)" in listed.output, listed.output


@pytest.mark.slow  # shares the PostgreSQL cluster above
def test_postgres_down_for_the_whole_run_keeps_its_rows_on_disk_for_the_next_run(bundle, shots, tmp_path, postgres):
    postgres.stop()
    try:
        history = History(postgres.url)  # a server that is away is not a configuration error
        summary = run_app(bundle, str(shots), headless=True, output_jsonl=tmp_path / "o.jsonl", history=history)
        assert summary["history"]["written"] == 0 and summary["history"]["queued"] == N + 1  # and the run's row
    finally:
        postgres.start()
    summary = run_app(bundle, str(shots), headless=True, output_jsonl=tmp_path / "o.jsonl", history=postgres.url)
    assert summary["history"]["written"] == 2 * N and summary["history"]["queued"] == 0
