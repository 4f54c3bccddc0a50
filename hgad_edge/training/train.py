"""Unified training: one HGAD model on the normal images of every class at once.

The backbone is frozen, so its features are computed once and cached; each step then trains the
flows and heads on a random sample of feature vectors per image and level, which is what makes
CPU training practical. Two stages (app. C): inter-class terms first, then the intra-class loss.

Tiled (config `tiling`, hgad_edge.core.tiling): every tile cut from a native-resolution training
image is one cache entry with its image's class, sampled like an image; the normal statistics pool
the tiles of a class, while the held-out scores that set the threshold are frame scores (the max
over each held-out frame's tiles), so PASS/FAIL is decided on frames.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from hgad_edge.core.thresholds import POLICIES
from hgad_edge.core.tiling import Tiling, TilingError, auto_tile, plan_tiles
from hgad_edge.training.batching import iter_tile_batches
from hgad_edge.training.checkpoint import load_train_state, save_run, save_train_state
from hgad_edge.training.config import HGADConfig, TrainConfig
from hgad_edge.training.data import ADDataset, DataError, Sample, image_shape
from hgad_edge.training.latent_mixture import fit_latent_mixtures
from hgad_edge.training.model import HGADModel
from hgad_edge.training.scoring import AnomalyScorer, fit_normal_statistics

# Most memory the tiled feature cache may take (FP16 backbone maps of every training tile).
CACHE_BUDGET_BYTES = 16 * 2**30


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss diverged); the message says what to change."""


def seed_everything(seed: int) -> None:
    # FrEIA draws its soft permutations from numpy's global RNG: seed it too.
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def split_calibration(samples: Sequence[Sample], cfg: TrainConfig) -> tuple[list[Sample], list[Sample]]:
    """Per class, hold out normal train images for calibration (fraction, clamped to [min, max],
    always leaving at least one image to train on)."""
    rng = random.Random(cfg.seed)
    fit, calib = [], []
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.class_id, []).append(s)
    for cid in sorted(by_class):
        items = list(by_class[cid])
        rng.shuffle(items)
        n = int(round(cfg.calib_fraction * len(items)))
        n = min(max(n, cfg.calib_min), cfg.calib_max, len(items) - 1)
        if n < 1:
            msg = (
                f"class {items[0].class_name} has {len(items)} normal training image(s); "
                "need at least 2 (one to calibrate)"
            )
            raise TrainingError(msg)
        calib.extend(sorted(items[:n], key=lambda s: s.path))
        fit.extend(sorted(items[n:], key=lambda s: s.path))
    return fit, calib


def check_calibration_size(calib: Sequence[Sample], cfg: HGADConfig) -> None:
    """Before training: enough held-out images per class for the configured threshold policy."""
    name, param = cfg.score.policy()
    need = POLICIES[name].min_normal(param)
    counts: dict[str, int] = {}
    for s in calib:
        counts[s.class_name] = counts.get(s.class_name, 0) + 1
    short = {c: n for c, n in counts.items() if n < need}
    if short:
        msg = (
            f"threshold policy {name} {param if param is not None else ''} needs {need} "
            "held-out normal images per class, "
            f"these classes get fewer: {short}; raise train.calib_min / calib_max / calib_fraction, add images, "
            "or choose another score.threshold_policy (or calibrate later with `hgad-edge calibrate`)"
        )
        raise TrainingError(msg)


@dataclass
class FeatureCache:
    """Backbone maps of every training image (tiled: of every tile), per level (N, C, h, w) in FP16,
    class ids (N,), and the index of each entry's image in the samples (N,)."""

    levels: list[torch.Tensor]
    labels: torch.Tensor
    frames: torch.Tensor | None = None


@torch.no_grad()
def extract_features(
    model: HGADModel, samples: Sequence[Sample], batch_size: int = 16, tiling: Tiling | None = None
) -> FeatureCache:
    """The backbone maps of `samples` resized whole, or of every tile cut from them (`tiling`)."""
    per_level: list[list[torch.Tensor]] = [[] for _ in model.levels]
    frames: list[np.ndarray] = []
    bar = tqdm(total=len(samples), desc="backbone features", unit="img")
    for batch in iter_tile_batches(samples, model.cfg.input_size, batch_size, tiling):
        for k, feat in enumerate(model.features(model.preprocess(batch.tiles))):
            per_level[k].append(feat.to(torch.float16))
        bar.update(int(batch.frame_ids[-1]) + 1 - bar.n)  # frames whose tiles have begun
        frames.append(batch.frame_ids)
    bar.close()
    index = torch.from_numpy(np.concatenate(frames)) if frames else torch.zeros(0, dtype=torch.long)
    labels = torch.tensor([s.class_id for s in samples], dtype=torch.long)[index]
    return FeatureCache([torch.cat(x) for x in per_level], labels, index)


def tile_counts(samples: Sequence[Sample], tiling: Tiling) -> list[int]:
    """Tiles each sample's image is cut into (sizes from the file headers; nothing is decoded)."""
    counts = []
    for s in samples:
        try:
            counts.append(plan_tiles(image_shape(s.path), tiling).count)
        except TilingError as err:
            raise DataError(f"{s.path}: {err}") from err
    return counts


def cache_entry_bytes(model: HGADModel) -> int:
    """Bytes one cache entry (an image, or a tile) takes: every level's FP16 backbone map."""
    return sum(2 * lv.channels * h * w for lv, (h, w) in zip(model.levels, model.map_shapes))


def check_cache_memory(model: HGADModel, counts: Sequence[int], budget: int | None = None) -> str:
    """Before extracting: what the tiled cache will take (per image: tiles x bytes, and in all), or a
    TrainingError naming the settings to change if that is over `budget` (CACHE_BUDGET_BYTES)."""
    budget = CACHE_BUDGET_BYTES if budget is None else budget
    entry, tiles = cache_entry_bytes(model), sum(counts)
    total, per_image = entry * tiles, tiles / max(1, len(counts))
    line = (
        f"feature cache: {tiles} tiles of {len(counts)} training images, per image {per_image:.3g} tiles x "
        f"{_bytes(entry)} = {_bytes(per_image * entry)}, {_bytes(total)} in all"
    )
    if total > budget:
        msg = (
            f"{line}: over the {_bytes(budget)} budget. Raise tiling.tile (fewer, larger tiles, each "
            "resized to input_size), lower tiling.overlap, train on fewer images, or set tiling.tile 0 "
            "(frames resized whole)"
        )
        raise TrainingError(msg)
    return line


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.{1 if n < 10 * scale else 0}f} {unit}"
    return f"{n:.0f} B"


def resolve_tiling(cfg: HGADConfig, samples: Sequence[Sample], tile: int | str | None = None) -> str:
    """Apply `--tile` to cfg (a side in source pixels, 0 = off, "auto": core.tiling.auto_tile on the
    training images' sizes, read from their headers; None: the config's) and say what training gets."""
    if tile == "auto":
        chosen = auto_tile([image_shape(s.path) for s in samples], cfg.input_size)
        cfg.tiling.tile = chosen or 0
        if chosen is None:
            return "tiling: off (frames near the input size are resized whole)"
    elif tile is not None:
        cfg.tiling.tile = int(tile)
    cfg.validate()
    tiling = cfg.tiling.setting()
    if tiling is None:
        return f"tiling: off (frames resized whole to {cfg.input_size[1]}x{cfg.input_size[0]})"
    per_image = sum(tile_counts(samples, tiling)) / max(1, len(samples))
    return f"tiling: {tiling.tile} px tiles, overlap {tiling.overlap:g}, ~{per_image:.3g} tiles per training image"


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 1% of the base rate."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def sample_vectors(feat: torch.Tensor, per_image: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, h, w) -> random vectors (B*V, C) and their map positions (B*V,)."""
    b, c, h, w = feat.shape
    pos = torch.randint(0, h * w, (b, per_image), generator=gen)
    flat = feat.flatten(2)  # (B, C, h*w)
    x = flat.gather(2, pos[:, None, :].expand(b, c, per_image))  # (B, C, V)
    return x.permute(0, 2, 1).reshape(-1, c).float(), pos.reshape(-1)


@torch.no_grad()
def init_centers(model: HGADModel, cache: FeatureCache, gen: torch.Generator, per_image: int = 64) -> None:
    """Place each level's class centres at the class mean latent of the untrained flow."""
    for k, feats in enumerate(cache.levels):
        x, pos = sample_vectors(feats, per_image, gen)
        z, _ = model.flow_vectors(k, x, pos)
        model.heads[k].init_centers_from(z, cache.labels.repeat_interleave(per_image))


def fit_run_statistics(
    scorer: AnomalyScorer,
    cfg: HGADConfig,
    fit: Sequence[Sample],
    calib: Sequence[Sample],
    classes: Sequence[int] | None = None,
) -> dict:
    """Fit a trained model's scoring constants (scoring.fit_normal_statistics): std and threshold on the
    held-out normal images `calib`, per-position statistics on up to train.position_images fit
    images per class. Also what a changed score config needs instead of retraining. Tiled: the
    statistics pool the images' tiles, the threshold is chosen on frame scores. `classes`: only
    these class ids (default all; a class change refits the classes it touched)."""
    tcfg, tiling = cfg.train, cfg.tiling.setting()
    classes = range(len(scorer.model.class_names)) if classes is None else classes

    def batches(samples: list[Sample]):
        return iter_tile_batches(samples, cfg.input_size, tcfg.batch_size, tiling)

    held_out = {y: batches([s for s in calib if s.class_id == y]) for y in classes}
    positions = {y: batches([s for s in fit if s.class_id == y][: tcfg.position_images]) for y in classes}
    return fit_normal_statistics(scorer, held_out, positions)


class Trainer:
    def __init__(
        self,
        cfg: HGADConfig,
        dataset: ADDataset,
        out_dir: Path,
        resume: bool = False,
        cache: FeatureCache | None = None,
        log: Callable[[str], None] = print,
    ):
        self.cfg, self.dataset, self.out_dir = cfg, dataset, Path(out_dir)
        self.resume = resume
        self.cache = cache  # features of the fit split, reusable across runs that share backbone, seed and tiling
        self.log = log

    def run(self) -> AnomalyScorer:
        cfg, tcfg, tiling = self.cfg, self.cfg.train, self.cfg.tiling.setting()
        seed_everything(tcfg.seed)
        model = HGADModel(cfg, self.dataset.classes)
        scorer = AnomalyScorer(model, cfg.score)
        fit, calib = split_calibration(self.dataset.samples("train"), tcfg)
        check_calibration_size(calib, cfg)
        counts = tile_counts(fit, tiling) if tiling is not None else [1] * len(fit)  # cache entries per image
        if tiling is not None and self.cache is None:
            self.log(check_cache_memory(model, counts))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        params = [p for p in list(model.flows.parameters()) + list(model.heads.parameters()) if p.requires_grad]
        optim = torch.optim.Adam(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
        steps_per_epoch = math.ceil(sum(counts) / tcfg.batch_size)  # a step: batch_size images (or tiles)
        total, warmup = steps_per_epoch * tcfg.epochs, int(round(tcfg.warmup_epochs * steps_per_epoch))
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: lr_factor(s, total, max(1, warmup)))
        start_epoch = self._maybe_resume(scorer, optim, sched)

        t0 = time.time()
        if self.cache is None:
            self.cache = extract_features(model, fit, batch_size=tcfg.batch_size, tiling=tiling)
        cache = self.cache
        feature_seconds = time.time() - t0
        if start_epoch == 0 and cfg.head.center_init == "data":
            init_centers(model, cache, torch.Generator().manual_seed(tcfg.seed))
        stage2_from = int(math.ceil(cfg.head.stage1_fraction * tcfg.epochs)) if cfg.head.intra else 0
        gen = torch.Generator().manual_seed(tcfg.seed + start_epoch)
        log_path = self.out_dir / "train_log.jsonl"
        model.flows.train()
        for epoch in range(start_epoch, tcfg.epochs):
            stats = self._epoch(model, cache, optim, sched, gen, epoch, stage2=epoch >= stage2_from)
            with open(log_path, "a") as f:
                f.write(json.dumps({"epoch": epoch + 1, **stats}) + "\n")
            save_run(self.out_dir, scorer, {"epochs_done": epoch + 1, "calibrated": False})
            save_train_state(
                self.out_dir, {"epoch": epoch + 1, "optim": optim.state_dict(), "sched": sched.state_dict()}
            )
        model.eval()
        fit_latent_mixtures(model, cache, tcfg.seed)  # head.latent_components > 0 only
        train_seconds = time.time() - t0
        calibration = fit_run_statistics(scorer, cfg, fit, calib)
        meta = {
            "epochs_done": tcfg.epochs,
            "calibrated": True,
            "calibration": calibration,
            "data_roots": [str(r) for r in getattr(self.dataset, "roots", [self.dataset.root])],
            "n_train": {c: sum(s.class_id == i for s in fit) for i, c in enumerate(self.dataset.classes)},
            "n_calib": {c: sum(s.class_id == i for s in calib) for i, c in enumerate(self.dataset.classes)},
            **({"n_train_tiles": _per_class(fit, counts, self.dataset.classes)} if tiling is not None else {}),
            "feature_seconds": round(feature_seconds, 1),
            "train_seconds": round(train_seconds, 1),
        }
        save_run(self.out_dir, scorer, meta)
        return scorer

    def _maybe_resume(self, scorer: AnomalyScorer, optim, sched) -> int:
        state = load_train_state(self.out_dir) if self.resume else None
        if state is None:
            if self.resume:
                raise TrainingError(f"nothing to resume in {self.out_dir}: no train_state.pt; train without --resume")
            return 0
        from safetensors.torch import load_file

        scorer.load_state_dict(load_file(str(self.out_dir / "model.safetensors")))
        optim.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        return int(state["epoch"])

    def _epoch(self, model: HGADModel, cache: FeatureCache, optim, sched, gen, epoch: int, stage2: bool) -> dict:
        tcfg = self.cfg.train
        desc = f"epoch {epoch + 1}/{tcfg.epochs}"
        stats = train_epoch(model, cache, optim, sched, gen, stage2, tcfg, desc, f"train.lr (now {tcfg.lr})")
        return {k: v for k, v in stats.items() if k != "steps"}


def train_epoch(
    model: HGADModel,
    cache: FeatureCache,
    optim,
    sched,
    gen: torch.Generator,
    stage2: bool,
    tcfg: TrainConfig,
    desc: str,
    lr_hint: str,
    max_steps: int | None = None,
) -> dict:
    """One pass over `cache` in random batches of tcfg.batch_size entries, or its first `max_steps`
    batches: the training step of every run (from scratch, and class changes on a trained one,
    hgad_edge.training.grow), on whatever parameters `optim` holds. Returns the mean loss terms,
    the stage and the steps taken. `lr_hint` names the rate to lower if the loss diverges."""
    n = cache.labels.shape[0]
    order = torch.randperm(n, generator=gen)
    starts = range(0, n, tcfg.batch_size)[:max_steps]
    sums: dict[str, float] = {}
    steps = 0
    bar = tqdm(starts, desc=desc, unit="step", leave=False)
    for i in bar:
        idx = order[i : i + tcfg.batch_size]
        loss, terms = step_loss(model, cache, idx, gen, stage2, tcfg.vectors_per_image)
        if not torch.isfinite(loss):
            raise TrainingError(f"loss became {loss.item()} ({desc}): lower {lr_hint} or check the data")
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        sched.step()
        for key, val in terms.items():
            sums[key] = sums.get(key, 0.0) + val
        steps += 1
        bar.set_postfix(loss=f"{terms['total']:.3f}")
    return {k: round(v / max(1, steps), 5) for k, v in sums.items()} | {"stage": 2 if stage2 else 1, "steps": steps}


def step_loss(model: HGADModel, cache: FeatureCache, idx, gen, stage2: bool, vectors_per_image: int):
    """Mean over levels of each level's loss on V sampled vectors per image (Alg. 1)."""
    v = vectors_per_image
    total = torch.zeros(())
    logged: dict[str, float] = {}
    for k, feats in enumerate(cache.levels):
        x, pos = sample_vectors(feats[idx], v, gen)
        y = cache.labels[idx].repeat_interleave(v)
        z, log_jac = model.flow_vectors(k, x, pos)
        terms = model.heads[k].losses(z, log_jac, y, stage2)
        total = total + terms["total"] / len(cache.levels)
        for key, val in terms.items():
            logged[key] = logged.get(key, 0.0) + val.item() / len(cache.levels)
    return total, logged


def _per_class(samples: Sequence[Sample], counts: Sequence[int], classes: Sequence[str]) -> dict[str, int]:
    return {c: sum(n for s, n in zip(samples, counts) if s.class_id == i) for i, c in enumerate(classes)}


def train(
    cfg: HGADConfig,
    dataset: ADDataset,
    out_dir: Path | str,
    resume: bool = False,
    cache: FeatureCache | None = None,
    log: Callable[[str], None] = print,
) -> AnomalyScorer:
    return Trainer(cfg, dataset, Path(out_dir), resume, cache, log).run()
