"""Streaming anomaly scoring (paper sec. 3.4), fused with the model into one module.

The paper (and the official code) turn log-likelihoods into likelihoods normalised by the maximum
over the whole test set of a class, which a camera stream does not have; and exp() of per-dimension
log-likelihoods saturates (float32 1 - exp(-20) == 1), flattening every map of a briefly trained
model. Here each level's per-dimension log-likelihood and inter-class negative entropy are
standardised in the log domain with constants from NORMAL training images (`fit_normal_statistics`):
z = (mean_normal[position] - value) / (rms_normal * spread[position]), per class, level and map
position (spread: how much more or less normal images vary at that position than on average,
`ScoreConfig.spread`), then upsampled and averaged over levels (each backbone map alike, its pooling
windows sharing its weight). Criteria (paper Tab. 3c): "loglik"
S_l, "entropy" S_e, "product" softplus(S_l) * 2 sigmoid(S_e): the paper's S_l * S_e with the
entropy factor squashed, so a confident class posterior (entropy at its normal level, factor 1)
keeps the likelihood evidence instead of zeroing it. The image score (mean of the top fraction)
reads the same construction with the deepest stage's levels weighted higher
(`ScoreConfig.image_deep_weight`): their evidence is steadier for the PASS/FAIL decision.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hgad_edge.core import thresholds as decision
from hgad_edge.core.tiling import frame_score
from hgad_edge.training.config import ScoreConfig
from hgad_edge.training.model import HGADModel

# Floor of a calibration std: a constant map (e.g. zero entropy everywhere) must not divide by 0.
TAU_MIN = 1e-3
# Floor of a position's relative spread: where normal training images barely vary (a constant
# background), a tiny change must not become a defect; a quarter of the level's typical spread.
SPREAD_FLOOR = 0.25


# ---- pure functions -----------------------------------------------------------------------------
def standardize(value: torch.Tensor, ref: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """(ref - value) / tau: how many normal-image standard deviations value lies below normal."""
    return (ref - value) / tau


def combine(s_l: torch.Tensor, s_e: torch.Tensor, criterion: str) -> torch.Tensor:
    if criterion == "loglik":
        return s_l
    if criterion == "entropy":
        return s_e
    return F.softplus(s_l) * 2.0 * torch.sigmoid(s_e)


def level_weights(weights: tuple[float, ...], maps: Sequence[Hashable]) -> torch.Tensor:
    """(levels,) weights summing to 1 for the average of the levels' maps. `maps`: per level, the
    backbone map it reads (stage and scale). () = each map weighs the same, shared equally by its
    pooling windows (stages [2, 3, 3]: 1/2, 1/4, 1/4): a second window of stage 3 adds evidence
    at another extent without outvoting the finer stage that localises small defects."""
    levels = len(maps)
    if not weights:
        windows = Counter(maps)
        return torch.tensor([1.0 / (len(windows) * windows[m]) for m in maps])
    if len(weights) != levels or any(w < 0 for w in weights) or sum(weights) <= 0:
        msg = f"score.level_weights={tuple(weights)}: give {levels} non-negative weights (one per level), not all 0"
        raise ValueError(msg)
    w = torch.tensor(weights, dtype=torch.float32)
    return w / w.sum()


def image_level_weights(map_weights: torch.Tensor, deepest: torch.Tensor, factor: float) -> torch.Tensor:
    """(levels,) weights of the map the image score reads: the anomaly map's, times `factor` on
    the deepest stage's levels (`deepest`: (levels,) bool), renormalised; factor 1: the map's."""
    w = map_weights * torch.where(deepest, factor, 1.0)
    return w / w.sum()


def relative_spread(values: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(N, h, w) normal values and their position means (h, w) -> each position's RMS deviation
    relative to the level's (mean square 1 over positions), floored at SPREAD_FLOOR."""
    rms = (values - ref).pow(2).mean(0).sqrt()
    scale = rms.pow(2).mean().sqrt()
    if scale <= 0:
        return torch.ones_like(ref)
    return (rms / scale).clamp_min(SPREAD_FLOOR)


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius ceil(4 sigma); sigma 0 gives the identity kernel [1]."""
    if sigma <= 0:
        return torch.ones(1)
    radius = max(1, int(math.ceil(4.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(maps: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable blur of (B, H, W) with reflect padding (export-friendly: Pad + 2 Conv). A one-tap
    kernel (smooth_sigma 0) is no blur: the maps pass through and no nodes are exported."""
    if kernel.numel() == 1:
        return maps
    r = kernel.numel() // 2
    x = F.pad(maps[:, None], (r, r, r, r), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x[:, 0]


def image_score(amap: torch.Tensor, topk: float) -> torch.Tensor:
    """Max of the map, or the mean of its top fraction `topk` (robust to single hot pixels)."""
    flat = amap.flatten(1)
    if topk <= 0:
        return flat.amax(1)
    k = max(1, int(round(topk * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(1)


def gather_class(maps: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """(B, Y, h, w) per-class maps -> (B, h, w) of each image's class cls (B,)."""
    b, _, h, w = maps.shape
    return maps.gather(1, cls.view(b, 1, 1, 1).expand(b, 1, h, w))[:, 0]


# ---- the fused module ---------------------------------------------------------------------------
class AnomalyScorer(nn.Module):
    """uint8 frames (B, H, W, 3) RGB at the model input size + class_id (B,) int64 (-1 = auto) ->
    anomaly_map (B, H, W), score (B,), class_pred (B,) int64: the exported graph. The per-class
    `threshold` / `scale` buffers are not used in it: the PASS/FAIL decision happens after the graph
    (hgad_edge.core.thresholds), so thresholds can be recalibrated without re-exporting."""

    def __init__(self, model: HGADModel, cfg: ScoreConfig):
        super().__init__()
        self.model = model
        y, k = model.num_classes, len(model.levels)
        for name in ("loglik", "neg_entropy"):
            # Per class, level and map position: border features (padding) and positional structure
            # give every position its own normal level; one scalar per level made borders the max.
            for lv, (h, w) in enumerate(model.map_shapes):
                self.register_buffer(f"ref_{name}_{lv}", torch.zeros(y, h, w))
                self.register_buffer(f"spread_{name}_{lv}", torch.ones(y, h, w))
            self.register_buffer(f"tau_{name}", torch.ones(y, k))
        self.register_buffer("threshold", torch.zeros(y))
        self.register_buffer("scale", torch.ones(y))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self.set_score_config(cfg)

    def set_score_config(self, cfg: ScoreConfig) -> None:
        """Take the scoring settings that calibration does not depend on (smoothing, top fraction,
        level weights, the image score's deep weight, criterion), e.g. to rescore one trained model.
        Level weights are Python floats: zero-weight levels leave no nodes in the exported graph.
        The model's config takes them too, so a saved run records the settings it scores with."""
        self.cfg = self.model.cfg.score = cfg
        levels = self.model.levels
        self.register_buffer("kernel", gaussian_kernel1d(cfg.smooth_sigma), persistent=False)
        weights = level_weights(cfg.level_weights, [(lv.stages, lv.scale) for lv in levels])
        last = max(max(lv.stages) for lv in levels)
        deepest = torch.tensor([max(lv.stages) == last for lv in levels])
        image = image_level_weights(weights, deepest, cfg.image_deep_weight)
        self.map_weights, self.image_weights = weights.tolist(), image.tolist()

    def select_class(self, terms, class_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Auto class = argmax of the image-averaged inter-class posterior over all levels."""
        post = torch.stack([lp.exp().mean((2, 3)) for _, _, lp in terms]).mean(0)  # (B, Y)
        auto = post.argmax(1)
        return torch.where(class_id >= 0, class_id, auto), post

    def level_maps(self, terms, cls: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per level: class log-likelihood maps (B, h, w) and negative entropy maps (B, h, w)."""
        return [gather_class(ll, cls) for ll, _, _ in terms], [nh for _, nh, _ in terms]

    def standardized(self, maps: list[torch.Tensor], name: str, cls: torch.Tensor) -> list[torch.Tensor]:
        """Per level: (normal mean - value) / (tau * spread) of `name` maps, at the level's size."""
        tau = getattr(self, f"tau_{name}")
        return [
            standardize(m, self.reference(name, k)[cls], tau[cls, k].view(-1, 1, 1) * self.spread(name, k)[cls])
            for k, m in enumerate(maps)
        ]

    def upsampled(self, maps: list[torch.Tensor], name: str, cls: torch.Tensor) -> list[torch.Tensor]:
        """Per level: the standardised `name` maps, bilinearly upsampled to the input size (B, H, W)."""
        size = self.model.cfg.input_size
        return [
            F.interpolate(z[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
            for z in self.standardized(maps, name, cls)
        ]

    def mixed(self, s_ls: list[torch.Tensor], s_es: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        """The smoothed map of the criterion on the levels' weighted averages (zero weights skipped)."""
        used = [(w, s_l, s_e) for w, s_l, s_e in zip(weights, s_ls, s_es) if w > 0]
        s_l, s_e = used[0][0] * used[0][1], used[0][0] * used[0][2]
        for w, a, b in used[1:]:
            s_l, s_e = s_l + w * a, s_e + w * b
        crit = self.cfg.criterion if self.model.cfg.head.per_class else "loglik"
        return gaussian_blur(combine(s_l, s_e, crit), self.kernel)

    def map_and_score(self, lls, nhs, cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly map (B, H, W) and image score (B,) (levels weighted per `score.image_deep_weight`)."""
        s_ls, s_es = self.upsampled(lls, "loglik", cls), self.upsampled(nhs, "neg_entropy", cls)
        amap = self.mixed(s_ls, s_es, self.map_weights)
        image_map = amap if self.image_weights == self.map_weights else self.mixed(s_ls, s_es, self.image_weights)
        return amap, image_score(image_map, self.cfg.topk)

    def reference(self, name: str, level: int) -> torch.Tensor:
        """(Y, h, w) normal mean of `name` ("loglik" / "neg_entropy") at each position of a level."""
        return getattr(self, f"ref_{name}_{level}")

    def spread(self, name: str, level: int) -> torch.Tensor:
        """(Y, h, w) relative normal spread of `name` at each position of a level (ones: one spread
        for the whole level)."""
        return getattr(self, f"spread_{name}_{level}")

    def normalize(self, score: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """score_normalized (0.5 at the class threshold): the runtime's host-side formula, evaluated here."""
        idx = cls.detach().cpu().numpy()
        thr, scale = self.threshold.detach().cpu().numpy()[idx], self.scale.detach().cpu().numpy()[idx]
        return torch.from_numpy(decision.normalize(score.detach().cpu().numpy(), thr, scale)).to(score.device)

    def forward(self, images: torch.Tensor, class_id: torch.Tensor):
        terms = self.model.level_terms(self.model.preprocess(images))
        cls, _ = self.select_class(terms, class_id)
        lls, nhs = self.level_maps(terms, cls)
        amap, score = self.map_and_score(lls, nhs, cls)
        return amap, score, cls

    @torch.no_grad()
    def evaluate_batch(self, images: torch.Tensor, class_id: torch.Tensor) -> dict[str, torch.Tensor]:
        """Evaluation in one pass: scores with the given class (-1: the auto class, as the graph does),
        the class 'auto' would pick, and each image's lowest per-dimension log-likelihood per level
        (for histograms)."""
        return self.evaluate_features(self.model.features(self.model.preprocess(images)), class_id)

    @torch.no_grad()
    def evaluate_features(self, feats: list[torch.Tensor], class_id: torch.Tensor) -> dict[str, torch.Tensor]:
        """`evaluate_batch` from backbone maps already computed (cached test features)."""
        terms = self.model.terms_from_features([f.to(self.model.body_dtype) for f in feats])
        auto, _ = self.select_class(terms, torch.full_like(class_id, -1))
        cls = torch.where(class_id >= 0, class_id, auto)
        lls, nhs = self.level_maps(terms, cls)
        amap, score = self.map_and_score(lls, nhs, cls)
        min_loglik = torch.stack([ll.flatten(1).amin(1) for ll in lls], 1)
        return {
            "anomaly_map": amap,
            "score": score,
            "score_normalized": self.normalize(score, cls),
            "class_pred": cls,
            "auto_class": auto,
            "min_loglik": min_loglik,
        }


# ---- calibration --------------------------------------------------------------------------------
# A batch of normal images: uint8 (B, H, W, 3), each its own frame; or (tiles, frame index of each
# tile) as batching.iter_tile_batches yields them, the tiles of a frame sharing its index.
NormalBatch = torch.Tensor | tuple[torch.Tensor, np.ndarray]


@torch.no_grad()
def _level_values(scorer: AnomalyScorer, batches: Iterable[NormalBatch], y: int):
    """Per batch: (class log-likelihood maps, negative-entropy maps, class ids, frame ids or None) of class y."""
    model = scorer.model
    for batch in batches:
        images, frames = (batch, None) if isinstance(batch, torch.Tensor) else (batch[0], np.asarray(batch[1]))
        cls = torch.full((images.shape[0],), y, dtype=torch.long)
        lls, nhs = scorer.level_maps(model.level_terms(model.preprocess(images)), cls)
        yield lls, nhs, cls, frames


def frame_scores(scores: np.ndarray, frames: Sequence[np.ndarray | None]) -> np.ndarray:
    """Per frame in index order: the max of its tiles' scores (core.tiling.frame_score), as float64.
    `scores`: the inputs' scores, batch after batch; `frames`: per batch, each input's frame index
    (None: each input is a frame)."""
    if all(f is None for f in frames):
        return np.asarray(scores, np.float64)
    if any(f is None for f in frames):
        raise ValueError("mixed batches: give every batch frame indices, or none")
    ids = np.concatenate(frames)
    return np.array([frame_score(scores[ids == f]) for f in np.unique(ids)], np.float64)


@torch.no_grad()
def fit_normal_statistics(
    scorer: AnomalyScorer,
    batches_by_class: dict[int, Iterable[NormalBatch]],
    position_batches_by_class: dict[int, Iterable[NormalBatch]] | None = None,
    policy: tuple[str, float | None] | None = None,
) -> dict:
    """Fit the scoring constants on normal images; batches yield uint8 (B, H, W, 3) or, tiled,
    (tiles, frame index of each tile) (`NormalBatch`).

    Per class and level: the per-position normal mean of log-likelihood and negative entropy from
    position_batches (many normal images, e.g. training images; default: the held-out ones), the
    std of the centred values on the held-out images, and from the held-out images' scores the
    threshold (the configured policy, hgad_edge.core.thresholds) and scale, so score_normalized =
    sigmoid((s - thr) / scale) is 0.5 at the threshold. Held-out images are never trained on, so
    std and threshold are honest. Tiled: means, spreads and std pool every tile of the class, but
    the scores that set threshold and scale are frame scores (the max over each held-out frame's
    tiles), so PASS/FAIL is decided on frames. Returns the constants and, per class, the held-out
    (frame) scores.
    Only the classes in batches_by_class change; `policy` (name, parameter) defaults to the config's.
    """
    policy, param = policy or scorer.cfg.policy()
    held_out_scores: dict[str, list[float]] = {}
    model = scorer.model
    k_levels = len(model.levels)
    for y, batches in batches_by_class.items():
        held_out = list(_level_values(scorer, batches, y))
        if not held_out:
            raise ValueError(f"no calibration images for class {model.class_names[y]}")
        source = held_out
        if position_batches_by_class and y in position_batches_by_class:
            source = list(_level_values(scorer, position_batches_by_class[y], y)) or held_out
        for name, idx in (("loglik", 0), ("neg_entropy", 1)):
            for k in range(k_levels):
                values = torch.cat([v[idx][k] for v in source]).double()
                ref = scorer.reference(name, k)[y] = values.mean(0)
                spread = torch.ones_like(ref)
                if scorer.cfg.spread == "position":
                    spread = relative_spread(values, ref)
                scorer.spread(name, k)[y] = spread
                centred = torch.cat([((v[idx][k] - ref) / spread).flatten() for v in held_out])
                tau = centred.pow(2).mean().sqrt()  # RMS around the position means
                getattr(scorer, f"tau_{name}")[y, k] = tau.clamp_min(TAU_MIN)
        scores = torch.cat([scorer.map_and_score(lls, nhs, cls)[1] for lls, nhs, cls, _ in held_out])
        s = frame_scores(scores.numpy(), [frames for *_, frames in held_out])
        class_name = model.class_names[y]
        scorer.threshold[y] = decision.choose_threshold(policy, param, s, what=f"class {class_name}").threshold
        scorer.scale[y] = decision.score_scale(s)
        held_out_scores[class_name] = s.tolist()
    scorer.calibrated.fill_(True)
    return {
        "threshold": scorer.threshold.tolist(),
        "scale": scorer.scale.tolist(),
        "threshold_policy": [policy, param],
        "held_out_scores": held_out_scores,
        **{f"tau_{n}": getattr(scorer, f"tau_{n}").tolist() for n in ("loglik", "neg_entropy")},
    }
