"""`hgad-edge` command line. Exists in every install; each verb imports its stack lazily and says
which extra to install when it is missing. Domain errors become ClickExceptions only here."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import click

from . import __version__

TRAIN_MODULES = ("torch", "timm", "FrEIA", "yaml", "safetensors")


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
    from .backbone import BackboneError
    from .checkpoint import RunError
    from .config import ConfigError
    from .data import DataError
    from .train import TrainingError

    return (BackboneError, RunError, ConfigError, DataError, TrainingError)


def parse_classes(value: str | None) -> list[str] | None:
    if not value:
        return None
    names = [c.strip() for c in value.split(",") if c.strip()]
    if not names:
        raise click.BadParameter("give class names separated by commas, e.g. --classes bottle,cable")
    return names


@click.group()
@click.version_option(__version__, prog_name="hgad-edge")
def main() -> None:
    """Unified visual anomaly detection (HGAD): train one model on many products, deploy it to the edge."""


@main.command()
@click.option("--data", "roots", multiple=True, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Dataset root (MVTec AD, VisA, BTAD or MVTec3D layout); repeat for several roots.")
@click.option("--classes", help="Comma-separated subset of classes (default: every class found).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run folder to create.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="YAML config.")
@click.option("--epochs", type=click.IntRange(min=1), help="Override train.epochs.")
@click.option("--mode", type=click.Choice(["single", "fixed", "gmm", "mi", "full"]), help="Override head.mode (ablation).")
@click.option("--seed", type=int, help="Override train.seed.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
def train(roots, classes, out, config_path, epochs, mode, seed, resume):
    """Train one unified HGAD model on every class under the data roots."""
    require("train", TRAIN_MODULES, "train")
    from .config import load_config
    from .data import open_roots
    from .train import train as run_training

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
        cfg = load_config(config_path, overrides)
        dataset = open_roots(list(roots), parse_classes(classes))
        click.echo(f"training on {len(dataset.classes)} classes: {', '.join(dataset.classes)}")
        run_training(cfg, dataset, out, resume=resume)
    except user_errors() as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"model saved in {out}; next: hgad-edge eval {out} --data {' --data '.join(map(str, roots))}")


@main.command(name="eval")
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", "roots", multiple=True, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--classes", help="Comma-separated subset of classes.")
@click.option("--pictures", is_flag=True, help="Also write heatmap overlays and histograms (PNG).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Output folder (default RUN/eval).")
def eval_cmd(run, roots, classes, pictures, out):
    """Per-class image AUROC, pixel AUROC, AUPRO and F1-max of a trained run."""
    require("train", TRAIN_MODULES, "eval")
    from .checkpoint import load_run
    from .data import open_roots
    from .evaluate import evaluate, metrics_table

    try:
        scorer, _, _ = load_run(run)
        dataset = open_roots(list(roots), parse_classes(classes))
        result = evaluate(scorer, dataset, out or run / "eval", pictures=pictures)
    except user_errors() as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(metrics_table(result))
    click.echo(f"written: {(out or run / 'eval') / 'metrics.json'}")


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"), show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True)
def demo(out, epochs):
    """Train and evaluate on the real elpv solar-cell data (PyPI elpv-dataset): no data needed."""
    require("train", TRAIN_MODULES, "demo")
    require("demo", ("elpv_dataset",), "demo")
    from .demo import run_demo

    try:
        result = run_demo(out, epochs)
    except user_errors() as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(result["mean"], indent=2))


if __name__ == "__main__":
    main()
