"""Unified kNN reference (PatchCore-style, no coreset): the bar HGAD's flows have to clear.

On the SAME backbone maps a run's flows see (its stages, pooling and input size), every level is
bilinearly upsampled to the finest level's map and concatenated; ONE memory bank holds
`per_class` random training vectors of every class together (unified: no class id at test time);
a test vector's anomaly is its distance to the nearest bank vector (exact, in chunks), the map is
upsampled to the input size and the image score is its max. Nothing here is exported: it is a
measuring stick in `benchmarks/ablation.py --modes knn` and the quality study.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hgad_edge.training.backbone import fuse_maps


@dataclass
class KnnBank:
    vectors: torch.Tensor  # (N, C) float32
    fit_seconds: float

    @property
    def nbytes(self) -> int:
        return self.vectors.numel() * self.vectors.element_size()


def fit_bank(levels: list[torch.Tensor], labels: torch.Tensor, per_class: int = 20000, seed: int = 0) -> KnnBank:
    """levels: per level (N, C_k, h_k, w_k) maps of the training images; labels (N,) class ids."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero()[:, 0]
        vecs = torch.cat([_vectors(fuse_maps([lv[i].float() for lv in levels])) for i in _chunks(idx)])
        take = torch.randperm(vecs.shape[0], generator=gen)[: min(per_class, vecs.shape[0])]
        parts.append(vecs[take])
    return KnnBank(torch.cat(parts).contiguous(), time.perf_counter() - t0)


def _chunks(idx: torch.Tensor, size: int = 64):
    for i in range(0, idx.numel(), size):
        yield idx[i : i + size]


def _vectors(fused: torch.Tensor) -> torch.Tensor:
    return fused.permute(0, 2, 3, 1).reshape(-1, fused.shape[1])


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Exact Euclidean distance of each query (Q, C) to its nearest bank row (N, C), in chunks of
    bank rows so the (Q, chunk) distance block stays small."""
    best = torch.full((queries.shape[0],), float("inf"))
    for i in range(0, bank.shape[0], chunk):
        b = bank[i : i + chunk]
        # |b|^2 - 2 q.b in one BLAS call; |q|^2 is the same for every bank row, added after the min
        part = torch.addmm(b.pow(2).sum(1)[None], queries, b.T, alpha=-2.0)
        best = torch.minimum(best, part.amin(1))
    return (best + queries.pow(2).sum(1)).clamp_min_(0.0).sqrt()


@torch.no_grad()
def knn_maps(
    bank: KnnBank, levels: list[torch.Tensor], input_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Test maps per level (B, C_k, h_k, w_k) -> anomaly maps (B, H, W) and image scores (B,)."""
    fused = fuse_maps([lv.float() for lv in levels])
    b, _, h, w = fused.shape
    dist = nearest_distance(_vectors(fused), bank.vectors).reshape(b, 1, h, w)
    amap = F.interpolate(dist, size=input_size, mode="bilinear", align_corners=False)[:, 0]
    return amap, amap.flatten(1).amax(1)


def evaluate_knn(cfg, dataset, cache=None, per_class: int = 20000) -> dict:
    """The kNN over every test class of dataset, in `evaluate`'s result layout (per class and mean
    metrics), plus its cost: bank fit seconds, scoring ms per image, bank size.

    cache: the training features of the fit split (a FeatureCache of the same backbone setting),
    e.g. the one a Trainer just used; computed here when None.
    """
    import numpy as np

    from hgad_edge.core.metrics import image_and_pixel_metrics
    from hgad_edge.training.batching import iter_batches
    from hgad_edge.training.data import load_mask
    from hgad_edge.training.evaluate import mean_metrics
    from hgad_edge.training.model import HGADModel
    from hgad_edge.training.train import extract_features, split_calibration

    model = HGADModel(cfg, dataset.classes)
    if cache is None:
        fit, _ = split_calibration(dataset.samples("train"), cfg.train)
        cache = extract_features(model, fit, batch_size=cfg.train.batch_size)
    bank = fit_bank(cache.levels, cache.labels, per_class, cfg.train.seed)
    per_cls, seconds, images = {}, 0.0, 0
    for name in dataset.classes:
        samples = [s for s in dataset.samples("test") if s.class_name == name]
        maps, scores = [], []
        for batch in iter_batches(samples, cfg.input_size, cfg.train.batch_size):
            feats = model.features(model.preprocess(batch))
            t0 = time.perf_counter()
            amap, score = knn_maps(bank, feats, cfg.input_size)
            seconds += time.perf_counter() - t0
            maps.append(amap.numpy())
            scores.append(score.numpy())
        images += len(samples)
        labels = np.array([s.label for s in samples])
        masks = None
        if dataset.has_masks(name):
            masks = np.stack(
                [
                    load_mask(s.mask_path, shape=cfg.input_size) if s.mask_path else np.zeros(cfg.input_size, bool)
                    for s in samples
                ]
            )
        m = image_and_pixel_metrics(
            labels, np.concatenate(scores), masks, np.concatenate(maps) if masks is not None else None
        )
        per_cls[name] = {k: (None if v is None else float(v)) for k, v in m.items()} | {
            "n_test": len(samples),
            "level": "pixel" if masks is not None else "image",
        }
    return {
        "classes": per_cls,
        "mean": mean_metrics(per_cls),
        "fit_seconds": round(bank.fit_seconds, 1),
        "score_ms_per_image": round(1e3 * seconds / max(1, images), 2),
        "bank_mb": round(bank.nbytes / 2**20, 1),
    }
