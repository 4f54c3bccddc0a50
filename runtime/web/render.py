"""JPEGs for the page: the live frame and the gallery's FAILs, drawn on the web thread, never the run's.

The frame is shrunk first (by area, as the camera window does: a small hot spot survives) and the map
with it, then the heatmap is drawn by the same `heatmap_overlay` as the window and the saved anomalies,
labelled like them (verdict, normalized score, class) plus the frame number.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from hgad_edge.core.overlay import heatmap_overlay, shrink

__all__ = ["LIVE_MAX_SIDE", "THUMB_MAX_SIDE", "overlay_jpeg"]

LIVE_MAX_SIDE = 960  # the live frame on the page: enough for a 1080p screen's main panel
THUMB_MAX_SIDE = 360  # gallery thumbnails
JPEG_QUALITY = 82


def overlay_jpeg(
    image: np.ndarray, amap: np.ndarray, record: dict[str, Any], vrange: tuple[float, float], max_side: int
) -> bytes:
    """The frame with its heatmap and label, at most `max_side` pixels on its long side, as JPEG bytes."""
    small = shrink(image, max_side)
    amap = np.asarray(amap, np.float32)
    if amap.shape[:2] != small.shape[:2] and max(amap.shape) > max_side:
        amap = shrink(amap, max(small.shape[:2]))  # a frame-sized (tiled) map shrinks with the frame
    verdict = "FAIL" if record["anomalous"] else "PASS"
    label = f"{verdict} {record['score_normalized']:.2f} {record['class']}  #{record['frame']}"
    drawn = heatmap_overlay(small, amap, vrange[0], vrange[1], alpha=0.45, label=label)
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return data.tobytes()
