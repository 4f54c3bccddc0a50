"""The latent mixture: each class's density in the trained flow's latent space, re-fitted after training.

Why (issue 29, benchmarks/results/quality_study/README.md "Why the flows lost to the kNN"): the trained
flows keep the evidence, their Gaussian mixture does not. On magnetic_tile, a nearest-neighbour search
on the flows' own latents scores stage 3 (3x3) at 96.3 image AUROC, the trained class centres (10 unit-variance
Gaussians per class) 84.4: the normal latents of a textured class are far from ten round blobs. A
mixture of M diagonal Gaussians fitted to each class's own training latents (k-means, then each
cluster's per-dimension variance) follows them closely, costs two batched MatMuls per level in the
graph (losses.diag_mixture_loglik), and needs no memory bank at run time.

Shapes and the score are the head's (MixtureHead.latent_*); this module only fits them.
"""

from __future__ import annotations

import math

import torch

from hgad_edge.training import losses as L

# Each cluster's variance is shrunk towards its class's per-dimension variance by this share of it: a
# cluster of a few latents must not become a needle that calls every other normal latent an anomaly.
VARIANCE_SHRINK = 0.01
KMEANS_ITERS = 20
# Latents per class and level to fit its mixture: spread over its images (every position of a small
# class's images, fewer of a large class's), at most this many.
MAX_VECTORS = 65536
# A component gets at least this many latents per dimension on average: a class with few images gets
# fewer components (battery_weld: 33 images), so each component's d variances rest on enough latents.
LATENTS_PER_DIM = 2


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(N, d), (M, d) -> (N, M) squared distances, expanded (x is centred: see diag_mixture_loglik)."""
    return (x.pow(2).sum(1)[:, None] - 2.0 * x @ c.T + c.pow(2).sum(1)[None]).clamp_min(0.0)


def kmeans(x: torch.Tensor, m: int, gen: torch.Generator, iters: int = KMEANS_ITERS) -> torch.Tensor:
    """Lloyd's k-means of x (N, d) from m distinct random rows -> (N,) cluster of each row. A cluster
    that empties keeps its centre (its row stays a real latent)."""
    m = min(m, x.shape[0])
    centres = x[torch.randperm(x.shape[0], generator=gen)[:m]].clone()
    for _ in range(iters):
        assign = _sq_dist(x, centres).argmin(1)
        counts = torch.bincount(assign, minlength=m)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        full = counts > 0
        centres[full] = sums[full] / counts[full, None].to(x.dtype)
    return _sq_dist(x, centres).argmin(1)


def diag_mixture(
    x: torch.Tensor, m: int, gen: torch.Generator, shrink: float = VARIANCE_SHRINK
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents x (N, d) of one class -> (offset (d,), mu (m, d), inv_var (m, d), log_norm (m,)) as
    losses.diag_mixture_loglik takes them: offset the latents' mean, mu each cluster's mean relative
    to it, variances the cluster's own plus `shrink` x the class's, weights the clusters' shares.
    Fewer latents than m: the unused components are padded (`pad_components`)."""
    x = x.double()
    offset = x.mean(0)
    xc = x - offset
    assign = kmeans(xc, m, gen)
    k = min(m, x.shape[0])
    counts = torch.bincount(assign, minlength=k).double()
    mu = torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, assign, xc) / counts.clamp_min(1)[:, None]
    sq = torch.zeros_like(mu).index_add_(0, assign, (xc - mu[assign]).pow(2))
    var = sq / counts.clamp_min(1)[:, None] + shrink * xc.var(0, unbiased=False).clamp_min(1e-12)[None]
    log_w = torch.where(counts > 0, (counts / counts.sum()).clamp_min(1e-30).log(), torch.full_like(counts, -1e4))
    d = x.shape[1]
    log_norm = log_w - 0.5 * var.log().sum(1) - 0.5 * d * L.LOG_2PI
    return pad_components(offset.float(), mu.float(), (1.0 / var).float(), log_norm.float(), m)


def pad_components(offset, mu, inv_var, log_norm, m: int):
    """Fill a fitted mixture up to the head's m components with ones that never win (log weight -1e4:
    exp underflows to 0, no -inf enters the graph)."""
    pad = m - mu.shape[0]
    if pad <= 0:
        return offset, mu, inv_var, log_norm
    d = mu.shape[1]
    mu = torch.cat([mu, torch.zeros(pad, d, dtype=mu.dtype)])
    inv_var = torch.cat([inv_var, torch.ones(pad, d, dtype=inv_var.dtype)])
    log_norm = torch.cat([log_norm, torch.full((pad,), -1e4, dtype=log_norm.dtype)])
    return offset, mu, inv_var, log_norm


@torch.no_grad()
def fit_latent_mixtures(model, cache, seed: int, classes: list[int] | None = None) -> None:
    """Fit every level's latent mixture of `classes` (default all) from the training features `cache`
    (train.FeatureCache): random positions of each image, about MAX_VECTORS latents a class (all of a
    small class's), through the trained flow; min(M, latents / (LATENTS_PER_DIM d)) components. Does
    nothing for a head without latent components."""
    from hgad_edge.training.train import sample_vectors  # train imports this module

    gen = torch.Generator().manual_seed(seed)
    ids = range(model.num_classes) if classes is None else classes
    for k, feats in enumerate(cache.levels):
        head = model.heads[k]
        if not head.latent_components:
            continue
        for y in ids:
            rows = (cache.labels == y).nonzero()[:, 0]
            if rows.numel() == 0:
                raise ValueError(f"no training features of class {model.class_names[y]} to fit its latent mixture")
            positions = feats.shape[2] * feats.shape[3]
            per_image = max(1, min(positions, math.ceil(MAX_VECTORS / rows.numel())))
            zs = []
            for i in range(0, rows.numel(), 64):
                x, pos = sample_vectors(feats[rows[i : i + 64]], per_image, gen)
                zs.append(model.flow_vectors(k, x, pos)[0])
            z = torch.cat(zs)[:MAX_VECTORS]
            m = max(1, min(head.latent_components, z.shape[0] // (LATENTS_PER_DIM * z.shape[1])))
            offset, mu, inv_var, log_norm = diag_mixture(z, m, gen)
            offset, mu, inv_var, log_norm = pad_components(offset, mu, inv_var, log_norm, head.latent_components)
            head.latent_offset[y], head.latent_mu[y] = offset, mu
            head.latent_inv_var[y], head.latent_log_norm[y] = inv_var, log_norm
