"""Per-class evaluation of a trained run: metrics table, metrics.json/md, optional pictures.

Every frame goes through `iter_frame_predictions` (its public face: `predict_frames`, which the
runtime-parity tests and the benchmarks call): resized whole to the model input, or, tiled (config
`tiling`), cut into tiles that go through the scorer as a batch, their maps stitched into one map at
the frame's native resolution (core.tiling.stitch_maps), the frame's score the max of its tiles'
and its class their majority. Pixel metrics are then computed at that resolution against the
native-resolution masks; metrics.json / metrics.md say which (`map_resolution`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from hgad_edge.core.files import atomic_write_json, atomic_write_text
from hgad_edge.core.metrics import aupro, auroc, image_and_pixel_metrics
from hgad_edge.core.thresholds import NORMALIZED_THRESHOLD, fpr_at_recall, recall_at_fpr
from hgad_edge.core.tiling import TileGrid, combine_tiles, frame_class
from hgad_edge.training.batching import Frame, frame_pixels, iter_tile_batches
from hgad_edge.training.config import HGADConfig
from hgad_edge.training.data import ADDataset, DataError, Sample, load_mask, resize_image

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")
# Operating points (test set, empirical): recall at a rejection rate of good parts, and the reverse.
RECALL_AT_FPR = (0.01, 0.05)
FPR_AT_RECALL = (0.90, 0.95)
OPERATING_KEYS = (
    *(f"recall_at_fpr_{round(100 * f)}" for f in RECALL_AT_FPR),
    *(f"fpr_at_recall_{round(100 * r)}" for r in FPR_AT_RECALL),
)
COUNT_KEYS = ("tp", "fp", "tn", "fn")
AUPRO_FPR_LIMIT = 0.3  # core.metrics.aupro's default, the one image_and_pixel_metrics reports


@dataclass
class ClassPredictions:
    name: str
    samples: list[Sample]
    labels: np.ndarray  # (n,) 0/1
    scores: np.ndarray  # (n,)
    normalized: np.ndarray  # (n,)
    auto_class: np.ndarray  # (n,)
    min_loglik: np.ndarray  # (n, levels)
    # (n, H, W) float32; tiled, at the frames' native sizes: a list of (H_i, W_i) where they differ
    maps: np.ndarray | list[np.ndarray]
    masks: np.ndarray | list[np.ndarray] | None  # bool, shaped like maps; None for image-level-only classes


# ---- frames -> maps, scores, classes (the one path: untiled and tiled) --------------------------
def map_resolution(cfg: HGADConfig) -> str:
    """At what resolution maps (and pixel metrics) are: "native" when tiled, else the model input."""
    return "native" if cfg.tiling.setting() is not None else f"input {cfg.input_size[1]}x{cfg.input_size[0]}"


def _frame_result(rows: dict[str, list[np.ndarray]], grid: TileGrid | None, blend: str) -> dict:
    """One frame's outputs from its inputs' (tiles') outputs: the map stitched at the frame's resolution
    (untiled: the one map, at the input size), score the tiles' max, classes the tiles' majority."""
    out = {k: np.concatenate(v) for k, v in rows.items()}
    amap, score, class_pred = combine_tiles(out["anomaly_map"], out["score"], out["class_pred"], grid, blend)
    return {
        "anomaly_map": amap,
        "score": np.float32(score),  # the max of float32s: exactly one of them
        "class_pred": class_pred,
        "auto_class": frame_class(out["auto_class"]),
        "min_loglik": out["min_loglik"].min(0),
    }


@torch.no_grad()
def iter_frame_predictions(
    scorer, cfg: HGADConfig, frames: Sequence[Frame], class_ids: Sequence[int], batch_size: int = 16
) -> Iterator[dict]:
    """Per frame, in order: anomaly_map (H, W) float32 (the frame's resolution when tiled, else the
    model input's), score, class_pred (the given class; -1: the class the tiles pick), auto_class and
    min_loglik (levels,) (the lowest over the tiles). All tiles of all frames go through
    scorer.evaluate_batch in batches of `batch_size` inputs; one frame's map is held at a time."""
    tiling = cfg.tiling.setting()
    blend = tiling.blend if tiling is not None else ""
    wanted = np.asarray(class_ids, np.int64)
    current, rows, grid = -1, {}, None
    for batch in iter_tile_batches(frames, cfg.input_size, batch_size, tiling):
        outputs = scorer.evaluate_batch(batch.tiles, torch.from_numpy(wanted[batch.frame_ids]))
        outputs = {k: v.numpy() for k, v in outputs.items() if k != "score_normalized"}
        for f in np.unique(batch.frame_ids).tolist():  # a frame's tiles are consecutive
            if f != current:
                if rows:
                    yield _frame_result(rows, grid, blend)
                current, rows, grid = f, {}, batch.grids[f]
            mine = batch.frame_ids == f
            for key, val in outputs.items():
                rows.setdefault(key, []).append(val[mine])
    if rows:
        yield _frame_result(rows, grid, blend)


def predict_frames(
    scorer, cfg: HGADConfig, frames: Sequence[Frame], class_ids: int | Sequence[int], batch_size: int = 16
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """PyTorch's result for frames (HxWx3 uint8 RGB arrays, or Samples), untiled or tiled per `cfg`:
    (maps (H, W) float32 per frame, at the frame's resolution when tiled, else the model input's;
    scores (n,) float32; class_preds (n,) int64). class_ids: one for all frames or one per frame; -1
    lets each tile pick its class (the frame's is the tiles' majority). What evaluation computes."""
    ids = [class_ids] * len(frames) if isinstance(class_ids, (int, np.integer)) else list(class_ids)
    if len(ids) != len(frames):
        raise ValueError(f"{len(ids)} class ids for {len(frames)} frames: give one, or one per frame")
    results = list(iter_frame_predictions(scorer, cfg, frames, ids, batch_size))
    maps = [r["anomaly_map"] for r in results]
    scores = np.array([r["score"] for r in results], np.float32)
    return maps, scores, np.array([r["class_pred"] for r in results], np.int64)


def _stacked(arrays: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """One (n, H, W) array when every frame has the same size (always so untiled), else the list."""
    return np.stack(arrays) if len({a.shape for a in arrays}) == 1 else arrays


def predict_class(
    scorer, samples: Sequence[Sample], class_id: int, has_masks: bool, batch_size: int = 16
) -> ClassPredictions:
    """One class's test images through `iter_frame_predictions`, with masks at the maps' resolution."""
    cfg = scorer.model.cfg
    results = list(iter_frame_predictions(scorer, cfg, list(samples), [class_id] * len(samples), batch_size))
    scores = np.array([r["score"] for r in results], np.float32)
    classes = np.array([r["class_pred"] for r in results], np.int64)
    maps = [r["anomaly_map"] for r in results]
    masks = _stacked([_mask_for(s, m.shape) for s, m in zip(samples, maps)]) if has_masks else None
    return ClassPredictions(
        name=samples[0].class_name,
        samples=list(samples),
        labels=np.array([s.label for s in samples], dtype=np.int64),
        scores=scores,
        normalized=scorer.normalize(torch.from_numpy(scores), torch.from_numpy(classes)).numpy(),
        auto_class=np.array([r["auto_class"] for r in results], np.int64),
        min_loglik=np.stack([r["min_loglik"] for r in results]),
        maps=_stacked(maps),
        masks=masks,
    )


def _mask_for(sample: Sample, size: tuple[int, int]) -> np.ndarray:
    if sample.mask_path is None:
        return np.zeros(size, dtype=bool)  # normal image: no defect pixel
    return load_mask(sample.mask_path, shape=size)


def ragged_pixel_metrics(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]) -> dict[str, float]:
    """Pixel AUROC and AUPRO of maps of different sizes (native resolution), equal to what
    image_and_pixel_metrics gives for a stack of them. AUROC pools every pixel. AUPRO needs each image's
    regions in 2-D: each defective image's mask bounding box (all of its regions) is one slice of an
    (N, h, w) stack, every other pixel is packed into further slices, and the stack's padding scores
    -inf: a normal pixel below every threshold, which scales each point's FPR by n / (n + pad) and
    nothing else, so the area up to FPR_LIMIT * n / (n + pad), over that limit, is the AUPRO itself."""
    flat_masks = np.concatenate([np.asarray(m, bool).ravel() for m in masks])
    result = {"pixel_auroc": auroc(flat_masks, np.concatenate([np.ravel(a) for a in maps]))}
    boxes, rest = [], []
    for mask, amap in zip(masks, maps):
        mask, amap = np.asarray(mask, bool), np.asarray(amap, np.float32)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if not rows.size:
            rest.append(amap.ravel())
            continue
        inside = np.zeros(mask.shape, bool)
        inside[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = True
        box_height = rows[-1] + 1 - rows[0]
        boxes.append((mask[inside].reshape(box_height, -1), amap[inside].reshape(box_height, -1)))
        rest.append(amap[~inside])
    height, width = max(b[0].shape[0] for b in boxes), max(b[0].shape[1] for b in boxes)
    pool = np.concatenate(rest)
    slices = len(boxes) + -(-pool.size // (height * width))
    stack_masks = np.zeros((slices, height, width), bool)
    stack_maps = np.full((slices, height, width), -np.inf, np.float32)
    for i, (mask, amap) in enumerate(boxes):
        stack_masks[i, : mask.shape[0], : mask.shape[1]] = mask
        stack_maps[i, : amap.shape[0], : amap.shape[1]] = amap
    stack_maps[len(boxes) :].reshape(-1)[: pool.size] = pool
    normal = int((~flat_masks).sum())
    pad = stack_maps.size - flat_masks.size
    result["aupro"] = aupro(stack_masks, stack_maps, fpr_limit=AUPRO_FPR_LIMIT * normal / (normal + pad))
    return result


def prediction_metrics(pred: ClassPredictions) -> dict:
    """image_and_pixel_metrics of a class's predictions, its maps stacked or (native sizes) not."""
    if pred.masks is None:
        return image_and_pixel_metrics(pred.labels, pred.scores)
    if not isinstance(pred.maps, list):
        return image_and_pixel_metrics(pred.labels, pred.scores, pred.masks, pred.maps)
    return {**image_and_pixel_metrics(pred.labels, pred.scores), **ragged_pixel_metrics(pred.masks, pred.maps)}


def class_metrics(pred: ClassPredictions, class_id: int, threshold: float | None = None) -> dict:
    """Metrics of one class. PASS/FAIL counts at `threshold` (the saved one); without it, from the
    scorer's score_normalized >= 0.5 (the same decision, for callers that only keep predictions)."""
    if len(set(pred.labels.tolist())) < 2:
        msg = f"class {pred.name}: the test set needs both normal and anomalous images to be evaluated"
        raise DataError(msg)
    m = prediction_metrics(pred)
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
    masks = _pick(pred.masks, keep) if pred.masks is not None else None
    return ClassPredictions(
        pred.name,
        [s for s, k in zip(pred.samples, keep) if k],
        pred.labels[keep],
        pred.scores[keep],
        pred.normalized[keep],
        pred.auto_class[keep],
        pred.min_loglik[keep],
        _pick(pred.maps, keep),
        masks,
    )


def _pick(arrays: np.ndarray | list[np.ndarray], keep: np.ndarray) -> np.ndarray | list[np.ndarray]:
    return arrays[keep] if isinstance(arrays, np.ndarray) else [a for a, k in zip(arrays, keep) if k]


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
    per class, out_dir/operating_points/<class>.png (score histograms, threshold, ROC). A tiled run's
    maps, masks and pixel metrics are at each image's native resolution ("map_resolution")."""
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
            write_pictures(pred, threshold, out_dir / "pictures")
    result = {"classes": per_class, "mean": mean_metrics(per_class), "map_resolution": map_resolution(scorer.model.cfg)}
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
    if result.get("map_resolution"):
        lines += ["", f"Pixel metrics on anomaly maps at {_resolution_words(result['map_resolution'])}."]
    return "\n".join(lines) + "\n"


def _resolution_words(resolution: str) -> str:
    return "each image's native resolution (tiled)" if resolution == "native" else f"the model {resolution}"


def _pixels(maps: np.ndarray | list[np.ndarray], keep: np.ndarray | None = None) -> np.ndarray:
    """Every map value (of the images where keep is True) in one flat array."""
    chosen = maps if keep is None else _pick(maps, keep)
    return np.asarray(chosen) if isinstance(chosen, np.ndarray) else np.concatenate([m.ravel() for m in chosen])


def write_pictures(pred: ClassPredictions, threshold: float, out: Path, per_kind: int = 6) -> None:
    """Heatmap overlays of the most/least anomalous test images and histograms (paper Fig. 2b), each
    image at its map's resolution (the model input, or native when tiled)."""
    from hgad_edge.core.overlay import heatmap_overlay
    from hgad_edge.training.viz import loglik_histogram, save_overlay_grid, score_histogram

    order = np.argsort(-pred.scores)
    anomalous = [i for i in order if pred.labels[i] == 1][:per_kind]
    normal = [i for i in order[::-1] if pred.labels[i] == 0][: max(2, per_kind // 3)]
    good = pred.labels == 0
    vmin = float(np.percentile(_pixels(pred.maps, good), 1)) if good.any() else float(_pixels(pred.maps).min())
    vmax = float(max(np.percentile(_pixels(pred.maps), 99.9), vmin + 1e-6))
    items = []
    for i in anomalous + normal:
        s = pred.samples[i]
        image = resize_image(frame_pixels(s), pred.maps[i].shape)
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
