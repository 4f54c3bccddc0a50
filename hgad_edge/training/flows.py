"""Per-level conditional normalizing flows (paper app. C) on feature vectors.

A level's map (B, C, h, w) is flattened to B*h*w vectors so the same code trains on sampled vectors
and scores whole maps with no Python loop over pixels (the model exports to one ONNX graph).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hgad_edge.training.config import FlowConfig


def positional_encoding_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """(dim, height, width) sin/cos encoding: first half encodes x, second half y (as in CFLOW).

    Input-independent: depends only on the map size, so it can be precomputed at export.
    """
    if dim % 4:
        raise ValueError(f"positional encoding dim must be a multiple of 4, got {dim}")
    half = dim // 2
    freq = torch.exp(torch.arange(0.0, half, 2) * -(math.log(10000.0) / half))  # (half/2,)
    pos_w = torch.arange(width, dtype=torch.float32)[:, None] * freq  # (W, half/2)
    pos_h = torch.arange(height, dtype=torch.float32)[:, None] * freq  # (H, half/2)
    pe = torch.zeros(dim, height, width)
    pe[0:half:2] = torch.sin(pos_w).T[:, None, :].expand(-1, height, -1)
    pe[1:half:2] = torch.cos(pos_w).T[:, None, :].expand(-1, height, -1)
    pe[half::2] = torch.sin(pos_h).T[:, :, None].expand(-1, -1, width)
    pe[half + 1 :: 2] = torch.cos(pos_h).T[:, :, None].expand(-1, -1, width)
    return pe


def subnet_mlp(hidden_ratio: float):
    """FrEIA subnet constructor: 2-layer MLP, Linear(c_in, r*c_in) - ReLU - Linear(., c_out)."""

    def build(c_in: int, c_out: int) -> nn.Module:
        hidden = int(round(hidden_ratio * c_in))
        return nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(), nn.Linear(hidden, c_out))

    return build


def build_flow(channels: int, cfg: FlowConfig) -> nn.Module:
    """FrEIA SequenceINN of AllInOneBlocks: affine coupling with soft clamping, fixed random soft
    permutation, SOFTPLUS global affine; the positional encoding is the coupling condition, which
    AllInOneBlock concatenates to the passive half before every subnet."""
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    flow = Ff.SequenceINN(channels)
    for _ in range(cfg.coupling_blocks):
        flow.append(
            Fm.AllInOneBlock,
            cond=0,
            cond_shape=(cfg.pos_dim,),
            subnet_constructor=subnet_mlp(cfg.hidden_ratio),
            affine_clamping=cfg.clamp,
            global_affine_type="SOFTPLUS",
            permute_soft=True,
        )
    return flow


def flatten_map(feat: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B*h*w, C), pixel-major per image."""
    return feat.permute(0, 2, 3, 1).reshape(-1, feat.shape[1])


def run_flow(flow: nn.Module, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, C), cond (N, pos_dim) -> z (N, C), log|det J| (N,)."""
    z, log_jac = flow(x, c=[cond])
    return z, log_jac


class PrecomputedConditionFlow(nn.Module):
    """Inference twin of a `build_flow` flow for whole maps of a fixed size.

    The positional condition is input-independent, so in every coupling the condition's columns of
    the subnet's first layer give a per-position constant: W_c @ pe + b, computed once here. Each
    block then multiplies only the passive half (C/2 columns instead of C/2 + pos_dim: most of the
    flow's FLOPs). Same parameters, same maths as FrEIA's AllInOneBlock (affine coupling with
    0.1-scaled, tanh-clamped log-scales, SOFTPLUS global affine, fixed soft permutation).
    """

    def __init__(self, flow: nn.Module, pos: torch.Tensor):
        super().__init__()
        self.blocks = nn.ModuleList(flow.module_list)
        for i, block in enumerate(self.blocks):
            _check_supported(block)
            first = block.subnet[0]
            split = block.splits[0]
            proj = pos.to(first.weight.dtype) @ first.weight[:, split:].T + first.bias
            self.register_buffer(f"cond_{i}", proj.detach(), persistent=False)  # (P, hidden)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B*P, C), rows ordered (image, position) as `flatten_map` gives -> z, log|det J|."""
        log_jac = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for i, block in enumerate(self.blocks):
            cond = getattr(self, f"cond_{i}")
            p, hidden = cond.shape
            first, act, second = block.subnet
            x1, x2 = torch.split(x, block.splits, dim=1)
            h = (x1 @ first.weight[:, : block.splits[0]].T).view(-1, p, hidden) + cond
            a = second(act(h.view(-1, hidden))) * 0.1
            ch = x2.shape[1]
            s = block.clamp * torch.tanh(a[:, :ch])
            x2 = x2 * torch.exp(s) + a[:, ch:]
            scale = block.global_scale_activation(block.global_scale)  # (1, C)
            log_jac = log_jac + s.sum(1) + torch.log(scale).sum()
            x = torch.nn.functional.linear(torch.cat((x1, x2), 1) * scale + block.global_offset, block.w_perm)
        return x, log_jac


def _check_supported(block: nn.Module) -> None:
    if block.GIN or block.householder or block.reverse_pre_permute or block.input_rank != 0:
        raise ValueError("PrecomputedConditionFlow supports the AllInOneBlock configuration of build_flow only")
    if not (isinstance(block.subnet, nn.Sequential) and len(block.subnet) == 3):
        raise ValueError("PrecomputedConditionFlow needs the 2-layer MLP subnet of subnet_mlp")
