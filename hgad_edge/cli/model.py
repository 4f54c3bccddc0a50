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


def _grow_flows() -> tuple[str, ...]:
    """--flows' choices: what GrowConfig allows."""
    from hgad_edge.training.config import GrowConfig

    return GrowConfig.FLOWS


def _grow(parent, roots, out, config_path, add, retrain, remove, flows, *scratch_only) -> None:
    """`train --from`: a class change on a trained run (hgad_edge.training.grow), every check before any work."""
    from hgad_edge.training.checkpoint import load_run_config, read_meta
    from hgad_edge.training.config import ConfigError, load_config
    from hgad_edge.training.data import open_roots
    from hgad_edge.training.grow import ClassChange, grow

    names = ("--classes", "--epochs", "--mode", "--seed", "--tile", "--resume")
    given = [n for n, v in zip(names, scratch_only) if v not in (None, False)]
    if parent is None:
        raise click.UsageError(
            "--add-class, --retrain-class, --remove-class and --flows change a trained run: add --from RUN"
        )
    if given:
        raise click.UsageError(
            f"{', '.join(given)} train from scratch; a change with --from keeps the parent's settings"
        )
    try:
        meta = read_meta(parent)
        change = ClassChange(tuple(add), tuple(retrain), tuple(remove))
        after = change.classes_after(meta["classes"])
        cfg = load_run_config(parent)
        if config_path is not None:
            cfg.grow = load_config(overrides={"grow": _grow_section(config_path)}).grow
        if flows is not None:
            cfg.grow.flows = flows
        cfg.validate()
    except ConfigError as exc:
        raise BadConfig(str(exc)) from exc
    except user_errors() as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        dataset = open_roots(list(roots))
        what = ", ".join(f"{k} {', '.join(v)}" for k, v in change.to_json().items() if v)
        click.echo(f"changing {parent} ({', '.join(meta['classes'])}): {what} -> {', '.join(after)}")
        result = grow(parent, dataset, change, out, cfg.grow, log=click.echo)
    except user_errors() as exc:
        raise click.ClickException(str(exc)) from exc
    seconds, data = result.meta["grow_seconds"], " --data ".join(map(str, roots))
    click.echo(
        f"model saved in {out} in {seconds:.0f} s; next: hgad-edge eval {out} --data {data} --classes {','.join(after)}"
    )


def _grow_section(path: Path) -> dict:
    """The `grow` section of a --config file given with --from: the only one a change may set (the rest
    is the parent's model)."""
    import yaml

    from hgad_edge.training.config import ConfigError

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict) or set(data) - {"grow"}:
        other = sorted(set(data) - {"grow"}) if isinstance(data, dict) else [type(data).__name__]
        raise ConfigError(
            f"config file {path} sets {', '.join(map(str, other))}: with --from only its grow section applies "
            "(the model's other settings are the parent's)"
        )
    return data.get("grow") or {}


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
@click.option(
    "--from",
    "parent",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Change the classes of this trained run instead of training from scratch (writes --out, never RUN).",
)
@click.option("--add-class", "add", multiple=True, help="--from: add this class (found under --data); repeatable.")
@click.option("--retrain-class", "retrain", multiple=True, help="--from: retrain this class on its images; repeatable.")
@click.option("--remove-class", "remove", multiple=True, help="--from: remove this class; repeatable.")
@click.option(
    "--flows",
    type=LazyChoice(_grow_flows),
    help="--from: fine-tune the shared flows on the new class with a replay of the others, or keep them frozen "
    "(overrides grow.flows).",
)
def train(roots, classes, out, config_path, epochs, mode, seed, tile, resume, parent, add, retrain, remove, flows):
    """Train one unified HGAD model on every class under the data roots, or change the classes of a
    trained one (--from RUN with --add-class, --retrain-class, --remove-class)."""
    require("train", TRAIN_MODULES, "train")
    if parent is not None or add or retrain or remove or flows:
        _grow(parent, roots, out, config_path, add, retrain, remove, flows, classes, epochs, mode, seed, tile, resume)
        return
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
    from hgad_edge.core.bundle_schema import SchemaError, describe_lineage
    from hgad_edge.training.checkpoint import load_run
    from hgad_edge.training.data import open_roots
    from hgad_edge.training.evaluate import evaluate, metrics_table

    try:
        scorer, _, meta = load_run(run)
        lineage = describe_lineage(meta.get("lineage"))
        dataset = open_roots(list(roots), parse_classes(classes))
        result = evaluate(scorer, dataset, out or run / "eval", pictures=pictures)
    except (*user_errors(), SchemaError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(metrics_table(result))
    click.echo("lineage: " + "\n         ".join(lineage))
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
