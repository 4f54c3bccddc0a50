"""Conditional flow (paper app. C) in FrEIA's test style: round trip, log-det vs autograd Jacobian.

The flow is perturbed away from its initialisation first: FrEIA scales every coupling output by 0.1,
so at init the blocks are close to (scaled) rotations and a wrong log-det could hide in the noise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hgad_edge.training.config import FlowConfig
from hgad_edge.training.flows import build_flow, flatten_map, positional_encoding_2d, run_flow

pytest.importorskip("FrEIA")

C, POS = 4, 4


# ---- positional encoding ------------------------------------------------------------------------
@pytest.mark.parametrize(("dim", "h", "w"), [(4, 3, 5), (8, 4, 4), (16, 7, 2)])
def test_positional_encoding_shape_and_bounds(dim: int, h: int, w: int) -> None:
    pe = positional_encoding_2d(dim, h, w)
    assert pe.shape == (dim, h, w)
    assert torch.isfinite(pe).all()
    assert pe.abs().max() <= 1.0
    # every (sin, cos) pair lies on the unit circle
    for k in range(0, dim, 2):
        torch.testing.assert_close(pe[k] ** 2 + pe[k + 1] ** 2, torch.ones(h, w))


def test_positional_encoding_hand_values() -> None:
    # dim 8: half = 4, frequencies exp(-[0, 2] log(1e4) / 4) = (1, 1/100);
    # channels 0..3 encode x (column j), 4..7 encode y (row i) as sin, cos, sin, cos
    pe = positional_encoding_2d(8, 3, 5).double()
    for i in range(3):
        for j in range(5):
            want = [
                math.sin(j), math.cos(j), math.sin(j / 100), math.cos(j / 100),
                math.sin(i), math.cos(i), math.sin(i / 100), math.cos(i / 100),
            ]  # fmt: skip
            assert pe[:, i, j].tolist() == pytest.approx(want, abs=1e-6)


def test_positional_encoding_distinct_positions_are_distinct() -> None:
    for dim, h, w in [(4, 6, 6), (8, 16, 16), (32, 8, 12)]:
        v = positional_encoding_2d(dim, h, w).reshape(dim, h * w).T.double()
        dist = torch.cdist(v, v) + torch.eye(h * w, dtype=torch.float64) * 10
        assert dist.min() > 1e-3, (dim, h, w)


@pytest.mark.parametrize("dim", [2, 6, 10, 5])
def test_positional_encoding_rejects_dim_not_multiple_of_4(dim: int) -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        positional_encoding_2d(dim, 4, 4)


# ---- flatten order ------------------------------------------------------------------------------
def test_flatten_map_is_pixel_major_per_image() -> None:
    b, c, h, w = 2, 3, 2, 4
    feat = torch.arange(b * c * h * w, dtype=torch.float64).reshape(b, c, h, w)
    flat = flatten_map(feat)
    assert flat.shape == (b * h * w, c)
    for bi in range(b):
        for i in range(h):
            for j in range(w):
                assert flat[bi * h * w + i * w + j].tolist() == feat[bi, :, i, j].tolist()
    # the positional condition flattened the same way lines up row for row
    pe = positional_encoding_2d(8, h, w)
    pe_rows = flatten_map(pe[None]).repeat(b, 1)
    for bi in range(b):
        for i in range(h):
            for j in range(w):
                assert pe_rows[bi * h * w + i * w + j].tolist() == pe[:, i, j].tolist()


# ---- the flow -----------------------------------------------------------------------------------
def _flow(seed: int = 0, blocks: int = 2, noise: float = 0.5, exact_rotation: bool = True) -> torch.nn.Module:
    """Tiny flow in float64 with all trainable parameters moved off their init.

    FrEIA stores the soft permutation as a float32 copy of a random rotation, so after .double() it
    is orthogonal (and w_perm_inv = w_perm.T its inverse) only to ~1e-7. exact_rotation replaces it by
    the nearest float64 rotation (polar factor) so round trip and log-det can be checked to ~1e-12.
    """
    torch.manual_seed(seed)
    np.random.seed(seed)  # FrEIA draws the soft permutation from scipy's special_ortho_group
    flow = build_flow(C, FlowConfig(coupling_blocks=blocks, clamp=1.9, pos_dim=POS, hidden_ratio=2.0)).double()
    with torch.no_grad():
        for p in flow.parameters():
            if p.requires_grad:  # the fixed rotations (requires_grad=False) must stay orthogonal
                p.add_(noise * torch.randn_like(p))
        if exact_rotation:
            for block in flow.module_list:
                u, _, vh = torch.linalg.svd(block.w_perm.reshape(C, C))
                w = u @ vh
                block.w_perm.copy_(w.reshape(block.w_perm.shape))
                block.w_perm_inv.copy_(w.T.reshape(block.w_perm_inv.shape))
    return flow.eval()


def _inputs(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = 1.5 * torch.randn(n, C, generator=g, dtype=torch.float64)
    pe = flatten_map(positional_encoding_2d(POS, 4, 4)[None]).double()
    cond = pe[torch.randint(0, 16, (n,), generator=g)]
    return x, cond


def test_build_flow_structure() -> None:
    flow = _flow()
    assert len(flow.module_list) == 2
    n_trainable = sum(p.numel() for p in flow.parameters() if p.requires_grad)
    # per block: subnet Linear(2+4 -> 12), Linear(12 -> 2*2), global scale and offset (4 each)
    assert n_trainable == 2 * ((6 * 12 + 12) + (12 * 4 + 4) + 4 + 4)


@pytest.mark.parametrize("exact_rotation", [False, True])
def test_flow_round_trip_in_float64(exact_rotation: bool) -> None:
    flow = _flow(exact_rotation=exact_rotation)
    x, cond = _inputs(64)
    with torch.no_grad():
        z, lj = run_flow(flow, x, cond)
        x_back, lj_rev = flow(z, c=[cond], rev=True)
    assert z.shape == x.shape and lj.shape == (64,)
    assert (z - x).abs().max() > 0.1  # not the identity
    tol = 1e-10 if exact_rotation else 1e-5
    torch.testing.assert_close(x_back, x, rtol=0, atol=tol)
    # forward log|det J| at x == -(reverse log|det J|) at z = f(x)
    torch.testing.assert_close(lj_rev, -lj, rtol=0, atol=tol)


def test_flow_depends_on_the_condition() -> None:
    flow = _flow()
    x, cond = _inputs(8)
    with torch.no_grad():
        z1, lj1 = run_flow(flow, x, cond)
        z2, lj2 = run_flow(flow, x, cond.flip(0))
    assert (z1 - z2).abs().max() > 1e-3
    assert (lj1 - lj2).abs().max() > 1e-3


def test_flow_rows_are_independent() -> None:
    # each feature vector is its own sample: a batch equals the rows run one at a time
    flow = _flow()
    x, cond = _inputs(6)
    with torch.no_grad():
        z, lj = run_flow(flow, x, cond)
        for n in range(6):
            zn, ljn = run_flow(flow, x[n : n + 1], cond[n : n + 1])
            torch.testing.assert_close(zn[0], z[n], rtol=0, atol=1e-12)
            torch.testing.assert_close(ljn[0], lj[n], rtol=0, atol=1e-12)


@pytest.mark.parametrize(("seed", "exact_rotation"), [(0, True), (3, True), (5, False)])
def test_flow_log_det_matches_autograd_jacobian(seed: int, exact_rotation: bool) -> None:
    flow = _flow(seed=seed, blocks=3, exact_rotation=exact_rotation)
    x, cond = _inputs(5, seed=seed + 10)
    with torch.no_grad():
        _, lj = run_flow(flow, x, cond)
    lj_vals = []
    for n in range(5):
        c_n = cond[n : n + 1]

        def f(v: torch.Tensor, c_n: torch.Tensor = c_n) -> torch.Tensor:
            return run_flow(flow, v[None], c_n)[0][0]

        jac = torch.autograd.functional.jacobian(f, x[n])
        assert jac.shape == (C, C)
        sign, logabsdet = torch.linalg.slogdet(jac)
        assert sign != 0
        assert lj[n].item() == pytest.approx(logabsdet.item(), abs=1e-10 if exact_rotation else 1e-5)
        lj_vals.append(lj[n].item())
    # the check is not vacuous: the Jacobian is far from volume-preserving and varies with x
    assert max(abs(v) for v in lj_vals) > 0.5
    assert max(lj_vals) - min(lj_vals) > 1e-2
