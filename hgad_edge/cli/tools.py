"""The tool verbs: info (what this machine has, for bug reports) and bench (the benchmark report of a run)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from hgad_edge.bench.choices import BACKENDS as BENCH_BACKENDS
from hgad_edge.bench.choices import DEFAULT_BACKENDS as BENCH_DEFAULT_BACKENDS
from hgad_edge.bench.choices import PRECISIONS as BENCH_PRECISIONS
from hgad_edge.cli.common import TRAIN_MODULES, parse_classes, require, user_errors


@click.command()
@click.argument("bundle", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
def info(bundle):
    """Versions, extras, backends, GPUs, cameras and the fitting `build --target`: paste it into bug reports.
    With BUNDLE: also what the bundle holds and its model's lineage (class changes since training)."""
    from hgad_edge.info import format_bundle, format_info, gather

    click.echo(format_info(gather()))
    if bundle is not None:
        from hgad_edge.core.errors import BundleError

        try:
            click.echo(format_bundle(bundle))
        except BundleError as exc:
            raise click.ClickException(str(exc)) from exc


def _csv(kind: type, allowed: tuple[str, ...] | None = None):
    def convert(ctx, param, value):
        items = [v.strip() for v in value.split(",") if v.strip()]
        try:
            out = tuple(kind(v) for v in items)
        except ValueError:
            raise click.BadParameter(f"comma-separated {kind.__name__} values, e.g. 1,8") from None
        bad = [v for v in out if allowed and v not in allowed]
        if bad or not out:
            raise click.BadParameter(f"choose from {', '.join(allowed or ())}" if bad else "give at least one value")
        return out

    return convert


@click.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--data",
    "roots",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Real data root for accuracy per backend (optional, repeatable).",
)
@click.option("--classes", help="Comma-separated classes of --data to score (default: every class of the model).")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("benchmarks/results"),
    show_default=True,
    help="Reports go to OUT/<machine name>/.",
)
@click.option(
    "--backends",
    default=",".join(BENCH_DEFAULT_BACKENDS),
    show_default=True,
    callback=_csv(str, BENCH_BACKENDS),
    help=f"Comma-separated subset of {','.join(BENCH_BACKENDS)}.",
)
@click.option("--precisions", default="fp32,fp16", show_default=True, callback=_csv(str, BENCH_PRECISIONS))
@click.option("--batch", "batches", default="1,8", show_default=True, callback=_csv(int))
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Untimed calls per case.")
@click.option("--iters", type=click.IntRange(min=1), default=20, show_default=True, help="Timed calls per case.")
@click.option("--max-images", type=click.IntRange(min=1), help="Cap test images per class for accuracy.")
@click.option("--no-official", is_flag=True, help="Skip timing the paper's configuration (B6 at 1024, random weights).")
@click.option(
    "--budget-s", type=click.FloatRange(min=0), help="Wall-clock cap; stages past it are recorded as skipped."
)
@click.option(
    "--bundle", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Reuse an exported bundle."
)
def bench(
    run, roots, classes, out, backends, precisions, batches, warmup, iters, max_images, no_official, budget_s, bundle
):
    """FLOPs, latency/throughput per backend and precision, accuracy and drift: report.md/json + plots."""
    require("train", (*TRAIN_MODULES, "onnx"), "bench")
    from hgad_edge.bench import BenchError, run_bench

    try:
        folder = run_bench(
            run,
            out,
            roots,
            backends,
            precisions,
            batches,
            warmup=warmup,
            iters=iters,
            max_images=max_images,
            official=not no_official,
            budget_s=budget_s,
            bundle=bundle,
            classes=parse_classes(classes),
        )
    except (*user_errors(), BenchError) as exc:
        raise click.ClickException(str(exc)) from exc
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    for target in report["targets"]:
        click.echo(f"{target['status']:>4}  {target['target']}")
    if report.get("busy_warning"):
        click.echo(f"WARNING: {report['busy_warning']}")
    click.echo(f"report: {folder / 'report.md'} ({len(report['errors'])} stage error(s))")
