"""The latent mixture's fit (hgad_edge.training.latent_mixture) on hand-made latents, and a tiny run's
graph with it: exported, within the deployment rules, ONNX Runtime = PyTorch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hgad_edge.training import losses as L
from hgad_edge.training.latent_mixture import VARIANCE_SHRINK, diag_mixture, kmeans


def two_blobs(n: int = 400) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    a = torch.tensor([10.0, 0.0]) + torch.randn(n, 2, generator=gen) * torch.tensor([1.0, 0.5])
    b = torch.tensor([-10.0, 0.0]) + torch.randn(n // 4, 2, generator=gen) * torch.tensor([0.5, 2.0])
    return torch.cat([a, b])


def test_kmeans_separates_two_blobs() -> None:
    x = two_blobs()
    assign = kmeans(x, 2, torch.Generator().manual_seed(3))
    assert len(set(assign[:400].tolist())) == 1 and len(set(assign[400:].tolist())) == 1
    assert assign[0] != assign[-1]


def test_diag_mixture_recovers_means_variances_and_weights() -> None:
    x = two_blobs()
    offset, mu, inv_var, log_norm = diag_mixture(x, 2, torch.Generator().manual_seed(3))
    torch.testing.assert_close(offset, x.mean(0))
    big = int(torch.argmax(mu[:, 0]))  # the blob at +10 (4/5 of the latents)
    small = 1 - big
    torch.testing.assert_close(offset + mu[big], torch.tensor([10.0, 0.0]), atol=0.2, rtol=0)
    torch.testing.assert_close(offset + mu[small], torch.tensor([-10.0, 0.0]), atol=0.4, rtol=0)
    class_var = x.var(0, unbiased=False)
    var_big = 1.0 / inv_var[big] - VARIANCE_SHRINK * class_var  # the cluster's own, shrink taken off
    torch.testing.assert_close(var_big, torch.tensor([1.0, 0.25]), atol=0.15, rtol=0)
    log_w = log_norm + 0.5 * (1.0 / inv_var).log().sum(1) + L.LOG_2PI  # d/2 log 2pi, d = 2
    torch.testing.assert_close(log_w.exp(), torch.tensor([0.8, 0.2])[[big, small]], atol=1e-6, rtol=0)


def test_diag_mixture_with_fewer_latents_than_components_pads_with_dead_ones() -> None:
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    offset, mu, inv_var, log_norm = diag_mixture(x, 5, torch.Generator().manual_seed(0))
    assert mu.shape == (5, 2) and inv_var.shape == (5, 2) and log_norm.shape == (5,)
    assert (log_norm[3:] < -1e3).all() and torch.isfinite(log_norm).all()
    ll = L.diag_mixture_loglik(x, offset[None], mu[None], inv_var[None], log_norm[None])
    assert torch.isfinite(ll).all()


@pytest.mark.slow
def test_a_run_with_a_latent_mixture_exports_within_the_rules_and_matches(tiny_run, tiny_data, tmp_path) -> None:
    """The tiny run with a latent mixture fitted: the bundle's FP32 and mixed FP16 graphs pass the
    deployment rules (export_bundle checks them: the head stays FP32), ONNX Runtime FP32 = PyTorch."""
    import onnxruntime as ort

    from hgad_edge.export.onnx_export import export_bundle
    from hgad_edge.training.batching import load_batch
    from hgad_edge.training.checkpoint import load_run, read_meta, save_run
    from hgad_edge.training.data import open_roots
    from hgad_edge.training.latent_mixture import fit_latent_mixtures
    from hgad_edge.training.model import HGADModel
    from hgad_edge.training.scoring import AnomalyScorer
    from hgad_edge.training.train import extract_features, split_calibration

    trained, cfg, _ = load_run(tiny_run)
    cfg.head.latent_components = (6, 0, 4)  # per level; the second keeps the trained centres
    dataset = open_roots([tiny_data])
    scorer = AnomalyScorer(HGADModel(cfg, dataset.classes), cfg.score)
    flows_and_centres = {k: v for k, v in trained.state_dict().items() if ".latent_" not in k}  # not its own mixture
    missing, unexpected = scorer.load_state_dict(flows_and_centres, strict=False)
    assert not unexpected and missing and all(".latent_" in k for k in missing)
    scorer.eval()
    images = load_batch(dataset.samples("test")[:4], cfg.input_size)
    cls = torch.tensor([0, 1, -1, 0])
    with torch.no_grad():
        before = scorer(images, cls)
        fit, _ = split_calibration(dataset.samples("train"), cfg.train)
        fit_latent_mixtures(scorer.model, extract_features(scorer.model, fit), seed=0)
        after = scorer(images, cls)
    assert not torch.allclose(before[1], after[1])  # the score reads the fitted mixture
    assert all(torch.isfinite(t).all() for t in after[:2])
    run = tmp_path / "run"
    save_run(run, scorer, read_meta(tiny_run))
    bundle = tmp_path / "bundle"
    export_bundle(run, bundle)  # raises if a graph breaks a rule
    outs = {}
    for precision in ("fp32", "fp16"):
        sess = ort.InferenceSession(str(bundle / f"model_{precision}.onnx"), providers=["CPUExecutionProvider"])
        outs[precision] = sess.run(None, {"images": images.numpy(), "class_id": cls.numpy()})
    np.testing.assert_allclose(outs["fp32"][1], after[1].numpy(), atol=1e-3, rtol=1e-4)
    np.testing.assert_array_equal(outs["fp32"][2], after[2].numpy())
    assert np.isfinite(outs["fp16"][0]).all() and np.isfinite(outs["fp16"][1]).all()
    spread = float(np.ptp(outs["fp32"][1])) or 1.0
    assert float(np.abs(outs["fp16"][1] - outs["fp32"][1]).max()) < 0.05 * spread + 1e-2
    assert math.isfinite(float(np.abs(outs["fp32"][0]).max()))
