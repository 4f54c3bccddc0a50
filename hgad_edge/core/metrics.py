"""Image- and pixel-level anomaly detection metrics (numpy only).

Kept free of torch and sklearn so the torch-free runtime and evaluation scripts can score a
class without heavy dependencies. All metrics are exact (no score binning) and handle tied
scores the way sklearn does; they are written for pixel-level inputs of tens of millions of
values: each class is sorted once with `np.sort` (no int64 argsort of all pixels) and compared
by `np.searchsorted`, so time is O(n log n) and peak memory about one copy of the scores.
"""

from __future__ import annotations

import numpy as np

_CHUNK = 1 << 22  # searchsorted needles per step; bounds the int64 temporaries to ~64 MB


def _as_binary(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    """Flatten 0/1 (or bool) labels to a bool vector; reject other values to catch 0/255 masks."""
    y = np.asarray(labels).ravel()
    if y.dtype == np.bool_:
        return y
    invalid = (y != 0) & (y != 1)
    if invalid.any():
        bad = y[invalid][0]
        msg = f"{name} must be binary 0/1 or bool, found value {bad!r}"
        raise ValueError(msg)
    return y != 0


def _as_scores(scores: np.ndarray, size: int, name: str = "scores") -> np.ndarray:
    """Flatten scores without copying float arrays (float32 stays float32 to halve sort cost)."""
    s = np.asarray(scores).ravel()
    if s.size != size:
        msg = f"{name} has {s.size} values but labels have {size}"
        raise ValueError(msg)
    if s.dtype == np.bool_:
        s = s.astype(np.uint8)
    if s.dtype.kind not in "fiu":
        msg = f"{name} must be numeric, got dtype {s.dtype}"
        raise ValueError(msg)
    return s


def _split_sorted(labels: np.ndarray, scores: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ascending-sorted (positive, negative) scores; both classes must be present."""
    y = _as_binary(labels)
    s = _as_scores(scores, y.size)
    pos = s[y]
    neg = s[~y]
    if pos.size == 0 or neg.size == 0:
        present = "positive (1)" if pos.size else "negative (0)"
        msg = f"{what} needs both classes, but only {present} labels are present ({y.size} samples)"
        raise ValueError(msg)
    pos.sort()
    neg.sort()
    if (pos.dtype.kind == "f") and (np.isnan(pos[-1]) or np.isnan(neg[-1])):
        msg = f"{what}: scores contain NaN"
        raise ValueError(msg)
    return pos, neg


def _count_below(haystack: np.ndarray, needles: np.ndarray) -> int:
    """Sum over needles of (#haystack < needle) * 2 + (#haystack == needle), i.e. twice the
    tie-averaged rank count, as an exact integer."""
    total = 0
    for start in range(0, needles.size, _CHUNK):
        chunk = needles[start : start + _CHUNK]
        total += int(np.searchsorted(haystack, chunk, side="left").sum(dtype=np.int64))
        total += int(np.searchsorted(haystack, chunk, side="right").sum(dtype=np.int64))
    return total


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC (Mann-Whitney U, ties count one half), equal to sklearn's roc_auc_score.

    Labels are 0/1 or bool of any shape (flattened). The smaller class is searched in the
    sorted larger one, so defect pixels (usually a few percent) drive the search cost.
    """
    pos, neg = _split_sorted(labels, scores, "auroc")
    n_pos, n_neg = pos.size, neg.size
    if n_pos <= n_neg:
        twice_wins = _count_below(neg, pos)  # 2 * #(neg < pos) + #(neg == pos)
    else:
        twice_wins = 2 * n_pos * n_neg - _count_below(pos, neg)  # counted from the negatives' side
    return float(twice_wins / (2.0 * n_pos * n_neg))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Best F1 over all thresholds `score >= t` (the maximum over sklearn's PR curve).

    The optimum always sits at a positive sample's score (raising t up to the next positive
    only drops false positives), so only those thresholds are evaluated; ties are grouped
    by `searchsorted(side="left")`.
    """
    pos, neg = _split_sorted(labels, scores, "f1_max")
    n_pos = pos.size
    best = 0.0
    for start in range(0, n_pos, _CHUNK):
        t = pos[start : start + _CHUNK]
        tp = n_pos - np.searchsorted(pos, t, side="left")
        fp = neg.size - np.searchsorted(neg, t, side="left")
        f1 = 2.0 * tp / (tp + fp + n_pos)
        best = max(best, float(f1.max()))
    return best


def _region_pixels(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores of all defect pixels and their PRO weight 1 / (n_regions * region_size).

    Regions are 8-connected components of each image's mask, so every defect counts equally
    regardless of its area (the point of PRO versus pixel AUROC).
    """
    import cv2  # local: keeps `import hgad_edge.core.metrics` cheap for auroc-only users

    scores, region_ids = [], []
    n_regions = 0
    for idx in np.flatnonzero(masks.reshape(masks.shape[0], -1).any(axis=1)):
        m = masks[idx]
        n_lab, lab = cv2.connectedComponents(m.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
        scores.append(maps[idx][m])
        region_ids.append(lab[m] - 1 + n_regions)
        n_regions += n_lab - 1
    if n_regions == 0:
        msg = "aupro: masks contain no defect region (all pixels are normal)"
        raise ValueError(msg)
    ids = np.concatenate(region_ids)
    sizes = np.bincount(ids, minlength=n_regions)
    weights = 1.0 / (n_regions * sizes[ids].astype(np.float64))
    return np.concatenate(scores), weights


def _truncated_area(x: np.ndarray, y: np.ndarray, x_limit: float) -> float:
    """Trapezoid area under a polyline with nondecreasing x, cut (interpolated) at x_limit."""
    keep = int(np.searchsorted(x, x_limit, side="right"))
    xs, ys = x[:keep], y[:keep]
    if keep < x.size and xs[-1] < x_limit:
        x0, x1, y0, y1 = x[keep - 1], x[keep], y[keep - 1], y[keep]
        y_lim = y0 + (y1 - y0) * (x_limit - x0) / (x1 - x0)
        xs, ys = np.append(xs, x_limit), np.append(ys, y_lim)
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1])) / 2.0)


def aupro(
    masks: np.ndarray,
    maps: np.ndarray,
    fpr_limit: float = 0.3,
    num_thresholds: int | None = None,
) -> float:
    """Normalised area under the per-region-overlap curve up to `fpr_limit` (MVTec AD).

    PRO(t) is the mean over all ground-truth regions (8-connected components, all images) of
    the fraction of the region scored >= t; FPR(t) is measured on pixels outside every mask.
    The area over FPR in [0, fpr_limit] is divided by fpr_limit, so a perfect map scores 1.

    With `num_thresholds=None` the sweep is exact: the curve only bends at defect-pixel
    scores (between them PRO is flat, so normal pixels only stretch horizontal segments), and
    each distinct defect score contributes the points just above and at that score. An int
    instead samples thresholds at FPR-evenly spaced quantiles of the normal scores (the
    classic MVTec evaluation), which approximates the exact value within about 1/num_thresholds.
    """
    masks = np.asarray(masks)
    maps = np.asarray(maps)
    if masks.ndim != 3 or masks.shape != maps.shape:
        msg = f"aupro expects masks and maps of equal shape (N, H, W), got {masks.shape} and {maps.shape}"
        raise ValueError(msg)
    if not 0.0 < fpr_limit <= 1.0:
        msg = f"fpr_limit must be in (0, 1], got {fpr_limit}"
        raise ValueError(msg)
    masks = _as_binary(masks, "masks").reshape(masks.shape)
    if maps.dtype.kind != "f":
        maps = maps.astype(np.float64)
    if np.isnan(maps.min()):
        msg = "aupro: maps contain NaN"
        raise ValueError(msg)

    d_scores, d_weights = _region_pixels(masks, maps)
    normal = maps[~masks]
    if normal.size == 0:
        msg = "aupro: no normal pixels, so the false-positive rate is undefined"
        raise ValueError(msg)
    normal.sort()
    n_normal = normal.size

    order = np.argsort(-d_scores, kind="stable")  # descending; defect pixels are few
    d_sorted = d_scores[order]
    pro_cum = np.cumsum(d_weights[order])
    pro_cum /= pro_cum[-1]  # the weights sum to 1; remove rounding so a perfect map gives 1.0

    if num_thresholds is None:
        last = np.append(np.flatnonzero(d_sorted[1:] != d_sorted[:-1]), d_sorted.size - 1)
        t = d_sorted[last]  # distinct defect scores, descending
        pro_at = pro_cum[last]  # PRO(score >= t)
        pro_above = np.append(0.0, pro_at[:-1])  # PRO(score > t)
        fpr_above = (n_normal - np.searchsorted(normal, t, side="right")) / n_normal
        fpr_at = (n_normal - np.searchsorted(normal, t, side="left")) / n_normal
        fpr = np.concatenate(([0.0], np.column_stack((fpr_above, fpr_at)).ravel(), [1.0]))
        pro = np.concatenate(([0.0], np.column_stack((pro_above, pro_at)).ravel(), [pro_at[-1]]))
    else:
        if num_thresholds < 2:
            msg = f"num_thresholds must be >= 2 or None, got {num_thresholds}"
            raise ValueError(msg)
        # Thresholds at normal-score quantiles place the points evenly on the FPR axis.
        ranks = np.linspace(0.0, 1.0, num_thresholds) * (n_normal - 1)
        t = normal[np.round(ranks).astype(np.int64)][::-1]
        fpr_curve = (n_normal - np.searchsorted(normal, t, side="left")) / n_normal
        n_above = np.searchsorted(-d_sorted, -t, side="right")  # #defect pixels >= t
        pro_curve = np.where(n_above > 0, pro_cum[np.maximum(n_above - 1, 0)], 0.0)
        fpr = np.concatenate(([0.0], fpr_curve))
        pro = np.concatenate(([0.0], pro_curve))
    return _truncated_area(fpr, pro, fpr_limit) / fpr_limit


def image_and_pixel_metrics(
    labels: np.ndarray,
    image_scores: np.ndarray,
    masks: np.ndarray | None = None,
    maps: np.ndarray | None = None,
) -> dict[str, float | None]:
    """The four numbers reported per class: image AUROC and F1-max, pixel AUROC and AUPRO.

    Pixel metrics pool all pixels of all images of the class; they are None without masks.
    """
    result: dict[str, float | None] = {
        "image_auroc": auroc(labels, image_scores),
        "f1_max": f1_max(labels, image_scores),
        "pixel_auroc": None,
        "aupro": None,
    }
    if masks is None:
        return result
    if maps is None:
        msg = "masks were given without anomaly maps"
        raise ValueError(msg)
    masks, maps = np.asarray(masks), np.asarray(maps)
    if masks.shape != maps.shape:
        msg = f"masks {masks.shape} and maps {maps.shape} must have the same shape"
        raise ValueError(msg)
    n_images = np.asarray(labels).size
    if masks.shape[0] != n_images:
        msg = f"{masks.shape[0]} masks for {n_images} image labels"
        raise ValueError(msg)
    result["pixel_auroc"] = auroc(masks, maps)
    result["aupro"] = aupro(masks, maps)
    return result
