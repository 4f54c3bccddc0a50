"""Per-class evaluation of a trained run: metrics table, metrics.json/md, optional pictures."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from hgad_edge.core.files import atomic_write_json, atomic_write_text
from hgad_edge.core.metrics import image_and_pixel_metrics
from hgad_edge.core.thresholds import NORMALIZED_THRESHOLD, fpr_at_recall, recall_at_fpr
from hgad_edge.training.batching import iter_batches
from hgad_edge.training.data import ADDataset, DataError, Sample, load_image, load_mask, resize_image

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")
# Operating points (test set, empirical): recall at a rejection rate of good parts, and the reverse.
RECALL_AT_FPR = (0.01, 0.05)
FPR_AT_RECALL = (0.90, 0.95)
OPERATING_KEYS = (
    *(f"recall_at_fpr_{round(100 * f)}" for f in RECALL_AT_FPR),
    *(f"fpr_at_recall_{round(100 * r)}" for r in FPR_AT_RECALL),
)
COUNT_KEYS = ("tp", "fp", "tn", "fn")


@dataclass
class ClassPredictions:
    name: str
    samples: list[Sample]
    labels: np.ndarray  # (n,) 0/1
    scores: np.ndarray  # (n,)
    normalized: np.ndarray  # (n,)
    auto_class: np.ndarray  # (n,)
    min_loglik: np.ndarray  # (n, levels)
    maps: np.ndarray  # (n, H, W) float32
    masks: np.ndarray | None  # (n, H, W) bool, None for image-level-only classes


@torch.no_grad()
def predict_class(
    scorer, samples: Sequence[Sample], class_id: int, has_masks: bool, batch_size: int = 16
) -> ClassPredictions:
    size = scorer.model.cfg.input_size
    out: dict[str, list[np.ndarray]] = {}
    for images in iter_batches(list(samples), size, batch_size):
        cls = torch.full((images.shape[0],), class_id, dtype=torch.long)
        for key, val in scorer.evaluate_batch(images, cls).items():
            out.setdefault(key, []).append(val.numpy())
    cat = {k: np.concatenate(v) for k, v in out.items()}
    masks = None
    if has_masks:
        masks = np.stack([_mask_for(s, size) for s in samples])
    return ClassPredictions(
        name=samples[0].class_name,
        samples=list(samples),
        labels=np.array([s.label for s in samples], dtype=np.int64),
        scores=cat["score"],
        normalized=cat["score_normalized"],
        auto_class=cat["auto_class"],
        min_loglik=cat["min_loglik"],
        maps=cat["anomaly_map"].astype(np.float32),
        masks=masks,
    )


def _mask_for(sample: Sample, size: tuple[int, int]) -> np.ndarray:
    if sample.mask_path is None:
        return np.zeros(size, dtype=bool)  # normal image: no defect pixel
    return load_mask(sample.mask_path, shape=size)


def class_metrics(pred: ClassPredictions, class_id: int, threshold: float | None = None) -> dict:
    """Metrics of one class. PASS/FAIL counts at `threshold` (the saved one); without it, from the
    scorer's score_normalized >= 0.5 (the same decision, for callers that only keep predictions)."""
    if len(set(pred.labels.tolist())) < 2:
        msg = f"class {pred.name}: the test set needs both normal and anomalous images to be evaluated"
        raise DataError(msg)
    m = image_and_pixel_metrics(pred.labels, pred.scores, pred.masks, pred.maps if pred.masks is not None else None)
    normal, anomalous = pred.labels == 0, pred.labels == 1
    good, bad = pred.scores[normal], pred.scores[anomalous]
    flagged = pred.scores >= threshold if threshold is not None else pred.normalized >= NORMALIZED_THRESHOLD
    tp, fp = int(flagged[anomalous].sum()), int(flagged[normal].sum())  # what the line sees at the saved threshold
    counts = {"tp": tp, "fp": fp, "tn": int(normal.sum()) - fp, "fn": int(anomalous.sum()) - tp}
    m.update(
        n_test=int(len(pred.labels)),
        n_anomalous=int(anomalous.sum()),
        level="pixel" if pred.masks is not None else "image",
        auto_class_accuracy=float(np.mean(pred.auto_class == class_id)),
        # What the line sees with the calibrated threshold (no test data used to set it).
        threshold=None if threshold is None else float(threshold),
        threshold_fpr=counts["fp"] / len(good),
        threshold_tpr=counts["tp"] / len(bad),
        **counts,
        **{f"recall_at_fpr_{round(100 * f)}": recall_at_fpr(good, bad, f) for f in RECALL_AT_FPR},
        **{f"fpr_at_recall_{round(100 * r)}": fpr_at_recall(good, bad, r) for r in FPR_AT_RECALL},
    )
    return {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in m.items()}


def tuning_half(samples: Sequence[Sample], seed: int = 0) -> np.ndarray:
    """(n,) bool: the fixed tuning half of a class's test images (the rest is the report half).

    Settings are chosen on the tuning half only and reported on the other, because anomaly
    datasets rarely ship a validation split. Stratified by defect type (normal is one type), so
    both halves see every kind of defect; seeded per class name, so adding a class or reordering
    files elsewhere does not move anyone's split.
    """
    mask = np.zeros(len(samples), dtype=bool)
    by_kind: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_kind.setdefault(s.defect, []).append(i)
    for kind in sorted(by_kind):
        idx = sorted(by_kind[kind], key=lambda i: samples[i].path.name)
        key = f"{seed}:{samples[idx[0]].class_name}:{kind}".encode()
        order = np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:8], "little")).permutation(len(idx))
        mask[[idx[j] for j in order[: (len(idx) + 1) // 2]]] = True
    return mask


def subset(pred: ClassPredictions, keep: np.ndarray) -> ClassPredictions:
    """The predictions of the images where keep (n,) is True."""
    masks = pred.masks[keep] if pred.masks is not None else None
    return ClassPredictions(
        pred.name,
        [s for s, k in zip(pred.samples, keep) if k],
        pred.labels[keep],
        pred.scores[keep],
        pred.normalized[keep],
        pred.auto_class[keep],
        pred.min_loglik[keep],
        pred.maps[keep],
        masks,
    )


def mean_metrics(per_class: dict[str, dict]) -> dict:
    keys = [*METRIC_KEYS, "auto_class_accuracy", "threshold_fpr", "threshold_tpr", *OPERATING_KEYS]
    out = {}
    for k in keys:
        vals = [c[k] for c in per_class.values() if c.get(k) is not None]
        out[k] = float(np.mean(vals)) if vals else None
    out["n_test"] = int(sum(c["n_test"] for c in per_class.values()))
    for k in COUNT_KEYS:  # rows without a threshold (e.g. the kNN baseline) have no counts
        counts = [c[k] for c in per_class.values() if c.get(k) is not None]
        out[k] = int(sum(counts)) if counts else None
    return out


def evaluate(scorer, dataset: ADDataset, out_dir: Path, pictures: bool = False, batch_size: int = 16) -> dict:
    """Evaluate every model class present in dataset; writes out_dir/metrics.json and metrics.md and,
    per class, out_dir/operating_points/<class>.png (score histograms, threshold, ROC)."""
    names = scorer.model.class_names
    missing = [c for c in dataset.classes if c not in names]
    if missing:
        msg = (
            f"the data has class(es) {', '.join(missing)} the model was not trained on "
            f"(model classes: {', '.join(names)})"
        )
        raise DataError(msg)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_class: dict[str, dict] = {}
    test = dataset.samples("test")
    for name in tqdm(dataset.classes, desc="evaluating", unit="class"):
        samples = [s for s in test if s.class_name == name]
        class_id = names.index(name)
        pred = predict_class(scorer, samples, class_id, dataset.has_masks(name), batch_size)
        threshold = float(scorer.threshold[class_id])
        per_class[name] = class_metrics(pred, class_id, threshold)
        write_operating_point(pred, threshold, out_dir / "operating_points")
        if pictures:
            write_pictures(pred, threshold, scorer.model.cfg.input_size, out_dir / "pictures")
    result = {"classes": per_class, "mean": mean_metrics(per_class)}
    atomic_write_json(out_dir / "metrics.json", result)
    atomic_write_text(out_dir / "metrics.md", metrics_table(result))
    return result


def write_operating_point(pred: ClassPredictions, threshold: float, out: Path) -> None:
    from hgad_edge.training.viz import operating_point_plot

    normal, anomalous = pred.labels == 0, pred.labels == 1
    operating_point_plot(
        out / f"{pred.name}.png",
        pred.scores[normal],
        pred.scores[anomalous],
        threshold,
        title=f"{pred.name}: test scores and the saved threshold",
    )


def _fmt(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def metrics_table(result: dict) -> str:
    """Markdown table, percentages; 'n/a' where a class has no pixel masks. Then the operating points:
    at the saved threshold (FPR, recall, counts) and what other thresholds would give on the test set."""
    head = (
        "| class | level | n_test | image AUROC | pixel AUROC | AUPRO@0.3 | F1-max | auto-class acc "
        "| FPR@thr | TPR@thr |"
    )
    lines = [head, "|" + "---|" * 10]
    rows = list(result["classes"].items()) + [("**mean**", result["mean"])]
    for name, m in rows:
        cells = [name, m.get("level", ""), str(m["n_test"])]
        cells += [_fmt(m.get(k)) for k in (*METRIC_KEYS, "auto_class_accuracy", "threshold_fpr", "threshold_tpr")]
        lines.append("| " + " | ".join(cells) + " |")
    ops = [f"recall@FPR {round(100 * f)}%" for f in RECALL_AT_FPR] + [
        f"FPR@recall {round(100 * r)}%" for r in FPR_AT_RECALL
    ]
    lines += ["", "| class | threshold | TP | FP | TN | FN | " + " | ".join(ops) + " |", "|" + "---|" * (6 + len(ops))]
    for name, m in rows:
        thr = f"{m['threshold']:.4g}" if m.get("threshold") is not None else ""
        cells = [
            name,
            thr,
            *("" if m.get(k) is None else str(m[k]) for k in COUNT_KEYS),
            *(_fmt(m.get(k)) for k in OPERATING_KEYS),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_pictures(
    pred: ClassPredictions, threshold: float, size: tuple[int, int], out: Path, per_kind: int = 6
) -> None:
    """Heatmap overlays of the most/least anomalous test images and histograms (paper Fig. 2b)."""
    from hgad_edge.core.overlay import heatmap_overlay
    from hgad_edge.training.viz import loglik_histogram, save_overlay_grid, score_histogram

    order = np.argsort(-pred.scores)
    anomalous = [i for i in order if pred.labels[i] == 1][:per_kind]
    normal = [i for i in order[::-1] if pred.labels[i] == 0][: max(2, per_kind // 3)]
    vmin = float(np.percentile(pred.maps[pred.labels == 0], 1)) if (pred.labels == 0).any() else float(pred.maps.min())
    vmax = float(max(np.percentile(pred.maps, 99.9), vmin + 1e-6))
    items = []
    for i in anomalous + normal:
        s = pred.samples[i]
        image = resize_image(load_image(s.path), size)
        mask = pred.masks[i] if pred.masks is not None else None
        verdict = "FAIL" if pred.scores[i] >= threshold else "PASS"
        label = f"{verdict} {pred.scores[i]:.3f}"
        items.append(
            (f"{s.defect}/{s.path.name}", heatmap_overlay(image, pred.maps[i], vmin, vmax, mask=mask, label=label))
        )
    save_overlay_grid(out / f"{pred.name}_overlays.png", items, cols=4)
    normal_mask, anom_mask = pred.labels == 0, pred.labels == 1
    loglik = pred.min_loglik.mean(1)
    loglik_histogram(
        out / f"{pred.name}_loglik_hist.png",
        loglik[normal_mask],
        loglik[anom_mask],
        title=f"{pred.name}: lowest log-likelihood per image (mean over levels)",
    )
    score_histogram(
        out / f"{pred.name}_score_hist.png",
        pred.scores[normal_mask],
        pred.scores[anom_mask],
        threshold,
        title=f"{pred.name}: image scores, calibrated threshold",
    )
