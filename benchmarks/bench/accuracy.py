"""Accuracy per engine on real data (image / pixel AUROC) and the drift against PyTorch FP32."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from hgad_edge.bench.context import Setup
from hgad_edge.bench.engines import TorchEngine, open_engine, skip_reason
from hgad_edge.bench.log import Budget
from hgad_edge.bench.rows import Drift


def cap_samples(samples: Sequence[Any], n: int | None) -> list[Any]:
    """At most n samples, normal and anomalous in their original proportion (at least one of each
    where both exist and n >= 2), picked evenly spaced so every defect type stays represented."""
    samples = list(samples)
    if n is None or len(samples) <= n:
        return samples
    groups = [[s for s in samples if s.label == v] for v in (0, 1)]
    groups = [g for g in groups if g]
    if len(groups) == 1 or n < 2:
        return _evenly(samples, n)
    normal, anomalous = groups
    k_normal = min(len(normal), max(1, round(n * len(normal) / len(samples))))
    k_normal = min(k_normal, n - 1)
    k_anomalous = min(len(anomalous), n - k_normal)
    return _evenly(normal, k_normal) + _evenly(anomalous, k_anomalous)


def _evenly(items: list, k: int) -> list:
    if k <= 0:
        return []
    idx = np.unique(np.linspace(0, len(items) - 1, k).round().astype(int))
    return [items[i] for i in idx]


def _predict(engine, images: np.ndarray, class_id: int, max_batch: int) -> tuple[np.ndarray, np.ndarray]:
    maps, scores = [], []
    for i in range(0, len(images), max_batch):
        chunk = list(images[i : i + max_batch])
        m, s, _ = engine.run(chunk, [class_id] * len(chunk))
        maps.append(np.asarray(m, dtype=np.float32))
        scores.append(np.asarray(s, dtype=np.float64))
    return np.concatenate(maps), np.concatenate(scores)


def _class_data(setup: Setup, dataset, name: str, max_images: int | None):
    from hgad_edge.training.batching import load_batch
    from hgad_edge.training.data import load_mask

    samples = cap_samples([s for s in dataset.samples("test") if s.class_name == name], max_images)
    size = tuple(setup.cfg.input_size)
    images = load_batch(samples, size).numpy()
    labels = np.array([s.label for s in samples], dtype=np.int64)
    masks = None
    if dataset.has_masks(name):
        masks = np.stack([load_mask(s.mask_path, shape=size) if s.mask_path else np.zeros(size, bool) for s in samples])
    return images, labels, masks


def _metrics(labels: np.ndarray, scores: np.ndarray, masks, maps: np.ndarray) -> dict[str, Any]:
    from hgad_edge.core.metrics import auroc

    finite = np.isfinite(scores).all() and np.isfinite(maps).all()
    out: dict[str, Any] = {"n": int(labels.size), "n_anomalous": int(labels.sum()), "finite": bool(finite)}
    both = 0 < labels.sum() < labels.size
    out["image_auroc"] = auroc(labels, np.nan_to_num(scores, nan=np.inf)) if both else None
    out["pixel_auroc"] = (
        auroc(masks, np.nan_to_num(maps, nan=np.inf)) if masks is not None and masks.any() and not masks.all() else None
    )
    return out


def bench_accuracy(
    setup: Setup,
    data_roots: Sequence[Path],
    backends,
    precisions,
    max_images: int | None,
    budget: Budget,
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Per class image/pixel AUROC per backend and precision; drift against torch FP32.
    classes: only these classes of the data (default: every class the model knows)."""
    from hgad_edge.training.data import open_roots

    dataset = open_roots([Path(r) for r in data_roots], classes)
    names = list(setup.scorer.model.class_names)
    classes = [c for c in dataset.classes if c in names]
    unknown = [c for c in dataset.classes if c not in names]
    if not classes:
        raise ValueError(f"none of the data's classes {dataset.classes} is a class of the model {names}")
    engines = {("torch", "fp32"): TorchEngine(setup.scorer, setup.device)}
    cases = [
        (b, p) for b in backends for p in precisions if (b, p) != ("torch", "fp32") and skip_reason(setup, b, p) is None
    ]
    for case in cases:
        try:
            engines[case] = open_engine(setup, *case)
        except Exception as err:  # noqa: BLE001
            setup.log.skip(f"accuracy {case[0]} {case[1]}", f"{type(err).__name__}: {err}")
    result: dict[str, Any] = {
        "data_roots": [str(r) for r in data_roots],
        "max_images": max_images,
        "classes": {},
        "drift": {},
        "unknown_classes": unknown,
    }
    drift = {f"{b} {p}": Drift(b, p) for b, p in engines}
    try:
        for name in tqdm(classes, desc="accuracy", unit="class"):
            if budget.spent():
                setup.log.skip(f"accuracy {name}", "time budget used up")
                continue
            images, labels, masks = _class_data(setup, dataset, name, max_images)
            class_id = names.index(name)
            ref_maps = ref_scores = None
            per_engine = {}
            for (b, p), engine in engines.items():
                maps, scores = _predict(engine, images, class_id, setup.max_batch)
                per_engine[f"{b} {p}"] = _metrics(labels, scores, masks, maps)
                if ref_maps is None:
                    ref_maps, ref_scores = maps, scores
                _update_drift(drift[f"{b} {p}"], maps, scores, ref_maps, ref_scores)
            result["classes"][name] = per_engine
    finally:
        for engine in engines.values():
            if engine.backend != "torch" or engine.precision != "fp32":
                engine.close()
    result["drift"] = list(drift.values())
    return result


def _update_drift(entry: Drift, maps, scores, ref_maps, ref_scores) -> None:
    bad = ~(np.isfinite(maps).all(axis=(1, 2)) & np.isfinite(scores))
    entry.nonfinite += int(bad.sum())
    entry.n_images += int(scores.size)
    ok = ~bad
    if ok.any():
        entry.max_abs_score_diff = max(entry.max_abs_score_diff, float(np.abs(scores[ok] - ref_scores[ok]).max()))
        entry.max_abs_map_diff = max(entry.max_abs_map_diff, float(np.abs(maps[ok] - ref_maps[ok]).max()))
