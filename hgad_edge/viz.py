"""Pictures an inspection engineer looks at: heat-map overlays, overlay grids, histograms.

`heatmap_overlay` runs per frame in the camera app, so it uses OpenCV only. The histogram
writers import matplotlib lazily and draw on a bare Agg canvas (no pyplot), so they work
headless and never switch the backend of an application that imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import cv2
import numpy as np

PathLike = Union[str, Path]

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_GREEN = (0, 255, 0)


def _check_rgb(image: np.ndarray, name: str = "image_rgb") -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        msg = f"{name} must be an HxWx3 uint8 RGB array, got shape {image.shape} dtype {image.dtype}"
        raise ValueError(msg)


def _text_scale(height: int, width: int) -> tuple[float, int]:
    """Font scale and stroke that stay legible from 128 px thumbnails to full camera frames."""
    scale = max(0.4, min(height, width) / 512.0)
    return scale, max(1, int(round(scale * 1.5)))


def _draw_label(image: np.ndarray, text: str) -> None:
    """Draw `text` white on a dark box in the top-left corner, in place."""
    h, w = image.shape[:2]
    scale, thick = _text_scale(h, w)
    (tw, th), base = cv2.getTextSize(text, _FONT, scale, thick)
    pad = max(2, th // 3)
    cv2.rectangle(image, (0, 0), (min(w - 1, tw + 2 * pad), min(h - 1, th + base + 2 * pad)), (0, 0, 0), -1)
    cv2.putText(image, text, (pad, pad + th), _FONT, scale, (255, 255, 255), thick, cv2.LINE_AA)


def heatmap_overlay(
    image_rgb: np.ndarray,
    amap: np.ndarray,
    vmin: float,
    vmax: float,
    alpha: float = 0.5,
    mask: Optional[np.ndarray] = None,
    label: Optional[str] = None,
) -> np.ndarray:
    """Blend a JET-coloured anomaly map over an RGB image; returns a new HxWx3 uint8 RGB array.

    The map is clipped to [vmin, vmax] (fixed per class, not per image) so colours mean the
    same score in every frame. A map of another size (e.g. feature resolution) is resized
    bilinearly to the image. `mask` (ground truth) is outlined in green; `label` (e.g.
    "FAIL 0.87") is written in the top-left corner.
    """
    image_rgb = np.asarray(image_rgb)
    amap = np.asarray(amap, dtype=np.float32)
    _check_rgb(image_rgb)
    if amap.ndim != 2:
        msg = f"amap must be a 2-D HxW array, got shape {amap.shape}"
        raise ValueError(msg)
    if not vmax > vmin:
        msg = f"vmax must be greater than vmin, got vmin={vmin}, vmax={vmax}"
        raise ValueError(msg)
    if not 0.0 <= alpha <= 1.0:
        msg = f"alpha must be in [0, 1], got {alpha}"
        raise ValueError(msg)
    h, w = image_rgb.shape[:2]
    if amap.shape != (h, w):
        amap = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)

    norm = np.nan_to_num((amap - np.float32(vmin)) * np.float32(255.0 / (vmax - vmin)), nan=0.0)
    gray = np.clip(norm + 0.5, 0, 255).astype(np.uint8)
    heat = cv2.cvtColor(cv2.applyColorMap(gray, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    out = cv2.addWeighted(np.ascontiguousarray(image_rgb), 1.0 - alpha, heat, alpha, 0.0)

    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != (h, w):
            msg = f"mask shape {mask.shape} does not match the image ({h}, {w})"
            raise ValueError(msg)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, _GREEN, max(1, min(h, w) // 128))
    if label:
        _draw_label(out, label)
    return out


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
    scale, thick = _text_scale(h, w)
    (tw, th), _ = cv2.getTextSize(title, _FONT, scale, thick)
    scale *= min(1.0, (w - 4) / max(tw, 1), (bar - 4) / max(th, 1))
    (tw, th), _ = cv2.getTextSize(title, _FONT, scale, thick)
    cv2.putText(tile, title, (2, (bar + th) // 2), _FONT, scale, (0, 0, 0), thick, cv2.LINE_AA)
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
        _check_rgb(np.asarray(image), f"image {title!r}")
    h, w = items[0][1].shape[:2]
    scale, thick = _text_scale(h, w)
    bar = cv2.getTextSize("Ag", _FONT, scale, thick)[0][1] * 2 + 4
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
    threshold: Optional[float] = None,
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
        ax.hist(anomalous, bins=edges, density=True, alpha=0.5, color="tab:red", label=f"anomalous (n={anomalous.size})")
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
    threshold: Optional[float],
    title: str,
) -> None:
    """Image-score histograms with the PASS/FAIL threshold, to see which parts it misjudges."""
    _write_histograms(path, normal_scores, anomalous_scores, title, "image anomaly score", threshold=threshold)
