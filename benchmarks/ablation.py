"""Rerun the paper's unified comparison (Tab. 3a) on your data: one model per head mode, same
backbone, features, seed and training budget; writes DIR/ablation.json and DIR/ablation.md.

    python benchmarks/ablation.py --data ROOT [--data ROOT2] --out DIR [--epochs N] [--modes knn,single,full]

Modes: knn (the bar: a unified PatchCore-style nearest-neighbour scorer on the same backbone
features, no flows; hgad_edge/training/knn.py), single (one N(0, I) centre: the CFLOW-style unified baseline),
fixed (fixed centre per class),
gmm (+ learnable inter-class mixture, L_g), mi (+ mutual information and entropy), full (+ intra-class
centres: HGAD).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hgad_edge.training.checkpoint import load_run, load_run_config, save_run
from hgad_edge.training.config import HeadConfig, load_config
from hgad_edge.training.data import open_roots
from hgad_edge.training.evaluate import evaluate
from hgad_edge.training.knn import evaluate_knn
from hgad_edge.training.train import Trainer, fit_run_statistics, split_calibration

MODES = ("knn", *HeadConfig.MODES)
LABELS = {
    "knn": "unified kNN on the same features (PatchCore-style reference)",
    "single": "single Gaussian N(0,I) (CFLOW-style)",
    "fixed": "fixed multiple centres",
    "gmm": "+ inter-class GMM",
    "mi": "+ mutual information",
    "full": "+ intra-class centres (HGAD)",
}


def run_ablation(roots, out: Path, epochs: int | None, modes, config: Path | None = None) -> dict:
    dataset = open_roots(roots)
    out.mkdir(parents=True, exist_ok=True)
    results, cache = {}, None
    for mode in sorted(modes, key=lambda m: m == "knn"):  # the kNN last: it reuses the flows' cached features
        overrides = ({"head": {"mode": mode}} if mode != "knn" else {}) | (
            {"train": {"epochs": epochs}} if epochs else {}
        )
        cfg = load_config(config, overrides)
        if mode == "knn":
            metrics = evaluate_knn(cfg, dataset, cache)
            results[mode] = {"label": LABELS[mode], "train_seconds": metrics["fit_seconds"], **metrics}
            print(f"knn: mean image AUROC {metrics['mean']['image_auroc']:.4f}", flush=True)
            continue
        t0 = time.time()
        reused = _finished(out / mode, cfg)
        if reused:
            print(f"{mode}: reusing the finished run in {out / mode}", flush=True)
            train_s = json.loads((out / mode / "meta.json").read_text()).get("train_seconds")
            if reused == "rescore":
                _recalibrate(out / mode, cfg, dataset)
        else:
            trainer = Trainer(cfg, dataset, out / mode, cache=cache)
            trainer.run()
            cache = trainer.cache  # same backbone, seed and split: extract features once
            train_s = round(time.time() - t0, 1)
        done_eval = out / mode / "eval" / "metrics.json"
        if (
            reused
            and done_eval.is_file()
            and done_eval.stat().st_mtime > (out / mode / "model.safetensors").stat().st_mtime
        ):
            metrics = json.loads(done_eval.read_text())  # evaluated after its last training: reuse
        else:
            scorer, _, _ = load_run(out / mode)
            metrics = evaluate(scorer, dataset, out / mode / "eval")
        results[mode] = {"label": LABELS[mode], "train_seconds": train_s, **metrics}
        print(f"{mode}: mean image AUROC {metrics['mean']['image_auroc']:.4f}", flush=True)
    results = {m: results[m] for m in MODES if m in results}  # table: the bar, then the paper's row order
    fit, _ = split_calibration(dataset.samples("train"), cfg.train)
    summary = {
        "data": [str(r) for r in roots],
        "classes": dataset.classes,
        "epochs": cfg.train.epochs,
        "config": cfg.to_dict(),
        "n_fit_images": len(fit),
        "results": results,
    }
    (out / "ablation.json").write_text(json.dumps(summary, indent=2))
    (out / "ablation.md").write_text(ablation_table(summary))
    return summary


def _finished(run: Path, cfg) -> str | None:
    """A calibrated run trained with exactly this config ("same"; an interrupted ablation resumes
    cheaply), or with the same training but other score settings ("rescore": recalibrate, no
    retraining); None: train it."""
    if not (run / "meta.json").is_file() or not (run / "config.yaml").is_file():
        return None
    if not json.loads((run / "meta.json").read_text()).get("calibrated"):
        return None
    saved = load_run_config(run)
    if _training_view(saved) != _training_view(cfg):
        return None
    return "same" if saved.score == cfg.score else "rescore"


def _recalibrate(run: Path, cfg, dataset) -> None:
    """Score the trained run with cfg.score: its calibration is fitted again (same held-out and
    position images as training used) and saved with the new settings."""
    scorer, _, meta = load_run(run)
    scorer.set_score_config(cfg.score)
    fit, calib = split_calibration(dataset.samples("train"), cfg.train)
    save_run(run, scorer, {**meta, "calibration": fit_run_statistics(scorer, cfg, fit, calib)})
    print(f"  recalibrated {run} for the score settings {cfg.score}", flush=True)


def _training_view(cfg) -> dict:
    """The config without its score section and the head settings its mode never reads: sweeping
    lambda2 or the intra-class centres reuses the baseline rows instead of retraining them."""
    d = cfg.to_dict()
    del d["score"]  # scoring settings change the calibration only (_recalibrate)
    unused = set()
    if not cfg.head.mutual_info:
        unused |= {"lambda2", "label_smoothing"}
    if not cfg.head.intra:
        unused |= {"intra_centers", "stage1_fraction"}
    if not cfg.head.learn_centers:
        unused |= {"lambda1"}
    d["head"] = {k: v for k, v in d["head"].items() if k not in unused}
    # the latent mixture per level as the model reads it ([] is a rule, not a different setting)
    d["head"]["latent_components"] = cfg.head.latent_per_level(cfg.backbone.level_stages())
    return d


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def ablation_table(summary: dict) -> str:
    classes = summary["classes"]
    head = (
        "| head | mean image AUROC | mean pixel AUROC | mean AUPRO | "
        + " | ".join(f"{c} img/pix" for c in classes)
        + " |"
    )
    lines = [head, "|" + "---|" * (4 + len(classes))]
    for _mode, r in summary["results"].items():
        cells = [r["label"], _pct(r["mean"]["image_auroc"]), _pct(r["mean"]["pixel_auroc"]), _pct(r["mean"]["aupro"])]
        for c in classes:
            m = r["classes"][c]
            cells.append(f"{_pct(m['image_auroc'])} / {_pct(m['pixel_auroc'])}")
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        f"\nSame backbone ({summary['config']['backbone']['name']}), cached features, seed and budget "
        f"({summary['epochs']} epochs) for every row; one unified model per row over {len(classes)} classes.\n"
    )
    return "\n".join(lines) + "\n" + note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--config", type=Path)
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    summary = run_ablation(args.data, args.out, args.epochs, modes, args.config)
    print(ablation_table(summary))


if __name__ == "__main__":
    main()
