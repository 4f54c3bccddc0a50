"""PASS/FAIL decisions and how their thresholds are chosen. numpy only (torch-free).

One place for the decision both sides make: the PyTorch scorer (eval) and the edge runtime (on the
host, after the graph) turn an image score into score_normalized = sigmoid((score - threshold[c]) /
scale[c]) and FAIL iff score >= threshold[c] (normalized >= 0.5). Thresholds are not in the exported
graph, so `hgad-edge calibrate` can change them without rebuilding a TensorRT engine.

Threshold policies are a registry (`POLICIES`): each says what it needs (normal scores only, or
labelled defects too), how many images, and returns the threshold plus the FPR / recall it expects.
`target-fpr` fits a Gaussian to the upper half of the normal scores (centre = median, spread = RMS
of the deviations above the median): with a few dozen normal images an empirical 99 % quantile is
just the largest score, while the fitted tail extrapolates. It is trusted down to an FPR of
1 / (TAIL_EXTRAPOLATION * n); a lower target needs more images and is refused, saying how many.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

NORMALIZED_THRESHOLD = 0.5  # score_normalized at the threshold (sigmoid(0))
SCALE_FLOOR = 1e-6  # a class whose normal scores are all equal still gets a finite sigmoid slope
# A fitted Gaussian tail is trusted this many times below the empirical resolution 1 / n.
TAIL_EXTRAPOLATION = 5.0
MIN_TAIL_IMAGES = 10  # mean and spread of the upper half need at least this many normal scores


class PolicyError(ValueError):
    """A policy cannot give a trustworthy threshold from these images; the message names the fix."""


# ---- the decision (both sides) -----------------------------------------------------------------
def normalize(score, threshold, scale, out: np.ndarray | None = None) -> np.ndarray:
    """sigmoid((score - threshold) / scale), written as 0.5 (1 + tanh(z / 2)): no overflow for large |z|."""
    z = (np.asarray(score, np.float64) - np.asarray(threshold, np.float64)) / np.asarray(scale, np.float64)
    value = 0.5 * (1.0 + np.tanh(0.5 * z))
    if out is None:
        return value.astype(np.float32)
    np.copyto(out, value, casting="same_kind")
    return out


def is_anomalous(score, threshold, out: np.ndarray | None = None) -> np.ndarray:
    """FAIL iff score >= threshold (the same as normalized >= 0.5, without the rounding of the sigmoid)."""
    return np.greater_equal(np.asarray(score, np.float64), np.asarray(threshold, np.float64), out=out)


def decision_threshold(threshold, scale, normalized_threshold: float = NORMALIZED_THRESHOLD) -> np.ndarray:
    """Score at which score_normalized reaches `normalized_threshold`: threshold + scale * logit(it).

    At the default 0.5 the logit is exactly 0, so the cut is the threshold itself (no sigmoid rounding)."""
    logit = math.log(normalized_threshold / (1.0 - normalized_threshold))
    return np.asarray(threshold, np.float64) + np.asarray(scale, np.float64) * logit


def score_scale(normal_scores) -> float:
    """Sigmoid slope: the spread of the normal scores, floored so a constant class stays finite."""
    s = np.asarray(normal_scores, np.float64)
    spread = float(s.std()) if s.size > 1 else 0.0
    return max(spread, 1e-3 * max(abs(float(s.mean())) if s.size else 0.0, 1e-6), SCALE_FLOOR)


# ---- operating points --------------------------------------------------------------------------
def confusion(normal_scores, defect_scores, threshold: float) -> dict[str, int]:
    """TP/FP/TN/FN at `threshold` (FAIL iff score >= threshold)."""
    n, d = np.asarray(normal_scores, np.float64), np.asarray(defect_scores, np.float64)
    fp, tp = int((n >= threshold).sum()), int((d >= threshold).sum())
    return {"tp": tp, "fp": fp, "tn": int(n.size - fp), "fn": int(d.size - tp)}


def rates(normal_scores, defect_scores, threshold: float) -> dict[str, float | None]:
    """FPR on normal and recall on defect scores at `threshold` (None where a side is empty)."""
    c = confusion(normal_scores, defect_scores, threshold)
    n, d = c["fp"] + c["tn"], c["tp"] + c["fn"]
    return {"fpr": c["fp"] / n if n else None, "recall": c["tp"] / d if d else None}


def roc_points(normal_scores, defect_scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, recall, thresholds) for every distinct score as threshold, from the strictest down;
    starts at (0, 0) with threshold +inf."""
    n, d = np.sort(np.asarray(normal_scores, np.float64)), np.sort(np.asarray(defect_scores, np.float64))
    thr = np.unique(np.concatenate([n, d]))[::-1]

    def share_at_or_above(sorted_scores: np.ndarray) -> np.ndarray:
        if not sorted_scores.size:
            return np.zeros(thr.size)
        return 1.0 - np.searchsorted(sorted_scores, thr, side="left") / sorted_scores.size

    return np.r_[0.0, share_at_or_above(n)], np.r_[0.0, share_at_or_above(d)], np.r_[np.inf, thr]


def recall_at_fpr(normal_scores, defect_scores, max_fpr: float) -> float:
    """Best recall among thresholds whose FPR is at most max_fpr (empirical, on these scores)."""
    fpr, tpr, _ = roc_points(normal_scores, defect_scores)
    return float(tpr[fpr <= max_fpr + 1e-12].max())


def fpr_at_recall(normal_scores, defect_scores, min_recall: float) -> float:
    """Lowest FPR among thresholds whose recall is at least min_recall."""
    fpr, tpr, _ = roc_points(normal_scores, defect_scores)
    return float(fpr[tpr >= min_recall - 1e-12].min())


# ---- the tail fit ------------------------------------------------------------------------------
def norm_ppf(p: float) -> float:
    """Inverse standard normal CDF (Acklam's rational approximation, |error| < 1.2e-9 after one
    Newton step); numpy has no erfinv and the base install carries no scipy."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"norm_ppf needs 0 < p < 1, got {p}")
    a = (
        -3.969683028665376e01,
        2.209460984245205e02,
        -2.759285104469687e02,
        1.383577518672690e02,
        -3.066479806614716e01,
        2.506628277459239e00,
    )
    b = (
        -5.447609879822406e01,
        1.615858368580409e02,
        -1.556989798598866e02,
        6.680131188771972e01,
        -1.328068155288572e01,
    )
    c = (
        -7.784894002430293e-03,
        -3.223964580411365e-01,
        -2.400758277161838e00,
        -2.549732539343734e00,
        4.374664141464968e00,
        2.938163982698783e00,
    )
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)
    lo = 0.02425
    if p < lo or p > 1 - lo:
        q = math.sqrt(-2 * math.log(p if p < lo else 1 - p))
        x = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / (
            (((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1
        )
        x = x if p < lo else -x
    else:
        q = p - 0.5
        r = q * q
        x = (
            (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5])
            * q
            / (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)
        )
    err = 0.5 * math.erfc(-x / math.sqrt(2)) - p  # one Newton step on the exact CDF
    return x - err * math.sqrt(2 * math.pi) * math.exp(x * x / 2)


def upper_tail_gaussian(normal_scores) -> tuple[float, float]:
    """(centre, spread) of a Gaussian fitted to the upper half: median and the RMS of the
    deviations above it. Right-skewed score distributions get the spread of their upper side."""
    s = np.asarray(normal_scores, np.float64)
    centre = float(np.median(s))
    above = s[s > centre] - centre
    spread = float(np.sqrt(np.mean(above**2))) if above.size else 0.0
    return centre, max(spread, SCALE_FLOOR)


def images_for_fpr(fpr: float) -> int:
    """Normal images needed before a target FPR is trusted (see TAIL_EXTRAPOLATION)."""
    return max(MIN_TAIL_IMAGES, math.ceil(1.0 / (TAIL_EXTRAPOLATION * fpr) - 1e-9))


# ---- policies ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    """A chosen threshold and what it promises on the images it was chosen from."""

    threshold: float
    expected_fpr: float | None
    expected_recall: float | None
    method: str  # one line on how (recorded with the threshold)


@dataclass(frozen=True)
class Policy:
    """name, CLI flag, what it needs, and how it chooses. `param` is None for parameterless policies."""

    name: str
    needs_defects: bool
    choose: Callable[[np.ndarray, np.ndarray, float | None], Choice]
    param_range: tuple[float, float] | None = None  # open interval the parameter must lie in
    help: str = ""
    min_normal: Callable[[float | None], int] = field(default=lambda p: 1)
    min_defects: Callable[[float | None], int] = field(default=lambda p: 0)


def _expected(
    normal: np.ndarray, defects: np.ndarray, threshold: float, method: str, fpr: float | None = None
) -> Choice:
    r = rates(normal, defects, threshold)
    return Choice(float(threshold), r["fpr"] if fpr is None else fpr, r["recall"], method)


def just_above(score: float) -> float:
    """The next float32 above `score`: FAIL is score >= threshold, so a threshold ON the highest normal
    score would fail that image. float32, because a run folder keeps its thresholds in float32 (a step
    of float64 would round back onto the score) and every score is a float32."""
    up = float(np.nextafter(np.float32(score), np.float32(np.inf)))
    return up if math.isfinite(up) and up > score else float(np.nextafter(score, np.inf))


def _max(normal, defects, _param) -> Choice:
    return _expected(normal, defects, just_above(float(normal.max())), "just above the max of the normal scores")


def _quantile(normal, defects, q) -> Choice:
    return _expected(
        normal,
        defects,
        float(np.quantile(normal, q)),
        f"empirical {q} quantile of the normal scores (linear interpolation)",
    )


def _target_fpr(normal, defects, f) -> Choice:
    centre, spread = upper_tail_gaussian(normal)
    thr = centre + norm_ppf(1.0 - f) * spread
    how = f"upper-half Gaussian fit (median {centre:.6g}, spread {spread:.6g}) at its 1 - {f} quantile"
    return _expected(normal, defects, thr, how, fpr=f)


def _below_score(score: float, normal: np.ndarray, defects: np.ndarray) -> float:
    """A threshold just under `score` with the same decisions on these images: midway to the next
    lower score. A threshold ON a score would let that image flip with the last-digit differences
    between backends (ONNX Runtime, TensorRT FP16, batch sizes)."""
    scores = np.concatenate([normal, defects])
    lower = scores[scores < score]
    if lower.size == 0:
        return score - 1e-3 * max(1.0, abs(score))
    return 0.5 * (score + float(lower.max()))


def _target_recall(normal, defects, r) -> Choice:
    """The strictest decisions that still flag ceil(r * m) of the m defect images (the threshold
    midway below the k-th highest defect score)."""
    k = math.ceil(r * defects.size - 1e-9)
    thr = _below_score(float(np.sort(defects)[::-1][max(k, 1) - 1]), normal, defects)
    return _expected(
        normal, defects, thr, f"below the k-th highest defect score, k = ceil({r} x {defects.size}) = {k}"
    )


def _f1_max(normal, defects, _param) -> Choice:
    best, best_thr = -1.0, float(defects.max())
    for thr in np.unique(defects):  # F1 only improves when a threshold sits on a defect score
        c = confusion(normal, defects, thr)
        f1 = 2 * c["tp"] / (2 * c["tp"] + c["fp"] + c["fn"])
        if f1 > best:
            best, best_thr = f1, float(thr)
    thr = _below_score(best_thr, normal, defects)
    return _expected(normal, defects, thr, f"maximum F1 ({best:.3f}) on the normal + defect images")


def _recall_images(r: float | None) -> int:
    return max(5, math.ceil(1.0 / (1.0 - r) - 1e-9)) if r is not None and r < 1 else 5


POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy("max", False, _max, help="just above the max of the normal scores (no normal calibration image fails)"),
        Policy(
            "quantile",
            False,
            _quantile,
            (0.0, 1.0),
            "empirical quantile Q of the normal scores",
            min_normal=lambda q: 2,
        ),
        Policy(
            "target-fpr",
            False,
            _target_fpr,
            (0.0, 1.0),
            "false-positive rate F from a Gaussian fit of the normal scores' upper tail",
            min_normal=images_for_fpr,
        ),
        Policy(
            "target-recall",
            True,
            _target_recall,
            (0.0, 1.0),
            "flag at least a fraction R of the defect images",
            min_defects=_recall_images,
        ),
        Policy(
            "f1-max", True, _f1_max, help="threshold of maximum F1 on normal + defect images", min_defects=lambda p: 5
        ),
    )
}


def check_policy(name: str, param: float | None) -> Policy:
    """The policy of that name, its parameter checked; PolicyError naming the choices otherwise."""
    if name not in POLICIES:
        raise PolicyError(f"unknown threshold policy {name!r}; choose one of {', '.join(POLICIES)}")
    policy = POLICIES[name]
    if policy.param_range is None:
        if param is not None:
            raise PolicyError(f"threshold policy {name!r} takes no parameter (got {param})")
        return policy
    lo, hi = policy.param_range
    if param is None or isinstance(param, bool) or not isinstance(param, (int, float)) or not lo < param < hi:
        raise PolicyError(f"threshold policy {name!r} needs a parameter strictly between {lo} and {hi}, got {param!r}")
    return policy


def choose_threshold(name: str, param: float | None, normal_scores, defect_scores=(), what: str = "") -> Choice:
    """Apply a policy; PolicyError (saying how many images are needed) when these images cannot support it."""
    policy = check_policy(name, param)
    normal = np.asarray(normal_scores, np.float64).ravel()
    defects = np.asarray(defect_scores, np.float64).ravel()
    where = f" for {what}" if what else ""
    if not (np.isfinite(normal).all() and np.isfinite(defects).all()):
        raise PolicyError(f"non-finite scores{where}: the model produced NaN/inf; re-export or retrain it")
    label = name if param is None else f"{name} {param}"
    need_n = policy.min_normal(param)
    if normal.size < need_n:
        extra = ""
        if name == "target-fpr" and normal.size >= MIN_TAIL_IMAGES:
            lowest = 1.0 / (TAIL_EXTRAPOLATION * normal.size)
            extra = f" ({normal.size} images support a target FPR down to {lowest:.4g})"
        msg = (
            f"policy {label} needs at least {need_n} normal images{where}, got {normal.size}{extra}: add normal images"
        )
        raise PolicyError(msg + (" or raise the target FPR" if name == "target-fpr" else ""))
    if policy.needs_defects:
        need_d = policy.min_defects(param)
        if defects.size < need_d:
            msg = (
                f"policy {label} needs at least {need_d} labelled defect images{where}, got {defects.size}: "
                "add defect images (--defects DIR)"
            )
            raise PolicyError(msg)
    return policy.choose(normal, defects, param)
