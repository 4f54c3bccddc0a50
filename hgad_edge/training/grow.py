"""Class changes on a trained run: add, retrain or remove product classes without training the rest.

HGAD shares its flows between classes while each class owns its mixture-head rows (centres, weights,
intra-class centres) and its scoring constants (per-position means and spreads, stds, threshold,
scale). A change therefore works on those rows and leaves the rest of the model alone:

* remove: the class's rows are dropped; the flows do not change.
* add / retrain: the class gets fresh rows (retrain: its old ones are discarded), its centres start at
  its mean latent under the parent's flows (as `init_centers` does for a new model), and
  `grow.steps` training steps run on its features together with a replay of `grow.replay_images`
  training images of every other class: the flows fine-tuned with all head rows ("finetune"), or
  frozen with only the new rows trained ("frozen": every other class's log-likelihoods stay exact).
  Its scoring constants are fitted on its own held-out images, as training does.
* every unchanged class is re-checked on its held-out normal images (the parent's held-out split):
  a change moves its scores even with frozen flows, because the class posterior (the entropy part
  of the score) spans every class. Its constants are refitted only when its held-out scores moved by
  more than `grow.recheck_tolerance` standard errors, and kept otherwise; recorded per class.

The new run records its lineage (parent model sha256, what changed, when, the parent's own lineage)
and never changes the parent: it is written into a staging folder and swapped in whole.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from hgad_edge.core.files import atomic_dir, sha256_file
from hgad_edge.core.thresholds import choose_threshold
from hgad_edge.training.checkpoint import WEIGHTS_FILE, load_run, read_meta, save_run
from hgad_edge.training.config import GrowConfig, HGADConfig
from hgad_edge.training.data import ADDataset, Sample
from hgad_edge.training.evaluate import predict_frames
from hgad_edge.training.latent_mixture import fit_latent_mixtures
from hgad_edge.training.model import HGADModel
from hgad_edge.training.scoring import AnomalyScorer
from hgad_edge.training.train import (
    FeatureCache,
    TrainingError,
    check_calibration_size,
    extract_features,
    fit_run_statistics,
    init_centers,
    lr_factor,
    split_calibration,
    train_epoch,
)

CHANGES = ("add", "retrain", "remove")
# Per-class tensors: the mixture head's (model.heads.<level>.<name>) and the scorer's scoring constants.
HEAD_PER_CLASS = (
    "main",
    "psi",
    "deltas",
    "psi_intra",
    "latent_offset",
    "latent_mu",
    "latent_inv_var",
    "latent_log_norm",
)
SCORER_PER_CLASS = ("ref_", "spread_", "tau_", "threshold", "scale")


class GrowError(TrainingError):
    """A class change cannot start (unknown class, class already there, last class, data missing...)."""


# ---- what changes -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassChange:
    """Classes to add (found under the data roots), retrain (new rows, from their current images) and
    remove. The new run's classes: the parent's minus the removed, in the parent's order, then the added."""

    add: tuple[str, ...] = ()
    retrain: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()

    def to_json(self) -> dict[str, list[str]]:
        return {k: list(getattr(self, k)) for k in CHANGES}

    @property
    def fresh(self) -> tuple[str, ...]:
        """Classes that get new head rows and newly fitted constants (added or retrained)."""
        return (*self.retrain, *self.add)

    def classes_after(self, parent: Sequence[str]) -> list[str]:
        """The new run's classes, or GrowError saying what is wrong with the change."""
        named = [*self.add, *self.retrain, *self.remove]
        if not named:
            raise GrowError("--from needs a change: --add-class, --retrain-class or --remove-class NAME")
        twice = sorted({c for c in named if named.count(c) > 1})
        if twice:
            raise GrowError(f"class {twice[0]!r} is named twice; name each class in one change only")
        there = [c for c in self.add if c in parent]
        if there:
            msg = f"class {there[0]!r} is already in the parent run ({', '.join(parent)}): use --retrain-class"
            raise GrowError(msg)
        unknown = [c for c in (*self.retrain, *self.remove) if c not in parent]
        if unknown:
            raise GrowError(f"class {unknown[0]!r} is not in the parent run; its classes: {', '.join(parent)}")
        after = [c for c in parent if c not in self.remove] + list(self.add)
        if not after:
            raise GrowError(f"removing {', '.join(self.remove)} leaves no class: a model needs at least one")
        return after


# ---- parameter surgery (pure) -------------------------------------------------------------------
def is_per_class(key: str) -> bool:
    """Whether a scorer state-dict tensor has one row per class (first dimension = classes)."""
    if key.startswith("model.heads."):
        return key.rsplit(".", 1)[-1] in HEAD_PER_CLASS
    return "." not in key and (key in ("threshold", "scale") or key.startswith(("ref_", "spread_", "tau_")))


def remap_classes(
    parent: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor], source: Sequence[int]
) -> dict[str, torch.Tensor]:
    """A child's scorer state: row i of every per-class tensor is the parent's row source[i], or, where
    source[i] is -1, row i of `fresh` (a newly built scorer with the child's classes); every other
    tensor (backbone, flows) is the parent's. Keys must match."""
    if set(parent) != set(fresh):
        diff = sorted(set(parent) ^ set(fresh))
        raise ValueError(f"parent and child scorers differ in their tensors ({diff[:3]}): not the same config")
    out = {}
    for key, value in parent.items():
        if not is_per_class(key):
            out[key] = value.clone()
            continue
        rows = [value[j] if j >= 0 else fresh[key][i] for i, j in enumerate(source)]
        out[key] = torch.stack(rows).to(value.dtype)
    return out


def child_scorer(parent: AnomalyScorer, classes: Sequence[str], fresh: Sequence[str], seed: int) -> AnomalyScorer:
    """A scorer for `classes` holding the parent's flows and its rows for each class it had and keeps
    unchanged; `fresh` classes get the rows a new model draws (seeded) and no scoring constants yet."""
    cfg = copy.deepcopy(parent.model.cfg)
    torch.manual_seed(seed)
    model = HGADModel(cfg, list(classes), load_backbone_weights=False)
    scorer = AnomalyScorer(model, cfg.score)
    names = parent.model.class_names
    source = [names.index(c) if c in names and c not in fresh else -1 for c in classes]
    scorer.load_state_dict(remap_classes(parent.state_dict(), scorer.state_dict(), source))
    return scorer


def fresh_rows_only(model: HGADModel, rows: Sequence[int]) -> list[torch.utils.hooks.RemovableHandle]:
    """Frozen flows: gradient hooks that zero every head row but `rows`, so the optimizer (without
    weight decay, which would move them anyway) trains the new classes only. Returns the hooks."""
    keep = torch.zeros(model.num_classes, dtype=torch.bool)
    keep[list(rows)] = True
    handles = []
    for head in model.heads:
        for name in HEAD_PER_CLASS:
            param = getattr(head, name, None)
            if isinstance(param, torch.nn.Parameter):
                mask = keep.view(-1, *([1] * (param.dim() - 1))).to(param.dtype)
                handles.append(param.register_hook(lambda g, m=mask: g * m))
    return handles


# ---- images -------------------------------------------------------------------------------------
def _relative(path: Path, roots: Sequence[Path]) -> str:
    """An image's name relative to the data root holding it: how a run records its held-out images."""
    for root in roots:
        if path.is_relative_to(root):
            return path.relative_to(root).as_posix()
    return path.as_posix()


@dataclass
class ClassImages:
    """One class's training images split as its run uses them: `fit` (trained on, replayed) and
    `held_out` (scoring constants, the re-check; never trained on)."""

    fit: list[Sample]
    held_out: list[Sample]


def parent_splits(
    dataset: ADDataset, parent_classes: Sequence[str], meta: dict, cfg: HGADConfig, needed: Sequence[str]
) -> dict[str, ClassImages]:
    """The parent's fit / held-out split of each class in `needed`: from the held-out names a grown run
    records, else (a run trained from scratch) `split_calibration` replayed over the parent's classes
    in its order (a class no longer under the roots takes part with its recorded image count, which is
    all that moves the shuffle). Checked against the parent's recorded counts: other images than it was
    trained on are a GrowError."""
    train = dataset.samples("train")
    by_class = {c: [s for s in train if s.class_name == c] for c in dataset.classes}
    recorded = meta.get("held_out")
    out: dict[str, ClassImages] = {}
    if isinstance(recorded, dict):
        for c in needed:
            names = set(recorded.get(c) or ())
            held = [s for s in by_class[c] if _relative(s.path, dataset.roots) in names]
            if not names or len(held) != len(names):
                msg = (
                    f"class {c}: {len(names) - len(held)} of its {len(names)} held-out images recorded in the parent "
                    f"run are not under {', '.join(map(str, dataset.roots))}; pass the roots it was trained on"
                )
                raise GrowError(msg)
            out[c] = ClassImages([s for s in by_class[c] if s not in held], held)
        return out
    samples: list[Sample] = []
    for i, c in enumerate(parent_classes):
        if c in by_class:
            samples += [replace(s, class_id=i) for s in by_class[c]]
        else:
            count = int(meta.get("n_train", {}).get(c, 0)) + int(meta.get("n_calib", {}).get(c, 0))
            samples += [Sample(Path(f"absent/{j:09d}"), c, i, 0, "good", None) for j in range(count)]
    fit, calib = split_calibration(samples, cfg.train)
    for c in needed:
        held = [s for s in calib if s.class_name == c]
        expected = meta.get("n_calib", {}).get(c)
        if expected is not None and len(held) != int(expected):
            msg = (
                f"class {c}: the training images under {', '.join(map(str, dataset.roots))} are not those the "
                f"parent run was trained on ({len(by_class[c])} found, {meta.get('n_train', {}).get(c, '?')} + "
                f"{expected} recorded); pass the roots it was trained on"
            )
            raise GrowError(msg)
        out[c] = ClassImages([s for s in fit if s.class_name == c], held)
    return out


def replay_images(fit: Sequence[Sample], count: int, seed: int) -> list[Sample]:
    """Up to `count` of a class's fit images, drawn once per class name and seed (never held-out ones)."""
    items = sorted(fit, key=lambda s: s.path.parts)
    if not items:
        return []
    random.Random(f"{seed}:{items[0].class_name}").shuffle(items)
    return sorted(items[:count], key=lambda s: s.path.parts)


# ---- the re-check -------------------------------------------------------------------------------
def held_out_scores(scorer: AnomalyScorer, samples: Sequence[Sample], class_id: int, batch_size: int) -> np.ndarray:
    """Frame scores of a class's held-out images (float64), as training's threshold sees them."""
    return predict_frames(scorer, scorer.model.cfg, list(samples), class_id, batch_size)[1].astype(np.float64)


def score_drift(before: np.ndarray, after: np.ndarray, policy: tuple[str, float | None], tolerance: float) -> dict:
    """How far one class's held-out scores moved, and whether past `tolerance` standard errors of their
    mean (std / sqrt(n) of `before`): the mean shift and the shift of the threshold the policy picks."""
    before, after = np.asarray(before, np.float64), np.asarray(after, np.float64)
    name, param = policy
    mean_shift = float(after.mean() - before.mean())
    thr_shift = float(choose_threshold(name, param, after).threshold - choose_threshold(name, param, before).threshold)
    limit = float(tolerance * before.std() / math.sqrt(before.size))
    return {
        "mean_shift": mean_shift,
        "threshold_shift": thr_shift,
        "tolerance": limit,
        "moved": bool(max(abs(mean_shift), abs(thr_shift)) > limit),
    }


# ---- the change ---------------------------------------------------------------------------------
@dataclass
class GrowResult:
    scorer: AnomalyScorer
    meta: dict
    classes: dict[str, dict] = field(default_factory=dict)  # per class: status, thresholds old / new


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def grow(
    parent_dir: Path | str,
    dataset: ADDataset,
    change: ClassChange,
    out_dir: Path | str,
    gcfg: GrowConfig | None = None,
    log: Callable[[str], None] = print,
) -> GrowResult:
    """Apply `change` to the run in `parent_dir` with images from `dataset` (open on the data roots) and
    write the new run to `out_dir` (never the parent; staged and swapped in whole). `gcfg`: the grow
    settings (default: the parent config's). Every check runs before any image is read."""
    parent_dir, out_dir = Path(parent_dir), Path(out_dir)
    if out_dir.resolve() == parent_dir.resolve():
        raise GrowError(f"--out {out_dir} is the parent run: a change writes a new run and never changes its parent")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        what = "already holds a run" if (out_dir / "meta.json").exists() else "is not an empty folder"
        raise GrowError(f"--out {out_dir} {what}: choose a new --out (the new run is written there whole)")
    meta = read_meta(parent_dir)
    parent_classes = list(meta["classes"])
    classes = change.classes_after(parent_classes)
    kept = [c for c in classes if c not in change.fresh]
    missing = [c for c in classes if c not in dataset.classes]
    if missing:
        roots = ", ".join(map(str, dataset.roots))
        why = (
            "its images are the new class's" if missing[0] in change.fresh else "its images are replayed and re-checked"
        )
        raise GrowError(f"class {missing[0]} is not under the data roots ({roots}): {why}; pass the root that holds it")
    scorer_parent, cfg, _ = load_run(parent_dir)
    if gcfg is not None:
        cfg.grow = gcfg
        cfg.validate()
    gcfg, tcfg = cfg.grow, cfg.train
    splits = parent_splits(dataset, parent_classes, meta, cfg, kept)
    for c in change.fresh:
        fit, held = split_calibration(dataset.select([c]).samples("train"), tcfg)
        splits[c] = ClassImages(fit, held)
    check_calibration_size([s for c in change.fresh for s in splits[c].held_out], cfg)
    parent_sha = sha256_file(parent_dir / WEIGHTS_FILE)

    t0 = time.time()
    scorer = child_scorer(scorer_parent, classes, change.fresh, tcfg.seed)
    ids = {c: i for i, c in enumerate(classes)}

    def ided(samples: Sequence[Sample]) -> list[Sample]:
        return [replace(s, class_id=ids[s.class_name]) for s in samples]

    timing = {"features": 0.0, "fine_tune": 0.0}
    steps = _fine_tune(scorer, cfg, splits, change, ided, timing, log) if change.fresh else 0
    scorer.eval()
    t1 = time.time()
    report = _statistics(scorer, scorer_parent, cfg, splits, change, ided, log)
    timing["statistics"] = time.time() - t1
    seconds = time.time() - t0

    entry = {
        "parent_sha256": parent_sha,
        "parent_run": str(parent_dir),
        "change": change.to_json(),
        "classes": classes,
        "flows": gcfg.flows if change.fresh else "unchanged",
        "steps": steps,
        "thresholds": {c: r["status"] for c, r in report.items()},
        "seconds": round(seconds, 1),
        "date": _now(),
    }
    child_meta = {
        "epochs_done": meta.get("epochs_done"),
        "calibrated": True,
        "data_roots": [str(r) for r in dataset.roots],
        "n_train": {c: len(splits[c].fit) for c in classes},
        "n_calib": {c: len(splits[c].held_out) for c in classes},
        "held_out": {c: [_relative(s.path, dataset.roots) for s in splits[c].held_out] for c in classes},
        "grow": {"config": dataclasses.asdict(gcfg), "classes": report},
        "grow_seconds": round(seconds, 1),
        # seconds of the features (and their image count), the fine-tune, the statistics with the re-check
        "grow_timing": {k: round(v, 1) for k, v in timing.items()},
        "lineage": [*meta.get("lineage", []), entry],
    }
    with atomic_dir(out_dir) as staging:
        save_run(staging, scorer, child_meta)
    return GrowResult(scorer, child_meta, report)


def _fine_tune(scorer: AnomalyScorer, cfg: HGADConfig, splits, change: ClassChange, ided, timing: dict, log) -> int:
    """Centres of the fresh classes from their data, then grow.steps steps on their features and the
    replay of the others'; returns the steps taken (`timing`: seconds of the features, the steps)."""
    model, gcfg, tcfg = scorer.model, cfg.grow, cfg.train
    tiling = cfg.tiling.setting()
    fresh = [s for c in change.fresh for s in splits[c].fit]
    replay = [
        s
        for c in model.class_names
        if c not in change.fresh
        for s in replay_images(splits[c].fit, gcfg.replay_images, tcfg.seed)
    ]
    log(f"features: {len(fresh)} images of {', '.join(change.fresh)}, {len(replay)} replayed of the other classes")
    t0 = time.time()
    cache = extract_features(model, ided(fresh + replay), batch_size=tcfg.batch_size, tiling=tiling)
    timing["features"], timing["feature_images"] = time.time() - t0, len(fresh) + len(replay)
    rows = [model.class_names.index(c) for c in change.fresh]
    gen = torch.Generator().manual_seed(tcfg.seed)
    if cfg.head.center_init == "data":
        own = torch.isin(cache.labels, torch.tensor(rows))
        init_centers(model, FeatureCache([lv[own] for lv in cache.levels], cache.labels[own]), gen)
    frozen = gcfg.flows == "frozen"
    model.flows.requires_grad_(not frozen)
    hooks = fresh_rows_only(model, rows) if frozen else []
    params = [p for p in list(model.flows.parameters()) + list(model.heads.parameters()) if p.requires_grad]
    # frozen: no weight decay, which would move the other classes' rows although their gradients are zero
    optim = torch.optim.Adam(params, lr=gcfg.lr, weight_decay=0.0 if frozen else tcfg.weight_decay)
    total, warmup = gcfg.steps, max(1, int(round(gcfg.warmup_fraction * gcfg.steps)))
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: lr_factor(s, total, warmup))
    stage2_from = int(math.ceil(cfg.head.stage1_fraction * total)) if cfg.head.intra else 0
    model.flows.train()
    done = 0
    while done < total:
        stage2 = done >= stage2_from
        budget = (total if stage2 else stage2_from) - done
        stats = train_epoch(
            model, cache, optim, sched, gen, stage2, tcfg, f"grow {done}/{total}", f"grow.lr (now {gcfg.lr})", budget
        )
        done += stats["steps"]
    for hook in hooks:
        hook.remove()
    model.flows.requires_grad_(True)
    # Latent mixtures (head.latent_components > 0): the fresh classes' from their features; fine-tuned
    # flows moved every class's latents, so then every class's, from its replayed images.
    fit_latent_mixtures(model, cache, tcfg.seed, rows if frozen else None)
    timing["fine_tune"] = time.time() - t0 - timing["features"]
    log(f"fine-tuned {done} steps ({gcfg.flows} flows): loss {stats['total']:.3f}")
    return done


def _statistics(scorer, parent: AnomalyScorer, cfg: HGADConfig, splits, change: ClassChange, ided, log) -> dict:
    """Scoring constants: fitted for the fresh classes; re-checked (and refitted where they moved)
    for every other class. Returns per class its status and threshold / scale before and after."""
    names, policy = scorer.model.class_names, cfg.score.policy()
    bs = cfg.train.batch_size
    report: dict[str, dict] = {}
    refit = []
    for c in names:
        if c in change.fresh:
            continue
        y, y0 = names.index(c), parent.model.class_names.index(c)
        before = held_out_scores(parent, splits[c].held_out, y0, bs)
        after = held_out_scores(scorer, splits[c].held_out, y, bs)
        drift = score_drift(before, after, policy, cfg.grow.recheck_tolerance)
        report[c] = {"status": "refitted" if drift["moved"] else "kept", **drift}
        if drift["moved"]:
            refit.append(c)
    todo = [*change.fresh, *refit]
    if todo:
        fit = ided([s for c in todo for s in splits[c].fit])
        calib = ided([s for c in todo for s in splits[c].held_out])
        fit_run_statistics(scorer, cfg, fit, calib, [names.index(c) for c in todo])
    for c in names:
        y = names.index(c)
        row = report.setdefault(c, {"status": "added" if c in change.add else "retrained"})
        was = parent.model.class_names.index(c) if c in parent.model.class_names else None
        row["threshold"] = {
            "old": None if was is None else float(parent.threshold[was]),
            "new": float(scorer.threshold[y]),
        }
        row["scale"] = {"old": None if was is None else float(parent.scale[was]), "new": float(scorer.scale[y])}
        log(
            f"{c}: {row['status']}"
            + (
                f" (held-out scores moved {row['mean_shift']:+.4g}, tolerance {row['tolerance']:.4g})"
                if "mean_shift" in row
                else ""
            )
        )
    return report
