"""The deploy verbs: export a run to a bundle, quantize it (INT8 Q/DQ graphs), write a Triton repository,
build and check TensorRT engines."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click

from hgad_edge.cli.common import TRAIN_MODULES, require, user_errors
from hgad_edge.core.trt_common import ENGINE_PRECISIONS, TARGETS


@click.command(name="export")
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
    "--int8",
    is_flag=True,
    help="Also write the INT8 Q/DQ graphs (ONNX Runtime's and TensorRT's) from one calibration on normal images.",
)
@click.option(
    "--calib-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="--int8: normal images to calibrate on [default: the run's own training images].",
)
@click.option(
    "--triton",
    "triton_repo",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also write a Triton model repository of the bundle here (see `hgad-edge triton-repo`).",
)
@click.option(
    "--keep-calibration",
    "keep_calibration",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="RUN came from `train --from PARENT`: keep the `calibrate` records of this bundle of PARENT for the "
    "classes the change did not touch.",
)
def export_cmd(run, out, precisions, no_simplify, int8, calib_dir, triton_repo, keep_calibration):
    """Fused ONNX graphs (FP32 and mixed FP16; with --int8 also INT8 Q/DQ) + metadata: the bundle the runtime
    and `build` use."""
    require("train", (*TRAIN_MODULES, "onnx", "onnxscript"), "export")
    from hgad_edge.export.int8_calibration import CalibrationError
    from hgad_edge.export.onnx_export import ExportError, export_bundle
    from hgad_edge.export.trt_check import check_onnx

    if calib_dir is not None and not int8:
        raise click.BadParameter("--calib-dir calibrates the INT8 graphs: add --int8", param_hint="--calib-dir")
    try:
        calibration = _calibration_set(calib_dir, run) if int8 else None
        result = export_bundle(
            run,
            out,
            tuple(precisions) or ("fp32", "fp16"),
            simplify=not no_simplify,
            int8=calibration,
            keep_calibration=keep_calibration,
        )
    except (*user_errors(), ExportError, CalibrationError) as exc:
        raise click.ClickException(str(exc)) from exc
    for precision, path in result.files.items():
        facts = result.metadata["models"][precision]
        if "quantized_nodes" in facts:
            what = f"{facts['nodes']} nodes, {facts['quantized_nodes']} quantized (Q/DQ, for {facts['runs_on']})"
        else:
            what = f"opset {facts['opset']}, {facts['nodes']} nodes, {facts['exporter']}"
        if facts.get("runs_on") == "onnxruntime":  # asymmetric Q/DQ: TensorRT refuses it by design (int8_trt is its)
            click.echo(f"{path}: {what}")
            continue
        check = check_onnx(path)
        problems = "TensorRT import problems: " + "; ".join(check.problems)
        verdict = f"imports into TensorRT ({check.checker})" if check.ok else problems
        click.echo(f"{path}: {what}; {verdict}")
    kept = result.metadata.get("calibration", {}).get("kept_from") if keep_calibration is not None else None
    if kept:
        click.echo(f"kept the calibrations of {', '.join(kept['classes'])} from {keep_calibration}")
    if triton_repo is not None:
        _write_triton_repo(out, triton_repo)
    click.echo(f"next: hgad-edge build {out} --precision fp16   (on the target GPU; --target rtx: for RTX GPUs, here)")


def _calibration_set(calib_dir: Path | None, run: Path | None):
    """The INT8 calibration images: a folder of normal images, else the run's own training images."""
    from hgad_edge.export.int8_calibration import CalibrationError, folder_set, run_set

    if calib_dir is not None:
        return folder_set(calib_dir)
    if run is None:
        raise CalibrationError("no calibration images: pass --calib-dir with normal images, or --run RUN")
    return run_set(run)


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--calib-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Normal (defect-free) images to calibrate on.",
)
@click.option(
    "--run",
    "run_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Calibrate on the training images of this run (the one the bundle was exported from).",
)
def quantize(bundle, calib_dir, run_dir):
    """Add INT8 to an exported bundle: model_int8.onnx (ONNX Runtime, CPU) and model_int8_trt.onnx (TensorRT,
    `build --precision int8`), Q/DQ graphs from one calibration on normal images; the head and scoring stay FP32."""
    require("train", ("onnx", *(TRAIN_MODULES if run_dir is not None else ())), "quantize")
    from hgad_edge.export.int8_calibration import CalibrationError
    from hgad_edge.export.int8_quantize import QuantizeError, quantize_bundle

    if (calib_dir is None) == (run_dir is None):
        raise click.UsageError("give the calibration images: either --calib-dir NORMAL_DIR or --run RUN")
    try:
        if run_dir is not None:
            _check_run_of(bundle, run_dir)
        meta = quantize_bundle(bundle, _calibration_set(calib_dir, run_dir))
    except (CalibrationError, QuantizeError) as exc:
        raise click.ClickException(str(exc)) from exc
    record = meta["quantization"]
    calibration = record["calibration"]
    for key in record["graphs"]:
        facts = meta["models"][key]
        click.echo(
            f"{bundle / facts['file']}: {facts['quantized_nodes']} nodes quantized ({facts['activations']} "
            f"activations, for {facts['runs_on']})"
        )
    click.echo(f"calibrated on {calibration['images']} images ({calibration['source']}), {calibration['method']}")
    click.echo(f"next: hgad-edge run {bundle} SOURCE --precision int8 (CPU); hgad-edge build {bundle} --precision int8")


def _check_run_of(bundle: Path, run_dir: Path) -> None:
    """--run must be the run the bundle was exported from (same checkpoint sha256)."""
    from hgad_edge.core.bundle import load_bundle
    from hgad_edge.core.errors import BundleError
    from hgad_edge.core.files import sha256_file
    from hgad_edge.export.int8_calibration import CalibrationError

    try:
        exported = load_bundle(bundle).metadata.get("checkpoint_sha256")
    except BundleError as err:
        raise CalibrationError(str(err)) from err
    weights = run_dir / "model.safetensors"
    if not weights.is_file() or exported != sha256_file(weights):
        raise CalibrationError(f"bundle {bundle} was not exported from run {run_dir} (checkpoint sha256 differs)")


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


@click.command(name="triton-repo")
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


def _frame_hw(ctx, param, value: str | None) -> tuple[int, int] | None:
    """--frame WIDTHxHEIGHT -> (H, W)."""
    if value is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", value)
    if not match or min(int(v) for v in match.groups()) < 1:
        raise click.BadParameter(f"use WIDTHxHEIGHT in pixels, e.g. 2448x2048, got {value!r}")
    width, height = (int(v) for v in match.groups())
    return height, width


@click.command()
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
    help="int8: the bundle's symmetric Q/DQ graph (hgad-edge quantize), strongly typed like fp16.",
)
@click.option(
    "--compute-capability",
    "capabilities",
    help="--target rtx only: GPUs the engine is for, e.g. 8.6,8.9 "
    "(default: TensorRT-RTX's portable set, Ampere and later).",
)
@click.option(
    "--batch",
    help="min:opt:max batch of the optimisation profile [default: 1:4:8; with --frame 1:TILES:TILES].",
)
@click.option(
    "--frame",
    "frame_hw",
    callback=_frame_hw,
    metavar="WIDTHxHEIGHT",
    help="Tiled bundles: the camera frame size; sizes the profile to its tile count (one engine call a frame).",
)
@click.option("--workspace-mb", type=click.IntRange(min=1), help="Builder workspace limit.")
@click.option("--force", is_flag=True, help="Rebuild even if an up-to-date engine exists.")
def build(bundle, target, precision, capabilities, batch, frame_hw, workspace_mb, force):
    """Build a TensorRT engine from an exported bundle: on this GPU, or ahead of time for RTX GPUs (--target rtx)."""
    from hgad_edge.core.engine_records import BuildError
    from hgad_edge.export.trt_build import build_engines

    parts = None
    if batch is not None:
        try:
            parts = tuple(int(b) for b in batch.split(":"))
        except ValueError:
            raise click.BadParameter("use min:opt:max, e.g. 1:4:8", param_hint="--batch") from None
        if len(parts) != 3:
            raise click.BadParameter("use min:opt:max, e.g. 1:4:8", param_hint="--batch")
    gpus = [c.strip() for c in capabilities.split(",") if c.strip()] if capabilities else None
    try:
        engine = build_engines(
            bundle,
            precision,
            parts,
            workspace_mb,
            force=force,
            target=target,
            compute_capabilities=gpus,
            frame_hw=frame_hw,
        )
    except BuildError as exc:
        raise click.ClickException(str(exc)) from exc
    meta = json.loads((bundle / "metadata.json").read_text(encoding="utf-8"))
    entry = meta["engines"][engine.name]
    click.echo(
        f"engine: {engine} ({entry.get('size_bytes', 0) / 2**20:.1f} MB, {TARGETS[target].label} "
        f"{entry['trt_version']}, compute capability {', '.join(entry['compute_capabilities'])}, {precision}, "
        f"batch {':'.join(str(b) for b in entry['batch'])})"
    )
    if frame_hw is not None:
        _echo_tiles(meta, frame_hw, entry["batch"][-1], bundle)


def _echo_tiles(meta: dict, frame_hw: tuple[int, int], max_batch: int, bundle: Path) -> None:
    """How a tiled bundle scores a frame of `frame_hw` with this engine (the bundle was checked by the build)."""
    from hgad_edge.core.tiling import Tiling
    from hgad_edge.export.trt_build import frame_tiles

    tiling = Tiling.from_dict(meta.get("tiling"))
    tiles = frame_tiles(tiling, frame_hw)
    calls = -(-tiles // max_batch)
    click.echo(
        f"frame {frame_hw[1]}x{frame_hw[0]}: {tiles} tiles of {tiling.tile} px, {calls} engine call(s) a frame; "
        f"run it with: hgad-edge run {bundle} SOURCE --max-batch {min(tiles, max_batch)}"
    )


@click.command(name="check-trt")
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
