"""Threshold policies and the PASS/FAIL decision (hgad_edge.core.thresholds): each policy gives the
threshold it promises, refuses what its images cannot support, and the decision math is the documented one."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from hgad_edge.core import thresholds as T
from hgad_edge.training.config import ConfigError, HGADConfig

RNG = np.random.default_rng(7)
NORMAL = RNG.normal(2.0, 0.5, 20000)  # a large generated normal set
FRESH = RNG.normal(2.0, 0.5, 200000)  # unseen normal images of the same line
DEFECTS = RNG.normal(4.0, 1.0, 400)
PARAMS = {"max": None, "quantile": 0.99, "target-fpr": 0.01, "target-recall": 0.9, "f1-max": None}


def _promise_max(choice, normal, defects, _p):
    assert choice.threshold > normal.max() and choice.expected_fpr == 0.0  # not even the max itself fails
    assert choice.threshold == np.nextafter(np.float32(normal.max()), np.float32(np.inf))  # just above it


def _promise_quantile(choice, normal, defects, q):
    assert abs((normal >= choice.threshold).mean() - (1 - q)) <= 1.5 / normal.size


def _promise_target_fpr(choice, normal, defects, f):
    fpr = (FRESH >= choice.threshold).mean()  # on images the fit never saw
    assert abs(fpr - f) <= 0.1 * f, fpr
    assert choice.expected_fpr == f


def _promise_target_recall(choice, normal, defects, r):
    assert (defects >= choice.threshold).mean() >= r
    higher = np.sort(defects[defects > choice.threshold])
    assert higher.size < 2 or (defects >= higher[1]).mean() < r  # the highest decisions keeping recall r
    _promise_off_scores(choice.threshold, normal, defects)


def _promise_off_scores(thr, normal, defects):
    """No score sits on the threshold: it lies midway between two scores, so backend jitter of a
    score cannot flip its image."""
    scores = np.concatenate([normal, defects])
    above, below = scores[scores >= thr].min(), scores[scores < thr].max()
    assert above > thr and thr == pytest.approx(0.5 * (above + below))


def _promise_f1_max(choice, normal, defects, _p):
    def f1(t):
        c = T.confusion(normal, defects, t)
        return 2 * c["tp"] / (2 * c["tp"] + c["fp"] + c["fn"])

    brute = max(f1(t) for t in np.unique(np.concatenate([normal, defects])))
    assert f1(choice.threshold) == pytest.approx(brute)
    _promise_off_scores(choice.threshold, normal, defects)


PROMISES = {
    "max": _promise_max,
    "quantile": _promise_quantile,
    "target-fpr": _promise_target_fpr,
    "target-recall": _promise_target_recall,
    "f1-max": _promise_f1_max,
}


def test_every_policy_has_a_promise_check():
    assert set(PROMISES) == set(T.POLICIES) == set(PARAMS)


@pytest.mark.parametrize("name", list(T.POLICIES))
def test_policy_gives_the_threshold_it_promises(name):
    normal = NORMAL[:2000] if T.POLICIES[name].needs_defects else NORMAL
    choice = T.choose_threshold(name, PARAMS[name], normal, DEFECTS)
    PROMISES[name](choice, normal, DEFECTS, PARAMS[name])
    if choice.expected_recall is not None:
        assert choice.expected_recall == pytest.approx((DEFECTS >= choice.threshold).mean())


def test_target_fpr_from_few_images_extrapolates_the_tail():
    """40 normal images: the empirical 99 % quantile sits near the largest one; the tail fit lands
    near the true 1 % point (mean over repetitions, spread as expected for n = 40)."""
    true = 2.0 + 0.5 * T.norm_ppf(0.99)
    fits = [T.choose_threshold("target-fpr", 0.01, RNG.normal(2.0, 0.5, 40)).threshold for _ in range(300)]
    assert abs(np.mean(fits) - true) < 0.05 and np.std(fits) < 0.25


@pytest.mark.parametrize(
    "name, param, n_normal, n_defects, words",
    [
        ("target-fpr", 0.01, 19, 0, "needs at least 20 normal images"),
        ("target-fpr", 0.001, 40, 0, "40 images support a target FPR down to 0.005"),
        ("quantile", 0.99, 1, 0, "needs at least 2 normal images"),
        ("target-recall", 0.95, 10, 19, "needs at least 20 labelled defect images"),
        ("f1-max", None, 10, 4, "needs at least 5 labelled defect images"),
        ("target-fpr", 1.5, 50, 0, "strictly between 0.0 and 1.0"),
        ("max", 0.3, 5, 0, "takes no parameter"),
        ("median", None, 5, 0, "unknown threshold policy"),
    ],
)
def test_policy_refuses_what_its_images_cannot_support(name, param, n_normal, n_defects, words):
    with pytest.raises(T.PolicyError, match=words):
        T.choose_threshold(name, param, NORMAL[:n_normal], DEFECTS[:n_defects])


def test_images_needed_for_a_target_fpr():
    assert (
        T.images_for_fpr(0.01) == 20 and T.images_for_fpr(0.001) == 200 and T.images_for_fpr(0.5) == T.MIN_TAIL_IMAGES
    )
    T.choose_threshold("target-fpr", 0.001, NORMAL[:200])  # exactly enough


def test_non_finite_scores_are_refused():
    with pytest.raises(T.PolicyError, match="non-finite"):
        T.choose_threshold("max", None, [1.0, float("nan")])


def test_norm_ppf_matches_the_standard_library():
    from statistics import NormalDist

    for p in (1e-9, 1e-4, 0.01, 0.02425, 0.3, 0.5, 0.97, 0.999999):
        assert T.norm_ppf(p) == pytest.approx(NormalDist().inv_cdf(p), abs=1e-9)


def test_decision_math():
    score, thr, scale = np.array([0.5, 1.0, 1.5, 1e6, -1e6]), 1.0, 0.25
    got = T.normalize(score, thr, scale)
    assert got.dtype == np.float32 and got[1] == 0.5
    np.testing.assert_allclose(got[:3], 1 / (1 + np.exp(-(score[:3] - thr) / scale)), rtol=1e-6)
    assert got[3] == 1.0 and got[4] == 0.0 and np.isfinite(got).all()  # no overflow warning / NaN
    np.testing.assert_array_equal(T.is_anomalous(score, thr), [False, True, True, True, False])
    out = np.empty(5, np.float32)
    assert T.normalize(score, thr, scale, out=out) is out and np.array_equal(out, got)


def test_operating_points_agree_with_sklearn():
    normal, defects = NORMAL[:300], DEFECTS[:100]
    fpr, tpr, _ = roc_curve(np.r_[np.zeros(300), np.ones(100)], np.r_[normal, defects], drop_intermediate=False)
    for f in (0.01, 0.05):
        assert T.recall_at_fpr(normal, defects, f) == pytest.approx(tpr[fpr <= f].max())
    for r in (0.9, 0.95):
        assert T.fpr_at_recall(normal, defects, r) == pytest.approx(fpr[tpr >= r].min())
    c = T.confusion(normal, defects, 3.0)
    assert c == {
        "tp": int((defects >= 3).sum()),
        "fp": int((normal >= 3).sum()),
        "tn": int((normal < 3).sum()),
        "fn": int((defects < 3).sum()),
    }


def test_scale_is_the_normal_spread_floored():
    assert T.score_scale([1.0, 3.0]) == 1.0 and T.score_scale([2.0, 2.0]) == pytest.approx(2e-3)
    assert T.score_scale([0.0]) == T.SCALE_FLOOR and math.isfinite(T.score_scale([]))


def test_config_policy_and_the_old_quantile_key():
    assert HGADConfig().score.policy() == ("max", None)
    assert HGADConfig.from_dict({"score": {"threshold_quantile": 1.0}}).score.policy() == ("max", None)
    assert HGADConfig.from_dict({"score": {"threshold_quantile": 0.95}}).score.policy() == ("quantile", 0.95)
    cfg = HGADConfig.from_dict({"score": {"threshold_policy": "target-fpr", "threshold_param": 0.05}})
    assert cfg.score.policy() == ("target-fpr", 0.05)
    with pytest.raises(ConfigError, match="needs labelled defects"):
        HGADConfig.from_dict({"score": {"threshold_policy": "f1-max"}})
    with pytest.raises(ConfigError, match="strictly between"):
        HGADConfig.from_dict({"score": {"threshold_policy": "quantile"}})
