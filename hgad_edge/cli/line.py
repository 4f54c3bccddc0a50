"""The verbs of the production line, torch-free: run (score a source), serve (a Triton server for many
stations) and calibrate (a new PASS/FAIL threshold from the line's own images)."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import click

from hgad_edge.cli.common import (
    TRAIN_MODULES,
    allow_engine_host_code_option,
    parse_thresholds,
    require,
    user_errors,
)
from hgad_edge.runtime.backends import BACKENDS as RUNTIME_BACKENDS
from hgad_edge.runtime.backends import LOCAL_BACKENDS, is_server_url
from hgad_edge.runtime.backends import PRECISIONS as RUNTIME_PRECISIONS
from hgad_edge.runtime.options import RuntimeOptions
from hgad_edge.runtime.sinks.registry import SINKS as SINK_SCHEMES


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on: 127.0.0.1 serves this machine only; 0.0.0.0 every network, to anyone who reaches "
    "the ports (inference is not authenticated: a private network, a firewall or an authenticating proxy).",
)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Largest batch the dynamic batcher forms.",
)
@click.option("--queue-delay-us", type=click.IntRange(min=0), default=2000, show_default=True)
@click.option(
    "--instances",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Model instances (runtimes) in the server.",
)
@click.option("--backend", type=click.Choice(LOCAL_BACKENDS), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(RUNTIME_PRECISIONS), default="auto", show_default=True)
@allow_engine_host_code_option
def serve(
    bundle,
    grpc_port,
    http_port,
    metrics_port,
    host,
    max_batch,
    queue_delay_us,
    instances,
    backend,
    precision,
    allow_engine_host_code,
):
    """Serve a bundle with a Triton Inference Server (the nvidia-pytriton wheel's) for many camera stations.

    Ready (/v2/health/ready, the "ready" line) once the model answered its warm-up; the bundle is
    reloaded when its metadata.json changes (a new calibration); stop with Ctrl-C or SIGTERM."""
    require("serve", ("tritonclient.grpc",), "serve")
    from hgad_edge.core.errors import HgadRuntimeError
    from hgad_edge.runtime.triton.server import ServeError, ServeOptions, serve_forever

    try:
        runtime = RuntimeOptions(
            backend, precision=precision, max_batch=max_batch, allow_engine_host_code=allow_engine_host_code
        )
        options = ServeOptions(grpc_port, http_port, metrics_port, host, queue_delay_us, instances, runtime)
        serve_forever(bundle, options, announce=lambda line: click.echo(line))
    except (ServeError, HgadRuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc


def _bundle_or_server(ctx, param, value: str):
    """A bundle folder, or an inference server's grpc://host:port[/model] URL."""
    if is_server_url(value):
        return value
    path = Path(value)
    if not path.is_dir():
        raise click.BadParameter(f"{value} is neither a bundle folder nor a server URL (grpc://host:8001)")
    return path


@click.command()
@click.argument("bundle", callback=_bundle_or_server)
@click.argument("source", required=False)
@click.option("--camera", type=str, help="Camera index or device (same as SOURCE): 0, csi://0, v4l2:///dev/video0.")
@click.option("--class", "class_name", default="auto", show_default=True, help="Product class name, or auto.")
@click.option(
    "--backend",
    type=click.Choice(RUNTIME_BACKENDS),
    default="auto",
    show_default=True,
    help="triton: BUNDLE is a server URL, grpc://host:8001[/model] (auto picks it for such URLs).",
)
@click.option(
    "--precision",
    type=click.Choice(RUNTIME_PRECISIONS),
    default="auto",
    show_default=True,
    help="Engine/graph precision; int8: the bundle's Q/DQ graph or an int8 engine (hgad-edge quantize).",
)
@click.option("--headless", is_flag=True, help="No window; print JSON lines / summary only.")
@click.option(
    "--output",
    "output_jsonl",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write one JSON line per frame (appended to an existing file; - for stdout; a FIFO or device such as "
    "/dev/null is written through, a symlink's target written to).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an existing --output file (at the end of the run, only if a line was written) instead of appending.",
)
@click.option(
    "--save-anomalies",
    type=click.Path(file_okay=False, path_type=Path),
    help="Save overlay + frame of every FAIL (file names carry this run's id).",
)
@click.option("--max-frames", type=click.IntRange(min=1))
@click.option("--reconnect-attempts", type=click.IntRange(min=0), default=5, show_default=True)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Tiled bundles: most tiles per engine call (a TensorRT engine must take it: `hgad-edge build --frame` "
    "prints the value for a frame size). Untiled bundles score one frame per call.",
)
@allow_engine_host_code_option
@click.option(
    "--threshold",
    "threshold_overrides",
    multiple=True,
    metavar="NAME=VALUE",
    help="Score threshold for class NAME for this run only (the bundle is not changed); repeatable.",
)
@click.option(
    "--sink",
    "sinks",
    multiple=True,
    metavar="URL",
    help="Also send each decision to URL, from its own thread, queued on disk while it is down (repeatable): "
    f"{', '.join(f'{s}://' for s in SINK_SCHEMES if s != 'jsonl')} or jsonl:FILE. See docs/line.md.",
)
@click.option(
    "--history",
    metavar="DB",
    help="Keep every decision in DB: a SQLite file (runs.db) or a postgresql:// URL; read it with `hgad-edge history`.",
)
@click.option(
    "--spool",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of the sinks' disk queues (default $HGAD_EDGE_SPOOL or ~/.local/state/hgad-edge/spool).",
)
@click.option(
    "--web",
    "web_bind",
    metavar="[HOST:]PORT",
    help="Serve the live inspection page and Prometheus /metrics on this port (127.0.0.1 unless HOST is given; "
    "0.0.0.0 for every network). Needs the web extra. See docs/web.md.",
)
@click.option(
    "--web-token",
    envvar="HGAD_EDGE_WEB_TOKEN",
    metavar="TOKEN",
    help="Operator token of the page (default: generated and printed at start; also $HGAD_EDGE_WEB_TOKEN): "
    "threshold changes need it, and off loopback looking does too.",
)
def run(
    bundle,
    source,
    camera,
    class_name,
    backend,
    precision,
    headless,
    output_jsonl,
    overwrite,
    save_anomalies,
    max_frames,
    reconnect_attempts,
    max_batch,
    allow_engine_host_code,
    threshold_overrides,
    sinks,
    history,
    spool,
    web_bind,
    web_token,
):
    """Score a camera, stream, video file, image folder (sub-folders too) or glob with a bundle or an
    inference server's grpc:// URL (no torch needed).

    Exits non-zero when no frame could be scored, a result could not be written (full disk, closed
    pipe: the run ends there, after its summary) or an anomalous frame could not be saved."""
    from hgad_edge.core.errors import HgadRuntimeError
    from hgad_edge.runtime.app import AppError, run_app, run_problems
    from hgad_edge.runtime.outputs import OutputError
    from hgad_edge.runtime.sinks import SinkError
    from hgad_edge.runtime.sources import SourceError
    from hgad_edge.runtime.web import WebError

    if (source is None) == (camera is None):
        raise click.UsageError("give exactly one of SOURCE or --camera")
    thresholds = parse_thresholds(threshold_overrides)
    try:
        options = RuntimeOptions(
            backend,
            precision=precision,
            max_batch=max_batch,
            allow_engine_host_code=allow_engine_host_code,
            thresholds=thresholds,
        )
        page = None if web_bind is None else _live_page(web_bind, web_token, bundle)
        with page or contextlib.nullcontext():
            summary = run_app(
                bundle,
                source if source is not None else camera,
                class_name,
                headless,
                output_jsonl,
                save_anomalies,
                max_frames,
                reconnect_attempts,
                options=options,
                overwrite=overwrite,
                sinks=sinks,
                history=history,
                spool=spool,
                web=page,
            )
    except (HgadRuntimeError, SourceError, AppError, OutputError, SinkError, WebError) as exc:
        raise click.ClickException(str(exc)) from exc
    problems = run_problems(summary)
    if problems:
        raise click.ClickException("; ".join(problems))


def _live_page(bind: str, token: str | None, bundle):
    """--web: the page's port bound and served before the model loads; a saved threshold goes through
    `hgad-edge calibrate`'s code (hgad_edge.threshold_calibration), which the runtime does not import."""
    require("web", ("starlette", "uvicorn", "prometheus_client"), "run --web")
    from hgad_edge import threshold_calibration as calibration
    from hgad_edge.runtime.web import LivePage, ThresholdStore, WebOptions

    store = None
    if not is_server_url(bundle):
        store = ThresholdStore(
            functools.partial(calibration.set_threshold, bundle, how="hgad-edge run --web"),
            functools.partial(calibration.undo_target, bundle, wait=False),  # the page never blocks on a calibrate
            functools.partial(calibration.read_bundle_metadata, bundle),
        )
    return LivePage(WebOptions.parse(bind, token), store).start(announce=lambda line: click.echo(line, err=True))


def policy_options(command):
    """One option per threshold policy of the registry: --max, --quantile Q, --target-fpr F, ..."""
    from hgad_edge.core.thresholds import POLICIES

    for name, policy in reversed(POLICIES.items()):
        dest = "policy_" + name.replace("-", "_")
        if policy.param_range is None:
            command = click.option(f"--{name}", dest, is_flag=True, help=policy.help)(command)
        else:
            lo, hi = policy.param_range
            kind = click.FloatRange(lo, hi, min_open=True, max_open=True)
            command = click.option(
                f"--{name}", dest, type=kind, metavar=name.split("-")[-1][0].upper(), help=policy.help
            )(command)
    return command


def chosen_policy(options: dict) -> tuple[str, float | None]:
    from hgad_edge.core.thresholds import POLICIES

    chosen = []
    for name, policy in POLICIES.items():
        value = options["policy_" + name.replace("-", "_")]
        if (policy.param_range is None and value) or (policy.param_range is not None and value is not None):
            chosen.append((name, None if policy.param_range is None else float(value)))
    if len(chosen) != 1:
        flags = ", ".join(f"--{n}" + ("" if p.param_range is None else " X") for n, p in POLICIES.items())
        raise click.UsageError(f"choose exactly one threshold policy: {flags}")
    return chosen[0]


@click.command(name="calibrate")
@click.argument("target", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--normal", type=click.Path(path_type=Path), help="Folder of normal (good) images from the line.")
@click.option(
    "--defects", type=click.Path(path_type=Path), help="Folder of labelled defect images (target-recall, f1-max)."
)
@click.option("--class", "class_name", help="Class the images show (needed when the model knows several).")
@policy_options
@click.option(
    "--refit-statistics",
    is_flag=True,
    help="Run folders only (needs torch): also refit the per-position "
    "normal statistics from the normal images (half of them; the other half sets the threshold).",
)
@click.option("--undo", is_flag=True, help="Restore the thresholds from before the last calibration.")
@click.option(
    "--backend",
    type=click.Choice(RUNTIME_BACKENDS),
    default="auto",
    show_default=True,
    help="Backend scoring a bundle's images (its own runtime).",
)
@click.option(
    "--no-wait",
    is_flag=True,
    help="Refuse at once when another calibrate (or --undo) of TARGET is running, instead of waiting for it.",
)
def calibrate_cmd(target, normal, defects, class_name, refit_statistics, undo, backend, no_wait, **options):
    """New PASS/FAIL threshold for one class of a bundle or run folder, from new normal images.

    A bundle is scored with its own runtime backend (no torch needed) and only its metadata.json
    changes: graphs and TensorRT engines stay valid. The write is atomic; --undo restores. One
    calibrate of a TARGET runs at a time: a second one waits for it (--no-wait: refused)."""
    from hgad_edge.core.errors import HgadRuntimeError
    from hgad_edge.core.thresholds import PolicyError
    from hgad_edge.threshold_calibration import CalibrationError, calibrate_target, target_kind, undo_target

    lock = {"wait": not no_wait, "announce": lambda line: click.echo(line, err=True)}
    served = (
        "a running `hgad-edge serve` of this bundle reloads its thresholds within a few seconds (no restart needed)"
    )

    errors: tuple = (CalibrationError, PolicyError, HgadRuntimeError)
    try:
        kind = target_kind(target)
    except CalibrationError as exc:
        raise click.ClickException(str(exc)) from exc
    if kind == "run":
        require("train", TRAIN_MODULES, "calibrate RUN")
        errors = (*errors, *user_errors())
    if undo:
        try:
            record = undo_target(target, **lock)
        except errors as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(
            f"{target}: restored the thresholds from before the calibration of {record['date']} ({record['policy']})"
        )
        if kind == "bundle":
            click.echo(served)
        return
    if normal is None:
        raise click.UsageError("give --normal DIR (a folder of normal images), or --undo")
    policy, param = chosen_policy(options)
    try:
        result = calibrate_target(
            target, normal, policy, param, defects, class_name, backend, refit_statistics=refit_statistics, **lock
        )
    except errors as exc:
        raise click.ClickException(str(exc)) from exc
    exp = result.record["expected"]
    shown = ", ".join(f"{k} {v:.4f}" for k, v in (("FPR", exp["fpr"]), ("recall", exp["recall"])) if v is not None)
    click.echo(
        f"{target} class {result.class_name}: threshold {result.previous_threshold:.6g} -> {result.threshold:.6g} "
        f"({policy}{'' if param is None else ' ' + str(param)}, {result.record['images']['count']} normal images; "
        f"expected {shown}); undo with: hgad-edge calibrate {target} --undo"
    )
    if kind == "run":
        click.echo(f"re-export to deploy it: hgad-edge export {target} --out BUNDLE")
    else:
        click.echo(served)
