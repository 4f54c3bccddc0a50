"""Quality study: which levers close the gap between HGAD's flows and a unified kNN on the same
backbone features. Every row is one unified model over all classes of the data, trained and
evaluated on the same protocol; settings are chosen on a fixed tuning half of each class's test
images and reported on the other half (`hgad_edge.training.evaluate.tuning_half`).

    python benchmarks/quality_study.py --data ROOT --out benchmarks/results/quality_study \\
        [--rows landed,knn_landed,pool3,...] [--rescore ROW]

Rows are named in ROWS below: overrides of BASE (the default of commit cc2a7f1, written out in
full so the study reproduces after the defaults change). Each finished row leaves its model in
WORK/runs/ROW, its full config in OUT/configs/ROW.yaml and its metrics in OUT/rows/ROW.json; the
table OUT/study.md is rebuilt from every finished row. Backbone features of the training and test images are
computed once per
feature setting and reused by every row that shares it. `--rescore` re-evaluates a trained row
with other scoring settings (no retraining): the SCORING sweep.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import resource
import time
from pathlib import Path

import _bootstrap  # noqa: F401  (repository root on sys.path when run from a checkout)
import numpy as np
import torch
import torch.nn.functional as F

from hgad_edge.core.files import atomic_write_json, atomic_write_text
from hgad_edge.core.metrics import image_and_pixel_metrics
from hgad_edge.training.batching import iter_batches
from hgad_edge.training.checkpoint import load_run
from hgad_edge.training.config import HGADConfig, save_config
from hgad_edge.training.data import load_mask, open_roots
from hgad_edge.training.evaluate import ClassPredictions, class_metrics, subset, tuning_half
from hgad_edge.training.knn import fit_bank, knn_maps
from hgad_edge.training.model import HGADModel
from hgad_edge.training.train import FeatureCache, Trainer, extract_features, split_calibration

# The landed default (cc2a7f1) in full: the study's fixed starting point.
BASE = {
    "input_size": [256, 256],
    "backbone": {
        "name": "tf_efficientnet_lite0",
        "stages": [2, 3],
        "pyramid": [1.0],
        "pool": 1,
        "merge": "levels",
        "pool_border": "exclude",
    },
    "flow": {"coupling_blocks": 8, "clamp": 1.9, "pos_dim": 256, "hidden_ratio": 2.0},
    "head": {
        "mode": "full",
        "intra_centers": 10,
        "lambda1": 1.0,
        "lambda2": 1.0,
        "label_smoothing": 0.02,
        "center_init": "data",
        "stage1_fraction": 0.3,
        "latent_components": [0],
    },
    "train": {"epochs": 8, "batch_size": 16, "vectors_per_image": 128, "lr": 1e-3, "warmup_epochs": 1.0, "seed": 0},
    "score": {"criterion": "product", "smooth_sigma": 4.0, "topk": 0.0, "spread": "level", "image_deep_weight": 1.0},
}


def merged(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, val in over.items():
        if isinstance(val, dict):
            out[key] = merged(out.get(key, {}), val)
        else:
            out[key] = val
    return out


# The settings this study chose up to the two-level default (commit dd23035), as overrides of BASE:
# the rows varying one setting of that default start here.
TWO_LEVEL = {
    "backbone": {"name": "tf_efficientnet_lite1", "pool": 3, "pool_border": "zero"},
    "head": {"lambda2": 0.1},
    "train": {"epochs": 24},
    "score": {"topk": 0.03, "spread": "position", "image_deep_weight": 3.0},
}
# config.py's defaults now: TWO_LEVEL + stage 3 also over 5x5 (a third level), 64 vectors per image,
# the levels weighted per backbone map (empty level_weights: 1/2, 1/4, 1/4).
CHOSEN = merged(
    TWO_LEVEL,
    {"backbone": {"stages": [2, 3, 3], "pool": [3, 3, 5]}, "train": {"vectors_per_image": 64}},
)

# name -> (what it tests, overrides of BASE). "knn_*" rows run the kNN on that row's features.
ROWS: dict[str, tuple[str, dict]] = {
    "landed": ("the landed default", {}),
    "knn_landed": ("kNN on the landed default's features (no pooling, 2 levels fused for the bank)", {}),
    "pool3": ("3x3 local aggregation of the backbone maps", {"backbone": {"pool": 3}}),
    "knn_pool3": (
        "kNN on the pool3 row's features (each stage pooled, then fused for the bank)",
        {"backbone": {"pool": 3}},
    ),
    "knn_fuse_pool3": (
        "kNN on stage 3 upsampled into stage 2, then 3x3 pooled (the issue's reference kNN)",
        {"backbone": {"pool": 3, "merge": "fuse"}},
    ),
    "knn_pool3z": (
        "kNN on each stage 3x3 pooled with the zero padding counted (PatchCore's AvgPool2d)",
        {"backbone": {"pool": 3, "pool_border": "zero"}},
    ),
    "knn_fuse_pool3z": (
        "kNN on stage 3 upsampled into stage 2, then 3x3 pooled counting the zero padding (the issue's kNN)",
        {"backbone": {"pool": 3, "merge": "fuse", "pool_border": "zero"}},
    ),
    "pool3z_e24": (
        "pooling with the zero padding counted + 24 epochs",
        {"backbone": {"pool": 3, "pool_border": "zero"}, "train": {"epochs": 24}},
    ),
    "lite1_pool3z_e24": (
        "Lite1 backbone + pooling (zero padding counted) + 24 epochs",
        {"backbone": {"name": "tf_efficientnet_lite1", "pool": 3, "pool_border": "zero"}, "train": {"epochs": 24}},
    ),
    "default": (
        "the default of that time: Lite1 + pooling (zero padding counted) + 24 epochs, top 3 %, per-position spread",
        {
            "backbone": {"name": "tf_efficientnet_lite1", "pool": 3, "pool_border": "zero"},
            "train": {"epochs": 24},
            "score": {"topk": 0.03, "spread": "position"},
        },
    ),
    "default_l2_01": (
        "the default of that time with lambda2 0.1 (less weight on the mutual-information term)",
        merged(TWO_LEVEL, {"score": {"image_deep_weight": 1.0}}),
    ),
    "default_320": (
        "the two-level default (lambda2 0.1) at 320x320 input (small defects)",
        merged(TWO_LEVEL, {"input_size": [320, 320], "score": {"image_deep_weight": 1.0}}),
    ),
    "default_pool5": (
        "the two-level default (lambda2 0.1, image score with stage 3 weighted 3x) with 5x5 local aggregation",
        merged(TWO_LEVEL, {"backbone": {"pool": 5}}),
    ),
    "default_pool35": (
        "the two-level default (lambda2 0.1, image score with stage 3 weighted 3x), stage 2 pooled 3x3 and stage 3 5x5",
        merged(TWO_LEVEL, {"backbone": {"pool": [3, 5]}}),
    ),
    "default_lite2": (
        "the two-level default with the Lite2 backbone (stage widths 48 / 120 instead of 40 / 112)",
        merged(TWO_LEVEL, {"backbone": {"name": "tf_efficientnet_lite2"}}),
    ),
    "default_h1": (
        "the two-level default with narrower flow subnets (hidden ratio 1 instead of 2)",
        merged(TWO_LEVEL, {"flow": {"hidden_ratio": 1.0}}),
    ),
    "default_h1_e48": (
        "narrower flow subnets (hidden ratio 1) with twice the epochs (48): the default's training time",
        merged(TWO_LEVEL, {"flow": {"hidden_ratio": 1.0}, "train": {"epochs": 48}}),
    ),
    "default_h1_s233": (
        "narrower subnets (hidden ratio 1) + a third level: stage 3 also pooled 5x5 beside its 3x3 level",
        merged(
            TWO_LEVEL,
            {
                "backbone": {"stages": [2, 3, 3], "pool": [3, 3, 5]},
                "flow": {"hidden_ratio": 1.0},
                "score": {"level_weights": [1.0, 1.0, 1.0]},  # equal thirds, as it ran
            },
        ),
    ),
    "default_s233_v64": (
        "a third level (stage 3 also pooled 5x5), half the vectors per image: the two-level default's cost",
        merged(CHOSEN, {"score": {"level_weights": [1.0, 1.0, 1.0]}}),  # equal thirds; rescored per map: CHOSEN
    ),
    "default_b12": (
        "the two-level default with 12 coupling blocks (the paper's depth) instead of 8",
        merged(TWO_LEVEL, {"flow": {"coupling_blocks": 12}}),
    ),
    "default_v256_e12": (
        "the two-level default with 2x vectors per image and half the epochs (same vectors seen, half the steps)",
        merged(TWO_LEVEL, {"train": {"vectors_per_image": 256, "epochs": 12}}),
    ),
    "default_lr3": (
        "the two-level default with a 3x lower peak learning rate (3e-4; same warm-up and cosine decay)",
        merged(TWO_LEVEL, {"train": {"lr": 3e-4}}),
    ),
    "pool3_fuse": (
        "pooling + stage 3 fused into stage 2 (one 152-d level)",
        {"backbone": {"pool": 3, "merge": "fuse"}},
    ),
    "pool3_e24": ("pooling + 3x the training budget (24 epochs)", {"backbone": {"pool": 3}, "train": {"epochs": 24}}),
    "pool3_fuse_e24": (
        "pooling + fuse + 24 epochs",
        {"backbone": {"pool": 3, "merge": "fuse"}, "train": {"epochs": 24}},
    ),
    "chosen": (
        "the default since the third level (CHOSEN): stages 2, 3, 3 pooled 3, 3, 5; 64 vectors per image",
        CHOSEN,
    ),
    "knn_chosen": ("kNN on the chosen default's three levels (fused for the bank)", CHOSEN),
    "chosen_lm64": (
        "CHOSEN + the latent mixture: each class's latents re-fitted as 64 diagonal Gaussians after training",
        merged(CHOSEN, {"head": {"latent_components": [64]}}),
    ),
    "chosen_lm256": (
        "CHOSEN + a latent mixture of 256 diagonal Gaussians per class and level",
        merged(CHOSEN, {"head": {"latent_components": [256]}}),
    ),
    "chosen_lm64_L12": (
        "CHOSEN + latent mixtures of 64 on the two stage-3 levels only (the stride-8 level keeps its centres)",
        merged(CHOSEN, {"head": {"latent_components": [0, 64, 64]}}),
    ),
    "chosen_lm256_L12": (
        "the new default: CHOSEN + latent mixtures of 256 on the two stage-3 levels only",
        merged(CHOSEN, {"head": {"latent_components": [0, 256, 256]}}),
    ),
    "default_s123": (
        "the default + a stride-4 level (stage 1 pooled 3x3) for small defects",
        merged(CHOSEN, {"backbone": {"stages": [1, 2, 3, 3], "pool": [3, 3, 3, 5]}}),
    ),
}


def row_config(name: str) -> HGADConfig:
    return HGADConfig.from_dict(merged(BASE, ROWS[name][1]))


def feature_key(cfg: HGADConfig) -> str:
    b = cfg.backbone
    return json.dumps(
        [
            b.name,
            b.weights,
            list(b.stages),
            list(b.pyramid),
            b.pool[0] if len(b.pool) == 1 else list(b.pool),  # caches from when pool was one int
            b.merge,
            list(cfg.input_size),
            cfg.train.seed,
            cfg.train.calib_fraction,
            cfg.train.calib_min,
            cfg.train.calib_max,
        ]
        # caches computed before pool_border existed are keyed without it ("exclude")
        + ([] if cfg.backbone.pool_border == "exclude" else [cfg.backbone.pool_border])
    )


class Features:
    """Backbone maps of the fit split (FP16, as training caches them) and of every test image
    (FP32, as evaluation computes them), for one feature setting; kept on disk between runs."""

    def __init__(self, cfg: HGADConfig, dataset, folder: Path):
        self.cfg, self.dataset = cfg, dataset
        folder.mkdir(parents=True, exist_ok=True)
        key = feature_key(cfg)
        path = folder / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
        data = torch.load(path, weights_only=False) if path.is_file() else None
        if data is None or data["key"] != key:
            data = self._compute()
            torch.save(data, path)
        self.train = FeatureCache(data["train_levels"], data["train_labels"])
        self.test = data["test_levels"]  # per class name: per level (n, C, h, w)
        self.seconds = data["seconds"]

    def _compute(self) -> dict:
        cfg, ds = self.cfg, self.dataset
        t0 = time.time()
        model = HGADModel(cfg, ds.classes)
        fit, _ = split_calibration(ds.samples("train"), cfg.train)
        train = extract_features(model, fit, batch_size=16)
        test = {}
        for name in ds.classes:
            samples = [s for s in ds.samples("test") if s.class_name == name]
            per_level: list[list[torch.Tensor]] = [[] for _ in model.levels]
            for images in iter_batches(samples, cfg.input_size, 16):
                for k, f in enumerate(model.features(model.preprocess(images))):
                    per_level[k].append(f)
            test[name] = [torch.cat(x) for x in per_level]
        return {
            "key": feature_key(cfg),
            "train_levels": train.levels,
            "train_labels": train.labels,
            "test_levels": test,
            "seconds": round(time.time() - t0, 1),
        }


def class_truth(dataset, size) -> dict:
    """Per class: test samples, labels, masks (or None) and the tuning-half mask."""
    out = {}
    for name in dataset.classes:
        samples = [s for s in dataset.samples("test") if s.class_name == name]
        masks = None
        if dataset.has_masks(name):
            masks = np.stack(
                [load_mask(s.mask_path, shape=size) if s.mask_path else np.zeros(size, bool) for s in samples]
            )
        out[name] = {
            "samples": samples,
            "labels": np.array([s.label for s in samples]),
            "masks": masks,
            "tune": tuning_half(samples),
        }
    return out


@torch.no_grad()
def hgad_predictions(scorer, feats: list[torch.Tensor], truth: dict, class_id: int) -> ClassPredictions:
    out: dict[str, list[np.ndarray]] = {}
    n = feats[0].shape[0]
    for i in range(0, n, 16):
        cls = torch.full((min(16, n - i),), class_id, dtype=torch.long)
        for key, val in scorer.evaluate_features([f[i : i + 16] for f in feats], cls).items():
            out.setdefault(key, []).append(val.numpy())
    cat = {k: np.concatenate(v) for k, v in out.items()}
    return ClassPredictions(
        truth["samples"][0].class_name,
        truth["samples"],
        truth["labels"],
        cat["score"],
        cat["score_normalized"],
        cat["auto_class"],
        cat["min_loglik"],
        cat["anomaly_map"].astype(np.float32),
        truth["masks"],
    )


def score_predictions(truth: dict, class_id: int, scores: np.ndarray, maps: np.ndarray) -> ClassPredictions:
    """Predictions that carry only scores and maps (the kNN, a rescoring): what AUROC needs."""
    n = len(scores)
    return ClassPredictions(
        truth["samples"][0].class_name,
        truth["samples"],
        truth["labels"],
        scores,
        scores,
        np.full(n, class_id),
        np.zeros((n, 1)),
        maps,
        truth["masks"],
    )


def split_metrics(pred: ClassPredictions, class_id: int, tune: np.ndarray, metric_fn) -> dict:
    return {
        part: metric_fn(subset(pred, keep), class_id)
        for part, keep in (("tune", tune), ("report", ~tune), ("full", np.ones_like(tune)))
    }


def knn_metrics(pred: ClassPredictions, class_id: int) -> dict:
    m = image_and_pixel_metrics(pred.labels, pred.scores, pred.masks, pred.maps if pred.masks is not None else None)
    return {k: (None if v is None else float(v)) for k, v in m.items()}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_row(name: str, dataset, out: Path, work: Path, truth: dict) -> dict:
    cfg = row_config(name)
    feats = Features(cfg, dataset, work / "features")
    run_dir = work / "runs" / name
    result = {"row": name, "what": ROWS[name][0], "overrides": ROWS[name][1], "feature_seconds": feats.seconds}
    t0 = time.time()
    if name.startswith("knn"):
        bank = fit_bank(feats.train.levels, feats.train.labels, seed=cfg.train.seed)
        per_class, t_score, n_img = {}, 0.0, 0
        for cid, cname in enumerate(dataset.classes):
            t1 = time.time()
            amap, score = [], []
            levels = feats.test[cname]
            for i in range(0, levels[0].shape[0], 16):
                m, s = knn_maps(bank, [lv[i : i + 16] for lv in levels], cfg.input_size)
                amap.append(m.numpy())
                score.append(s.numpy())
            t_score += time.time() - t1
            n_img += levels[0].shape[0]
            pred = score_predictions(truth[cname], cid, np.concatenate(score), np.concatenate(amap))
            per_class[cname] = split_metrics(pred, cid, truth[cname]["tune"], knn_metrics)
        result.update(
            per_class=per_class,
            train_seconds=round(bank.fit_seconds, 1),
            score_ms_per_image=round(1e3 * t_score / n_img, 1),
            bank_mb=round(bank.nbytes / 2**20, 1),
        )
    else:
        if (run_dir / "meta.json").is_file() and json.loads((run_dir / "meta.json").read_text()).get("calibrated"):
            scorer, _, meta = load_run(run_dir)
            train_s = meta.get("train_seconds")
        else:
            trainer = Trainer(cfg, dataset, run_dir, cache=feats.train)
            scorer = trainer.run().eval()
            train_s = round(time.time() - t0, 1)
        result.update(per_class=evaluate_hgad(scorer, feats, dataset, truth), train_seconds=train_s)
    cfg_path = out / "configs" / f"{name}.yaml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg_path)
    result["peak_rss_mb"] = round(peak_rss_mb())
    result["mean"] = mean_over_classes(result["per_class"])
    return result


def evaluate_hgad(scorer, feats: Features, dataset, truth: dict) -> dict:
    per_class = {}
    for cid, cname in enumerate(dataset.classes):
        pred = hgad_predictions(scorer, feats.test[cname], truth[cname], cid)
        per_class[cname] = split_metrics(pred, cid, truth[cname]["tune"], class_metrics)
    return per_class


def mean_over_classes(per_class: dict) -> dict:
    out = {}
    for part in ("tune", "report", "full"):
        out[part] = {}
        for key in ("image_auroc", "pixel_auroc", "aupro"):
            vals = [c[part][key] for c in per_class.values() if c[part].get(key) is not None]
            out[part][key] = float(np.mean(vals)) if vals else None
    return out


@torch.no_grad()
def rescore(name: str, dataset, work: Path, truth: dict, sweep: list[dict]) -> list[dict]:
    """Scoring settings on a trained row without retraining (calibration constants kept: they do
    not depend on smoothing, top-k, level weights or the criterion; thresholds do not enter
    AUROC). The flows run once per image; each setting only redoes the cheap map arithmetic."""
    scorer, cfg, _ = load_run(work / "runs" / name)
    feats = Features(cfg, dataset, work / "features")
    terms = {}  # class -> [(lls, nhs, cls)] per chunk of test images
    for cid, cname in enumerate(dataset.classes):
        levels, chunks = feats.test[cname], []
        for i in range(0, levels[0].shape[0], 16):
            chunk = [lv[i : i + 16] for lv in levels]
            cls = torch.full((chunk[0].shape[0],), cid, dtype=torch.long)
            chunks.append((*scorer.level_maps(scorer.model.terms_from_features(chunk), cls), cls))
        terms[cname] = chunks
    rows, trained = [], cfg.score  # set_score_config replaces cfg.score: each setting starts from the row's own
    for over in sweep:
        scorer.set_score_config(dataclasses.replace(trained, **over))
        per_class = {}
        for cid, cname in enumerate(dataset.classes):
            outs = [scorer.map_and_score(lls, nhs, cls) for lls, nhs, cls in terms[cname]]
            maps, scores = torch.cat([m for m, _ in outs]), torch.cat([s for _, s in outs])
            pred = score_predictions(truth[cname], cid, scores.numpy(), maps.numpy())
            per_class[cname] = split_metrics(pred, cid, truth[cname]["tune"], knn_metrics)
        rows.append({"row": name, "score": over, "per_class": per_class, "mean": mean_over_classes(per_class)})
        m = rows[-1]["mean"]
        print(
            f"  {name} {over}: tune image {m['tune']['image_auroc']:.4f} pixel {m['tune']['pixel_auroc']:.4f} | "
            f"full image {m['full']['image_auroc']:.4f} pixel {m['full']['pixel_auroc']:.4f}",
            flush=True,
        )
    return rows


@torch.no_grad()
def diagnose(name: str, dataset, out: Path, work: Path, truth: dict) -> dict:
    """Where do the flows lose to the kNN? Per class: image AUROC of each level alone (the
    row's own scoring, one level at a time), of the whole model and of the kNN on the same
    features; and score histograms normal vs defect, HGAD beside kNN (OUT/diagnose/*.png)."""
    from hgad_edge.core.metrics import auroc
    from hgad_edge.training.scoring import image_score
    from hgad_edge.training.viz import score_histogram

    scorer, cfg, _ = load_run(work / "runs" / name)
    feats = Features(cfg, dataset, work / "features")
    bank = fit_bank(feats.train.levels, feats.train.labels, seed=cfg.train.seed)
    level_banks = [fit_bank([lv], feats.train.labels, seed=cfg.train.seed) for lv in feats.train.levels]
    report = {}
    for cid, cname in enumerate(dataset.classes):
        levels, labels = feats.test[cname], truth[cname]["labels"]
        per_level = [[] for _ in levels]
        knn_level = [[] for _ in levels]
        knn_scores, hgad_scores = [], []
        for i in range(0, levels[0].shape[0], 16):
            chunk = [lv[i : i + 16] for lv in levels]
            cls = torch.full((chunk[0].shape[0],), cid, dtype=torch.long)
            lls, nhs = scorer.level_maps(scorer.model.terms_from_features(chunk), cls)
            s_ls, s_es = scorer.upsampled(lls, "loglik", cls), scorer.upsampled(nhs, "neg_entropy", cls)
            for k in range(len(levels)):
                alone = [float(j == k) for j in range(len(levels))]
                per_level[k].append(image_score(scorer.mixed(s_ls, s_es, alone), scorer.cfg.topk).numpy())
                amap = knn_maps(level_banks[k], [chunk[k]], cfg.input_size)[0]
                knn_level[k].append(image_score(amap, scorer.cfg.topk).numpy())
            hgad_scores.append(scorer.map_and_score(lls, nhs, cls)[1].numpy())
            knn_scores.append(knn_maps(bank, chunk, cfg.input_size)[1].numpy())
        hgad, knn = np.concatenate(hgad_scores), np.concatenate(knn_scores)
        types = np.array([s.path.parent.name for s in truth[cname]["samples"]])
        report[cname] = {
            # each level's map alone, image score as the row's (top fraction): HGAD, and the kNN on that level
            "levels": {
                lv.name: float(auroc(labels, np.concatenate(per_level[k]))) for k, lv in enumerate(scorer.model.levels)
            },
            "knn_levels": {
                lv.name: float(auroc(labels, np.concatenate(knn_level[k]))) for k, lv in enumerate(scorer.model.levels)
            },
            "hgad": float(auroc(labels, hgad)),
            "knn": float(auroc(labels, knn)),
            # good images against one defect type at a time, the whole model and the fused kNN
            "defect_types": {
                t: {"hgad": float(auroc(labels[sel], hgad[sel])), "knn": float(auroc(labels[sel], knn[sel]))}
                for t in sorted(set(types) - {"good"})
                for sel in [(types == "good") | (types == t)]
                if (types == "good").any()
            },
        }
        for tag, vals in (("hgad", hgad), ("knn", knn)):
            score_histogram(
                out / "diagnose" / f"{name}_{cname}_{tag}.png",
                vals[labels == 0],
                vals[labels == 1],
                None,
                title=f"{cname}: {tag} image scores ({name}), AUROC {100 * report[cname][tag]:.1f}",
            )
        print(f"  {cname}: {report[cname]}", flush=True)
    atomic_write_json(out / "diagnose" / f"{name}.json", report)
    return report


@torch.no_grad()
def probe_latents(name: str, cname: str, dataset, out: Path, work: Path, truth: dict, sizes=(64, 256, 1024)) -> dict:
    """Where does the evidence get lost, per level, for one class: position-free image scores (top 3 % of the
    upsampled map) from the trained head, from nearest neighbours on the features and on the flow's latents
    (30,000 training latents per class, all classes in one bank), and from diagonal mixtures of `sizes`
    components fitted to the class's latents (latent_mixture.diag_mixture, without the Jacobian)."""
    from hgad_edge.core.metrics import auroc
    from hgad_edge.training.knn import nearest_distance
    from hgad_edge.training.latent_mixture import diag_mixture
    from hgad_edge.training.losses import diag_mixture_loglik
    from hgad_edge.training.scoring import image_score

    scorer, cfg, _ = load_run(work / "runs" / name)
    model, feats = scorer.model, Features(cfg, dataset, work / "features")
    cid, gen, per = dataset.classes.index(cname), torch.Generator().manual_seed(0), 30000
    labels, levels = truth[cname]["labels"], feats.test[cname]
    report = {}
    for k, lv in enumerate(feats.train.levels):
        xs, zs = [], {}
        for y in range(len(dataset.classes)):
            rows = (feats.train.labels == y).nonzero()[:, 0]
            img = rows[torch.randint(0, rows.numel(), (per,), generator=gen)]
            pos = torch.randint(0, lv.shape[2] * lv.shape[3], (per,), generator=gen)
            x = lv.flatten(2)[img, :, pos].float()
            xs.append(x)
            zs[y] = model.flow_vectors(k, x, pos)[0]
        x_bank, z_bank = torch.cat(xs), torch.cat(list(zs.values()))
        mixtures = {m: [t[None] for t in diag_mixture(zs[cid], m, gen)] for m in sizes}
        scores: dict[str, list[np.ndarray]] = {}
        for i in range(0, levels[k].shape[0], 16):
            f = levels[k][i : i + 16]
            b, d, h, w = f.shape
            z, log_jac = model.flow_map(k, f)
            maps = {
                "trained head": -model.heads[k](z, log_jac)[0][:, cid],
                "kNN on features": nearest_distance(f.permute(0, 2, 3, 1).reshape(-1, d).float(), x_bank),
                "kNN on latents": nearest_distance(z, z_bank),
            }
            for m, (offset, mu, inv_var, log_norm) in mixtures.items():
                maps[f"diagonal mixture of {m}"] = -diag_mixture_loglik(z, offset, mu, inv_var, log_norm)[:, 0] / d
            for key, v in maps.items():
                up = F.interpolate(v.reshape(b, 1, h, w), size=cfg.input_size, mode="bilinear", align_corners=False)
                scores.setdefault(key, []).append(image_score(up[:, 0], 0.03).numpy())
        report[model.levels[k].name] = {key: float(auroc(labels, np.concatenate(v))) for key, v in scores.items()}
        print(f"  {cname} {model.levels[k].name}: {report[model.levels[k].name]}", flush=True)
    atomic_write_json(out / "diagnose" / f"{name}_{cname}_latents.json", report)
    return report


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def study_table(rows: list[dict], classes: list[str]) -> str:
    head = (
        "| row | what | tune img / pix | report img / pix | full img / pix | "
        + " | ".join(f"{c} (full) img / pix" for c in classes)
        + " | train s | peak MB |"
    )
    lines = [head, "|" + "---|" * (7 + len(classes))]
    for r in rows:
        m = r["mean"]
        cells = [f"`{r['row']}`", r["what"]]
        cells += [f"{_pct(m[p]['image_auroc'])} / {_pct(m[p]['pixel_auroc'])}" for p in ("tune", "report", "full")]
        cells += [
            f"{_pct(r['per_class'][c]['full']['image_auroc'])} / {_pct(r['per_class'][c]['full']['pixel_auroc'])}"
            for c in classes
        ]
        cells += [str(r.get("train_seconds")), str(r.get("peak_rss_mb"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(out: Path, classes: list[str]) -> None:
    rows = [json.loads(p.read_text()) for p in sorted((out / "rows").glob("*.json"))]
    order = {n: i for i, n in enumerate(ROWS)}
    rows.sort(key=lambda r: order.get(r["row"], 999))
    atomic_write_text(out / "study.md", study_table(rows, classes))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path, help="results (rows, configs, table): small, committed")
    ap.add_argument("--work", type=Path, default=Path("runs/quality_study"), help="models and feature caches")
    ap.add_argument("--rows", default="landed,knn_pool3")
    ap.add_argument("--rescore", help="trained row to re-evaluate over the scoring sweep")
    ap.add_argument(
        "--sweep", type=json.loads, help='with --rescore: JSON list of score overrides, e.g. [{"topk": 0.03}]'
    )
    ap.add_argument("--diagnose", help="trained row to compare with the kNN per class and level")
    ap.add_argument("--probe-latents", nargs=2, metavar=("ROW", "CLASS"), help="trained row: densities in its latents")
    args = ap.parse_args()
    names = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in names if r not in ROWS]
    if bad:
        ap.error(f"unknown row(s) {bad}; choose from {', '.join(ROWS)}")
    torch.set_num_threads(2)
    dataset = open_roots(args.data)
    if args.probe_latents:
        row, cname = args.probe_latents
        probe_latents(row, cname, dataset, args.out, args.work, class_truth(dataset, tuple(row_config(row).input_size)))
        return
    if args.diagnose:
        diagnose(
            args.diagnose,
            dataset,
            args.out,
            args.work,
            class_truth(dataset, tuple(row_config(args.diagnose).input_size)),
        )
        return
    if args.rescore:
        truth = class_truth(dataset, tuple(row_config(args.rescore).input_size))
        sweep = [
            {},
            {"topk": 0.001},
            {"topk": 0.01},
            {"topk": 0.03},
            {"smooth_sigma": 2.0},
            {"smooth_sigma": 8.0},
            {"criterion": "loglik"},
            {"criterion": "entropy"},
        ]
        if len(row_config(args.rescore).backbone.stages) == 2 and row_config(args.rescore).backbone.merge == "levels":
            sweep += [{"level_weights": w} for w in ((1.0, 0.0), (0.0, 1.0), (2.0, 1.0), (1.0, 2.0))]
        tag = "" if args.sweep is None else "_" + hashlib.sha256(json.dumps(args.sweep).encode()).hexdigest()[:8]
        rows = rescore(args.rescore, dataset, args.work, truth, args.sweep or sweep)
        atomic_write_json(args.out / "rescore" / f"{args.rescore}{tag}.json", rows)
        return
    for name in names:
        if (args.out / "rows" / f"{name}.json").is_file():
            print(f"{name}: done before, kept", flush=True)
            continue
        print(f"{name}: {ROWS[name][0]}", flush=True)
        result = run_row(name, dataset, args.out, args.work, class_truth(dataset, tuple(row_config(name).input_size)))
        atomic_write_json(args.out / "rows" / f"{name}.json", result)
        m = result["mean"]
        print(f"{name}: tune {m['tune']}, report {m['report']}, full {m['full']}", flush=True)
        write_table(args.out, dataset.classes)


if __name__ == "__main__":
    main()
