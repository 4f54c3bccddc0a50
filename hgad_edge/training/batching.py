"""Images to model batches: uint8 (B, H, W, 3) RGB tensors at the model input size, decoded one
batch ahead on a worker thread. Used by training, calibration, evaluation and the benchmarks.

With tiling (hgad_edge.core.tiling) a frame becomes several model inputs: `iter_tile_batches` yields
its tiles with the index of the frame each tile was cut from, so statistics can pool tiles while
scores, maps and thresholds stay per frame.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, TypeVar

import numpy as np
import torch

from hgad_edge.core.imaging import load_image, resize_image
from hgad_edge.core.tiling import TileGrid, Tiling, cut_tiles, plan_tiles
from hgad_edge.training.data import Sample

Frame = Sample | np.ndarray  # a dataset image (decoded when needed) or an HxWx3 uint8 RGB frame
_In, _Out = TypeVar("_In"), TypeVar("_Out")


def frame_pixels(frame: Frame) -> np.ndarray:
    """HxWx3 uint8 RGB pixels of a frame: a Sample's image decoded, an array as it is."""
    return frame if isinstance(frame, np.ndarray) else load_image(frame.path)


def load_batch(samples: Sequence[Frame], input_size: tuple[int, int]) -> torch.Tensor:
    """Images -> uint8 (B, H, W, 3) RGB at the model input size (the same host resize the runtime uses)."""
    return torch.from_numpy(np.stack([resize_image(frame_pixels(s), input_size) for s in samples]))


def _one_ahead(load: Callable[[_In], _Out], items: Sequence[_In]) -> Iterator[_Out]:
    """load(item) for each item in order, the next one computed on a worker thread (OpenCV releases the GIL)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, items[0]) if items else None
        for i in range(len(items)):
            result = pending.result()
            pending = pool.submit(load, items[i + 1]) if i + 1 < len(items) else None
            yield result


def iter_batches(samples: Sequence[Frame], input_size: tuple[int, int], batch_size: int) -> Iterator[torch.Tensor]:
    """Batches decoded on a worker thread one batch ahead (OpenCV releases the GIL)."""
    chunks = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    yield from _one_ahead(lambda chunk: load_batch(chunk, input_size), chunks)


class TileBatch(NamedTuple):
    """Model inputs and where they come from: tiles uint8 (B, H, W, 3) at the input size, the index
    (into the frames iterated) of each tile's frame (B,), and the grid of each frame with a tile here
    (None: the frame was resized whole, one input)."""

    tiles: torch.Tensor
    frame_ids: np.ndarray
    grids: dict[int, TileGrid | None]


def frame_tiles(image: np.ndarray, input_size: tuple[int, int], tiling: Tiling | None) -> tuple[np.ndarray, TileGrid]:
    """A frame's tiles (count, H, W, 3) uint8 at input_size and their grid (core.tiling.cut_tiles)."""
    grid = plan_tiles(image.shape[:2], tiling)
    return cut_tiles(image, grid, input_size), grid


def iter_tile_batches(
    frames: Sequence[Frame], input_size: tuple[int, int], batch_size: int, tiling: Tiling | None = None
) -> Iterator[TileBatch]:
    """Batches of up to `batch_size` model inputs with the frame index of each. Tiled: every frame is
    cut into tiles (a frame's tiles are consecutive and may go on in the next batch); frames are
    decoded and cut one ahead on a worker thread. Without tiling: `iter_batches`' batches (each frame
    resized whole), one input per frame."""
    if tiling is None:
        start = 0
        for batch in iter_batches(frames, input_size, batch_size):
            ids = np.arange(start, start + batch.shape[0])
            start += batch.shape[0]
            yield TileBatch(batch, ids, dict.fromkeys(ids.tolist()))
        return
    cut = _one_ahead(lambda frame: frame_tiles(frame_pixels(frame), input_size, tiling), frames)
    yield from _rebatch(((i, *tiles_grid) for i, tiles_grid in enumerate(cut)), batch_size)


def _rebatch(per_frame: Iterable[tuple[int, np.ndarray, TileGrid]], batch_size: int) -> Iterator[TileBatch]:
    """(frame index, tiles, grid) per frame -> batches of exactly `batch_size` tiles (the last one fewer)."""
    tiles, ids = np.zeros((0,), np.uint8), np.zeros(0, np.int64)
    grids: dict[int, TileGrid] = {}
    for i, cut, grid in per_frame:
        tiles = cut if not len(tiles) else np.concatenate([tiles, cut])
        ids = np.concatenate([ids, np.full(len(cut), i, np.int64)])
        grids[i] = grid
        while len(ids) >= batch_size:
            yield _tile_batch(tiles[:batch_size], ids[:batch_size], grids)
            tiles, ids = tiles[batch_size:], ids[batch_size:]
        grids = {f: grids[f] for f in np.unique(ids).tolist()}
    if len(ids):
        yield _tile_batch(tiles, ids, grids)


def _tile_batch(tiles: np.ndarray, ids: np.ndarray, grids: dict[int, TileGrid]) -> TileBatch:
    return TileBatch(torch.from_numpy(np.ascontiguousarray(tiles)), ids, {f: grids[f] for f in np.unique(ids).tolist()})
