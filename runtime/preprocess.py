"""Host-side preprocessing: frames of any size -> the model's preallocated uint8 input buffer.

The exported graph normalises pixels itself, so the host only resizes (with the trainer's own
`resize_image`, so pixels match training) and copies into a buffer planned once at create time;
for TensorRT that buffer is pinned memory, so there is no extra copy before the upload.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from hgad_edge.core.errors import InvalidArgumentError
from hgad_edge.core.imaging import MIN_IMAGE_SIDE, resize_image

__all__ = ["AUTO_CLASS", "BatchPacker", "as_frame_list", "resolve_class_ids"]

AUTO_CLASS = -1


def as_frame_list(frames: Any) -> list[np.ndarray]:
    """Accept one HxWx3 frame, a BxHxWx3 array, or a list of HxWx3 frames; check dtype and shape."""
    if isinstance(frames, np.ndarray):
        if frames.ndim == 3:
            frames_list = [frames]
        elif frames.ndim == 4:
            frames_list = list(frames)
        else:
            msg = (
                f"frames must be one HxWx3 RGB image or a BxHxWx3 batch, got an array of shape {frames.shape}; "
                "convert grey images with cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)"
            )
            raise InvalidArgumentError(msg)
    elif isinstance(frames, (list, tuple)):
        frames_list = list(frames)
    else:
        msg = f"frames must be a numpy array or a list of arrays, got {type(frames).__name__}"
        raise InvalidArgumentError(msg)
    if not frames_list:
        raise InvalidArgumentError("frames is empty; pass at least one HxWx3 uint8 RGB image")
    for i, frame in enumerate(frames_list):
        _check_frame(frame, i)
    return frames_list


def _check_frame(frame: Any, index: int) -> None:
    if not isinstance(frame, np.ndarray):
        raise InvalidArgumentError(f"frame {index} is a {type(frame).__name__}, expected an HxWx3 uint8 numpy array")
    if frame.ndim != 3 or frame.shape[2] != 3:
        msg = (
            f"frame {index} has shape {frame.shape}, expected HxWx3 RGB; convert grey or BGRA images with "
            "cv2.cvtColor first"
        )
        raise InvalidArgumentError(msg)
    if frame.dtype != np.uint8:
        msg = (
            f"frame {index} has dtype {frame.dtype}, expected uint8 (0..255); for float images in [0, 1] pass "
            "(img * 255).round().astype(np.uint8)"
        )
        raise InvalidArgumentError(msg)
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise InvalidArgumentError(f"frame {index} is empty (shape {frame.shape}); skip empty camera frames")
    if min(frame.shape[:2]) < MIN_IMAGE_SIDE:
        msg = (
            f"frame {index} is {frame.shape[1]}x{frame.shape[0]} pixels, below the {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} "
            "minimum: no texture to score; pass the camera's full frame"
        )
        raise InvalidArgumentError(msg)


def resolve_class_ids(class_id: Any, batch: int, classes: Sequence[str]) -> list[int]:
    """Per-frame class indices: int, class name, "auto" (-1 = model picks), or one per frame."""
    if isinstance(class_id, (list, tuple, np.ndarray)):
        if len(class_id) != batch:
            msg = f"got {len(class_id)} class ids for {batch} frames; pass one per frame or a single value"
            raise InvalidArgumentError(msg)
        return [_one_class_id(c, classes) for c in class_id]
    return [_one_class_id(class_id, classes)] * batch


def _one_class_id(value: Any, classes: Sequence[str]) -> int:
    if isinstance(value, str):
        if value == "auto":
            return AUTO_CLASS
        if value in classes:
            return classes.index(value)
        msg = f"unknown class {value!r}; this bundle knows {list(classes)} (or pass 'auto')"
        raise InvalidArgumentError(msg)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        msg = f"class_id must be an int, a class name or 'auto', got {value!r}"
        raise InvalidArgumentError(msg)
    if not AUTO_CLASS <= int(value) < len(classes):
        msg = f"class_id {int(value)} is out of range; use 0..{len(classes) - 1} or -1 / 'auto'"
        raise InvalidArgumentError(msg)
    return int(value)


class BatchPacker:
    """Writes validated frames and class ids into the runner's preallocated input buffers."""

    def __init__(self, images: np.ndarray, class_ids: np.ndarray, classes: Sequence[str]) -> None:
        self.images = images  # (max_batch, H, W, 3) uint8, owned by the runner
        self.class_ids = class_ids  # (max_batch,) int64, owned by the runner
        self.classes = tuple(classes)
        self.size = (int(images.shape[1]), int(images.shape[2]))

    @property
    def max_batch(self) -> int:
        return int(self.images.shape[0])

    def pack(self, frames: Any, class_id: Any = "auto") -> int:
        """Fill the buffers and return the batch size; nothing is written if validation fails."""
        frame_list = as_frame_list(frames)
        batch = len(frame_list)
        if batch > self.max_batch:
            msg = (
                f"got {batch} frames but this handle was created with max_batch={self.max_batch}; "
                f"split the batch or create it with max_batch>={batch}"
            )
            raise InvalidArgumentError(msg)
        ids = resolve_class_ids(class_id, batch, self.classes)
        for i, frame in enumerate(frame_list):
            self._put(i, frame)
        self.class_ids[:batch] = ids
        return batch

    def _put(self, i: int, frame: np.ndarray) -> None:
        if frame.shape[:2] == self.size:
            np.copyto(self.images[i], frame)
        else:
            self.images[i] = resize_image(frame, self.size)
