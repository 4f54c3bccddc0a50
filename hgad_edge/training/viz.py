"""Evaluation pictures an inspection engineer looks at: overlay grids and histograms.

The per-frame heat-map overlay lives in `overlay.py` (shared with the camera app). The histogram
writers import matplotlib lazily and draw on a bare Agg canvas (no pyplot), so they work
headless and never switch the backend of an application that imports this module.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from hgad_edge.core.overlay import FONT, check_rgb, text_scale

PathLike = str | Path


def _write_png(path: PathLike, image_rgb: np.ndarray) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)):
        msg = f"could not write image to {path}"
        raise OSError(msg)


def _titled_tile(title: str, image: np.ndarray, size: tuple[int, int], bar: int) -> np.ndarray:
    """Resize `image` to size (w, h) and put a white title bar above it; long titles shrink."""
    w, h = size
    tile = np.full((h + bar, w, 3), 255, np.uint8)
    tile[bar:] = image if image.shape[:2] == (h, w) else cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    scale, thick = text_scale(h, w)
    (tw, th), _ = cv2.getTextSize(title, FONT, scale, thick)
    scale *= min(1.0, (w - 4) / max(tw, 1), (bar - 4) / max(th, 1))
    (tw, th), _ = cv2.getTextSize(title, FONT, scale, thick)
    cv2.putText(tile, title, (2, (bar + th) // 2), FONT, scale, (0, 0, 0), thick, cv2.LINE_AA)
    return tile


def save_overlay_grid(path: PathLike, items: list[tuple[str, np.ndarray]], cols: int = 4) -> None:
    """Tile titled RGB images (e.g. overlays of one class) into one PNG for a quick visual check.

    All tiles take the size of the first image; the last row is padded with white.
    """
    if not items:
        msg = "save_overlay_grid needs at least one (title, image) item"
        raise ValueError(msg)
    if cols < 1:
        msg = f"cols must be >= 1, got {cols}"
        raise ValueError(msg)
    for title, image in items:
        check_rgb(np.asarray(image), f"image {title!r}")
    h, w = items[0][1].shape[:2]
    scale, thick = text_scale(h, w)
    bar = cv2.getTextSize("Ag", FONT, scale, thick)[0][1] * 2 + 4
    tiles = [_titled_tile(title, np.asarray(image), (w, h), bar) for title, image in items]
    cols = min(cols, len(tiles))
    rows = -(-len(tiles) // cols)
    gap = 4
    grid = np.full((rows * (h + bar + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = r * (h + bar + gap), c * (w + gap)
        grid[y : y + h + bar, x : x + w] = tile
    _write_png(path, grid)


def _finite(values: np.ndarray) -> np.ndarray:
    """Flattened finite values (log-likelihoods may hold -inf; those cannot be binned)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    return values[np.isfinite(values)]


def _write_histograms(
    path: PathLike,
    normal: np.ndarray,
    anomalous: np.ndarray,
    title: str,
    xlabel: str,
    threshold: float | None = None,
) -> None:
    """Overlapping density histograms of normal (blue) and anomalous (red) values on shared bins."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    normal, anomalous = _finite(normal), _finite(anomalous)
    if normal.size == 0:
        msg = "histogram needs at least one finite normal value"
        raise ValueError(msg)
    values = np.concatenate((normal, anomalous))
    bins = int(np.clip(np.sqrt(values.size), 10, 60))  # fewer bins for a few dozen image scores
    edges = np.histogram_bin_edges(values, bins=bins)

    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(normal, bins=edges, density=True, alpha=0.5, color="tab:blue", label=f"normal (n={normal.size})")
    if anomalous.size:
        ax.hist(
            anomalous, bins=edges, density=True, alpha=0.5, color="tab:red", label=f"anomalous (n={anomalous.size})"
        )
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1.2, label=f"threshold = {threshold:.4g}")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def loglik_histogram(
    path: PathLike,
    normal: np.ndarray,
    anomalous: np.ndarray,
    title: str,
    xlabel: str = "log-likelihood per dim",
) -> None:
    """Normal vs anomalous log-likelihood histograms (as HGAD paper Fig. 2b): shows how far the
    flow separates the two, which a single AUROC number hides. `anomalous` may be empty."""
    _write_histograms(path, normal, anomalous, title, xlabel)


def score_histogram(
    path: PathLike,
    normal_scores: np.ndarray,
    anomalous_scores: np.ndarray,
    threshold: float | None,
    title: str,
) -> None:
    """Image-score histograms with the PASS/FAIL threshold, to see which parts it misjudges."""
    _write_histograms(path, normal_scores, anomalous_scores, title, "image anomaly score", threshold=threshold)


def operating_point_plot(
    path: PathLike,
    normal_scores: np.ndarray,
    anomalous_scores: np.ndarray,
    threshold: float,
    title: str,
) -> None:
    """Two panels: normal / defect score histograms with the threshold line, and the ROC curve
    with the saved threshold's (FPR, recall) marked: where PASS/FAIL sits and what moving it buys."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from hgad_edge.core.thresholds import rates, roc_points

    normal, anomalous = _finite(normal_scores), _finite(anomalous_scores)
    if normal.size == 0 or anomalous.size == 0:
        raise ValueError("operating_point_plot needs finite normal and anomalous scores")
    edges = np.histogram_bin_edges(
        np.concatenate((normal, anomalous, [threshold])),
        bins=int(np.clip(np.sqrt(normal.size + anomalous.size), 10, 60)),
    )
    fig = Figure(figsize=(10.0, 4.0), dpi=110)
    FigureCanvasAgg(fig)
    hist, roc = fig.subplots(1, 2)
    hist.hist(normal, bins=edges, alpha=0.5, color="tab:blue", label=f"normal (n={normal.size})")
    hist.hist(anomalous, bins=edges, alpha=0.5, color="tab:red", label=f"defect (n={anomalous.size})")
    hist.axvline(threshold, color="black", linestyle="--", linewidth=1.2, label=f"threshold = {threshold:.4g}")
    hist.set_xlabel("image anomaly score")
    hist.set_ylabel("images")
    hist.legend(fontsize="small")
    fpr, tpr, _ = roc_points(normal, anomalous)
    point = rates(normal, anomalous, threshold)
    roc.plot(np.r_[fpr, 1.0], np.r_[tpr, 1.0], color="tab:purple", drawstyle="steps-post", label="ROC")
    roc.plot(
        [point["fpr"]],
        [point["recall"]],
        "o",
        color="black",
        label=f"threshold: FPR {100 * point['fpr']:.1f} %, recall {100 * point['recall']:.1f} %",
    )
    roc.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":")
    roc.set_xlabel("false-positive rate (good parts rejected)")
    roc.set_ylabel("recall (defects caught)")
    roc.set_xlim(-0.01, 1.01)
    roc.set_ylim(-0.01, 1.01)
    roc.legend(fontsize="small", loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
