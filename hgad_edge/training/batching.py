"""Images to model batches: uint8 (B, H, W, 3) RGB tensors at the model input size, decoded one
batch ahead on a worker thread. Used by training, calibration, evaluation and the benchmarks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from hgad_edge.core.imaging import load_image, resize_image
from hgad_edge.training.data import Sample


def load_batch(samples: Sequence[Sample], input_size: tuple[int, int]) -> torch.Tensor:
    """Images -> uint8 (B, H, W, 3) RGB at the model input size (the same host resize the runtime uses)."""
    return torch.from_numpy(np.stack([resize_image(load_image(s.path), input_size) for s in samples]))


def iter_batches(samples: Sequence[Sample], input_size: tuple[int, int], batch_size: int) -> Iterator[torch.Tensor]:
    """Batches decoded on a worker thread one batch ahead (OpenCV releases the GIL)."""
    chunks = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load_batch, chunks[0], input_size) if chunks else None
        for i in range(len(chunks)):
            batch = pending.result()
            pending = pool.submit(load_batch, chunks[i + 1], input_size) if i + 1 < len(chunks) else None
            yield batch
