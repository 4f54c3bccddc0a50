"""HGAD model: frozen backbone -> per-level conditional flow -> per-level mixture head.

The body (backbone and flows) runs in `body_dtype` (FP32, or FP16 for the mixed-precision export);
latents and log|det J| are cast to FP32 before the head, where squared distances reach 1e6-1e9,
far past FP16's range (deployment notes).
"""

from __future__ import annotations

import torch
from torch import nn

from hgad_edge.training.backbone import Backbone
from hgad_edge.training.config import HGADConfig
from hgad_edge.training.flows import PrecomputedConditionFlow, build_flow, flatten_map, positional_encoding_2d, run_flow
from hgad_edge.training.head import MixtureHead


class HGADModel(nn.Module):
    def __init__(self, cfg: HGADConfig, class_names: list[str], load_backbone_weights: bool = True):
        super().__init__()
        cfg.validate()
        if not class_names:
            raise ValueError("a model needs at least one class")
        self.cfg, self.class_names = cfg, list(class_names)
        self.backbone = Backbone(cfg.backbone, load_backbone_weights)
        self.levels = self.backbone.levels
        self.map_shapes = self.backbone.feature_shapes(cfg.input_size)
        self.flows = nn.ModuleList(build_flow(lv.channels, cfg.flow) for lv in self.levels)
        latent = cfg.head.latent_per_level(cfg.backbone.level_stages())
        self.heads = nn.ModuleList(
            MixtureHead(lv.channels, len(class_names), cfg.head, m) for lv, m in zip(self.levels, latent)
        )
        for k, (h, w) in enumerate(self.map_shapes):
            pe = positional_encoding_2d(cfg.flow.pos_dim, h, w)
            self.register_buffer(f"pos_{k}", pe.permute(1, 2, 0).reshape(h * w, -1), persistent=False)
        mean = torch.tensor(self.backbone.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.backbone.std).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean * 255.0, persistent=False)
        self.register_buffer("pixel_std", std * 255.0, persistent=False)
        self.body_dtype = torch.float32
        self.fused_flows: nn.ModuleList | None = None
        self._fp32_body: dict[str, torch.Tensor] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def pos(self, k: int) -> torch.Tensor:
        """(h*w, pos_dim) positional condition of level k, row-major over the map."""
        return getattr(self, f"pos_{k}")

    def set_body_dtype(self, dtype: torch.dtype) -> HGADModel:
        """Run backbone and flows in dtype (mixed precision); the heads always stay FP32."""
        if dtype != torch.float32 and self._fp32_body is None:
            # FP32 -> FP16 -> FP32 would round the weights: keep the FP32 originals to return to.
            self._fp32_body = {k: v.detach().clone() for k, v in self._body_state().items()}
        self.body_dtype = dtype
        self.backbone.to(dtype)
        self.flows.to(dtype)
        if dtype == torch.float32 and self._fp32_body is not None:
            with torch.no_grad():
                for k, v in self._body_state().items():
                    v.copy_(self._fp32_body[k])
        if self.fused_flows is not None:
            self.fuse_condition()  # rebuild the per-position constants in the new dtype
        return self

    def _body_state(self) -> dict[str, torch.Tensor]:
        return {f"backbone.{k}": v for k, v in self.backbone.state_dict(keep_vars=True).items()} | {
            f"flows.{k}": v for k, v in self.flows.state_dict(keep_vars=True).items()
        }

    def fuse_condition(self) -> HGADModel:
        """Inference (and export): precompute the positional condition's share of every coupling
        subnet's first layer (see PrecomputedConditionFlow). Training keeps the FrEIA flows."""
        with torch.no_grad():
            self.fused_flows = nn.ModuleList(
                PrecomputedConditionFlow(flow, self.pos(k).to(self.body_dtype)) for k, flow in enumerate(self.flows)
            )
        return self

    # ---- stages -------------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) RGB at input_size -> normalised float (B, 3, H, W).

        In the model (and so in the exported graph) so every backend sees identical inputs.
        """
        x = images.to(torch.float32).permute(
            0, 3, 1, 2
        )  # Cast first: TensorRT wants uint8 inputs cast before any layer
        return (x - self.pixel_mean) / self.pixel_std

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone(x.to(self.body_dtype))

    def flow_vectors(self, k: int, x: torch.Tensor, pos_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Level-k flow on vectors x (N, C) at map positions pos_index (N,) -> FP32 z, log|det J|."""
        cond = self.pos(k)[pos_index].to(self.body_dtype)
        z, log_jac = run_flow(self.flows[k], x.to(self.body_dtype), cond)
        return z.float(), log_jac.float()

    def flow_map(self, k: int, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Level-k flow on a whole map (B, C, h, w) -> z (B*h*w, C), log|det J| (B*h*w,) in FP32."""
        x = flatten_map(feat).to(self.body_dtype)
        if self.fused_flows is not None:
            z, log_jac = self.fused_flows[k](x)
        else:
            cond = self.pos(k).to(self.body_dtype).repeat(feat.shape[0], 1)
            z, log_jac = run_flow(self.flows[k], x, cond)
        return z.float(), log_jac.float()

    def level_terms(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Normalised images -> per level (loglik (B, Y, h, w), neg_entropy (B, h, w), log_post (B, Y, h, w))."""
        return self.terms_from_features(self.features(x))

    def terms_from_features(self, feats: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """`level_terms` from backbone maps already computed (a study evaluates many heads on one
        backbone's cached test features)."""
        out = []
        for k, feat in enumerate(feats):
            b, _, h, w = feat.shape
            z, log_jac = self.flow_map(k, feat)
            loglik, nh, log_post = self.heads[k](z, log_jac)
            y = loglik.shape[1]
            out.append(
                (
                    loglik.reshape(b, h, w, y).permute(0, 3, 1, 2),
                    nh.reshape(b, h, w),
                    log_post.reshape(b, h, w, y).permute(0, 3, 1, 2),
                )
            )
        return out
