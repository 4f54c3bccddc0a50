"""The heat-map overlay drawn on camera frames and evaluation pictures (OpenCV + numpy only).

Shared by the torch-free runtime (per frame in the camera app) and the evaluation pictures
(`viz.py`), so it imports neither torch nor matplotlib.
"""

from __future__ import annotations

import cv2
import numpy as np

FONT = cv2.FONT_HERSHEY_SIMPLEX
GREEN = (0, 255, 0)


def check_rgb(image: np.ndarray, name: str = "image_rgb") -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        msg = f"{name} must be an HxWx3 uint8 RGB array, got shape {image.shape} dtype {image.dtype}"
        raise ValueError(msg)


def shrink(image: np.ndarray, max_side: int) -> np.ndarray:
    """An image (or map) no larger than max_side on its long side, by area (a small hot spot of a map
    is averaged in, not skipped); smaller ones are returned as they are."""
    scale = max_side / max(image.shape[:2])
    if scale >= 1.0:
        return image
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def text_scale(height: int, width: int) -> tuple[float, int]:
    """Font scale and stroke that stay legible from 128 px thumbnails to full camera frames."""
    scale = max(0.4, min(height, width) / 512.0)
    return scale, max(1, int(round(scale * 1.5)))


def _draw_label(image: np.ndarray, text: str) -> None:
    """Draw `text` white on a dark box in the top-left corner, in place."""
    h, w = image.shape[:2]
    scale, thick = text_scale(h, w)
    (tw, th), base = cv2.getTextSize(text, FONT, scale, thick)
    pad = max(2, th // 3)
    cv2.rectangle(image, (0, 0), (min(w - 1, tw + 2 * pad), min(h - 1, th + base + 2 * pad)), (0, 0, 0), -1)
    cv2.putText(image, text, (pad, pad + th), FONT, scale, (255, 255, 255), thick, cv2.LINE_AA)


def heatmap_overlay(
    image_rgb: np.ndarray,
    amap: np.ndarray,
    vmin: float,
    vmax: float,
    alpha: float = 0.5,
    mask: np.ndarray | None = None,
    label: str | None = None,
) -> np.ndarray:
    """Blend a JET-coloured anomaly map over an RGB image; returns a new HxWx3 uint8 RGB array.

    The map is clipped to [vmin, vmax] (fixed per class, not per image) so colours mean the
    same score in every frame. A map of another size (e.g. feature resolution) is resized
    bilinearly to the image. `mask` (ground truth) is outlined in green; `label` (e.g.
    "FAIL 0.87") is written in the top-left corner.
    """
    image_rgb = np.asarray(image_rgb)
    amap = np.asarray(amap, dtype=np.float32)
    check_rgb(image_rgb)
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
        cv2.drawContours(out, contours, -1, GREEN, max(1, min(h, w) // 128))
    if label:
        _draw_label(out, label)
    return out
