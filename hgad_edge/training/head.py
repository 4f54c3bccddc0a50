"""Hierarchical Gaussian mixture head of one level (sec. 3.3): parameters, training losses and the
per-vector quantities scoring needs. Math lives in `losses.py`; this module owns the parameters and
the ablation switches (paper Tab. 3a)."""

from __future__ import annotations

import math

import torch
from torch import nn

from hgad_edge.training import losses as L
from hgad_edge.training.config import HeadConfig


class MixtureHead(nn.Module):
    def __init__(self, dim: int, num_classes: int, cfg: HeadConfig, latent_components: int = 0):
        super().__init__()
        self.dim, self.num_classes, self.cfg = dim, num_classes, cfg
        # Alg. 1: mu_y <- y + r, r ~ N(0, I): classes start apart along the diagonal.
        offsets = torch.arange(num_classes, dtype=torch.float32)[:, None]
        init = offsets + cfg.center_init_scale * torch.randn(num_classes, dim)
        if cfg.learn_centers:
            self.main = nn.Parameter(init)
            self.psi = nn.Parameter(torch.zeros(num_classes))  # psi = 0: equal class weights
        else:
            self.register_buffer("main", init if cfg.per_class else torch.zeros(num_classes, dim))
            self.register_buffer("psi", torch.zeros(num_classes))
        if cfg.intra:
            self.deltas = nn.Parameter(torch.randn(num_classes, cfg.intra_centers - 1, dim))
            self.psi_intra = nn.Parameter(torch.zeros(num_classes, cfg.intra_centers))
        # The latent mixture (this level's head.latent_components M > 0): each class's density in the
        # trained flow's latent space, re-fitted after training (hgad_edge.training.latent_mixture);
        # scores read it.
        self.latent_components = latent_components if cfg.per_class else 0
        if self.latent_components:
            m = self.latent_components
            self.register_buffer("latent_offset", torch.zeros(num_classes, dim))
            self.register_buffer("latent_mu", torch.zeros(num_classes, m, dim))
            self.register_buffer("latent_inv_var", torch.ones(num_classes, m, dim))
            self.register_buffer("latent_log_norm", torch.zeros(num_classes, m))

    @torch.no_grad()
    def init_centers_from(self, z: torch.Tensor, y: torch.Tensor) -> None:
        """center_init="data": move each class's main centre to the mean latent of its vectors,
        keeping the random part so classes with similar features still start apart."""
        if not self.cfg.per_class:
            return
        noise = self.main - torch.arange(self.num_classes, dtype=self.main.dtype, device=self.main.device)[:, None]
        for c in range(self.num_classes):
            sel = y == c
            if sel.any():
                self.main[c] = z[sel].mean(0) + noise[c]

    # ---- training -------------------------------------------------------------------------------
    def losses(self, z: torch.Tensor, log_jac: torch.Tensor, y: torch.Tensor, stage2: bool) -> dict[str, torch.Tensor]:
        """Mean loss terms of eq. 11 for the enabled components; 'total' is what to minimise."""
        cfg = self.cfg
        if not cfg.per_class:
            terms = {"nll": L.gaussian_nll(z, log_jac).mean()}
            terms["total"] = terms["nll"]
            return terms
        if not cfg.learn_centers:  # fixed centres: each class fits its own N(mu_y, I)
            terms = {"nll": L.gaussian_nll(z, log_jac, self.main[y]).mean()}
            terms["total"] = terms["nll"]
            return terms
        log_w = L.log_softmax(self.psi, 0)
        terms = {"g": L.loss_g(z, log_jac, self.main, log_w).mean()}
        total = cfg.lambda1 * terms["g"]
        if cfg.mutual_info:
            terms["mi"] = L.loss_mi(z, y, self.main, log_w, cfg.label_smoothing).mean()
            total = total + cfg.lambda2 * terms["mi"]
        if cfg.mutual_info and (stage2 or not cfg.intra):  # app. C: stage 1 is L_g + L_mi only
            terms["e"] = L.class_entropy(z, self.main).mean()
            total = total + terms["e"]
        if cfg.intra and stage2:
            terms["in"] = L.loss_in(z, log_jac, y, self.main, self.deltas, L.log_softmax(self.psi_intra, 1)).mean()
            total = total + terms["in"]
        terms["total"] = total
        return terms

    # ---- scoring --------------------------------------------------------------------------------
    def class_centers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Y, M, d) centres and (Y, M) log weights defining p(z | y) for the likelihood score."""
        if self.cfg.intra:
            return L.intra_centers(self.main, self.deltas), L.log_softmax(self.psi_intra, 1)
        return self.main[:, None, :], torch.zeros(self.num_classes, 1, device=self.main.device)

    def forward(self, z: torch.Tensor, log_jac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scoring is the head's forward, so exporters record its nodes under MixtureHead
        (graph_check proves from that record that the head stays FP32)."""
        return self.score_terms(z, log_jac)

    def score_terms(self, z: torch.Tensor, log_jac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per vector: log p(x | y)/d for every class y (N, Y), inter-class negative entropy nh (N,)
        and the log class posterior log p(y | z) (N, Y) used to pick the class when it is 'auto'.

        Everything is computed for all classes so a class index can be gathered afterwards: the
        exported graph has no data-dependent control flow.
        """
        n, d = z.shape
        if self.latent_components:
            log_pz = L.diag_mixture_loglik(
                z, self.latent_offset, self.latent_mu, self.latent_inv_var, self.latent_log_norm
            )  # (N, Y), normalised (d/2 log 2pi included)
            y = log_pz.shape[1]
            loglik = (log_pz + log_jac[:, None]) / d
        else:
            centers, log_w = self.class_centers()  # (Y, M, d), (Y, M)
            y, m = log_w.shape
            d2 = L.sq_dist(z, centers.reshape(y * m, d)).reshape(n, y, m)
            log_pz = L.log_sum_exp(-0.5 * d2 + log_w[None], 2)  # (N, Y)
            loglik = (log_pz + log_jac[:, None] - 0.5 * d * L.LOG_2PI) / d
        if not self.cfg.per_class:
            uniform = torch.full((n, y), -math.log(y), dtype=z.dtype, device=z.device)
            return loglik, torch.zeros(n, dtype=z.dtype, device=z.device), uniform
        main_logits = -0.5 * L.sq_dist(z, self.main)  # (N, Y)
        log_p = L.log_softmax(main_logits, 1)
        neg_entropy = (log_p.exp() * log_p).sum(1)
        log_post = L.log_softmax(main_logits + L.log_softmax(self.psi, 0)[None], 1)
        return loglik, neg_entropy, log_post
