"""`hgad-edge` command line. Exists in every install; each verb imports its stack lazily and says
which extra to install when it is missing. Domain errors become ClickExceptions only here."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import click

from hgad_edge import __version__
from hgad_edge.bench.engines import BACKENDS as BENCH_BACKENDS
from hgad_edge.bench.engines import DEFAULT_BACKENDS as BENCH_DEFAULT_BACKENDS
from hgad_edge.bench.engines import PRECISIONS as BENCH_PRECISIONS
from hgad_edge.core.trt_common import ENGINE_PRECISIONS, TARGETS
from hgad_edge.runtime.backends import BACKENDS as RUNTIME_BACKENDS
from hgad_edge.runtime.backends import LOCAL_BACKENDS, is_server_url
from hgad_edge.runtime.backends import PRECISIONS as RUNTIME_PRECISIONS
from hgad_edge.training.config import HEAD_MODES

TRAIN_MODULES = ("torch", "timm", "FrEIA", "yaml", "safetensors")
allow_engine_host_code_option = click.option(  # run and serve
    "--allow-engine-host-code",
    is_flag=True,
    help="Load version-compatible TensorRT engines, which run host code embedded in the engine file (only engines you "
    "trust).",
)


def require(extra: str, modules: tuple[str, ...], verb: str) -> None:
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        msg = f"`hgad-edge {verb}` needs {', '.join(missing)}: pip install 'hgad-edge[{extra}]'"
        raise click.ClickException(msg)


def user_errors():
    """The exception types a user can cause (bad data, config, run folder), shown without a traceback."""
    from hgad_edge.training.backbone import BackboneError
    from hgad_edge.training.checkpoint import RunError
    from hgad_edge.training.config import ConfigError
    from hgad_edge.training.data import DataError
    from hgad_edge.training.train import TrainingError

    return (BackboneError, RunError, ConfigError, DataError, TrainingError)


class BadConfig(click.ClickException):
    """A config value the user must fix: exit code 2, like click's own bad-option errors."""

    exit_code = 2


def parse_classes(value: str | None) -> list[str] | None:
    if not value:
        return None
    names = [c.strip() for c in value.split(",") if c.strip()]
    if not names:
        raise click.BadParameter("give class names separated by commas, e.g. --classes bottle,cable")
    return names


def parse_thresholds(items: tuple[str, ...]) -> dict[str, float] | None:
    """`--threshold NAME=VALUE` pairs -> {name: value}; the runtime checks the names against the bundle."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not name.strip() or not math.isfinite(number):
            raise click.BadParameter(
                f"{item!r}: use NAME=VALUE with a finite number, e.g. --threshold bottle=1.25", param_hint="--threshold"
            )
        out[name.strip()] = number
    return out or None


@click.group()
@click.version_option(__version__, prog_name="hgad-edge")
def main() -> None:
    """Unified visual anomaly detection (HGAD): train one model on many products, deploy it to the edge."""


@main.command()
@click.option(
    "--data",
    "roots",
    multiple=True,
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Dataset root (MVTec AD, VisA, BTAD or MVTec3D layout); repeat for several roots.",
)
@click.option("--classes", help="Comma-separated subset of classes (default: every class found).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run folder to create.")
@click.option(
    "--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="YAML config."
)
@click.option("--epochs", type=click.IntRange(min=1), help="Override train.epochs.")
@click.option("--mode", type=click.Choice(tuple(HEAD_MODES)), help="Override head.mode (ablation).")
@click.option("--seed", type=int, help="Override train.seed.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
def train(roots, classes, out, config_path, epochs, mode, seed, resume):
    """Train one unified HGAD model on every class under the data roots."""
    require("train", TRAIN_MODULES, "train")
    from hgad_edge.training.config import ConfigError, load_config
    from hgad_edge.training.data import open_roots
    from hgad_edge.training.train import train as run_training

    if (out / "meta.json").exists() and not resume:
        raise click.ClickException(f"{out} already holds a run: pass --resume to continue it or choose another --out")
    overrides: dict = {}
    if epochs is not None:
        overrides.setdefault("train", {})["epochs"] = epochs
    if seed is not None:
        overrides.setdefault("train", {})["seed"] = seed
    if mode is not None:
        overrides["head"] = {"mode": mode}
    try:
        cfg = load_config(config_path, overrides)  # checked before any image is read
    except ConfigError as exc:
        raise BadConfig(str(exc)) from exc
    try:
        dataset = open_roots(list(roots), parse_classes(classes))
        click.echo(f"training on {len(dataset.classes)} classes: {', '.join(dataset.classes)}")
        run_training(cfg, dataset, out, resume=resume)
    except user_errors() as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"model saved in {out}; next: hgad-edge eval {out} --data {' --data '.join(map(str, roots))}")


@main.command(name="eval")
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--data", "roots", multiple=True, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option("--classes", help="Comma-separated subset of classes.")
@click.option("--pictures", is_flag=True, help="Also write heatmap overlays and histograms (PNG).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Output folder (default RUN/eval).")
def eval_cmd(run, roots, classes, pictures, out):
    """Per-class image AUROC, pixel AUROC, AUPRO, F1-max and operating points (FPR/recall, counts) of a trained run."""
    require("train", TRAIN_MODULES, "eval")
    from hgad_edge.training.checkpoint import load_run
    from hgad_edge.training.data import open_roots
    from hgad_edge.training.evaluate import evaluate, metrics_table

    try:
        scorer, _, _ = load_run(run)
        dataset = open_roots(list(roots), parse_classes(classes))
        result = evaluate(scorer, dataset, out or run / "eval", pictures=pictures)
    except user_errors() as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(metrics_table(result))
    folder = out or run / "eval"
    click.echo(
        f"written: {folder / 'metrics.json'}, {folder / 'metrics.md'}, {folder / 'operating_points'}/<class>.png"
    )


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"), show_default=True)
@click.option(
    "--quick", is_flag=True, help="Smoke test: 1 epoch, a subset of the images, a smaller model (under a minute)."
)
@click.option("--epochs", type=click.IntRange(min=1), help="Training epochs (default 3; 1 with --quick).")
def demo(out, quick, epochs):
    """The whole product on real solar-cell images (PyPI elpv-dataset): train, eval, export, engine, run."""
    require("train", (*TRAIN_MODULES, "onnx", "onnxscript"), "demo")
    require("demo", ("elpv_dataset",), "demo")
    from hgad_edge.core.errors import HgadRuntimeError
    from hgad_edge.demo import run_demo
    from hgad_edge.export.onnx_export import ExportError
    from hgad_edge.runtime.app import AppError
    from hgad_edge.runtime.sources import SourceError

    try:
        run_demo(out, quick=quick, epochs=epochs)
    except (*user_errors(), ExportError, HgadRuntimeError, SourceError, AppError) as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
def info():
    """Versions, extras, backends, GPUs, cameras and the fitting `build --target`: paste it into bug reports."""
    from hgad_edge.info import format_info, gather

    click.echo(format_info(gather()))


@main.command(name="export")
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Bundle folder to write.")
@click.option(
    "--precision",
    "precisions",
    multiple=True,
    type=click.Choice(["fp32", "fp16"]),
    help="Graphs to export (default both: FP32 and the mixed FP16 graph).",
)
@click.option("--no-simplify", is_flag=True, help="Skip onnxslim.")
@click.option(
    "--triton",
    "triton_repo",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also write a Triton model repository of the bundle here (see `hgad-edge triton-repo`).",
)
def export_cmd(run, out, precisions, no_simplify, triton_repo):
    """Fused ONNX graphs (FP32 and mixed FP16) + metadata: the bundle the runtime and `build` use."""
    require("train", (*TRAIN_MODULES, "onnx", "onnxscript"), "export")
    from hgad_edge.export.onnx_export import ExportError, export_bundle
    from hgad_edge.export.trt_check import check_onnx

    try:
        result = export_bundle(run, out, tuple(precisions) or ("fp32", "fp16"), simplify=not no_simplify)
    except (*user_errors(), ExportError) as exc:
        raise click.ClickException(str(exc)) from exc
    for precision, path in result.files.items():
        facts = result.metadata["models"][precision]
        check = check_onnx(path)
        problems = "TensorRT import problems: " + "; ".join(check.problems)
        verdict = f"imports into TensorRT ({check.checker})" if check.ok else problems
        click.echo(f"{path}: opset {facts['opset']}, {facts['nodes']} nodes, {facts['exporter']}; {verdict}")
    if triton_repo is not None:
        _write_triton_repo(out, triton_repo)
    click.echo(f"next: hgad-edge build {out} --precision fp16   (on the target GPU; --target rtx: for RTX GPUs, here)")


def _write_triton_repo(bundle: Path, repo: Path, **options) -> None:
    from hgad_edge.core.errors import HgadRuntimeError
    from hgad_edge.runtime.triton.repository import RepositoryError, write_repository

    try:
        models = write_repository(bundle, repo, **options)
    except (RepositoryError, HgadRuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    for model in models:
        click.echo(f"{model.path}: {model.platform} ({model.precision}, max batch {model.max_batch})")
        for note in model.notes:
            click.echo(f"  note: {note}")
    click.echo(f"serve it on the GPU server: tritonserver --model-repository {repo}   (NVIDIA's Triton container)")
    click.echo(f"then score from a station: hgad-edge run grpc://SERVER:8001/{models[0].name} SOURCE --headless")


@main.command(name="triton-repo")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("repo", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="max_batch_size of the ONNX models (TensorRT models take their engine's profile).",
)
@click.option(
    "--queue-delay-us",
    type=click.IntRange(min=0),
    default=2000,
    show_default=True,
    help="How long the dynamic batcher may hold a request to fill a batch.",
)
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True, help="Model instances per GPU.")
@click.option(
    "--kind",
    type=click.Choice(["gpu", "cpu"]),
    default="gpu",
    show_default=True,
    help="Instance kind of the ONNX models.",
)
@click.option("--prefix", default="hgad", show_default=True, help="Model names: PREFIX_onnx_fp32, PREFIX_trt_fp16, ...")
def triton_repo(bundle, repo, max_batch, queue_delay_us, instances, kind, prefix):
    """Write a Triton Inference Server model repository (ONNX Runtime + TensorRT models) from a bundle."""
    _write_triton_repo(
        bundle, repo, max_batch=max_batch, queue_delay_us=queue_delay_us, instances=instances, kind=kind, prefix=prefix
    )


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@click.option(
    "--host", default="0.0.0.0", show_default=True, help="Address to listen on (127.0.0.1: this machine only)."
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
    """Serve a bundle with an embedded Triton Inference Server (PyTriton) for many camera stations."""
    require("serve", ("pytriton", "tritonclient.grpc"), "serve")
    from hgad_edge.core.errors import HgadRuntimeError
    from hgad_edge.runtime.triton.server import ServeError, ServeOptions, serve_forever

    options = ServeOptions(
        grpc_port,
        http_port,
        metrics_port,
        host,
        max_batch,
        queue_delay_us,
        instances,
        backend,
        precision,
        allow_engine_host_code=allow_engine_host_code,
    )
    try:
        serve_forever(bundle, options, announce=lambda line: click.echo(line))
    except (ServeError, HgadRuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--target",
    type=click.Choice(list(TARGETS)),
    default="tensorrt",
    show_default=True,
    help="; ".join(f"{t.name}: {t.label} for {t.hardware}" for t in TARGETS.values()) + ".",
)
@click.option(
    "--precision",
    type=click.Choice(list(ENGINE_PRECISIONS)),
    default="fp16",
    show_default=True,
    help="int8: --target tensorrt (TensorRT 10) only.",
)
@click.option(
    "--compute-capability",
    "capabilities",
    help="--target rtx only: GPUs the engine is for, e.g. 8.6,8.9 "
    "(default: TensorRT-RTX's portable set, Ampere and later).",
)
@click.option("--batch", default="1:4:8", show_default=True, help="min:opt:max batch of the optimisation profile.")
@click.option("--workspace-mb", type=click.IntRange(min=1), help="Builder workspace limit.")
@click.option(
    "--calib-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Normal images for INT8 calibration.",
)
@click.option("--force", is_flag=True, help="Rebuild even if an up-to-date engine exists.")
def build(bundle, target, precision, capabilities, batch, workspace_mb, calib_dir, force):
    """Build a TensorRT engine from an exported bundle: on this GPU, or ahead of time for RTX GPUs (--target rtx)."""
    from hgad_edge.export.trt_build import BuildError, build_engines

    try:
        parts = tuple(int(b) for b in batch.split(":"))
    except ValueError:
        raise click.BadParameter("use min:opt:max, e.g. 1:4:8", param_hint="--batch") from None
    if len(parts) != 3:
        raise click.BadParameter("use min:opt:max, e.g. 1:4:8", param_hint="--batch")
    if precision == "int8" and calib_dir is None:
        raise click.BadParameter("INT8 needs --calib-dir with normal images", param_hint="--calib-dir")
    gpus = [c.strip() for c in capabilities.split(",") if c.strip()] if capabilities else None
    try:
        engine = build_engines(
            bundle, precision, parts, workspace_mb, calib_dir, force=force, target=target, compute_capabilities=gpus
        )
    except BuildError as exc:
        raise click.ClickException(str(exc)) from exc
    entry = json.loads((bundle / "metadata.json").read_text(encoding="utf-8"))["engines"][engine.name]
    click.echo(
        f"engine: {engine} ({entry.get('size_bytes', 0) / 2**20:.1f} MB, {TARGETS[target].label} "
        f"{entry['trt_version']}, compute capability {', '.join(entry['compute_capabilities'])}, {precision})"
    )


@main.command(name="check-trt")
@click.argument("onnx_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--table",
    "table_only",
    is_flag=True,
    help="Use the hand-kept operator table even if a TensorRT parser is installed.",
)
def check_trt(onnx_file, table_only):
    """Check (CPU) that every node of ONNX_FILE imports into TensorRT: with a real TensorRT / TensorRT-RTX
    parser where one is installed, else with onnx-tensorrt's operator table."""
    from hgad_edge.export.trt_check import check_onnx

    result = check_onnx(onnx_file, use_parser=not table_only)
    click.echo(result.markdown)
    if not result.ok:
        raise click.ClickException("the graph will not build as is: see the errors above")


def _bundle_or_server(ctx, param, value: str):
    """A bundle folder, or an inference server's grpc://host:port[/model] URL."""
    if is_server_url(value):
        return value
    path = Path(value)
    if not path.is_dir():
        raise click.BadParameter(f"{value} is neither a bundle folder nor a server URL (grpc://host:8001)")
    return path


@main.command()
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
    help="Engine/graph precision; int8 needs a TensorRT engine built with --calib-dir.",
)
@click.option("--headless", is_flag=True, help="No window; print JSON lines / summary only.")
@click.option(
    "--output",
    "output_jsonl",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write one JSON line per frame (appended to an existing file; - for stdout).",
)
@click.option(
    "--overwrite", is_flag=True, help="Replace an existing --output file (at the end of the run) instead of appending."
)
@click.option(
    "--save-anomalies",
    type=click.Path(file_okay=False, path_type=Path),
    help="Save overlay + frame of every FAIL (file names carry this run's id).",
)
@click.option("--max-frames", type=click.IntRange(min=1))
@click.option("--reconnect-attempts", type=click.IntRange(min=0), default=5, show_default=True)
@allow_engine_host_code_option
@click.option(
    "--threshold",
    "threshold_overrides",
    multiple=True,
    metavar="NAME=VALUE",
    help="Score threshold for class NAME for this run only (the bundle is not changed); repeatable.",
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
    allow_engine_host_code,
    threshold_overrides,
):
    """Score a camera, stream, video file, image folder (sub-folders too) or glob with a bundle or an
    inference server's grpc:// URL (no torch needed).

    Exits non-zero when no frame could be scored or an anomalous frame could not be saved."""
    from hgad_edge.core.errors import HgadRuntimeError
    from hgad_edge.runtime.app import AppError, run_app, run_problems
    from hgad_edge.runtime.sources import SourceError

    if (source is None) == (camera is None):
        raise click.UsageError("give exactly one of SOURCE or --camera")
    try:
        summary = run_app(
            bundle,
            source if source is not None else camera,
            class_name,
            backend,
            headless,
            output_jsonl,
            save_anomalies,
            max_frames,
            reconnect_attempts,
            precision=precision,
            overwrite=overwrite,
            allow_engine_host_code=allow_engine_host_code,
            thresholds=parse_thresholds(threshold_overrides),
        )
    except (HgadRuntimeError, SourceError, AppError) as exc:
        raise click.ClickException(str(exc)) from exc
    problems = run_problems(summary)
    if problems:
        raise click.ClickException("; ".join(problems))


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


@main.command(name="calibrate")
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
def calibrate_cmd(target, normal, defects, class_name, refit_statistics, undo, backend, **options):
    """New PASS/FAIL threshold for one class of a bundle or run folder, from new normal images.

    A bundle is scored with its own runtime backend (no torch needed) and only its metadata.json
    changes: graphs and TensorRT engines stay valid. The write is atomic; --undo restores."""
    from hgad_edge.core.errors import HgadRuntimeError
    from hgad_edge.core.thresholds import PolicyError
    from hgad_edge.threshold_calibration import CalibrationError, calibrate_target, target_kind, undo_target

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
            record = undo_target(target)
        except errors as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(
            f"{target}: restored the thresholds from before the calibration of {record['date']} ({record['policy']})"
        )
        return
    if normal is None:
        raise click.UsageError("give --normal DIR (a folder of normal images), or --undo")
    policy, param = chosen_policy(options)
    try:
        result = calibrate_target(
            target, normal, policy, param, defects, class_name, backend, refit_statistics=refit_statistics
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


@main.command()
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


if __name__ == "__main__":
    main()
