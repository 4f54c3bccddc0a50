"""MixtureHead: the ablation modes (paper Tab. 3a), eq. 11 weighting, which parameters learn, and
the scoring quantities of sec. 3.4 against hand-computed values (d = 3, two classes)."""

from __future__ import annotations

import math

import pytest
import torch

from hgad_edge.training.config import HeadConfig
from hgad_edge.training.head import MixtureHead

LOG_2PI = math.log(2.0 * math.pi)
D, Y, M = 3, 2, 3
MAIN = [(0.0, 0.0, 0.0), (2.0, 0.0, 0.0)]
# z_0 is equidistant to both main centres; the others are not
Z = [(1.0, 5.0, -3.0), (0.5, 1.0, 0.0), (-1.0, 2.0, 0.5), (3.0, 0.0, 1.0)]
LOG_JAC = [0.3, -1.2, 2.5, 0.0]
LABELS = [0, 1, 0, 1]
LAMBDA1, LAMBDA2 = 0.5, 7.0  # not the defaults, so a wrong weighting of eq. 11 shows
EPS = 0.1  # label smoothing of L_mi, not the default either

KEYS = {
    ("single", False): {"nll", "total"},
    ("single", True): {"nll", "total"},
    ("fixed", False): {"nll", "total"},
    ("fixed", True): {"nll", "total"},
    ("gmm", False): {"g", "total"},
    ("gmm", True): {"g", "total"},
    ("mi", False): {"g", "mi", "e", "total"},
    ("mi", True): {"g", "mi", "e", "total"},
    ("full", False): {"g", "mi", "total"},  # app. C: stage 1 optimises only L_g and L_mi
    ("full", True): {"g", "mi", "e", "in", "total"},
}
# parameters that must receive a (nonzero) gradient from 'total'; all other parameters get none
LEARNS = {
    ("single", False): set(),
    ("single", True): set(),
    ("fixed", False): set(),
    ("fixed", True): set(),
    ("gmm", False): {"main", "psi"},
    ("gmm", True): {"main", "psi"},
    ("mi", False): {"main", "psi"},
    ("mi", True): {"main", "psi"},
    ("full", False): {"main", "psi"},
    ("full", True): {"main", "psi", "deltas", "psi_intra"},
}
PARAMS = {
    "single": set(),
    "fixed": set(),
    "gmm": {"main", "psi"},
    "mi": {"main", "psi"},
    "full": {"main", "psi", "deltas", "psi_intra"},
}


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _sq(a, b) -> float:
    return sum((ai - bi) ** 2 for ai, bi in zip(a, b))


def _head(mode: str, psi=(0.3, -0.4)) -> MixtureHead:
    torch.manual_seed(0)
    cfg = HeadConfig(mode=mode, intra_centers=M, lambda1=LAMBDA1, lambda2=LAMBDA2, label_smoothing=EPS)
    head = MixtureHead(D, Y, cfg).double()
    with torch.no_grad():
        if cfg.per_class:  # 'single' keeps its N(0, I) centre
            head.main.copy_(_t(MAIN))
        if cfg.learn_centers:
            head.psi.copy_(_t(psi))
        if cfg.intra:
            head.deltas.copy_(_t([[(0.0, 1.0, 0.0), (1.0, 1.0, -1.0)], [(-1.0, -1.0, 0.5), (0.0, 0.0, 2.0)]]))
            head.psi_intra.copy_(_t([(0.0, math.log(3.0), 0.5), (math.log(2.0), 0.0, -1.0)]))
    return head


def _inputs(requires_grad: bool = False):
    z = _t(Z).requires_grad_(requires_grad)
    lj = _t(LOG_JAC).requires_grad_(requires_grad)
    return z, lj, torch.tensor(LABELS)


def _hand_terms(mode: str, psi=(0.3, -0.4)) -> dict[str, float]:
    """Eqs. 3, 6, 8, 9, 10 written out with math for the batch above (means over samples)."""
    py = [math.exp(v) / sum(math.exp(u) for u in psi) for v in psi]
    out = {"nll": 0.0, "g": 0.0, "mi": 0.0, "e": 0.0, "in": 0.0}
    mus_in = [
        [MAIN[0], (0.0, 1.0, 0.0), (1.0, 1.0, -1.0)],
        [MAIN[1], (1.0, -1.0, 0.5), (2.0, 0.0, 2.0)],
    ]
    e_in = [(1.0, 3.0, math.exp(0.5)), (2.0, 1.0, math.exp(-1.0))]
    p_in = [[v / sum(row) for v in row] for row in e_in]
    for z, lj, y in zip(Z, LOG_JAC, LABELS):
        center = (0.0, 0.0, 0.0) if mode == "single" else MAIN[y]
        out["nll"] += (D / 2 * LOG_2PI + 0.5 * _sq(z, center) - lj) / D  # eq. 3
        mix = [py[k] * math.exp(-0.5 * _sq(z, MAIN[k])) for k in range(Y)]
        out["g"] += (-math.log(sum(mix)) - lj + D / 2 * LOG_2PI) / D  # eq. 6
        q = [EPS / Y + (1 - EPS) * (k == y) for k in range(Y)]  # smoothed labels
        out["mi"] += -sum(q[k] * (math.log(mix[k] / sum(mix)) - math.log(py[k])) for k in range(Y))  # eq. 8
        e = [math.exp(-0.5 * _sq(z, MAIN[k])) for k in range(Y)]
        out["e"] += -sum(v / sum(e) * math.log(v / sum(e)) for v in e)  # eq. 9
        ll = math.log(sum(p_in[y][i] * math.exp(-0.5 * _sq(z, mus_in[y][i])) for i in range(M)))
        out["in"] += (-ll - lj + D / 2 * LOG_2PI) / D  # eq. 10 (+ d/2 log 2 pi)
    return {k: v / len(Z) for k, v in out.items()}


# ---- training losses ----------------------------------------------------------------------------
def test_modes_are_the_five_ablations() -> None:
    assert tuple(HeadConfig.MODES) == ("single", "fixed", "gmm", "mi", "full")


@pytest.mark.parametrize("mode", HeadConfig.MODES)
def test_parameters_per_mode(mode: str) -> None:
    head = _head(mode)
    assert {name for name, _ in head.named_parameters()} == PARAMS[mode]
    if mode == "full":
        assert head.deltas.shape == (Y, M - 1, D) and head.psi_intra.shape == (Y, M)


@pytest.mark.parametrize(
    ("mode", "stage2"),
    [
        (m, s)
        for m in HeadConfig.MODES
        for s in (False, True)
    ],
)
def test_losses_keys_values_and_total(mode: str, stage2: bool) -> None:
    head = _head(mode)
    z, lj, y = _inputs()
    terms = head.losses(z, lj, y, stage2=stage2)
    assert set(terms) == KEYS[(mode, stage2)]
    for k, v in terms.items():
        assert v.shape == () and torch.isfinite(v), k
    hand = _hand_terms(mode)
    for k in terms.keys() - {"total"}:
        assert terms[k].item() == pytest.approx(hand[k], abs=1e-12), k
    # eq. 11: L = lambda1 L_g + lambda2 L_mi + L_e + L_in over the enabled terms
    if mode in ("single", "fixed"):
        want = hand["nll"]
    else:
        want = LAMBDA1 * hand["g"]
        if mode == "mi" or mode == "full":
            want += LAMBDA2 * hand["mi"]
        if mode == "mi" or (mode == "full" and stage2):
            want += hand["e"]
        if mode == "full" and stage2:
            want += hand["in"]
    assert terms["total"].item() == pytest.approx(want, abs=1e-11)


@pytest.mark.parametrize("stage2", [False, True])
@pytest.mark.parametrize("mode", HeadConfig.MODES)
def test_which_parameters_learn(mode: str, stage2: bool) -> None:
    head = _head(mode)
    z, lj, y = _inputs(requires_grad=True)
    head.losses(z, lj, y, stage2=stage2)["total"].backward()
    for name, p in head.named_parameters():
        got = p.grad is not None and bool(torch.count_nonzero(p.grad))
        assert got == (name in LEARNS[(mode, stage2)]), name
    # the flow always learns: gradient reaches both z and log|det J|
    assert z.grad is not None and torch.count_nonzero(z.grad) > 0
    # each likelihood term holds -log|det J| / d per sample, averaged over N; L_mi and L_e none
    weight = 1.0 if mode in ("single", "fixed") else LAMBDA1 + (1.0 if (mode == "full" and stage2) else 0.0)
    want = torch.full((len(Z),), -weight / D / len(Z), dtype=torch.float64)
    torch.testing.assert_close(lj.grad, want, rtol=0, atol=1e-15)


def test_l_in_gives_the_main_centre_and_psi_no_gradient() -> None:
    # SG[mu_1^y] in eq. 10: the stage-2 term moves only deltas, psi_intra and the flow
    head = _head("full")
    z, lj, y = _inputs(requires_grad=True)
    terms = head.losses(z, lj, y, stage2=True)
    g_main, g_psi, g_deltas, g_psi_in, g_z = torch.autograd.grad(
        terms["in"], [head.main, head.psi, head.deltas, head.psi_intra, z], allow_unused=True
    )
    assert g_main is None or torch.count_nonzero(g_main) == 0
    assert g_psi is None or torch.count_nonzero(g_psi) == 0
    assert torch.count_nonzero(g_deltas) > 0 and torch.count_nonzero(g_psi_in) > 0
    assert torch.count_nonzero(g_z) > 0


@pytest.mark.parametrize("mode", ["fixed", "gmm", "mi", "full"])
def test_centre_init_is_class_offset_plus_noise(mode: str) -> None:
    # Alg. 1: mu_y <- y + r, r ~ N(0, I) (classes indexed from 0 here); psi <- 0
    head = MixtureHead(D, Y, HeadConfig(mode=mode, center_init_scale=0.0))
    assert head.main.tolist() == [[0.0] * D, [1.0] * D]
    assert head.psi.tolist() == [0.0] * Y
    torch.manual_seed(0)
    noisy = MixtureHead(D, Y, HeadConfig(mode=mode, center_init_scale=1.0)).main
    torch.manual_seed(0)
    torch.testing.assert_close(noisy - torch.tensor([[0.0], [1.0]]), torch.randn(Y, D))
    # fixed centres are buffers (saved, never optimised); learned ones are parameters
    assert ("main" in dict(head.named_buffers())) == (mode == "fixed")


def test_single_mode_centre_is_the_origin() -> None:
    single = MixtureHead(D, Y, HeadConfig(mode="single"))
    assert single.main.shape == (Y, D) and torch.count_nonzero(single.main) == 0


# ---- scoring ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", HeadConfig.MODES)
def test_score_terms_shapes_and_normalisation(mode: str) -> None:
    head = _head(mode)
    z, lj, _ = _inputs()
    with torch.no_grad():
        loglik, nh, log_post = head.score_terms(z, lj)
    n = len(Z)
    assert loglik.shape == (n, Y) and nh.shape == (n,) and log_post.shape == (n, Y)
    for t in (loglik, nh, log_post):
        assert torch.isfinite(t).all()
    torch.testing.assert_close(log_post.double().exp().sum(1), torch.ones(n, dtype=torch.float64))
    assert (nh <= 0).all()


def test_score_terms_gmm_loglik_is_eq14_for_each_class() -> None:
    head = _head("gmm")
    z, lj, _ = _inputs()
    with torch.no_grad():
        loglik, _, _ = head.score_terms(z, lj)
    for n, p in enumerate(Z):
        for yy in range(Y):
            # eq. 14 restricted to class y (p(x | y), no c_y): -||z - mu_y||^2/2 + log|det J| - d/2 log 2 pi
            want = (-0.5 * _sq(p, MAIN[yy]) + LOG_JAC[n] - D / 2 * LOG_2PI) / D
            assert loglik[n, yy].item() == pytest.approx(want, abs=1e-13)


def test_score_terms_full_loglik_is_the_intra_mixture() -> None:
    # sec. 3.4: log p(x) = logsumexp_i(-||z - mu_i^y||^2/2 + c_i^y) + log|det J| - d/2 log 2 pi
    head = _head("full")
    z, lj, _ = _inputs()
    with torch.no_grad():
        loglik, _, _ = head.score_terms(z, lj)
    hand = _hand_terms("full")
    # the mean over samples of -loglik[n, y_n] is exactly the L_in of the same batch
    own = loglik[torch.arange(len(Z)), torch.tensor(LABELS)]
    assert (-own.mean()).item() == pytest.approx(hand["in"], abs=1e-13)
    mus = [[(0.0, 0.0, 0.0), (0.0, 1.0, 0.0), (1.0, 1.0, -1.0)], [(2.0, 0.0, 0.0), (1.0, -1.0, 0.5), (2.0, 0.0, 2.0)]]
    e_in = [(1.0, 3.0, math.exp(0.5)), (2.0, 1.0, math.exp(-1.0))]
    for n, p in enumerate(Z):
        for yy in range(Y):
            w = [v / sum(e_in[yy]) for v in e_in[yy]]
            lse = math.log(sum(w[i] * math.exp(-0.5 * _sq(p, mus[yy][i])) for i in range(M)))
            assert loglik[n, yy].item() == pytest.approx((lse + LOG_JAC[n] - D / 2 * LOG_2PI) / D, abs=1e-13)


@pytest.mark.parametrize("mode", ["fixed", "gmm", "mi", "full"])
def test_score_terms_entropy_and_posterior_by_hand(mode: str) -> None:
    psi = (0.3, -0.4)
    head = _head(mode, psi)
    z, lj, _ = _inputs()
    with torch.no_grad():
        _, nh, log_post = head.score_terms(z, lj)
    # z_0 = (1, 5, -3) is at squared distance 35 from both main centres: nh = -log 2
    assert nh[0].item() == pytest.approx(-math.log(2.0), abs=1e-14)
    hand = _hand_terms(mode)
    assert (-nh.mean()).item() == pytest.approx(hand["e"], abs=1e-13)  # nh = -(eq. 9 integrand)
    py = [0.5, 0.5] if mode == "fixed" else [math.exp(v) / sum(math.exp(u) for u in psi) for v in psi]
    for n, p in enumerate(Z):
        w = [py[k] * math.exp(-0.5 * _sq(p, MAIN[k])) for k in range(Y)]
        # log p(y | z) by Bayes with the prior p(y) = softmax(psi)
        assert log_post[n].tolist() == pytest.approx([math.log(v / sum(w)) for v in w], abs=1e-13)


def test_score_terms_single_mode_is_the_standard_normal() -> None:
    head = _head("single")
    z, lj, _ = _inputs()
    with torch.no_grad():
        loglik, nh, log_post = head.score_terms(z, lj)
    for n, p in enumerate(Z):
        want = (-0.5 * _sq(p, (0.0, 0.0, 0.0)) + LOG_JAC[n] - D / 2 * LOG_2PI) / D
        assert loglik[n].tolist() == pytest.approx([want, want], abs=1e-13)
    assert nh.tolist() == [0.0] * len(Z)
    assert log_post.shape == (len(Z), Y)
    assert log_post.flatten().tolist() == pytest.approx([-math.log(2.0)] * (Y * len(Z)), abs=1e-7)
