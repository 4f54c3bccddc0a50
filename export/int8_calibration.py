"""INT8 calibration: which normal images, fed to the graph exactly as the runtime feeds it, give the
value ranges that every Q/DQ graph of a bundle is written from (export/int8_quantize.py).

One calibration pass: ONNX Runtime's calibrator runs the FP32 graph once over the images and records
the range of every tensor that may be quantized; the ranges are saved as JSON (ONNX Runtime's
calibration cache) and both graphs, asymmetric uint8 for ONNX Runtime and symmetric int8 for
TensorRT, are quantized from that one file, so they share their scales' source.

The images are normal (defect-free) only: the ranges describe what a good part looks like, and a
defect that saturates a quantized tensor only makes its score larger. By default they are the run's
own training images (the fit split, not the held-out normals its thresholds were set on); else a
folder (--calib-dir). They are picked evenly per class (CALIBRATION_IMAGES at most), resized with the
runtime's own resize, or cut into tiles for a tiled bundle, and fed with class_id -1 (auto): the
quantized parts (backbone, flows) do not see the class, so calibration needs no labels.
"""

from __future__ import annotations

import hashlib
import logging
import math
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hgad_edge.core.imaging import IMAGE_EXTENSIONS, DataError, load_image, resize_image
from hgad_edge.core.imaging import find_images as _find_images
from hgad_edge.core.tiling import Tiling, cut_tiles, plan_tiles

__all__ = [
    "CALIBRATION_IMAGES",
    "CALIBRATION_METHOD",
    "CalibrationError",
    "CalibrationSet",
    "calibrate_ranges",
    "find_images",
    "folder_set",
    "run_set",
]

log = logging.getLogger("hgad_edge.export")

CALIBRATION_IMAGES = 256  # at most this many images, spread evenly over the classes
FEED_BATCH = 8  # images per calibration run of the graph (its batch axis is dynamic)
# MinMax only: the run returns two numbers per tensor, so any number of images fits in memory. ONNX
# Runtime's histogram methods (percentile, entropy) get every activation back (about 0.1-0.5 GB per
# 256x256 image of the default model: 225 images grew a process to 23 GB before the OOM killer ended
# it) and cannot be fed in parts (merging its histograms across calls asked for a 38 GB array).
CALIBRATION_METHOD = "MinMax"


class CalibrationError(ValueError):
    """The calibration images cannot be used; the message says what to pass instead."""


def find_images(folder: Path | str) -> list[Path]:
    """All images under `folder` (recursive, IMAGE_EXTENSIONS, hidden files skipped), sorted.

    Sorted so that the same folder always gives the same images, hence the same ranges.
    """
    root = Path(folder)
    if not root.is_dir():
        raise CalibrationError(
            f"calibration folder {root} does not exist; pass a folder of normal (defect-free) images"
        )
    found = [p for p in _find_images(root) if p.is_file()]
    if not found:
        msg = (
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}; "
            "pass a folder of normal images, e.g. <dataset>/<class>/train/good"
        )
        raise CalibrationError(msg)
    return found


def _evenly(items: Sequence[Any], k: int) -> list[Any]:
    """k items spread evenly over `items` (all of them when k >= len), order kept."""
    if k >= len(items):
        return list(items)
    idx = np.unique(np.linspace(0, len(items) - 1, k).round().astype(int))
    return [items[i] for i in idx]


@dataclass(frozen=True)
class CalibrationSet:
    """The images a calibration runs on and where they came from (recorded in metadata.json)."""

    paths: tuple[Path, ...]
    source: str  # for people: "training images of run X (fit split)" or "folder D"
    per_class: dict[str, int] | None = None

    def record(self) -> dict[str, Any]:
        """What metadata.json keeps: the source, the count and a digest of exactly these files."""
        digest = hashlib.sha256()
        for path in self.paths:
            digest.update(path.name.encode("utf-8") + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        out: dict[str, Any] = {"source": self.source, "images": len(self.paths), "sha256": digest.hexdigest()}
        if self.per_class:
            out["per_class"] = dict(self.per_class)
        return out


def folder_set(folder: Path | str, limit: int = CALIBRATION_IMAGES) -> CalibrationSet:
    """Up to `limit` images of a folder of normal images, evenly spread over its sorted list."""
    found = find_images(folder)
    return CalibrationSet(tuple(_evenly(found, limit)), f"folder {Path(folder)} ({len(found)} images)")


def run_set(run_dir: Path | str, limit: int = CALIBRATION_IMAGES) -> CalibrationSet:
    """The run's own training images (the fit split: never the held-out normals its thresholds came
    from), up to `limit` spread evenly over the classes. CalibrationError when they are not reachable."""
    from hgad_edge.training.checkpoint import load_run_config, read_meta
    from hgad_edge.training.data import open_roots
    from hgad_edge.training.train import split_calibration

    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    roots = [Path(r) for r in meta.get("data_roots") or []]
    fix = "pass --calib-dir with a folder of normal images of these classes"
    if not roots:
        raise CalibrationError(f"run {run_dir} does not record its training data (no data_roots in meta.json); {fix}")
    missing = [str(r) for r in roots if not r.is_dir()]
    if missing:
        msg = f"the training data of run {run_dir} ({', '.join(missing)}) is not reachable from here; {fix}"
        raise CalibrationError(msg)
    cfg = load_run_config(run_dir)
    try:
        samples = open_roots(roots, meta["classes"]).samples("train")
    except DataError as err:
        raise CalibrationError(f"cannot read the training images of run {run_dir}: {err}; {fix}") from err
    fit, _ = split_calibration(samples, cfg.train)
    by_class: dict[str, list[Path]] = {}
    for sample in fit:
        by_class.setdefault(sample.class_name, []).append(Path(sample.path))
    share = max(1, math.ceil(limit / max(1, len(by_class))))
    picked = {name: _evenly(paths, share) for name, paths in sorted(by_class.items())}
    paths = tuple(p for chosen in picked.values() for p in chosen)
    if not paths:
        raise CalibrationError(f"run {run_dir} has no training images under {', '.join(map(str, roots))}; {fix}")
    source = f"training images of run {run_dir} (fit split of {', '.join(map(str, roots))})"
    return CalibrationSet(paths, source, {name: len(chosen) for name, chosen in picked.items()})


def graph_inputs(calibration: CalibrationSet, input_size: Sequence[int], tiling: Tiling | None) -> Iterator[np.ndarray]:
    """uint8 (B, H, W, 3) batches of what the graph sees: resized frames, or a tiled bundle's tiles."""
    size = (int(input_size[0]), int(input_size[1]))
    pending: list[np.ndarray] = []
    for path in calibration.paths:
        try:
            frame = load_image(path)
        except DataError as err:
            raise CalibrationError(f"calibration image {path} cannot be used: {err}") from err
        if tiling is None:
            pending.append(resize_image(frame, size))
        else:
            pending.extend(cut_tiles(frame, plan_tiles(frame.shape[:2], tiling), size))
        while len(pending) >= FEED_BATCH:
            yield np.stack(pending[:FEED_BATCH])
            pending = pending[FEED_BATCH:]
    if pending:
        yield np.stack(pending)


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol (get_next -> feed dict, None at the end)."""

    def __init__(self, batches: Iterator[np.ndarray], image_input: str, class_input: str) -> None:
        self.batches, self.image_input, self.class_input = batches, image_input, class_input
        self.fed = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        images = next(self.batches, None)
        if images is None:
            return None
        self.fed += len(images)
        return {self.image_input: images, self.class_input: np.full((len(images),), -1, np.int64)}


def calibrate_ranges(
    fp32_onnx: Path,
    calibration: CalibrationSet,
    out: Path,
    op_types: Sequence[str],
    input_size: Sequence[int],
    tiling: Tiling | None = None,
    inputs: tuple[str, str] = ("images", "class_id"),
) -> dict[str, Any]:
    """Run the FP32 graph over the calibration images once; write the MinMax ranges of every input and
    output of the `op_types` nodes to `out` (ONNX Runtime's calibration cache, JSON). Returns the facts."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data

    with tempfile.TemporaryDirectory(prefix="hgad-int8-") as work:
        calibrator = create_calibrator(
            Path(fp32_onnx),
            list(op_types),
            augmented_model_path=str(Path(work) / "augmented.onnx"),
            calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHOD),
        )
        reader = _Reader(graph_inputs(calibration, input_size, tiling), *inputs)
        calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
        save_tensors_data(ranges, out)
    log.info("int8 calibration: %d graph inputs from %d images", reader.fed, len(calibration.paths))
    return {"method": CALIBRATION_METHOD, "inputs": reader.fed, "tensors": len(ranges.data)}
