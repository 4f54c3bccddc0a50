"""Metrics against sklearn (reference only) and hand-checkable PRO cases."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from hgad_edge.core.metrics import aupro, auroc, f1_max, image_and_pixel_metrics

try:  # the reference implementation: only the comparisons against it need it (the `test` extra has it)
    from sklearn import metrics as sklearn_metrics
except ImportError:
    sklearn_metrics = None
needs_sklearn = pytest.mark.skipif(
    sklearn_metrics is None, reason="scikit-learn is the reference: pip install 'hgad-edge[test]'"
)


def _sklearn_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = sklearn_metrics.precision_recall_curve(labels, scores)
    denom = precision + recall
    return float(np.max(np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0)))


@needs_sklearn
@pytest.mark.parametrize("n", [7, 100, 5000])
@pytest.mark.parametrize("pos_rate", [0.05, 0.5, 0.95])
@pytest.mark.parametrize("levels", [3, 50, None])
def test_auroc_and_f1_match_sklearn_with_ties(n: int, pos_rate: float, levels: int | None) -> None:
    rng = np.random.default_rng(n + int(pos_rate * 100) + (levels or 0))
    labels = rng.random(n) < pos_rate
    labels[:2] = [True, False]
    raw = rng.random(n) + 0.3 * labels
    scores = np.round(raw * levels) / levels if levels else raw  # few levels -> many ties
    assert auroc(labels, scores) == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores), abs=1e-12)
    assert f1_max(labels, scores) == pytest.approx(_sklearn_f1_max(labels, scores), abs=1e-12)


@needs_sklearn
def test_float32_scores_and_any_label_shape() -> None:
    rng = np.random.default_rng(1)
    labels = (rng.random((4, 16, 16)) < 0.2).astype(np.uint8)
    scores = (rng.random((4, 16, 16)) + labels).astype(np.float32)
    ref = sklearn_metrics.roc_auc_score(labels.ravel(), scores.ravel())
    assert auroc(labels, scores) == pytest.approx(ref, abs=1e-12)
    assert auroc(labels.astype(bool), scores) == pytest.approx(ref, abs=1e-12)


def test_perfect_inverted_constant() -> None:
    labels = np.array([0, 0, 1, 1, 0, 1])
    good = labels * 2.0 + 0.1 * np.arange(6)
    assert auroc(labels, good) == 1.0
    assert auroc(labels, -good) == 0.0
    assert auroc(labels, np.zeros(6)) == 0.5
    assert f1_max(labels, good) == 1.0
    assert f1_max(labels, np.zeros(6)) == pytest.approx(2 * 0.5 / 1.5)  # everything flagged


def test_random_scores_near_half() -> None:
    rng = np.random.default_rng(2)
    labels = rng.random(200_000) < 0.1
    assert auroc(labels, rng.random(labels.size)) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("fn", [auroc, f1_max])
def test_single_class_raises(fn) -> None:
    with pytest.raises(ValueError, match="both classes"):
        fn(np.zeros(5), np.arange(5.0))
    with pytest.raises(ValueError, match="both classes"):
        fn(np.ones(5), np.arange(5.0))


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="binary"):
        auroc(np.array([0, 255, 0]), np.arange(3.0))
    with pytest.raises(ValueError, match="values"):
        auroc(np.array([0, 1, 0]), np.arange(4.0))
    with pytest.raises(ValueError, match="NaN"):
        auroc(np.array([0, 1, 0]), np.array([0.0, np.nan, 1.0]))


def _blob_masks(n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), bool)
    for i in range(0, n, 2):
        for _ in range(rng.integers(1, 4)):
            canvas = np.zeros((size, size), np.uint8)
            centre = tuple(int(v) for v in rng.integers(4, size - 4, 2))
            cv2.circle(canvas, centre, int(rng.integers(1, size // 6)), 1, -1)
            masks[i] |= canvas > 0
    return masks


def _brute_force_aupro(masks: np.ndarray, maps: np.ndarray, limit: float) -> float:
    """Literal definition: every distinct score as threshold, PRO averaged over regions."""
    normal = maps[~masks]
    regions = []
    for mask, amap in zip(masks, maps):
        n_lab, lab = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        regions += [amap[lab == r] for r in range(1, n_lab)]
    fpr, pro = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fpr.append(float(np.mean(normal >= t)))
        pro.append(float(np.mean([np.mean(r >= t) for r in regions])))
    return _area_up_to(fpr, pro, limit) / limit


def _area_up_to(xs: list[float], ys: list[float], limit: float) -> float:
    """Area under the polyline (xs nondecreasing) over [0, limit], segment by segment: each straight
    piece integrated up to where it leaves [0, limit] (written apart from the metrics module)."""
    area = 0.0
    for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]):
        end = min(x1, limit)
        if end > x0:  # vertical steps (x0 == x1) and pieces past the limit add nothing
            y_end = y0 + (y1 - y0) * (end - x0) / (x1 - x0)
            area += (end - x0) * (y0 + y_end) / 2
    return area


def test_aupro_perfect_and_inverted() -> None:
    masks = _blob_masks(6, 32, 0)
    assert aupro(masks, masks.astype(np.float32)) == 1.0
    assert aupro(masks, (~masks).astype(np.float32)) == 0.0


@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
def test_aupro_matches_brute_force_with_ties(limit: float) -> None:
    masks = _blob_masks(4, 20, 3)
    rng = np.random.default_rng(4)
    maps = np.round(rng.random(masks.shape) + 0.4 * masks, 1)  # coarse levels -> ties across classes
    assert aupro(masks, maps, limit) == pytest.approx(_brute_force_aupro(masks, maps, limit), abs=1e-12)


def test_aupro_two_regions_one_found() -> None:
    # Region A (4 px, image 0) scores 1, region B (1 px, image 1) scores 0 like all normal
    # pixels except one normal pixel at 0.5. PRO is 0.5 from FPR 0 until the threshold drops
    # to 0, where every pixel switches on: the curve is (0,0)-(0,.5)-(1/N,.5)-(1,1).
    masks = np.zeros((2, 4, 4), bool)
    masks[0, :2, :2] = True
    masks[1, 3, 3] = True
    maps = masks[0:1].astype(float).repeat(2, axis=0)
    maps[1] = 0.0
    maps[0, 3, 3] = 0.5
    n_normal = int((~masks).sum())
    x = 1.0 / n_normal
    expected = (x * 0.5 + (0.3 - x) * (0.5 + (0.5 + 0.5 * (0.3 - x) / (1 - x))) / 2) / 0.3
    assert aupro(masks, maps, 0.3) == pytest.approx(expected, abs=1e-12)
    # B scoring below every normal pixel is only found at FPR 1: a flat 0.5 plateau.
    maps[1, 3, 3] = -1.0
    assert aupro(masks, maps, 0.3) == pytest.approx(0.5, abs=1e-12)


def test_aupro_small_regions_count_like_large_ones() -> None:
    # One huge found region and one tiny missed region: pixel AUROC is high, PRO is only 0.5.
    masks = np.zeros((1, 40, 40), bool)
    masks[0, :30, :30] = True
    masks[0, 38, 38] = True
    maps = masks.astype(float)
    maps[0, 38, 38] = -1.0
    assert aupro(masks, maps) == pytest.approx(0.5)
    assert auroc(masks, maps) > 0.99


def test_aupro_monotone_in_map_quality() -> None:
    masks = _blob_masks(20, 48, 5)
    noise = np.random.default_rng(6).random(masks.shape).astype(np.float32)
    values = [aupro(masks, noise + s * masks) for s in (0.0, 0.2, 0.5, 1.0)]
    assert values[0] == pytest.approx(0.15, abs=0.03)  # random map: mean PRO = FPR -> 0.3 / 2
    assert values == sorted(values) and values[-1] == pytest.approx(1.0)


def test_aupro_sampled_thresholds_close_to_exact() -> None:
    masks = _blob_masks(20, 48, 7)
    maps = np.random.default_rng(8).random(masks.shape) + 0.4 * masks
    exact = aupro(masks, maps)
    assert aupro(masks, maps, num_thresholds=400) == pytest.approx(exact, abs=5e-3)


def test_aupro_errors() -> None:
    with pytest.raises(ValueError, match="no defect region"):
        aupro(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="shape"):
        aupro(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(np.ones((1, 2, 2), bool), np.zeros((1, 2, 2)), fpr_limit=0.0)


def test_image_and_pixel_metrics() -> None:
    masks = _blob_masks(8, 32, 9)
    labels = masks.any(axis=(1, 2))
    maps = masks.astype(np.float32)
    image_scores = maps.max(axis=(1, 2))
    assert image_and_pixel_metrics(labels, image_scores) == {
        "image_auroc": 1.0,
        "f1_max": 1.0,
        "pixel_auroc": None,
        "aupro": None,
    }
    full = image_and_pixel_metrics(labels, image_scores, masks, maps)
    assert full == {"image_auroc": 1.0, "f1_max": 1.0, "pixel_auroc": 1.0, "aupro": 1.0}
    with pytest.raises(ValueError, match="without anomaly maps"):
        image_and_pixel_metrics(labels, image_scores, masks)
