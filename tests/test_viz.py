"""Overlays and histogram PNGs: shapes, determinism, files readable by OpenCV."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from hgad_edge.core.overlay import heatmap_overlay
from hgad_edge.training.viz import loglik_histogram, save_overlay_grid, score_histogram


def _scene(h: int = 96, w: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:h, :w]
    image = np.stack([xx * 2 % 256, yy * 2 % 256, np.full((h, w), 90)], axis=-1).astype(np.uint8)
    amap = np.exp(-((xx - 80) ** 2 + (yy - 40) ** 2) / 200.0).astype(np.float32)
    mask = amap > 0.5
    return image, amap, mask


def test_overlay_shape_dtype_and_input_untouched() -> None:
    image, amap, mask = _scene()
    before = image.copy()
    out = heatmap_overlay(image, amap, 0.0, 1.0, mask=mask, label="FAIL 0.87")
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(image, before)
    assert not np.array_equal(out, image)


def test_overlay_clipping_is_deterministic() -> None:
    image, amap, _ = _scene()
    a = heatmap_overlay(image, amap, 0.2, 0.6)
    b = heatmap_overlay(image, np.clip(amap, 0.2, 0.6), 0.2, 0.6)  # clipping happens inside
    assert np.array_equal(a, b)
    assert np.array_equal(a, heatmap_overlay(image, amap, 0.2, 0.6))
    hot = heatmap_overlay(image, np.full(amap.shape, 5.0), 0.0, 1.0, alpha=1.0)
    assert np.all(hot[..., 0] > 100) and np.all(hot[..., 2] < 50)  # above vmax -> red end of JET
    cold = heatmap_overlay(image, np.full(amap.shape, -5.0), 0.0, 1.0, alpha=1.0)
    assert np.all(cold[..., 2] > 100) and np.all(cold[..., 0] < 50)  # below vmin -> blue end


def test_overlay_alpha_zero_keeps_image_and_mask_is_green() -> None:
    image, amap, mask = _scene()
    assert np.array_equal(heatmap_overlay(image, amap, 0.0, 1.0, alpha=0.0), image)
    out = heatmap_overlay(image, amap, 0.0, 1.0, alpha=0.0, mask=mask)
    changed = np.any(out != image, axis=-1)
    assert changed.any()
    assert np.all(out[changed] == (0, 255, 0))


def test_overlay_resizes_low_resolution_map() -> None:
    image, amap, _ = _scene()
    out = heatmap_overlay(image, amap[::4, ::4], 0.0, 1.0)
    assert out.shape == image.shape


def test_overlay_errors() -> None:
    image, amap, mask = _scene()
    with pytest.raises(ValueError, match="vmax"):
        heatmap_overlay(image, amap, 1.0, 1.0)
    with pytest.raises(ValueError, match="uint8"):
        heatmap_overlay(image.astype(np.float32), amap, 0.0, 1.0)
    with pytest.raises(ValueError, match="mask shape"):
        heatmap_overlay(image, amap, 0.0, 1.0, mask=mask[:10])


def test_overlay_grid_png(tmp_path: Path) -> None:
    image, amap, mask = _scene()
    items = [
        (f"{name} {s:.2f}", heatmap_overlay(image, amap * s, 0.0, 1.0, mask=mask, label=name))
        for name, s in [
            ("PASS", 0.2),
            ("FAIL", 0.9),
            ("FAIL", 1.0),
            ("PASS", 0.1),
            ("a long title that must shrink", 0.5),
        ]
    ]
    items.append(("small", image[:48, :64]))  # resized to the first tile
    path = tmp_path / "sub" / "grid.png"
    save_overlay_grid(path, items, cols=4)
    grid = cv2.imread(str(path))
    assert grid is not None and grid.ndim == 3
    assert grid.shape[1] == 4 * 128 + 3 * 4
    assert grid.shape[0] > 2 * 96
    with pytest.raises(ValueError, match="at least one"):
        save_overlay_grid(tmp_path / "empty.png", [])


def test_histograms_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(0)
    normal = rng.normal(-1.0, 0.3, 2000)
    anomalous = np.append(rng.normal(-2.0, 0.5, 300), -np.inf)  # non-finite values are dropped
    paths = [tmp_path / "ll.png", tmp_path / "ll_normal_only.png", tmp_path / "scores.png"]
    loglik_histogram(paths[0], normal, anomalous, "bottle")
    loglik_histogram(paths[1], normal, np.array([]), "bottle (train)")
    score_histogram(paths[2], rng.random(50), rng.random(20) + 0.5, 0.7, "bottle image scores")
    for path in paths:
        img = cv2.imread(str(path))
        assert img is not None and img.shape[0] > 100 and img.shape[1] > 100
    with pytest.raises(ValueError, match="finite normal"):
        score_histogram(tmp_path / "x.png", np.array([np.nan]), np.array([1.0]), None, "x")
