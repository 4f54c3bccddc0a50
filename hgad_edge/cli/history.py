"""`hgad-edge history DB`: read the inspection history `hgad-edge run --history DB` keeps: list and
filter decisions (time, class, decision, run), export them as CSV, list the runs, prune by age or size.
Torch-free; a PostgreSQL history needs the extra `[line]`."""

from __future__ import annotations

import datetime as dt
import re
import sys

import click

_AGO = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(value: str | None, option: str) -> float | None:
    """'2026-05-12', '2026-05-12 14:00' (local time unless it says its zone), or back from now: 90m, 12h, 7d."""
    if value is None:
        return None
    text = value.strip()
    ago = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", text)
    if ago:
        return dt.datetime.now().timestamp() - float(ago.group(1)) * _AGO[ago.group(2)]
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: give a date or time (2026-05-12, '2026-05-12 14:00', 2026-05-12T14:00Z) or an age (12h, 7d)",
            param_hint=option,
        ) from None
    return moment.timestamp()  # a naive time is local time


def _local(timestamp: float | None) -> str:
    if timestamp is None:
        return "?"
    return dt.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _table(rows: list[dict]) -> list[str]:
    header = ("time (local)", "run", "frame", "class", "score_n", "decision", "source", "evidence")
    cells = [
        (
            _local(r["timestamp"]),
            str(r["run"]),
            str(r["frame"]),
            str(r["class"]),
            f"{r['score_normalized']:.3f}" if r["score_normalized"] is not None else "",
            str(r["decision"]),
            str(r["source"]),
            r["evidence"] or "",
        )
        for r in rows
    ]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header) - 1)]
    return ["  ".join(c[:-1][i].ljust(w) for i, w in enumerate(widths)) + "  " + c[-1] for c in [header, *cells]]


@click.command(name="history")
@click.argument("db")
@click.option("--since", help="From this time on: 2026-05-12, '2026-05-12 14:00' (local time), or an age: 12h, 7d.")
@click.option("--until", help="Before this time (same forms as --since).")
@click.option("--class", "class_name", help="Only this product class.")
@click.option("--decision", type=click.Choice(["PASS", "FAIL"], case_sensitive=False), help="Only PASS or FAIL.")
@click.option("--run", "run_id", help="Only this run (its id, as the messages and saved images carry it).")
@click.option(
    "--limit", type=click.IntRange(min=1), help="The newest N matching decisions (listing default: 50; CSV: all)."
)
@click.option(
    "--csv",
    "csv_out",
    type=click.Path(dir_okay=False, allow_dash=True),
    help="Write the matching decisions as CSV to FILE (- for stdout) instead of listing them.",
)
@click.option("--runs", "list_runs", is_flag=True, help="List the runs: bundle, model sha256, thresholds, calibration.")
@click.option("--keep-days", type=click.FloatRange(min=0, min_open=True), help="Delete decisions older than N days.")
@click.option("--keep-rows", type=click.IntRange(min=1), help="Delete all but the newest N decisions.")
def history_cmd(db, since, until, class_name, decision, run_id, limit, csv_out, list_runs, keep_days, keep_rows):
    """List, filter and export the decisions kept by `hgad-edge run --history DB` (a SQLite file or a
    postgresql:// URL); prune it by age or size."""
    from hgad_edge.core.files import atomic_path
    from hgad_edge.runtime import history

    start, end = parse_time(since, "--since"), parse_time(until, "--until")
    try:
        store = history.open_store(db)
    except history.HistoryError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        if keep_days is not None or keep_rows is not None:
            deleted = history.prune(store, history.Retention(keep_days, keep_rows))
            click.echo(
                f"{store.shown}: deleted {deleted} decisions (kept: newer than {keep_days} days / {keep_rows} rows)"
            )
            return
        if list_runs:
            for run in history.query_runs(store):
                calibration = run["calibration"] or {}
                click.echo(
                    f"{run['run']}  {run['started']}  {run['station']}  bundle {run['bundle']}  "
                    f"model {str(run['model_sha256'])[:12]}  thresholds {run['thresholds_version']} "
                    f"{run['thresholds']}  calibration {calibration.get('date', 'none (as exported)')}"
                )
            return
        filters = {"since": start, "until": end, "class_name": class_name, "run": run_id}
        filters["decision"] = decision.upper() if decision else None
        if csv_out is not None:
            rows = history.query(store, **filters, limit=limit)
            if csv_out == "-":
                history.write_csv(rows, sys.stdout)
            else:
                with atomic_path(csv_out) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
                    history.write_csv(rows, fh)
                click.echo(f"{len(rows)} decisions written to {csv_out}", err=True)
            return
        rows = history.query(store, **filters, limit=limit or 50)
        counts = history.count(store, **filters)
        for line in _table(rows) if rows else []:
            click.echo(line)
        total = sum(counts.values())
        split = ", ".join(f"{n} {d}" for d, n in sorted(counts.items()))
        click.echo(f"{len(rows)} shown of {total} matching" + (f" ({split})" if split else ""))
    finally:
        store.close()
