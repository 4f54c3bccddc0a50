"""The HGAD objective (paper eqs. 3, 6, 8, 9, 10) against numbers worked out by hand.

Running example (d = 2, two classes): mu_0 = (0, 0), mu_1 = (2, 0), psi = (0, log 3), so
p(y) = softmax(psi) = (1/4, 3/4) and c_y = log p(y). The reference values are written with `math`
only, straight from the paper's equations, so they do not share code with `hgad_edge.training.losses`.
Every likelihood loss of the library is "per dimension", i.e. the paper's value divided by d.
"""

from __future__ import annotations

import math

import pytest
import torch

from hgad_edge.training import losses as L

LOG_2PI = math.log(2.0 * math.pi)
D = 2
MU = [(0.0, 0.0), (2.0, 0.0)]
PSI = (0.0, math.log(3.0))
PY = (0.25, 0.75)  # softmax(PSI)


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _sq(a, b) -> float:
    return sum((ai - bi) ** 2 for ai, bi in zip(a, b))


def _gauss(z, mu) -> float:
    """N(z; mu, I) in d = len(z) dimensions, written out."""
    return (2.0 * math.pi) ** (-len(z) / 2) * math.exp(-0.5 * _sq(z, mu))


def _centers() -> torch.Tensor:
    return _t(MU)


def _log_w() -> torch.Tensor:
    return L.log_softmax(_t(PSI), 0)


# Points: one equidistant to both centres, two that are not.
POINTS = [(1.0, 0.0), (0.5, 1.0), (-1.0, 2.0)]
LOG_JAC = [0.3, -1.2, 2.5]


# ---- helpers: log_sum_exp / log_softmax / sq_dist ---------------------------------------------
def test_log_weights_are_the_hand_class_priors() -> None:
    # c_y = logsoftmax_y(psi) = log p(y)
    assert _log_w().tolist() == pytest.approx([math.log(0.25), math.log(0.75)], abs=1e-15)


def test_log_sum_exp_matches_torch_for_moderate_values() -> None:
    g = torch.Generator().manual_seed(0)
    x = 10.0 * torch.randn(5, 7, generator=g, dtype=torch.float64)
    for dim in (0, 1, -1):
        torch.testing.assert_close(L.log_sum_exp(x, dim), torch.logsumexp(x, dim), rtol=1e-14, atol=1e-12)
        torch.testing.assert_close(L.log_sum_exp(x, dim, keepdim=True), torch.logsumexp(x, dim, keepdim=True))
    # hand value: log(e^1 + e^2 + e^3)
    got = L.log_sum_exp(_t([1.0, 2.0, 3.0]), 0).item()
    assert got == pytest.approx(math.log(math.exp(1) + math.exp(2) + math.exp(3)), abs=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_sum_exp_is_finite_where_naive_exp_log_overflows(dtype: torch.dtype) -> None:
    big = torch.tensor([1e4, 1e4], dtype=dtype)
    small = torch.tensor([-1e4, -1e4], dtype=dtype)
    # the naive form (what an unshifted ReduceLogSumExp computes) breaks down
    assert torch.log(torch.exp(big).sum()).item() == math.inf
    assert torch.log(torch.exp(small).sum()).item() == -math.inf
    # log(2 e^a) = a + log 2
    assert L.log_sum_exp(big, 0).item() == pytest.approx(1e4 + math.log(2.0), rel=1e-7)
    assert L.log_sum_exp(small, 0).item() == pytest.approx(-1e4 + math.log(2.0), rel=1e-7)
    mixed = torch.tensor([1e4, -1e4, 1e4 - math.log(3.0)], dtype=torch.float64)
    assert L.log_sum_exp(mixed, 0).item() == pytest.approx(1e4 + math.log(4.0 / 3.0), rel=1e-15)


def test_log_sum_exp_gradient_is_the_softmax_and_finite() -> None:
    x = torch.tensor([[1e4, 1e4 - math.log(3.0), -1e4], [-1e4, -1e4, -1e4]], dtype=torch.float64, requires_grad=True)
    out = L.log_sum_exp(x, 1)
    assert torch.isfinite(out).all()
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(grad).all()
    # d lse / dx = softmax(x): (3/4, 1/4, 0) and (1/3, 1/3, 1/3)
    torch.testing.assert_close(grad, _t([[0.75, 0.25, 0.0], [1 / 3, 1 / 3, 1 / 3]]), rtol=0, atol=1e-12)


def test_log_sum_exp_of_all_minus_inf_is_minus_inf_not_nan() -> None:
    x = torch.tensor([[-math.inf, -math.inf], [-math.inf, 0.0]], dtype=torch.float64)
    assert L.log_sum_exp(x, 1).tolist() == [-math.inf, 0.0]


@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_log_softmax_sums_to_one_in_probability_space(scale: float) -> None:
    g = torch.Generator().manual_seed(1)
    x = scale * torch.randn(6, 5, generator=g, dtype=torch.float64)
    lp = L.log_softmax(x, 1)
    assert torch.isfinite(lp).all()
    torch.testing.assert_close(lp.exp().sum(1), torch.ones(6, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(lp, torch.log_softmax(x, 1), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(L.log_softmax(x, 0).exp().sum(0), torch.ones(5, dtype=torch.float64))


def test_sq_dist_hand_values_and_layout() -> None:
    z = _t([[1.0, 0.0], [0.5, 1.0], [3.0, -4.0]])
    got = L.sq_dist(z, _centers())
    assert got.shape == (3, 2)
    want = [[_sq(p, m) for m in MU] for p in [(1.0, 0.0), (0.5, 1.0), (3.0, -4.0)]]
    assert got.tolist() == want  # [[1, 1], [1.25, 3.25], [25, 17]] exactly


def test_sq_dist_float32_at_large_norm_matches_float64() -> None:
    # |z| ~ 300 with unit-scale distances: the expanded |z|^2 - 2 z.mu + |mu|^2 form cancels ~1e5
    # against ~1 in float32 and is off by far more than 1e-6; explicit differences are not.
    g = torch.Generator().manual_seed(2)
    base = 300.0 / math.sqrt(16) * torch.ones(16, dtype=torch.float64)
    z = (base + torch.randn(64, 16, generator=g, dtype=torch.float64)).float()
    mu = (base + 0.3 * torch.randn(5, 16, generator=g, dtype=torch.float64)).float()
    assert z.norm(dim=1).min() > 290
    ref = L.sq_dist(z.double(), mu.double())  # same float32 inputs, exact arithmetic up to 1e-16
    got = L.sq_dist(z, mu)
    assert got.dtype == torch.float32
    rel = ((got.double() - ref).abs() / ref).max().item()
    assert rel < 1e-6
    expanded = (z.pow(2).sum(1)[:, None] - 2 * z @ mu.T + mu.pow(2).sum(1)[None]).double()
    assert ((expanded - ref).abs() / ref).max().item() > 1e-3  # why the explicit form matters


# ---- eq. 3: single Gaussian ---------------------------------------------------------------------
@pytest.mark.parametrize("with_center", [False, True])
def test_gaussian_nll_is_eq3_per_dimension(with_center: bool) -> None:
    z = _t(POINTS)
    lj = _t(LOG_JAC)
    center = _t([[2.0, 0.0], [0.0, 0.0], [1.0, -1.0]]) if with_center else None
    got = L.gaussian_nll(z, lj, center)
    assert got.shape == (3,)
    for n, p in enumerate(POINTS):
        c = center[n].tolist() if with_center else (0.0, 0.0)
        # eq. 3: L_m = d/2 log(2 pi) + 1/2 ||phi(x) - c||^2 - log|det J|
        lm = D / 2 * LOG_2PI + 0.5 * _sq(p, c) - LOG_JAC[n]
        assert got[n].item() == pytest.approx(lm / D, abs=1e-14)
        # ... which is -log p(x) = -(log N(z; c, I) + log|det J|) (eq. 1)
        assert got[n].item() == pytest.approx(-(math.log(_gauss(p, c)) + LOG_JAC[n]) / D, abs=1e-14)


# ---- eq. 6: inter-class mixture NLL -------------------------------------------------------------
def test_inter_logits_hand_values() -> None:
    got = L.inter_logits(_t([[1.0, 0.0]]), _centers(), _log_w())
    # -||z - mu_y||^2 / 2 + c_y = -1/2 + log(1/4), -1/2 + log(3/4)
    assert got.tolist()[0] == pytest.approx([-0.5 + math.log(0.25), -0.5 + math.log(0.75)], abs=1e-15)


def test_loss_g_is_eq6_per_dimension() -> None:
    z = _t(POINTS)
    lj = _t(LOG_JAC)
    got = L.loss_g(z, lj, _centers(), _log_w())
    assert got.shape == (3,)
    # z = (1, 0) is at squared distance 1 from both centres: logsumexp = -1/2 + log(1/4 + 3/4) = -1/2
    # L_g = (1/2 - 0.3 + log 2 pi) / 2
    assert got[0].item() == pytest.approx((0.5 - 0.3 + LOG_2PI) / 2, abs=1e-14)
    for n, p in enumerate(POINTS):
        # eq. 6: L_g = -logsumexp_y(-||z - mu_y||^2/2 + c_y) - log|det J| + d/2 log(2 pi)
        lse = math.log(sum(PY[k] * math.exp(-0.5 * _sq(p, MU[k])) for k in range(2)))
        assert got[n].item() == pytest.approx((-lse - LOG_JAC[n] + D / 2 * LOG_2PI) / D, abs=1e-14)
        # ... = -log p(x) with p_Z(z) = sum_y p(y) N(z; mu_y, I)   (eqs. 12-15)
        pz = sum(PY[k] * _gauss(p, MU[k]) for k in range(2))
        assert got[n].item() == pytest.approx(-(math.log(pz) + LOG_JAC[n]) / D, abs=1e-14)


def test_loss_g_finite_far_from_all_centres() -> None:
    z = _t([[3000.0, 0.0]])  # ||z - mu||^2 / 2 ~ 4.5e6: exp underflows to 0 without the shift
    got = L.loss_g(z, _t([0.0]), _centers(), _log_w())
    # logsumexp dominated by the nearer centre mu_1: -2998^2/2 + log(3/4) (+ log(1 + tiny))
    want = (0.5 * 2998.0**2 - math.log(0.75) + LOG_2PI) / D
    assert got.item() == pytest.approx(want, rel=1e-14)


# ---- eq. 8: mutual information ------------------------------------------------------------------
@pytest.mark.parametrize("y", [0, 1])
def test_loss_mi_is_eq8(y: int) -> None:
    z = _t(POINTS)
    yy = torch.full((3,), y, dtype=torch.long)
    got = L.loss_mi(z, yy, _centers(), _log_w())
    assert got.shape == (3,)
    for n, p in enumerate(POINTS):
        # eq. 8: L_mi = -(logsoftmax_y(-||z - mu_y'||^2/2 + c_y') - c_y)
        logits = [-0.5 * _sq(p, MU[k]) + math.log(PY[k]) for k in range(2)]
        lsm = logits[y] - math.log(sum(math.exp(v) for v in logits))
        assert got[n].item() == pytest.approx(-(lsm - math.log(PY[y])), abs=1e-14)
        # eq. 19/20: = -(log p(y | z) - log p(y)), p(y | z) by Bayes with the Gaussian densities
        post = PY[y] * _gauss(p, MU[y]) / sum(PY[k] * _gauss(p, MU[k]) for k in range(2))
        assert got[n].item() == pytest.approx(-(math.log(post) - math.log(PY[y])), abs=1e-14)
    # at the equidistant point the posterior equals the prior: no information, L_mi = 0
    assert got[0].item() == pytest.approx(0.0, abs=1e-15)


def test_loss_mi_mixed_labels_gather_the_right_class() -> None:
    z = _t([[0.5, 1.0], [0.5, 1.0]])
    got = L.loss_mi(z, torch.tensor([0, 1]), _centers(), _log_w())
    # distances 1.25 and 3.25: posterior p(0|z) = 1/4 e^-0.625 / (1/4 e^-0.625 + 3/4 e^-1.625)
    a, b = 0.25 * math.exp(-0.625), 0.75 * math.exp(-1.625)
    assert got.tolist() == pytest.approx([-math.log(a / (a + b) / 0.25), -math.log(b / (a + b) / 0.75)], abs=1e-14)
    assert got[0] < 0 < got[1]  # z is nearer mu_0: labelling it 0 gains information


def test_loss_mi_smoothed_labels_weigh_every_class() -> None:
    eps = 0.1
    z = _t(POINTS)
    got = L.loss_mi(z, torch.tensor([0, 1, 1]), _centers(), _log_w(), smoothing=eps)
    for n, (p, y) in enumerate(zip(POINTS, (0, 1, 1))):
        logits = [-0.5 * _sq(p, MU[k]) + math.log(PY[k]) for k in range(2)]
        lse = math.log(sum(math.exp(v) for v in logits))
        q = [eps / 2 + (1 - eps) * (k == y) for k in range(2)]  # (1 - eps) onehot + eps / Y
        want = -sum(q[k] * (logits[k] - lse - math.log(PY[k])) for k in range(2))
        assert got[n].item() == pytest.approx(want, abs=1e-14)


def test_loss_mi_smoothing_gives_a_finite_optimal_margin() -> None:
    # z sits on mu_0 with label 0; mu_1 = (D, 0). Hard labels: L_mi falls forever as D grows.
    # eps > 0: minimum where p(0 | z) = q_0 = 1 - eps / 2, i.e. w1 e^{-D^2/2} / w0 = (eps/2) / (1 - eps/2).
    eps = 0.02
    ds = torch.linspace(0.5, 8.0, 301, dtype=torch.float64)
    z, y = _t([[0.0, 0.0]]), torch.tensor([0])

    def curve(smoothing: float) -> torch.Tensor:
        return torch.stack([L.loss_mi(z, y, _t([[0.0, 0.0], [d.item(), 0.0]]), _log_w(), smoothing)[0] for d in ds])

    hard, soft = curve(0.0), curve(eps)
    assert (hard.diff() < 0).all()
    d_star = math.sqrt(2 * math.log(PY[1] / PY[0] * (1 - eps / 2) / (eps / 2)))
    assert ds[soft.argmin()].item() == pytest.approx(d_star, abs=0.03)
    assert soft[-1] > soft.min() + 0.01  # pulling classes further apart now costs


def test_loss_mi_does_not_train_the_class_weights() -> None:
    # The prior log p(y) is the constant H(Y) part of the MI: psi learns from L_g only.
    psi = _t(PSI).requires_grad_()
    centers = _centers().requires_grad_()
    L.loss_mi(_t(POINTS), torch.tensor([0, 1, 1]), centers, L.log_softmax(psi, 0), 0.02).sum().backward()
    assert psi.grad is None or torch.all(psi.grad == 0)
    assert centers.grad.abs().sum() > 0


# ---- eq. 9: entropy -----------------------------------------------------------------------------
def test_class_entropy_is_eq9() -> None:
    z = _t(POINTS)
    got = L.class_entropy(z, _centers())
    assert got.shape == (3,)
    # equidistant point: softmax = (1/2, 1/2), H = log 2 (the class weights psi play no part)
    assert got[0].item() == pytest.approx(math.log(2.0), abs=1e-15)
    for n, p in enumerate(POINTS):
        # eq. 9: H = -sum_y softmax_y(-||z - mu||^2/2) logsoftmax_y(-||z - mu||^2/2)
        e = [math.exp(-0.5 * _sq(p, m)) for m in MU]
        q = [v / sum(e) for v in e]
        assert got[n].item() == pytest.approx(-sum(qi * math.log(qi) for qi in q), abs=1e-14)


def test_class_entropy_is_zero_far_on_one_side_without_nan() -> None:
    got = L.class_entropy(_t([[-1e4, 0.0]]), _centers())
    assert got.item() == 0.0  # softmax (1, 0) exactly in float64; 0 * log 0 must not give NaN


# ---- eq. 10: intra-class centres ----------------------------------------------------------------
MAIN = [(0.0, 0.0), (2.0, 0.0)]
DELTAS = [[(0.0, 1.0)], [(-1.0, -1.0)]]  # M = 2: mu_2^y = mu_1^y + Delta_2^y
PSI_IN = [(0.0, math.log(3.0)), (math.log(2.0), 0.0)]  # p_i(0) = (1/4, 3/4), p_i(1) = (2/3, 1/3)
P_IN = [(0.25, 0.75), (2 / 3, 1 / 3)]


def _intra_hand(p, y):
    """Intra-class centres of class y and the eq. 10 log-sum-exp, written out."""
    mus = [MAIN[y], tuple(a + b for a, b in zip(MAIN[y], DELTAS[y][0]))]
    terms = [P_IN[y][i] * math.exp(-0.5 * _sq(p, mus[i])) for i in range(2)]
    return mus, terms


def test_intra_centers_adds_deltas_with_first_fixed_at_zero() -> None:
    got = L.intra_centers(_t(MAIN), _t(DELTAS))
    assert got.tolist() == [[[0.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [1.0, -1.0]]]


def test_loss_in_is_eq10_per_dimension_with_log_2pi() -> None:
    z = _t(POINTS)
    lj = _t(LOG_JAC)
    y = torch.tensor([0, 1, 1])
    log_w_in = L.log_softmax(_t(PSI_IN), 1)
    got = L.loss_in(z, lj, y, _t(MAIN), _t(DELTAS), log_w_in)
    assert got.shape == (3,)
    for n, p in enumerate(POINTS):
        yn = int(y[n])
        _, terms = _intra_hand(p, yn)
        # eq. 10: -logsumexp_i(-||z - (SG[mu_1^y] + Delta_i^y)||^2/2 + c_i^y) - log|det J|, and the
        # library adds d/2 log(2 pi) so it is -log p(x | y) under sum_i p_i(y) N(mu_i^y, I)
        want = (-math.log(sum(terms)) - LOG_JAC[n] + D / 2 * LOG_2PI) / D
        assert got[n].item() == pytest.approx(want, abs=1e-14)
    # intra_loglik alone is the bare log-sum-exp
    centers = L.intra_centers(_t(MAIN), _t(DELTAS))
    ll = L.intra_loglik(z, centers[y], log_w_in[y])
    assert ll.tolist() == pytest.approx([math.log(sum(_intra_hand(p, int(y[n]))[1])) for n, p in enumerate(POINTS)])


def test_loss_in_stops_gradient_at_the_main_centre_only() -> None:
    p, yn, lj = (0.5, 2.0), 0, 0.3
    main = _t(MAIN).requires_grad_(True)
    deltas = _t(DELTAS).requires_grad_(True)
    psi_in = _t(PSI_IN).requires_grad_(True)
    z = _t([p]).requires_grad_(True)
    loss = L.loss_in(z, _t([lj]), torch.tensor([yn]), main, deltas, L.log_softmax(psi_in, 1)).sum()
    g_main, g_deltas, g_psi, g_z = torch.autograd.grad(loss, [main, deltas, psi_in, z], allow_unused=True)
    assert g_main is None or torch.count_nonzero(g_main) == 0  # SG[mu_1^y]
    # hand gradient: d/dDelta_2^y [-log sum_i w_i e^{-|z - mu_i|^2/2}] / d = -r_2 (z - mu_2) / d,
    # r_i the responsibilities; the other class's delta gets exactly nothing
    mus, terms = _intra_hand(p, yn)
    r2 = terms[1] / sum(terms)
    want = torch.zeros(2, 1, 2, dtype=torch.float64)
    want[yn, 0] = _t([-r2 * (p[j] - mus[1][j]) / D for j in range(2)])
    assert torch.count_nonzero(g_deltas[yn]) == 2
    torch.testing.assert_close(g_deltas, want, rtol=1e-12, atol=1e-15)
    # psi_intra of class y learns (d/dpsi_i = (p_i - r_i)/d), the other class's does not
    r = [t / sum(terms) for t in terms]
    want_psi = torch.zeros(2, 2, dtype=torch.float64)
    want_psi[yn] = _t([(P_IN[yn][i] - r[i]) / D for i in range(2)])
    torch.testing.assert_close(g_psi, want_psi, rtol=1e-12, atol=1e-15)
    # and the flow (through z) still learns: d/dz = sum_i r_i (z - mu_i) / d
    want_z = [sum(r[i] * (p[j] - mus[i][j]) for i in range(2)) / D for j in range(2)]
    assert g_z[0].tolist() == pytest.approx(want_z, abs=1e-14)


def test_loss_g_gradient_does_reach_the_main_centre() -> None:
    # contrast with L_in: eq. 6 is what moves mu_1^y. d/dmu_k = -r_k (z - mu_k) / d
    p = (0.5, 1.0)
    main = _t(MAIN).requires_grad_(True)
    loss = L.loss_g(_t([p]), _t([0.0]), main, _log_w()).sum()
    (g,) = torch.autograd.grad(loss, [main])
    w = [PY[k] * math.exp(-0.5 * _sq(p, MU[k])) for k in range(2)]
    r = [v / sum(w) for v in w]
    want = [[-r[k] * (p[j] - MU[k][j]) / D for j in range(2)] for k in range(2)]
    torch.testing.assert_close(g, _t(want), rtol=1e-12, atol=1e-15)


def test_diag_mixture_loglik_one_component_is_the_hand_gaussian() -> None:
    # one class, one component at offset + mu = (1, 2), variances (1, 4): z = (2, 0) is 1 and 2 std off,
    # log N = -0.5 (1 + 1) - 0.5 log(1 * 4) - log 2pi
    offset, mu = torch.tensor([[1.0, 1.0]]), torch.tensor([[[0.0, 1.0]]])
    inv_var = torch.tensor([[[1.0, 0.25]]])
    log_norm = 0.5 * inv_var.log().sum(-1) - L.LOG_2PI  # d/2 log 2pi with d = 2
    got = L.diag_mixture_loglik(torch.tensor([[2.0, 0.0]]), offset, mu, inv_var, log_norm)
    assert got.shape == (1, 1)
    assert got.item() == pytest.approx(-1.0 - 0.5 * math.log(4.0) - L.LOG_2PI)


def test_diag_mixture_loglik_is_the_mixture_density_per_class() -> None:
    gen = torch.Generator().manual_seed(0)
    y, m, d, n = 3, 4, 5, 7
    z = 3.0 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    offset = torch.randn(y, d, generator=gen, dtype=torch.float64)
    mu = torch.randn(y, m, d, generator=gen, dtype=torch.float64)
    var = 0.2 + torch.rand(y, m, d, generator=gen, dtype=torch.float64)
    w = torch.softmax(torch.randn(y, m, generator=gen, dtype=torch.float64), 1)
    log_norm = w.log() - 0.5 * var.log().sum(-1) - 0.5 * d * L.LOG_2PI
    got = L.diag_mixture_loglik(z, offset, mu, 1.0 / var, log_norm)
    for c in range(y):  # sum of weighted densities, each from its own formula
        dens = torch.zeros(n, dtype=torch.float64)
        for k in range(m):
            normal = torch.distributions.Normal(offset[c] + mu[c, k], var[c, k].sqrt())
            dens += w[c, k] * normal.log_prob(z).sum(1).exp()
        torch.testing.assert_close(got[:, c], dens.log())


def test_diag_mixture_loglik_keeps_precision_at_latent_norms_of_300() -> None:
    """Centred first: latents ~300 from the origin but near their class keep float64's answer in float32."""
    gen = torch.Generator().manual_seed(1)
    d = 112
    offset = 300.0 / math.sqrt(d) * torch.ones(1, d, dtype=torch.float64)
    z = offset + torch.randn(6, d, generator=gen, dtype=torch.float64)
    mu = 0.5 * torch.randn(1, 8, d, generator=gen, dtype=torch.float64)
    inv_var = 1.0 / (0.5 + torch.rand(1, 8, d, generator=gen, dtype=torch.float64))
    log_norm = torch.zeros(1, 8, dtype=torch.float64)
    ref = L.diag_mixture_loglik(z, offset, mu, inv_var, log_norm)
    got = L.diag_mixture_loglik(*(t.float() for t in (z, offset, mu, inv_var, log_norm)))
    torch.testing.assert_close(got.double(), ref, atol=1e-3, rtol=1e-5)
