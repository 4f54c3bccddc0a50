"""`hgad-edge demo`: the whole product in one command, on real images that ship with pip.

data -> train -> eval (pictures) -> export (bundle, graph checks) -> engine (where a TensorRT
flavour is installed) -> the torch-free runtime over the test images as a stream, through the same
`run_app` as `hgad-edge run`, counted against the labels -> a summary table and the next commands.

The data are the real electroluminescence solar-cell images of the PyPI package elpv-dataset
(CC BY-NC-SA 4.0), two classes (mono- and polycrystalline) laid out as MVTec AD. Every step prints
one line; the numbers behind them are in files under the demo folder (summary.json, metrics.json,
the JSON lines of the run), never dumped on the console.
"""

from __future__ import annotations

import contextlib
import glob
import json
import random
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from tqdm.auto import tqdm

from hgad_edge.core.files import atomic_dir, atomic_write_json

# Cells with defect probability >= 2/3 are anomalous; 0 is normal; 1/3 is ambiguous and left out.
DEFECT_MIN_PROBABILITY = 2.0 / 3.0
TEST_NORMAL_PER_CLASS = 100
# Of the 369 / 452 defective cells per class: 250 test cells per class (as in realad's elpv), and
# the eval pass in PyTorch (~0.35 s of CPU per image on 2 cores) keeps the demo within 6 minutes.
TEST_DEFECTIVE_PER_CLASS = 150
NORMAL_KIND = "good"  # the test folder of normal cells; every other folder holds defective ones
STEPS = ("data", "train", "eval", "export", "engine", "run")


@dataclass(frozen=True)
class DemoPlan:
    """How much of the data and training a demo run uses."""

    epochs: int
    train_per_class: int | None  # normal training cells per class (None: all of them)
    test_per_kind: int | None  # test cells per class and kind, good / defective (None: all)
    data_dir: str  # folder under the demo folder that holds this plan's data
    config: dict = field(default_factory=dict)  # overrides of the default model config
    precisions: tuple[str, ...] = ("fp32", "fp16")  # graphs exported (fp32 runs on CPU, fp16 builds engines)


FULL = DemoPlan(epochs=3, train_per_class=None, test_per_kind=None, data_dir="data")
# Smoke test of every step in under a minute on 2 cores: a subset, one epoch, a smaller model and
# the FP32 graph only (export, single-threaded, takes ~10 s of CPU per graph and per 2 couplings).
QUICK = DemoPlan(
    epochs=1,
    train_per_class=40,
    test_per_kind=12,
    data_dir="data-quick",
    config={"input_size": [128, 128], "flow": {"coupling_blocks": 2}},
    precisions=("fp32",),
)


# ---- data -------------------------------------------------------------------------------------------
def _elpv_labels(src: Path) -> list[tuple[str, float, str]]:
    rows = []
    for line in (src / "labels.csv").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            rows.append((parts[0], float(parts[1]), parts[2]))
    return rows


def prepare_elpv(
    root: Path, seed: int = 0, train_per_class: int | None = None, test_per_kind: int | None = None
) -> Path:
    """Write <root>/elpv_{mono,poly}/{train/good,test/good,test/defective} (copies, atomically).

    The split is the same for every subset: a subset takes the first cells of each shuffled list.
    <root>/.complete records the split; a folder written for another split is rewritten.
    """
    import elpv_dataset

    stamp = json.dumps(
        {
            "seed": seed,
            "train_per_class": train_per_class,
            "test_per_kind": test_per_kind,
            "test_normal": TEST_NORMAL_PER_CLASS,
            "test_defective": TEST_DEFECTIVE_PER_CLASS,
        }
    )
    done = root / ".complete"
    if done.is_file() and done.read_text().strip() == stamp:
        return root
    src = Path(elpv_dataset.__file__).parent / "data"
    rows = _elpv_labels(src)
    rng = random.Random(seed)
    with atomic_dir(root) as staging:
        for kind in ("mono", "poly"):
            normal = sorted(p for p, prob, t in rows if t == kind and prob == 0.0)
            defect = sorted(p for p, prob, t in rows if t == kind and prob >= DEFECT_MIN_PROBABILITY)
            rng.shuffle(normal)
            rng.shuffle(defect)
            split = {
                f"test/{NORMAL_KIND}": normal[:TEST_NORMAL_PER_CLASS][:test_per_kind],
                "train/good": normal[TEST_NORMAL_PER_CLASS:][:train_per_class],
                "test/defective": defect[:TEST_DEFECTIVE_PER_CLASS][:test_per_kind],
            }
            for sub, files in split.items():
                dst = staging / f"elpv_{kind}" / sub
                dst.mkdir(parents=True, exist_ok=True)
                for rel in files:
                    shutil.copyfile(src / rel, dst / Path(rel).name)
        (staging / ".complete").write_text(stamp + "\n")
    return root


# ---- one line per step ----------------------------------------------------------------------------
def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{seconds:.1f} s"


class _Steps:
    """Prints `[i/n] step  result  (time)` as each step ends; keeps wall and CPU seconds per step."""

    def __init__(self) -> None:
        self.index, self.started = 0, time.perf_counter()
        self.mark = (self.started, time.process_time())
        self.seconds: dict[str, dict[str, float]] = {}

    def done(self, line: str) -> None:
        name, now = STEPS[self.index], (time.perf_counter(), time.process_time())
        self.index += 1
        wall, cpu = now[0] - self.mark[0], now[1] - self.mark[1]
        self.seconds[name] = {"wall": round(wall, 1), "cpu": round(cpu, 1)}
        click.echo(f"[{self.index}/{len(STEPS)}] {name:<6}  {line}  ({_duration(wall)})")
        self.mark = now

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


@contextlib.contextmanager
def _working(desc: str) -> Iterator[None]:
    """A progress line with the elapsed time, for steps that report no progress of their own."""
    bar = tqdm(total=None, desc=desc, bar_format="{desc}: {elapsed}", leave=False)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.5):
            bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join()
        bar.close()


# ---- train, eval, export, engine ------------------------------------------------------------------------
def _reusable(model_dir: Path, epochs: int, data_root: Path) -> bool:
    """A finished model of an earlier demo run, trained after its data were written, same epochs."""
    meta_path = model_dir / "meta.json"
    if not meta_path.is_file() or meta_path.stat().st_mtime < (data_root / ".complete").stat().st_mtime:
        return False
    meta = json.loads(meta_path.read_text())
    return (
        bool(meta.get("calibrated"))
        and meta.get("epochs_done") == epochs
        and meta.get("data_roots") == [str(data_root)]
    )


def _train(dataset, model_dir: Path, data_root: Path, plan: DemoPlan, epochs: int) -> str:
    from hgad_edge.training.config import load_config
    from hgad_edge.training.train import train

    if _reusable(model_dir, epochs, data_root):
        return f"reused the {epochs}-epoch model in {model_dir}"
    cfg = load_config(overrides={**plan.config, "train": {"epochs": epochs}})
    with atomic_dir(model_dir) as staging:  # an interrupted demo keeps the previous model
        train(cfg, dataset, staging)
    return f"one model for {', '.join(dataset.classes)}, {epochs} epoch(s): {model_dir}"


def _evaluate(dataset, model_dir: Path) -> tuple[dict, str]:
    from hgad_edge.training.checkpoint import load_run
    from hgad_edge.training.evaluate import evaluate

    scorer, _, _ = load_run(model_dir)
    result = evaluate(scorer, dataset, model_dir / "eval", pictures=True)
    aurocs = ", ".join(f"{name} {100 * m['image_auroc']:.1f}" for name, m in result["classes"].items())
    return result, f"image AUROC {aurocs}; metrics.json and pictures/ in {model_dir / 'eval'}"


def _export(model_dir: Path, bundle_dir: Path, precisions: tuple[str, ...]) -> str:
    from hgad_edge.export.onnx_export import export_bundle
    from hgad_edge.export.trt_support import check_trt_support

    with _working("export: fused ONNX graphs"):
        result = export_bundle(model_dir, bundle_dir, precisions)  # ExportError if a graph breaks a deployment rule
    problems = [
        f"{path.name}: {'; '.join(r.errors)}" for path in result.files.values() if not (r := check_trt_support(path)).ok
    ]
    graphs = " + ".join(path.name for path in result.files.values())
    trt = "every op has a TensorRT importer" if not problems else "TensorRT support problems: " + " | ".join(problems)
    return f"{bundle_dir}: {graphs}, deployment rules hold, {trt}"


def build_engine(bundle_dir: Path, precision: str) -> tuple[Path | None, str]:
    """The demo's one call into the engine builder: (engine or None, the step's line)."""
    from hgad_edge.info import build_target, gather

    target, why = build_target(gather())
    if target is None:
        return None, "skipped: no TensorRT (`run` uses ONNX Runtime)"
    from hgad_edge.core.engine_records import BuildError
    from hgad_edge.export.trt_build import build_engines

    try:
        with _working(f"engine: TensorRT build ({target})"):
            engine = build_engines(bundle_dir, precision, target=target)
    except BuildError as err:
        return None, f"skipped: {str(err).splitlines()[0]}"
    return engine, f"{engine} ({engine.stat().st_size / 1e6:.1f} MB, {precision}; {why})"


# ---- the runtime as a stream ---------------------------------------------------------------------------
@dataclass
class StreamTally:
    """PASS/FAIL of one class's test stream against the labels (from the folder names)."""

    good: int = 0
    defective: int = 0
    false_rejects: int = 0  # normal cells that FAILed
    caught: int = 0  # defective cells that FAILed
    seconds: float = 0.0  # wall time of the stream, model load excluded

    @property
    def frames(self) -> int:
        return self.good + self.defective

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def add(self, record: dict[str, Any]) -> None:
        defective = Path(record["source"]).parent.name != NORMAL_KIND
        self.defective += defective
        self.good += not defective
        if record["anomalous"]:
            self.caught += defective
            self.false_rejects += not defective

    @property
    def recall(self) -> float | None:
        return self.caught / self.defective if self.defective else None

    @property
    def false_reject_rate(self) -> float | None:
        return self.false_rejects / self.good if self.good else None


def _stream(
    bundle_dir: Path, data_root: Path, classes: list[str], run_dir: Path
) -> tuple[dict[str, StreamTally], str, str]:
    """Every class's test images through `run_app` (headless, JSON lines, FAIL images saved)."""
    from hgad_edge.runtime.app import AppError, run_app, run_problems

    shutil.rmtree(run_dir, ignore_errors=True)  # FAIL images of an earlier demo would mix with these
    tallies, backend = {}, "?"
    for name in classes:
        pattern = glob.escape(str(data_root / name / "test")) + "/*/*"
        tally = StreamTally()
        with tqdm(total=len(glob.glob(pattern)), desc=f"run {name}", unit="frame", leave=False) as bar:

            def on_record(record: dict[str, Any], tally=tally, bar=bar) -> None:
                tally.add(record)
                bar.update()

            summary = run_app(
                bundle_dir,
                pattern,
                class_name=name,
                headless=True,
                output_jsonl=run_dir / f"{name}.jsonl",
                save_anomalies=run_dir / "anomalies" / name,
                print_summary=False,
                on_record=on_record,
            )
        if summary["interrupted"]:
            raise KeyboardInterrupt  # Ctrl-C ends the demo, as it ends `hgad-edge run`
        problems = run_problems(summary)
        if problems:
            raise AppError("; ".join(problems))
        tally.seconds, backend = summary["elapsed_s"], summary["backend"]
        tallies[name] = tally
    frames, seconds = sum(t.frames for t in tallies.values()), sum(t.seconds for t in tallies.values())
    fps = frames / seconds if seconds > 0 else 0.0
    caught, defective = sum(t.caught for t in tallies.values()), sum(t.defective for t in tallies.values())
    rejects, good = sum(t.false_rejects for t in tallies.values()), sum(t.good for t in tallies.values())
    line = (
        f"{frames} frames at {fps:.1f} frames/s ({backend}): {caught}/{defective} defective FAIL, "
        f"{rejects}/{good} good FAIL; JSON lines {run_dir}/<class>.jsonl, FAIL images {run_dir / 'anomalies'}"
    )
    return tallies, backend, line


# ---- summary ---------------------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def summary_rows(metrics: dict, tallies: dict[str, StreamTally]) -> list[dict[str, Any]]:
    rows = []
    for name, t in tallies.items():
        rows.append(
            {
                "class": name,
                "image_auroc": metrics["classes"][name]["image_auroc"],
                "recall": t.recall,
                "caught": t.caught,
                "defective": t.defective,
                "false_reject_rate": t.false_reject_rate,
                "false_rejects": t.false_rejects,
                "good": t.good,
                "fps": t.fps,
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The ten-second table: class, image AUROC, recall and false rejects at the saved threshold, fps."""
    head = ("class", "image AUROC", "recall at threshold", "false rejects", "frames/s")
    cells = [head] + [
        (
            r["class"],
            f"{100 * r['image_auroc']:.1f}",
            f"{r['caught']}/{r['defective']} ({_pct(r['recall'])})",
            f"{r['false_rejects']}/{r['good']} ({_pct(r['false_reject_rate'])})",
            f"{r['fps']:.1f}",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    return "\n".join(
        "  " + "   ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in cells
    )


def next_commands(out: Path, engine_built: bool) -> str:
    """The next commands with this demo's folders filled in."""
    lines = [
        (
            "hgad-edge train --data YOUR_ROOT --out runs/mine",
            "your images: YOUR_ROOT/<class>/train/good, <class>/test/<kind>",
        ),
        (f"hgad-edge run {out / 'bundle'} --camera 0", "PASS/FAIL live on a camera (--headless without a screen)"),
        (f"hgad-edge bench {out / 'model'}", "speed and accuracy per backend on this machine"),
    ]
    if not engine_built:
        lines.append((f"hgad-edge build {out / 'bundle'} --precision fp16", "on the target GPU, for a TensorRT engine"))
    width = max(len(cmd) for cmd, _ in lines)
    return "\n".join(f"  {cmd:<{width}}   # {why}" for cmd, why in lines)


# ---- entry point ------------------------------------------------------------------------------------------
def run_demo(out: Path, quick: bool = False, epochs: int | None = None) -> dict[str, Any]:
    """Run every step (module docstring), print one line each and the summary; return the summary."""
    from hgad_edge.training.data import open_roots

    plan = QUICK if quick else FULL
    epochs = epochs or plan.epochs
    steps = _Steps()
    mode = " --quick" if quick else ""
    click.echo(f"hgad-edge demo{mode}: real solar-cell images, from training to a running detector -> {out}")

    with _working("data: elpv solar cells"):
        data_root = prepare_elpv(
            out / plan.data_dir, train_per_class=plan.train_per_class, test_per_kind=plan.test_per_kind
        )
        dataset = open_roots([data_root])
    n_train, test = len(dataset.samples("train")), dataset.samples("test")
    n_bad = sum(s.label for s in test)
    counts = f"{len(test)} to test ({len(test) - n_bad} good, {n_bad} defective)"
    steps.done(f"{n_train} normal cells to train on, {counts}: {data_root}")

    steps.done(_train(dataset, out / "model", data_root, plan, epochs))
    metrics, line = _evaluate(dataset, out / "model")
    steps.done(line)
    steps.done(_export(out / "model", out / "bundle", plan.precisions))
    precision = "fp16" if "fp16" in plan.precisions else "fp32"  # fp16 engines come from the mixed graph
    engine, line = build_engine(out / "bundle", precision)
    steps.done(line)
    tallies, backend, line = _stream(out / "bundle", data_root, dataset.classes, out / "run")
    steps.done(line)

    rows = summary_rows(metrics, tallies)
    summary = {
        "quick": quick,
        "epochs": epochs,
        "backend": backend,
        "engine": str(engine) if engine else None,
        "seconds": round(steps.elapsed, 1),
        "steps": steps.seconds,
        "classes": rows,
    }
    atomic_write_json(out / "summary.json", summary)
    scored = "Each test image was scored by the torch-free runtime at the saved threshold"
    click.echo(f"\nDone in {_duration(steps.elapsed)}. {scored}:\n")
    click.echo(format_table(rows))
    click.echo(f"\nNext (everything above is in {out}: summary.json, model/eval, bundle, run):")
    click.echo(next_commands(out, engine is not None))
    return summary
