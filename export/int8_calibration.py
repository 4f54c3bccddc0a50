"""INT8 entropy calibration data for TensorRT 10 (implicit quantization).

Why a separate module: the image side (find normal images, resize them exactly like the runtime,
stack uint8 NHWC batches) is plain numpy and is tested on CPU; only `make_entropy_calibrator`
touches TensorRT and CUDA, and it does so through objects passed in, so it can be faked too.

The calibrator feeds the graph's two inputs: `images` (uint8 NHWC, the real pixels) and
`class_id` (int64, all -1 = "auto", so calibration does not depend on class labels). TensorRT
asks `get_batch(names)` for one device pointer per requested input name, in that order.
The calibration cache sits in the bundle's engines/ folder, keyed by the ONNX model's sha256,
so a rebuild of the same model on the same device skips the image pass.

INT8 calibration (IInt8EntropyCalibrator2) exists only in TensorRT 10; TensorRT 11 removed
implicit quantization in favour of explicit Q/DQ nodes in the ONNX graph.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hgad_edge.core.cuda_api import cuda_call
from hgad_edge.core.imaging import IMAGE_EXTENSIONS, load_image, resize_image
from hgad_edge.core.imaging import find_images as _find_images

__all__ = ["CalibrationBatches", "CalibrationError", "calibration_cache_path", "find_images", "make_entropy_calibrator"]

log = logging.getLogger("hgad_edge.export")


class CalibrationError(ValueError):
    """The calibration images cannot be used; the message says what to pass instead."""


def find_images(folder: Path | str) -> list[Path]:
    """All images under `folder` (recursive, IMAGE_EXTENSIONS, hidden files skipped), sorted.

    Sorted so that the same folder always gives the same batches, hence the same scales.
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


def calibration_cache_path(engines_dir: Path, onnx_sha256: str) -> Path:
    """Where the INT8 scales of one ONNX model live (reused across rebuilds of that model)."""
    return Path(engines_dir) / f"int8_calibration_{onnx_sha256[:16]}.cache"


class CalibrationBatches:
    """Fixed-size uint8 (B, H, W, 3) batches of resized images, at most `max_batches` of them.

    Every batch is full (TensorRT calibrates on the profile's fixed calibration shape): when the
    folder runs out, images are reused from the start, so even a handful of images works.
    """

    def __init__(self, paths: Sequence[Path], input_size: tuple[int, int], batch_size: int, max_batches: int) -> None:
        if batch_size < 1 or max_batches < 1:
            raise CalibrationError(
                f"calibration needs batch_size >= 1 and batches >= 1, got {batch_size} and {max_batches}"
            )
        if not paths:
            raise CalibrationError("no calibration images given")
        self.paths = list(paths)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.batch_size = int(batch_size)
        wanted = -(-len(self.paths) // self.batch_size)  # one pass over the folder, rounded up
        self.num_batches = max(1, min(int(max_batches), wanted))

    def __len__(self) -> int:
        return self.num_batches

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch_size, *self.input_size, 3)

    def batch(self, index: int) -> np.ndarray:
        """Batch `index` as a C-contiguous uint8 array, resized with the runtime's resize_image."""
        if not 0 <= index < self.num_batches:
            raise IndexError(f"calibration batch {index} out of range 0..{self.num_batches - 1}")
        start = index * self.batch_size
        picks = [self.paths[(start + i) % len(self.paths)] for i in range(self.batch_size)]
        return np.ascontiguousarray(np.stack([resize_image(load_image(p), self.input_size) for p in picks]))

    def __iter__(self) -> Iterator[np.ndarray]:
        for index in range(self.num_batches):
            yield self.batch(index)


class _DeviceInputs:
    """Device buffers for one calibration batch of both inputs (cuda-python runtime API)."""

    def __init__(self, cudart: Any, batches: CalibrationBatches) -> None:
        self.cudart = cudart
        self.image_bytes = int(np.prod(batches.shape))
        self.class_ids = np.full((batches.batch_size,), -1, dtype=np.int64)
        self.images = self.classes = 0
        self.images = int(cuda_call(cudart.cudaMalloc(self.image_bytes), cudart, "cudaMalloc (calibration images)"))
        self.classes = int(
            cuda_call(cudart.cudaMalloc(self.class_ids.nbytes), cudart, "cudaMalloc (calibration class ids)")
        )
        self.copy(self.classes, self.class_ids)

    def copy(self, device: int, host: np.ndarray) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        cuda_call(
            self.cudart.cudaMemcpy(device, host.ctypes.data, host.nbytes, kind), self.cudart, "cudaMemcpy (calibration)"
        )

    def free(self) -> None:
        for ptr in (self.images, self.classes):
            if ptr:
                self.cudart.cudaFree(ptr)
        self.images = self.classes = 0


def make_entropy_calibrator(
    trt: Any,
    cudart: Any,
    batches: CalibrationBatches | None,
    input_names: tuple[str, str],
    cache_path: Path,
    use_cache: bool = True,
) -> Any:
    """A `trt.IInt8EntropyCalibrator2` feeding `batches`; call `.free()` after the build.

    The class is created here because its base class only exists once TensorRT is imported.
    `batches` may be None when a calibration cache exists: TensorRT then never asks for data.
    `input_names` = (images input, class id input) as named in the bundle metadata.
    """
    base = getattr(trt, "IInt8EntropyCalibrator2", None)
    if base is None:
        msg = (
            f"TensorRT {getattr(trt, '__version__', '?')} has no IInt8EntropyCalibrator2: "
            "implicit INT8 calibration is gone "
            "(TensorRT 11); quantize the ONNX model explicitly with Q/DQ nodes (TensorRT Model Optimizer) or build fp16"
        )
        raise CalibrationError(msg)

    class EntropyCalibrator(base):
        """Entropy calibration over normal images; errors are kept and re-raised after the build."""

        def __init__(self) -> None:
            base.__init__(self)
            self.batches = batches
            self.image_name, self.class_name = input_names
            self.cache_path = Path(cache_path)
            self.index = 0
            self.error: BaseException | None = None
            self.device = _DeviceInputs(cudart, batches) if batches is not None else None

        def get_batch_size(self) -> int:
            return 1  # explicit-batch network: the batch dimension is part of the input shape

        def get_batch(self, names: list[str], *args: Any) -> list[int] | None:
            if self.batches is None or self.index >= len(self.batches):
                return None
            try:
                host = self.batches.batch(self.index)
                self.device.copy(self.device.images, host)
                self.index += 1
                log.info("INT8 calibration batch %d/%d", self.index, len(self.batches))
                pointers = {self.image_name: self.device.images, self.class_name: self.device.classes}
                return [pointers[name] for name in names]
            except BaseException as err:  # TensorRT swallows callback errors: keep it for the builder
                self.error = err
                return None

        def read_calibration_cache(self, *args: Any) -> bytes | None:
            if use_cache and self.cache_path.is_file():
                log.info("using INT8 calibration cache %s", self.cache_path)
                return self.cache_path.read_bytes()
            return None

        def write_calibration_cache(self, cache: Any, *args: Any) -> None:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            self.cache_path.write_bytes(bytes(cache))

        def free(self) -> None:
            if self.device is not None:
                self.device.free()

    return EntropyCalibrator()
