"""The deploy verbs: export a run to a bundle, write a Triton repository, build and check TensorRT engines."""

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
    help="int8: --target tensorrt (TensorRT 10) only.",
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
@click.option(
    "--calib-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Normal images for INT8 calibration.",
)
@click.option("--force", is_flag=True, help="Rebuild even if an up-to-date engine exists.")
def build(bundle, target, precision, capabilities, batch, frame_hw, workspace_mb, calib_dir, force):
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
    if precision == "int8" and calib_dir is None:
        raise click.BadParameter("INT8 needs --calib-dir with normal images", param_hint="--calib-dir")
    gpus = [c.strip() for c in capabilities.split(",") if c.strip()] if capabilities else None
    try:
        engine = build_engines(
            bundle,
            precision,
            parts,
            workspace_mb,
            calib_dir,
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
