"""Scoring on its own: the criteria, the image score, and what `fit_normal_statistics` fits (on the tiny run's
real model and real normal images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hgad_edge.training.batching import load_batch
from hgad_edge.training.checkpoint import load_run
from hgad_edge.training.config import ScoreConfig
from hgad_edge.training.data import open_roots
from hgad_edge.training.scoring import (
    SPREAD_FLOOR,
    TAU_MIN,
    combine,
    fit_normal_statistics,
    gaussian_blur,
    image_score,
    level_weights,
    relative_spread,
)


# ---- pure functions -----------------------------------------------------------------------------
@pytest.mark.parametrize("criterion", ScoreConfig.CRITERIA)
def test_every_criterion_combines_as_documented(criterion):
    s_l = torch.linspace(-6, 6, 13)
    s_e = torch.linspace(3, -3, 13)
    expected = {"loglik": s_l, "entropy": s_e, "product": F.softplus(s_l) * 2 * torch.sigmoid(s_e)}[criterion]
    assert torch.allclose(combine(s_l, s_e, criterion), expected)
    # more likelihood evidence never lowers the score, whatever the criterion
    assert (combine(s_l + 1, s_e, criterion) >= combine(s_l, s_e, criterion)).all()


def test_product_keeps_likelihood_evidence_at_normal_entropy():
    """S_e = 0 (entropy at its normal level): the factor is 1, the score is softplus(S_l), not 0."""
    s_l = torch.tensor([-2.0, 0.0, 5.0])
    assert torch.allclose(combine(s_l, torch.zeros(3), "product"), F.softplus(s_l))


def test_image_score_max_or_top_fraction():
    amap = torch.arange(100, dtype=torch.float32).view(1, 10, 10)
    assert image_score(amap, 0.0).item() == 99.0  # topk 0: the max
    assert image_score(amap, 0.1).item() == pytest.approx(np.mean(np.arange(90, 100)))
    assert image_score(amap, 1.0).item() == pytest.approx(49.5)  # the whole map
    assert image_score(amap, 1e-6).item() == 99.0  # at least one pixel
    two = torch.stack([amap[0], -amap[0]])
    assert image_score(two, 0.5).tolist() == pytest.approx([74.5, -24.5])  # per image


def test_image_level_weights_favour_the_deepest_stage():
    from hgad_edge.training.scoring import image_level_weights

    w = torch.tensor([0.25, 0.25, 0.5])
    deepest = torch.tensor([False, True, True])  # e.g. stage 2 at scale 1, stage 3 at scales 1 and 0.5
    assert torch.allclose(image_level_weights(w, deepest, 1.0), w)  # factor 1: the anomaly map's
    assert torch.allclose(image_level_weights(w, deepest, 3.0), torch.tensor([0.25, 0.75, 1.5]) / 2.5)
    assert torch.allclose(image_level_weights(w, torch.ones(3, dtype=torch.bool), 3.0), w)  # one stage


def test_level_weights_share_a_map_between_its_windows():
    """Empty weights: each backbone map (stage, scale) weighs the same, split over its windows."""
    s2, s3 = ((2,), 1.0), ((3,), 1.0)
    assert level_weights((), [s2, s3]).tolist() == [0.5, 0.5]
    assert level_weights((), [s2, s3, s3]).tolist() == [0.5, 0.25, 0.25]  # stage 3 at 3x3 and 5x5
    assert torch.allclose(level_weights((), [s2, s3, ((3,), 0.5)]), torch.full((3,), 1 / 3))  # a scale: a map
    assert level_weights((1.0, 3.0, 0.0), [s2, s3, s3]).tolist() == [0.25, 0.75, 0.0]  # given: normalised
    with pytest.raises(ValueError, match="give 3 non-negative weights"):
        level_weights((1.0,), [s2, s3, s3])


@pytest.mark.parametrize("factor", [1.0, 3.0])
def test_image_score_weights_the_deepest_stage(tiny_run, tiny_data, factor):
    """The anomaly map averages the levels (the default's: stage 2, stage 3 at 3x3 and at 5x5) with
    the per-map weights 1/2, 1/4, 1/4 whatever the factor; the image score is the top fraction of the
    same construction with the stage-3 levels weighted `factor` times more."""
    import dataclasses

    scorer, cfg, _ = load_run(tiny_run)
    assert [lv.stages for lv in scorer.model.levels] == [(2,), (3,), (3,)]
    scorer.set_score_config(dataclasses.replace(cfg.score, image_deep_weight=factor, topk=0.05))
    images = load_batch(open_roots([tiny_data]).samples("test")[:4], cfg.input_size)
    cls = torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        amap, score, _ = scorer(images, cls)
        lls, nhs = scorer.level_maps(scorer.model.level_terms(scorer.model.preprocess(images)), cls)
        s_ls, s_es = scorer.upsampled(lls, "loglik", cls), scorer.upsampled(nhs, "neg_entropy", cls)

    def built(*w):
        s_l = sum(wk * x for wk, x in zip(w, s_ls)) / sum(w)
        s_e = sum(wk * x for wk, x in zip(w, s_es)) / sum(w)
        return gaussian_blur(combine(s_l, s_e, cfg.score.criterion), scorer.kernel)

    assert torch.allclose(amap, built(2.0, 1.0, 1.0), atol=1e-5)
    assert torch.allclose(score, image_score(built(2.0, factor, factor), 0.05), atol=1e-5)
    # the factor matters: the score differs from the anomaly map's
    assert factor == 1.0 or not torch.allclose(score, image_score(amap, 0.05), atol=1e-3)


def test_relative_spread_by_hand():
    """Per position: RMS deviation from the position mean, over the level's RMS; floored."""
    values = torch.tensor([[[0.0, 0.0, 0.0, 5.0]], [[2.0, 4.0, 8.0, 5.0]]], dtype=torch.float64)  # (N=2, 1, 4)
    ref = values.mean(0)
    rms = torch.tensor([[1.0, 2.0, 4.0, 0.0]], dtype=torch.float64)  # |value - mean| at each position
    level = (rms.pow(2).mean()).sqrt()  # sqrt(21 / 4)
    got = relative_spread(values, ref)
    assert torch.allclose(got, (rms / level).clamp_min(SPREAD_FLOOR))
    assert got[0, 3] == SPREAD_FLOOR  # a constant position gets the floor, not 0
    assert torch.equal(relative_spread(torch.ones(3, 2, 2), torch.ones(2, 2)), torch.ones(2, 2))  # nothing varies


# ---- calibration --------------------------------------------------------------------------------
def _normal_batches(tiny_data, cfg, class_name):
    samples = [s for s in open_roots([tiny_data]).samples("train") if s.class_name == class_name][:12]
    return [load_batch(samples[:6], cfg.input_size), load_batch(samples[6:], cfg.input_size)]


@pytest.mark.parametrize("spread", ScoreConfig.SPREADS)
@pytest.mark.parametrize("quantile", [1.0, 0.5])
def test_calibrate_fits_reference_spread_and_threshold(tiny_run, tiny_data, quantile, spread):
    scorer, cfg, _ = load_run(tiny_run)
    scorer.cfg.threshold_quantile = quantile
    scorer.cfg.spread = spread
    y = scorer.model.class_names.index("dots")
    batches = _normal_batches(tiny_data, cfg, "dots")
    out = fit_normal_statistics(scorer, {y: batches})
    assert out["threshold"][y] == pytest.approx(float(scorer.threshold[y]))
    images = torch.cat(batches)
    cls = torch.full((images.shape[0],), y)
    with torch.no_grad():
        terms = scorer.model.level_terms(scorer.model.preprocess(images))
        lls, nhs = scorer.level_maps(terms, cls)
        _, score, _ = scorer(images, cls)  # the graph's outputs; score_normalized is the host-side formula
        normalized = scorer.normalize(score, cls)
    for k, ll in enumerate(lls):
        # per position: the normal mean and the relative spread; per level: the RMS around the mean
        # in units of the spread (so standardised values have RMS 1)
        ref, tau, rel = scorer.reference("loglik", k)[y], scorer.tau_loglik[y, k], scorer.spread("loglik", k)[y]
        assert torch.allclose(ref, ll.double().mean(0).float(), atol=1e-4)
        if spread == "level":
            assert torch.equal(rel, torch.ones_like(rel))
        else:
            dev = (ll.double() - ref.double()).pow(2).mean(0).sqrt()
            expected = (dev / dev.pow(2).mean().sqrt()).clamp_min(SPREAD_FLOOR)
            assert torch.allclose(rel.double(), expected, rtol=1e-4) and not torch.equal(rel, torch.ones_like(rel))
        z = (ref - ll) / (tau * rel)
        assert tau >= TAU_MIN and float(z.pow(2).mean().sqrt()) == pytest.approx(1.0, rel=1e-3)
    scores = score.double().numpy()
    assert float(scorer.threshold[y]) == pytest.approx(np.quantile(scores, quantile), rel=1e-5)
    assert float(scorer.scale[y]) == pytest.approx(max(scores.std(), 1e-3 * abs(scores.mean()), 1e-6), rel=1e-5)
    passed = (
        (normalized < 0.5).float().mean().item() if quantile < 1 else (normalized <= 0.5 + 1e-6).float().mean().item()
    )
    assert passed == pytest.approx(quantile, abs=1 / len(scores))  # the quantile of normals passes


def test_calibrate_uses_position_images_for_the_means(tiny_run, tiny_data):
    scorer, cfg, _ = load_run(tiny_run)
    y = scorer.model.class_names.index("stripes")
    held_out, positions = _normal_batches(tiny_data, cfg, "stripes")
    fit_normal_statistics(scorer, {y: [held_out]}, {y: [positions]})
    with torch.no_grad():
        terms = scorer.model.level_terms(scorer.model.preprocess(positions))
        lls, _ = scorer.level_maps(terms, torch.full((positions.shape[0],), y))
    assert torch.allclose(scorer.reference("loglik", 0)[y], lls[0].double().mean(0).float(), atol=1e-4)
    with pytest.raises(ValueError, match="no calibration images for class stripes"):
        fit_normal_statistics(scorer, {y: []})


def test_smoothing_is_a_normalised_blur():
    from hgad_edge.training.scoring import gaussian_kernel1d

    const = torch.full((1, 32, 32), 3.0)
    assert torch.allclose(gaussian_blur(const, gaussian_kernel1d(2.0)), const, atol=1e-5)  # sums to 1, reflect pad
    spike = torch.zeros(1, 33, 33)
    spike[0, 16, 16] = 1.0
    blurred = gaussian_blur(spike, gaussian_kernel1d(1.5))
    assert blurred.argmax().item() == spike.argmax().item() and blurred.max() < 1.0
