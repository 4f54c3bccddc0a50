"""The HGAD objective (paper eqs. 3, 6, 8, 9, 10, 11) as small pure functions.

Conventions: z (N, d) latents, log_jac (N,) log|det J|, y (N,) class indices, centres (Y, d) or
(Y, M, d), log weights from log_softmax. Likelihood losses are divided by d ("nats per dimension",
as CFLOW/HGAD implementations do). L_mi stays in nats: a misclassified vector's L_mi grows with its
squared distances, so lambda2 decides how much the flow serves class separation rather than density
(see config.HeadConfig.lambda2).

Every log-sum-exp is the hand-written max-shifted one below: TensorRT imports ONNX ReduceLogSumExp
as log(sum(exp(x))) without the shift, which overflows on these distances (deployment notes).
"""

from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2.0 * math.pi)


def log_sum_exp(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """log(sum(exp(x))) = m + log(sum(exp(x - m))), m = max(x): finite for any finite x."""
    m = x.amax(dim=dim, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    out = m + torch.log(torch.sum(torch.exp(x - m), dim=dim, keepdim=True))
    return out if keepdim else out.squeeze(dim)


def log_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return x - log_sum_exp(x, dim=dim, keepdim=True)


def sq_dist(z: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """||z_n - mu_k||^2 for z (N, d), centers (K, d) -> (N, K).

    Explicit differences, not |z|^2 - 2 z.mu + |mu|^2: latents reach |z| ~ 300, where the expanded
    form loses the distance to cancellation.
    """
    return (z[:, None, :] - centers[None, :, :]).pow(2).sum(-1)


def diag_mixture_loglik(
    z: torch.Tensor, offset: torch.Tensor, mu: torch.Tensor, inv_var: torch.Tensor, log_norm: torch.Tensor
) -> torch.Tensor:
    """log sum_m w_m N(z; offset_y + mu_m^y, diag(1 / inv_var_m^y)) for every class y, (N, Y).

    z (N, d); offset (Y, d); mu, inv_var (Y, M, d); log_norm (Y, M) = log w + 0.5 sum_d log inv_var
    - d/2 log 2pi. The quadratic is expanded into two batched MatMuls (no (N, Y, M, d) difference
    tensor), after centring z on each class's offset (its latents' mean): centred latents are a few
    units, not ~300, so the expansion keeps the distance's precision (see `sq_dist`).
    """
    zc = z[None] - offset[:, None, :]  # (Y, N, d)
    q = (
        torch.matmul(zc * zc, inv_var.transpose(1, 2))
        - 2.0 * torch.matmul(zc, (mu * inv_var).transpose(1, 2))
        + (mu * mu * inv_var).sum(-1)[:, None, :]
    )  # (Y, N, M)
    return log_sum_exp(log_norm[:, None, :] - 0.5 * q, 2).transpose(0, 1)


def gaussian_nll(z: torch.Tensor, log_jac: torch.Tensor, center: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 3 per sample, per dimension: -log p(x)/d under N(center, I) (center None: N(0, I))."""
    d = z.shape[1]
    diff = z if center is None else z - center
    return (0.5 * diff.pow(2).sum(1) - log_jac + 0.5 * d * LOG_2PI) / d


def inter_logits(z: torch.Tensor, centers: torch.Tensor, log_w: torch.Tensor) -> torch.Tensor:
    """-||z - mu_y||^2 / 2 + c_y, (N, Y): the class logits of eqs. 6 and 8."""
    return -0.5 * sq_dist(z, centers) + log_w[None, :]


def loss_g(z: torch.Tensor, log_jac: torch.Tensor, centers: torch.Tensor, log_w: torch.Tensor) -> torch.Tensor:
    """Eq. 6: NLL under the inter-class mixture sum_y p(y) N(mu_y, I), per dimension, (N,)."""
    d = z.shape[1]
    return (-log_sum_exp(inter_logits(z, centers, log_w), 1) - log_jac + 0.5 * d * LOG_2PI) / d


def loss_mi(
    z: torch.Tensor, y: torch.Tensor, centers: torch.Tensor, log_w: torch.Tensor, smoothing: float = 0.0
) -> torch.Tensor:
    """Eq. 8 with smoothed labels: -sum_k q_k (log p(k | z) - log p(k)), (N,), where
    q = (1 - eps) onehot(y) + eps / Y; eps = 0 is eq. 8 exactly: -(logsoftmax_y(-||z - mu||^2/2 + c) - c_y).

    Why smoothing: with hard labels -log p(y | z) reaches 0 only as the class margins grow without
    bound, so lambda2 * L_mi keeps pulling classes apart for the whole run instead of letting the
    flow fit each class's density; with eps > 0 the optimum is p(. | z) = q, a finite margin (the
    official HGAD code trains with eps = 0.02).
    Why the prior is stop-gradient: log p(y) is the constant H(Y) part of the MI. Trained through
    it, eq. 8 = ||z - mu_y||^2 / 2 + logsumexp_k(-||z - mu_k||^2 / 2 + log p(k)) is lowest with all
    weight on the class farthest from the data: the weights learn from L_g, as mixture weights should.
    """
    log_w = log_w.detach()
    log_post = log_softmax(inter_logits(z, centers, log_w), 1)
    gain = log_post - log_w[None, :]  # (N, Y) pointwise information of each label
    q = torch.full_like(gain, smoothing / centers.shape[0])
    q.scatter_add_(1, y[:, None], torch.full_like(gain[:, :1], 1.0 - smoothing))
    return -(q * gain).sum(1)


def class_entropy(z: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Eq. 9 integrand: entropy of softmax_y(-||z - mu_y||^2 / 2), (N,). Its negative is the
    inter-class negative entropy nh used for scoring (sec. 3.4)."""
    log_p = log_softmax(-0.5 * sq_dist(z, centers), 1)
    return -(log_p.exp() * log_p).sum(1)


def intra_centers(main: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """mu_i^y = mu_1^y + Delta_i^y with Delta_1 = 0: main (Y, d), deltas (Y, M-1, d) -> (Y, M, d)."""
    zero = torch.zeros_like(main)[:, None, :]
    return main[:, None, :] + torch.cat([zero, deltas], 1)


def intra_loglik(z: torch.Tensor, centers_y: torch.Tensor, log_w_y: torch.Tensor) -> torch.Tensor:
    """log sum_i exp(-||z - mu_i^y||^2 / 2 + c_i^y) for each sample's own class.

    z (N, d), centers_y (N, M, d) (the centres of each sample's class), log_w_y (N, M) -> (N,).
    """
    d2 = (z[:, None, :] - centers_y).pow(2).sum(-1)
    return log_sum_exp(-0.5 * d2 + log_w_y, 1)


def loss_in(
    z: torch.Tensor,
    log_jac: torch.Tensor,
    y: torch.Tensor,
    main: torch.Tensor,
    deltas: torch.Tensor,
    log_w_intra: torch.Tensor,
) -> torch.Tensor:
    """Eq. 10 per dimension, (N,): the main centre is stop-gradient, only the deltas (and the
    intra weights and the flow) learn here. d/2 log 2pi is added so the value is a true NLL."""
    d = z.shape[1]
    centers = intra_centers(main.detach(), deltas)
    ll = intra_loglik(z, centers[y], log_w_intra[y])
    return (-ll - log_jac + 0.5 * d * LOG_2PI) / d
