"""The model verbs, on the training side (the `train` extra): train, eval, and the demo that runs the whole product."""

from __future__ import annotations

from pathlib import Path

import click

from hgad_edge.cli.common import TRAIN_MODULES, BadConfig, LazyChoice, parse_classes, require, user_errors


class TileSize(click.ParamType):
    """`--tile`: a tile side in source pixels (0 = off) or `auto`."""

    name = "SIZE|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value == "auto":
            return value
        try:
            size = int(value)
        except ValueError:
            size = -1
        if size < 0:
            self.fail(f"{value!r} is not a tile size: give source pixels (e.g. 256), 0 for off, or auto", param, ctx)
        return size


def _head_modes() -> tuple[str, ...]:
    """--mode's choices: the head-mode registry (read when train's help or options need it)."""
    from hgad_edge.training.config import HEAD_MODES

    return tuple(HEAD_MODES)


@click.command()
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
@click.option("--mode", type=LazyChoice(_head_modes), help="Override head.mode (ablation).")
@click.option("--seed", type=int, help="Override train.seed.")
@click.option(
    "--tile",
    type=TileSize(),
    help="Train (and later score) on tiles of SIZE source pixels cut from native-resolution frames, each "
    "resized to the model input (SIZE = the input side: native pixels); 0: off, frames resized whole; "
    "auto: tiles when the training images are well above the input size. Overrides tiling.tile.",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
def train(roots, classes, out, config_path, epochs, mode, seed, tile, resume):
    """Train one unified HGAD model on every class under the data roots."""
    require("train", TRAIN_MODULES, "train")
    from hgad_edge.training.config import ConfigError, load_config
    from hgad_edge.training.data import open_roots
    from hgad_edge.training.train import resolve_tiling
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
    if isinstance(tile, int):
        overrides["tiling"] = {"tile": tile}
    try:
        cfg = load_config(config_path, overrides)  # checked before any image is read
    except ConfigError as exc:
        raise BadConfig(str(exc)) from exc
    try:
        dataset = open_roots(list(roots), parse_classes(classes))
        click.echo(f"training on {len(dataset.classes)} classes: {', '.join(dataset.classes)}")
        click.echo(resolve_tiling(cfg, dataset.samples("train"), tile))  # `auto` measures the images
        run_training(cfg, dataset, out, resume=resume, log=click.echo)
    except user_errors() as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"model saved in {out}; next: hgad-edge eval {out} --data {' --data '.join(map(str, roots))}")


@click.command(name="eval")
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


@click.command()
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
