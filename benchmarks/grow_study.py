#!/usr/bin/env python
"""A unified model that grows with the plant: add, retrain and remove one class against training from scratch.

    python benchmarks/grow_study.py --data ../shared/data/realad --out benchmarks/results/grow_study
        [--runs runs/grow_study] [--four RUN] [--parts changes,tune] [--config YAML]

One class is changed in every step: the class with the most training images (realad: magnetic_tile,
714 of 1551). Not for how it scores: it is the costliest class to add or retrain (the most features
to extract and learn) and the one that dominates the shared flows, so both the time target and the
bound on the other classes' drift are tested where they are hardest. With that class as the fourth,
the three-class model is exactly the four-class model without it, so one scratch pair serves all
three changes:

* three: a model of the other classes trained from scratch (the default config); reused when its
  folder under --runs is complete with that config;
* four: the four-class model from scratch (--four RUN reuses one, checked to have the default config
  and these classes; else trained under --runs);
* add: three + the class (`train --from three --add-class`), against four (every class within 1.0
  image / pixel AUROC) and three (no old class losing more than 0.5 image AUROC);
* retrain: four with the class retrained, against four (every class within 1.0; no other class
  losing more than 0.5);
* remove: four without the class, against three (every class within 1.0) and four (no class losing
  more than 0.5);
* each in at most a third of the from-scratch training time of its classes (the scratch run's
  recorded train_seconds, which leaves out its statistics fit; the change's time counts everything:
  features, fine-tune, statistics and the re-check of every class).

Evaluation: every model on the full test sets of its classes (hgad_edge.training.evaluate's
class_metrics on the scorer's outputs; the test images' backbone maps are computed once, since every
model shares the frozen backbone), and on the tuning / report halves (`tuning_half`). `--parts tune`
runs the grow settings grid (flows finetune / frozen, steps, lr) on the add step and scores it on the
tuning half only: what GrowConfig's defaults were chosen by.

Writes OUT/grow_study.json and OUT/grow_study.md (atomic); models under --runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ itself, also when loaded by path
from _bootstrap import bootstrap_package  # noqa: E402

bootstrap_package()

from hgad_edge.core.files import atomic_write_json, atomic_write_text  # noqa: E402

IMAGE_MARGIN, OLD_CLASS_MARGIN, TIME_SHARE = 1.0, 0.5, 1.0 / 3.0  # the targets (AUROC points, time)
TUNE_GRID = (  # (flows, steps, lr): the add step scored on the tuning half
    ("finetune", 300, 5e-4),
    ("frozen", 300, 1e-3),
    ("finetune", 150, 1e-3),
    ("finetune", 300, 1e-3),
)


def chosen_class(dataset) -> str:
    """The class with the most training images (ties: the first by name)."""
    counts = {c: sum(s.class_name == c for s in dataset.samples("train")) for c in dataset.classes}
    return max(sorted(counts), key=lambda c: counts[c])


# ---- models -------------------------------------------------------------------------------------
def complete_run(folder: Path, classes: list[str], config) -> bool:
    """A finished run of exactly these classes with `config` (an HGADConfig; its grow section aside)."""
    from hgad_edge.training.checkpoint import RunError, load_run_config, read_meta

    try:
        meta = read_meta(folder)
        cfg = load_run_config(folder)
    except RunError:
        return False
    same = {**cfg.to_dict(), "grow": None} == {**config.to_dict(), "grow": None}
    return bool(meta.get("calibrated")) and sorted(meta["classes"]) == sorted(classes) and same


def scratch(folder: Path, dataset, classes: list[str], config, log) -> Path:
    import copy

    from hgad_edge.training.train import train

    if complete_run(folder, classes, config):
        log(f"reusing {folder} ({', '.join(classes)}, the study's config)")
        return folder
    if folder.exists() and any(folder.iterdir()):
        raise SystemExit(f"{folder} holds something else than a finished run of {classes} with the config: move it")
    log(f"training {folder} from scratch on {', '.join(classes)}")
    train(copy.deepcopy(config), dataset.select(classes), folder, log=log)
    return folder


def changed(parent: Path, folder: Path, dataset, change, gcfg, log) -> Path:
    """The parent with `change`, reused when `folder` holds that change made with these settings."""
    from hgad_edge.training.checkpoint import RunError, read_meta
    from hgad_edge.training.grow import grow

    try:
        meta = read_meta(folder)
        last = meta["lineage"][-1]
        if last["change"] == change.to_json() and meta["grow"]["config"] == dataclasses.asdict(gcfg):
            log(f"reusing {folder}")
            return folder
    except (RunError, KeyError, IndexError):
        pass
    if folder.exists():
        raise SystemExit(f"{folder} holds another run: move it away")
    grow(parent, dataset, change, folder, gcfg, log=log)
    return folder


# ---- evaluation ---------------------------------------------------------------------------------
class TestSet:
    """Backbone maps of every test image per class (FP32, as evaluation computes them; every model
    shares the frozen backbone), labels, masks and the tuning half, computed once."""

    def __init__(self, dataset, model, cache: Path | None = None) -> None:
        from quality_study import class_truth  # samples, labels, masks and tuning half, as the quality study has them

        feats = self._features(dataset, model, cache)
        truth = class_truth(dataset, tuple(model.cfg.input_size))
        self.by_class = {name: {**truth[name], "feats": feats[name]} for name in dataset.classes}

    @staticmethod
    def _features(dataset, model, cache: Path | None) -> dict:
        """Per class, per level (n, C, h, w): kept in `cache` (a .pt file) keyed by the backbone, input
        size and test files, so a rerun of the study does not extract them again."""
        import hashlib
        import json

        import torch

        from hgad_edge.training.batching import iter_tile_batches

        test = dataset.samples("test")
        key = json.dumps(
            [model.cfg.backbone.__dict__, list(model.cfg.input_size), [str(s.path) for s in test]], default=str
        )
        key = hashlib.sha256(key.encode()).hexdigest()
        if cache is not None and cache.is_file():
            data = torch.load(cache, weights_only=True)
            if data.get("key") == [key]:
                return data["feats"]
        feats = {}
        for name in dataset.classes:
            per_level: list[list[torch.Tensor]] = [[] for _ in model.levels]
            for batch in iter_tile_batches([s for s in test if s.class_name == name], model.cfg.input_size, 16, None):
                for k, f in enumerate(model.features(model.preprocess(batch.tiles))):
                    per_level[k].append(f)
            feats[name] = [torch.cat(x) for x in per_level]
        if cache is not None:
            torch.save({"key": [key], "feats": feats}, cache)
        return feats

    def cached_metrics(self, folder: Path, cache: Path, halves: tuple[str, ...] = ("full", "tune", "report")) -> dict:
        """`metrics` of the run in `folder`, kept in the JSON file `cache` by the model's sha256 (a rerun
        of the study scores only the models it has not scored)."""
        import json

        from hgad_edge.core.files import sha256_file
        from hgad_edge.training.checkpoint import load_run

        key = f"{sha256_file(folder / 'model.safetensors')}:{','.join(halves)}"
        known = json.loads(cache.read_text()) if cache.is_file() else {}
        if key not in known:
            known[key] = self.metrics(load_run(folder)[0], halves)
            atomic_write_json(cache, known)
        return known[key]

    def metrics(self, scorer, halves: tuple[str, ...] = ("full", "tune", "report")) -> dict:
        """Per class of the model: image / pixel AUROC (and the rest of class_metrics) per half."""
        import torch

        from hgad_edge.training.evaluate import ClassPredictions, class_metrics, subset

        out = {}
        for y, name in enumerate(scorer.model.class_names):
            t = self.by_class[name]
            rows: dict[str, list[np.ndarray]] = {}
            n = len(t["samples"])
            with torch.no_grad():
                for i in range(0, n, 16):
                    cls = torch.full((min(16, n - i),), y, dtype=torch.long)
                    for key, val in scorer.evaluate_features([f[i : i + 16] for f in t["feats"]], cls).items():
                        rows.setdefault(key, []).append(val.numpy())
            cat = {k: np.concatenate(v) for k, v in rows.items()}
            pred = ClassPredictions(
                name, t["samples"], t["labels"], cat["score"], cat["score_normalized"], cat["auto_class"],
                cat["min_loglik"], cat["anomaly_map"].astype(np.float32), t["masks"],
            )  # fmt: skip
            keep = {"full": np.ones(n, bool), "tune": t["tune"], "report": ~t["tune"]}
            threshold = float(scorer.threshold[y])
            out[name] = {h: _auroc(class_metrics(subset(pred, keep[h]), y, threshold)) for h in halves}
        return out


def _auroc(m: dict) -> dict:
    return {
        "image_auroc": 100 * m["image_auroc"],
        "pixel_auroc": None if m.get("pixel_auroc") is None else 100 * m["pixel_auroc"],
        "fpr_at_threshold": 100 * m["threshold_fpr"],
        "tpr_at_threshold": 100 * m["threshold_tpr"],
    }


# ---- targets ------------------------------------------------------------------------------------
def check(step: dict, metrics: dict, half: str = "full") -> dict:
    """PASS/MISS of one change: every class within IMAGE_MARGIN of the scratch model of the same
    classes (image and pixel), no unchanged class losing more than OLD_CLASS_MARGIN image AUROC against
    the parent, time within TIME_SHARE of the scratch training."""
    mine, ref, parent = metrics[step["model"]], metrics[step["scratch"]], metrics[step["parent"]]
    worst_gap, worst_loss = [], []
    for c in mine:
        for key in ("image_auroc", "pixel_auroc"):
            a, b = mine[c][half][key], ref[c][half][key]
            if a is not None and b is not None:
                worst_gap.append((b - a, c, key))
        if c in parent and c != step["class"]:
            worst_loss.append((parent[c][half]["image_auroc"] - mine[c][half]["image_auroc"], c))
    gap, loss = max(worst_gap), max(worst_loss)
    share = step["seconds"] / step["scratch_seconds"]
    out = {
        "scratch_gap": {"points": gap[0], "class": gap[1], "metric": gap[2], "pass": gap[0] <= IMAGE_MARGIN},
        "old_class_loss": {"points": loss[0], "class": loss[1], "pass": loss[0] <= OLD_CLASS_MARGIN},
        "time": {"share": share, "pass": share <= TIME_SHARE},
    }
    if step.get("scratch_at_own_speed"):
        own = step["seconds"] / step["scratch_at_own_speed"]
        out["time_at_own_speed"] = {"share": own, "pass": own <= TIME_SHARE}
    return out


def scratch_at_own_speed(scratch_meta: dict, cfg, timing: dict, steps: int, frozen: bool) -> float | None:
    """What the scratch training would take at the change's own measured speed (seconds per step and
    per feature image, on the same model and batch size): the time target on equal terms when the
    scratch run was timed on a less (or more) loaded machine. None without fine-tuned flows (no steps,
    or frozen flows: their steps cost less than a training step)."""
    if not steps or not timing.get("feature_images") or frozen:
        return None
    images = sum(scratch_meta["n_train"].values())
    scratch_steps = cfg.train.epochs * -(-images // cfg.train.batch_size)
    return scratch_steps * timing["fine_tune"] / steps + images * timing["features"] / timing["feature_images"]


# ---- report -------------------------------------------------------------------------------------
def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def _own_speed(step: dict, targets: dict) -> str:
    own = targets.get("time_at_own_speed")
    if own is None:
        return "n/a (flows not trained)"
    verdict = "PASS" if own["pass"] else "MISS"
    return f"{verdict} {step['seconds']:.0f} / {step['scratch_at_own_speed']:.0f} s = {own['share']:.2f}"


def report_md(result: dict) -> str:
    classes, models = result["classes"], result["models"]
    lines = [
        "# Growing a unified model: add, retrain, remove one class",
        "",
        f"Data: `{result['data']}`. Changed class: **{result['class']}** ({result['class_reason']}).",
        f"Grow settings: {result['grow_config']}. Machine: {result['machine']}.",
        "",
        "## Image / pixel AUROC per class (full test sets)",
        "",
        "| model | " + " | ".join(classes) + " | mean image | time s |",
        "|---|" + "---|" * (len(classes) + 2),
    ]
    for name, m in models.items():
        cells = []
        for c in classes:
            row = m["metrics"].get(c)
            cells.append(
                "-" if row is None else f"{_pct(row['full']['image_auroc'])} / {_pct(row['full']['pixel_auroc'])}"
            )
        mean = np.mean([r["full"]["image_auroc"] for r in m["metrics"].values()])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean:.1f} | {m['seconds']:.0f} |")
    lines += [
        "",
        "Tuning / report halves (image AUROC):",
        "",
        "| model | " + " | ".join(classes) + " |",
        "|---|" + "---|" * len(classes),
    ]
    for name, m in models.items():
        cells = []
        for c in classes:
            row = m["metrics"].get(c)
            cells.append(
                "-" if row is None else f"{row['tune']['image_auroc']:.1f} / {row['report']['image_auroc']:.1f}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Targets", ""]
    lines += [
        "| change | vs scratch (worst, <= 1.0) | old classes vs parent (worst image, <= 0.5) "
        "| time / scratch (<= 1/3) | time / scratch at the change's speed |",
        "|---|---|---|---|---|",
    ]
    for step in result["steps"]:
        t = step["targets"]
        g, o, s = t["scratch_gap"], t["old_class_loss"], t["time"]
        lines.append(
            f"| {step['name']} ({step.get('flows', '')} flows; vs {step['scratch']}, parent {step['parent']}) "
            f"| {'PASS' if g['pass'] else 'MISS'} {g['points']:+.2f} ({g['class']} {g['metric'].split('_')[0]}) "
            f"| {'PASS' if o['pass'] else 'MISS'} {o['points']:+.2f} ({o['class']}) "
            f"| {'PASS' if s['pass'] else 'MISS'} {step['seconds']:.0f} / {step['scratch_seconds']:.0f} s "
            f"= {s['share']:.2f} | {_own_speed(step, t)} |"
        )
    lines += [
        "",
        "Positive numbers are AUROC points lost (scratch or parent minus the changed model). Time: the change's "
        "wall-clock seconds (features, fine-tune, statistics and the re-check of every class) against the scratch "
        "run's recorded train_seconds (features and epochs; its statistics fit not counted); the last column "
        "against the scratch run's steps and feature images at the change's own measured speed, for a scratch "
        "run timed on a differently loaded machine.",
        "",
    ]
    lines += ["## Thresholds per class (re-check of the unchanged classes)", ""]
    lines += [
        "| change | class | status | threshold old -> new | held-out mean shift | tolerance |",
        "|---|---|---|---|---|---|",
    ]
    for step in result["steps"]:
        for c, r in step["thresholds"].items():
            old = r["threshold"]["old"]
            shift = f"{r['mean_shift']:+.4f}" if "mean_shift" in r else ""
            tol = f"{r['tolerance']:.4f}" if "tolerance" in r else ""
            lines.append(
                f"| {step['name']} | {c} | {r['status']} | {'-' if old is None else f'{old:.4f}'} -> "
                f"{r['threshold']['new']:.4f} | {shift} | {tol} |"
            )
    if result.get("tune"):
        lines += ["", "## Grow settings on the tuning half (add step)", ""]
        lines += ["| flows | steps | lr | " + " | ".join(classes) + " | worst vs scratch | worst old loss | time s |"]
        lines += ["|---|---|---|" + "---|" * (len(classes) + 3)]
        for row in result["tune"]:
            cells = [
                f"{_pct(row['metrics'][c]['tune']['image_auroc'])} / {_pct(row['metrics'][c]['tune']['pixel_auroc'])}"
                for c in classes
            ]
            t = row["targets"]
            lines.append(
                f"| {row['flows']} | {row['steps']} | {row['lr']:g} | "
                + " | ".join(cells)
                + f" | {t['scratch_gap']['points']:+.2f} | {t['old_class_loss']['points']:+.2f}"
                + f" | {row['seconds']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--runs", type=Path, default=Path("runs/grow_study"), help="where the models go (reused)")
    ap.add_argument("--four", type=Path, help="a finished run of every class with the study's config to reuse")
    ap.add_argument("--config", type=Path, help="the scratch models' config (default: the defaults; a test's tiny one)")
    ap.add_argument(
        "--parts",
        default="changes",
        help="comma-separated: changes (add, retrain, remove with the grow config), tune (the grow settings grid)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: beside other work on 2 cores)")
    args = ap.parse_args()

    import torch
    from serve_bench import machine_name

    from hgad_edge.training.checkpoint import load_run, read_meta
    from hgad_edge.training.config import load_config
    from hgad_edge.training.data import open_roots
    from hgad_edge.training.grow import ClassChange

    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    dataset = open_roots([args.data])
    if len(dataset.classes) < 2:
        raise SystemExit(f"{args.data} has {len(dataset.classes)} class(es): the study needs at least two")
    cls = chosen_class(dataset)
    others = [c for c in dataset.classes if c != cls]
    n_train = sum(s.class_name == cls for s in dataset.samples("train"))
    reason = (
        f"the class with the most training images ({n_train} of {len(dataset.samples('train'))}): the costliest to "
        "add or retrain and the one that dominates the shared flows; with it as the fourth, the three-class model "
        "is the four-class model without it"
    )
    log(f"changed class: {cls} ({reason})")
    runs = args.runs
    runs.mkdir(parents=True, exist_ok=True)
    config = load_config(args.config)
    three = scratch(runs / "three", dataset, others, config, log)
    four = args.four if args.four is not None and complete_run(args.four, dataset.classes, config) else None
    if args.four is not None and four is None:
        log(f"{args.four} is not a finished run of {dataset.classes} with the study's config: training one")
    four = four or scratch(runs / "four", dataset, dataset.classes, config, log)
    gcfg = config.grow

    seconds = {"three": read_meta(three)["train_seconds"], "four": read_meta(four)["train_seconds"]}
    log("test features (once, shared by every model)")
    tests = TestSet(dataset, load_run(four)[0].model, runs / "test_features.pt")
    cache = runs / "metrics.json"
    metrics = {name: tests.cached_metrics(folder, cache) for name, folder in (("three", three), ("four", four))}

    tune_rows = []
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if "tune" in parts:
        for flows, steps, lr in TUNE_GRID:
            g = dataclasses.replace(gcfg, flows=flows, steps=steps, lr=lr)
            folder = changed(three, runs / f"tune_{flows}_{steps}_{lr:g}", dataset, ClassChange(add=(cls,)), g, log)
            meta = read_meta(folder)
            m = tests.cached_metrics(folder, cache, ("tune",))
            step = {"model": "x", "scratch": "four", "parent": "three", "class": cls, "seconds": meta["grow_seconds"],
                    "scratch_seconds": seconds["four"]}  # fmt: skip
            targets = check(step, {"x": m, "four": metrics["four"], "three": metrics["three"]}, half="tune")
            tune_rows.append(
                {
                    "flows": flows,
                    "steps": steps,
                    "lr": lr,
                    "metrics": m,
                    "seconds": meta["grow_seconds"],
                    "targets": targets,
                }
            )
            log(f"tune {flows} {steps} {lr:g}: {targets}")

    frozen = dataclasses.replace(gcfg, flows="frozen")
    plan = [  # name, parent, change, scratch model of the same classes, parent's name, its seconds, settings
        ("add", three, ClassChange(add=(cls,)), "four", "three", seconds["four"], gcfg),
        ("retrain", four, ClassChange(retrain=(cls,)), "four", "four", seconds["four"], gcfg),
        ("remove", four, ClassChange(remove=(cls,)), "three", "four", seconds["three"], gcfg),
    ]
    if gcfg.flows != "frozen":  # the other flows setting too, same steps and rate (the issue: measure both)
        plan += [
            ("add_frozen", three, ClassChange(add=(cls,)), "four", "three", seconds["four"], frozen),
            ("retrain_frozen", four, ClassChange(retrain=(cls,)), "four", "four", seconds["four"], frozen),
        ]
    steps = []
    for name, parent, change, ref, parent_name, scratch_seconds, settings in plan if "changes" in parts else ():
        folder = changed(parent, runs / name, dataset, change, settings, log)
        meta = read_meta(folder)
        scratch_meta = read_meta({"three": three, "four": four}[ref])
        metrics[name] = tests.cached_metrics(folder, cache)
        seconds[name] = meta["grow_seconds"]
        step = {
            "name": name, "model": name, "scratch": ref, "parent": parent_name, "class": cls,
            "flows": meta["lineage"][-1]["flows"],
            "seconds": meta["grow_seconds"], "scratch_seconds": scratch_seconds,
            "thresholds": meta["grow"]["classes"], "lineage": meta["lineage"], "timing": meta.get("grow_timing"),
            "scratch_at_own_speed": scratch_at_own_speed(
                scratch_meta, config, meta.get("grow_timing") or {}, meta["lineage"][-1]["steps"],
                meta["lineage"][-1]["flows"] == "frozen",
            ),
        }  # fmt: skip
        step["targets"] = check(step, metrics)
        steps.append(step)
        log(f"{name}: {step['targets']}")

    result = {
        "data": str(args.data),
        "class": cls,
        "class_reason": reason,
        "classes": dataset.classes,
        "grow_config": dataclasses.asdict(gcfg),
        "machine": machine_name(),
        "threads": args.threads,
        "models": {n: {"metrics": metrics[n], "seconds": seconds[n]} for n in metrics},
        "steps": steps,
        "tune": tune_rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "grow_study.json", result)
    atomic_write_text(args.out / "grow_study.md", report_md(result))
    print(report_md(result))


if __name__ == "__main__":
    main()
