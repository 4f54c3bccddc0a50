"""How well do the threshold policies hold on the test sets, and does recalibration fix a lighting change?

    python benchmarks/calibration_study.py --run RUN --data ROOT [--data ROOT2] --out DIR
        [--shift-class NAME (default: the class with most held-out images)] [--brightness 30] [--contrast 0.8]

(a) Per class: thresholds from the `max`, `quantile 0.99` and `target-fpr 0.01` policies, chosen on the
    held-out normal training images only (the split training used), and the FPR / recall they give
    on the test set.
(b) Lighting shift: one class's held-out and test images are shifted (x' = contrast * x + brightness,
    clipped) as a stand-in for a lighting change; each policy is then compared without recalibration
    (the trained threshold), with thresholds-only recalibration on the shifted held-out normals, and
    with `--refit-statistics` (per-position normal statistics refit from half of them, threshold
    from the other half: the code path of `hgad-edge calibrate RUN --refit-statistics`).
Writes DIR/calibration_study.json and DIR/calibration_study.md (atomically).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bootstrap import bootstrap_package  # noqa: E402

bootstrap_package()

from hgad_edge.core.files import atomic_write_json, atomic_write_text  # noqa: E402
from hgad_edge.core.thresholds import PolicyError, choose_threshold, rates  # noqa: E402
from hgad_edge.threshold_calibration import RunScorer  # noqa: E402
from hgad_edge.training.checkpoint import load_run  # noqa: E402
from hgad_edge.training.data import load_image, open_roots  # noqa: E402
from hgad_edge.training.train import split_calibration  # noqa: E402

POLICIES = (("max", None), ("quantile", 0.99), ("target-fpr", 0.01))


def shift_lighting(image: np.ndarray, brightness: float, contrast: float) -> np.ndarray:
    return np.clip(contrast * image.astype(np.float32) + brightness, 0, 255).round().astype(np.uint8)


def _label(policy: str, param) -> str:
    return policy if param is None else f"{policy} {param}"


def _evaluate(held_out: np.ndarray, normal: np.ndarray, defects: np.ndarray) -> dict:
    """Per policy: the threshold from held_out, and the test FPR / recall it gives."""
    rows = {}
    for policy, param in POLICIES:
        try:
            thr = choose_threshold(policy, param, held_out).threshold
        except PolicyError as err:
            rows[_label(policy, param)] = {"threshold": None, "fpr": None, "recall": None, "refused": str(err)}
            continue
        rows[_label(policy, param)] = {"threshold": float(thr), **rates(normal, defects, thr)}
    return rows


def _fixed(threshold: float | None, normal: np.ndarray, defects: np.ndarray) -> dict:
    if threshold is None:
        return {"threshold": None, "fpr": None, "recall": None, "refused": "no threshold before the shift"}
    return {"threshold": threshold, **rates(normal, defects, threshold)}


def run_study(
    run: Path,
    roots: list[Path],
    out: Path,
    shift_class: str | None = None,
    brightness: float = 30.0,
    contrast: float = 0.8,
) -> dict:
    t0 = time.time()
    scorer = RunScorer(run)
    classes = scorer.classes
    dataset = open_roots(roots, classes)  # the run's classes, in its order: the split training used
    _, calib = split_calibration(dataset.samples("train"), scorer.cfg.train)
    test = dataset.samples("test")
    loaded = {s.path: load_image(s.path) for s in [*calib, *test]}
    per_class, cache = {}, {}
    for y, name in enumerate(classes):
        held = [loaded[s.path] for s in calib if s.class_name == name]
        normal = [loaded[s.path] for s in test if s.class_name == name and s.label == 0]
        defects = [loaded[s.path] for s in test if s.class_name == name and s.label == 1]
        scores = [scorer.scores(images, y) for images in (held, normal, defects)]
        cache[name] = (held, normal, defects)
        per_class[name] = {
            "n_held_out": len(held),
            "n_test_normal": len(normal),
            "n_test_defect": len(defects),
            "policies": _evaluate(*scores),
        }
        print(f"{name}: {len(held)} held-out, {len(normal)} + {len(defects)} test images scored", flush=True)
    # default: the class with the most held-out normal images (the refit splits them in two)
    shift_class = shift_class or max(classes, key=lambda c: per_class[c]["n_held_out"])
    if shift_class not in classes:
        raise SystemExit(f"--shift-class {shift_class!r} is not a class of the run ({', '.join(classes)})")
    y = classes.index(shift_class)
    held, normal, defects = ([shift_lighting(im, brightness, contrast) for im in group] for group in cache[shift_class])
    trained = float(scorer.scorer.threshold[y])
    s_held, s_normal, s_defects = (scorer.scores(g, y) for g in (held, normal, defects))
    refit = RunScorer(run)
    refit.refit_statistics(held, y)  # means from held[0::2], spreads from held[1::2]
    r_held, r_normal, r_defects = (refit.scores(g, y) for g in (held[1::2], normal, defects))
    shift = {
        "class": shift_class,
        "brightness": brightness,
        "contrast": contrast,
        "trained_threshold": trained,
        "unshifted": per_class[shift_class]["policies"],
        # each policy's threshold from the unshifted held-out images, kept through the lighting change
        "no_recalibration": {
            k: _fixed(row["threshold"], s_normal, s_defects) for k, row in per_class[shift_class]["policies"].items()
        },
        "thresholds_only": _evaluate(s_held, s_normal, s_defects),
        "refit_statistics": _evaluate(r_held, r_normal, r_defects),
    }
    summary = {
        "run": str(run),
        "data": [str(r) for r in roots],
        "classes": classes,
        "per_class": per_class,
        "mean": _means(per_class),
        "lighting_shift": shift,
        "seconds": round(time.time() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "calibration_study.json", summary)
    atomic_write_text(out / "calibration_study.md", study_tables(summary))
    return summary


def _means(per_class: dict) -> dict:
    out = {}
    for label in (_label(p, q) for p, q in POLICIES):
        rows = [c["policies"][label] for c in per_class.values() if c["policies"][label]["fpr"] is not None]
        out[label] = {k: float(np.mean([r[k] for r in rows])) if rows else None for k in ("fpr", "recall")}
        out[label]["classes"] = len(rows)
    return out


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _cell(row: dict) -> str:
    if row.get("refused"):
        need = re.search(r"needs at least (\d+)", row["refused"])
        return f"refused (needs {need.group(1)} images)" if need else "refused"
    return f"{_pct(row['fpr'])} / {_pct(row['recall'])}"


def study_tables(summary: dict) -> str:
    labels = [_label(p, q) for p, q in POLICIES]
    lines = [
        "Test-set FPR / recall (%) with thresholds chosen on the held-out normal training images only.",
        "",
        "| class | held-out | test good / defect | " + " | ".join(labels) + " |",
        "|" + "---|" * (3 + len(labels)),
    ]
    for name, c in summary["per_class"].items():
        cells = [name, str(c["n_held_out"]), f"{c['n_test_normal']} / {c['n_test_defect']}"]
        lines.append("| " + " | ".join(cells + [_cell(c["policies"][k]) for k in labels]) + " |")
    mean = summary["mean"]
    lines.append(
        "| **mean** | | | "
        + " | ".join(f"{_pct(mean[k]['fpr'])} / {_pct(mean[k]['recall'])} ({mean[k]['classes']} cl.)" for k in labels)
        + " |"
    )
    s = summary["lighting_shift"]
    lines += [
        "",
        f"Lighting shift on {s['class']} (x' = {s['contrast']} x + {s['brightness']}): test FPR / recall (%).",
        "",
        "| | " + " | ".join(labels) + " |",
        "|" + "---|" * (1 + len(labels)),
    ]
    arms = (
        ("unshifted images, calibrated on unshifted held-out", "unshifted"),
        ("shifted, no recalibration (the thresholds above)", "no_recalibration"),
        ("shifted, thresholds recalibrated on shifted held-out", "thresholds_only"),
        ("shifted, --refit-statistics (half for statistics, half for the threshold)", "refit_statistics"),
    )
    for title, key in arms:
        lines.append(f"| {title} | " + " | ".join(_cell(s[key][k]) for k in labels) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--data", action="append", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--shift-class")
    ap.add_argument("--brightness", type=float, default=30.0)
    ap.add_argument("--contrast", type=float, default=0.8)
    args = ap.parse_args()
    load_run(args.run)  # a clear error for a folder that is not a trained run
    summary = run_study(args.run, args.data, args.out, args.shift_class, args.brightness, args.contrast)
    print(study_tables(summary))


if __name__ == "__main__":
    main()
