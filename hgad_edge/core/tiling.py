"""Tiled inspection: a high-resolution frame as a batch of model-sized tiles, and their maps stitched back.

Resizing a 5 MP frame to the model's 256x256 input shrinks a 15-pixel defect below one feature of the
stride-8 level: no model behind that resize can see it. With tiling the frame is cut into squares of
`tile` source pixels (neighbours share at least `overlap` of a tile), each square is resized to the
model's input (not at all when `tile` equals the input side: native resolution), all tiles of a frame
go through the graph as one batch, and the tiles' anomaly maps are stitched into one map at the
frame's own resolution.

* Tile starts along an axis are spread evenly from 0 to length - tile, as few as keep the overlap, so
  the last tile ends on the border and no tile hangs over it.
* A frame (or axis) shorter than one tile is padded by mirroring up to the tile, never upscaled: the
  model sees its pixels at the scale it was trained at; the padded part of the map is cut away.
* Where tiles overlap, `blend` decides: "mean" (each pixel the average of the tiles that see it) or
  "max" (the most anomalous of them).
* The frame's score is the highest of its tiles' scores (each tile's score is the model's own image
  score over that tile), and its class the one most of its tiles predict; thresholds are fitted on
  frame scores made the same way, so PASS/FAIL keeps its meaning.

Position reaches the model inside a tile only (the flows' positional encoding and the per-position
normal statistics are tile coordinates): the graph stays one fixed tile size for frames of any size
and aspect ratio, and every tile of every training frame adds samples to the same statistics.

Torch-free: the training side (feature cache, statistics, evaluation) and the runtime cut and stitch
with these same functions, so they see identical pixels and maps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

from hgad_edge.core.imaging import MIN_IMAGE_SIDE, resize_image

__all__ = [
    "BLENDS",
    "MAX_TILE",
    "MIN_TILE",
    "TileGrid",
    "Tiling",
    "TilingError",
    "auto_tile",
    "axis_starts",
    "combine_tiles",
    "cut_tiles",
    "frame_class",
    "frame_score",
    "plan_tiles",
    "stitch_maps",
]

BLENDS = ("mean", "max")
MIN_TILE = 32  # one cell of the backbone's stride-32 stage
MAX_TILE = 8192  # a tile larger than any camera frame is a typo
MAX_OVERLAP = 0.75  # beyond this a frame costs 16x its tile count and adds nothing
AUTO_NATIVE_RATIO = 1.5  # `--tile auto`: frames up to this many times the input side are resized whole


class TilingError(ValueError):
    """A tiling setting that cannot work; the message names the setting and what to use."""


@dataclass(frozen=True)
class Tiling:
    """How frames are cut: `tile` source pixels a side, at least `overlap` of a tile shared with each
    neighbour, overlaps blended by `blend` (BLENDS)."""

    tile: int
    overlap: float = 0.125
    blend: str = "mean"

    def __post_init__(self) -> None:
        if isinstance(self.tile, bool) or not isinstance(self.tile, (int, np.integer)):
            raise TilingError(f"tiling.tile must be a whole number of source pixels, got {self.tile!r}")
        if not MIN_TILE <= int(self.tile) <= MAX_TILE:
            raise TilingError(f"tiling.tile must be within {MIN_TILE}..{MAX_TILE} pixels, got {self.tile}")
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, (int, float)):
            raise TilingError(f"tiling.overlap must be a fraction of a tile, got {self.overlap!r}")
        if not 0.0 <= float(self.overlap) <= MAX_OVERLAP:
            msg = f"tiling.overlap must be within 0..{MAX_OVERLAP} (a fraction of a tile), got {self.overlap}"
            raise TilingError(msg)
        if self.blend not in BLENDS:
            raise TilingError(f"tiling.blend must be one of {list(BLENDS)}, got {self.blend!r}")
        object.__setattr__(self, "tile", int(self.tile))
        object.__setattr__(self, "overlap", float(self.overlap))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: Mapping[str, Any] | None) -> Tiling | None:
        """None (or no mapping) means no tiling: frames are resized whole, as before tiling existed."""
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise TilingError(f"tiling must be a mapping {{tile, overlap, blend}} or null, got {type(value).__name__}")
        unknown = set(value) - {"tile", "overlap", "blend"}
        if unknown:
            raise TilingError(f"tiling has unknown keys {sorted(unknown)}; known: tile, overlap, blend")
        if "tile" not in value:
            raise TilingError("tiling needs `tile` (the tile side in source pixels)")
        return cls(**value)


@dataclass(frozen=True)
class TileGrid:
    """Where a frame of `frame` (H, W) is cut: tile origins (y, x), row by row."""

    frame: tuple[int, int]
    tile: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)

    @property
    def padded(self) -> tuple[int, int]:
        """The frame's size once padded up to at least one tile per axis."""
        return max(self.frame[0], self.tile), max(self.frame[1], self.tile)

    @property
    def origins(self) -> list[tuple[int, int]]:
        return [(y, x) for y in self.ys for x in self.xs]


def axis_starts(length: int, tile: int, overlap: float) -> tuple[int, ...]:
    """Tile starts along one axis: evenly spread over 0..length-tile, as few as keep `overlap`."""
    if length <= tile:
        return (0,)
    stride = max(1, math.floor(tile * (1.0 - overlap)))  # whole pixels, so rounded starts keep the overlap
    n = math.ceil((length - tile) / stride) + 1
    return tuple(round(i * (length - tile) / (n - 1)) for i in range(n))


def plan_tiles(frame_hw: Sequence[int], tiling: Tiling) -> TileGrid:
    """The tile grid of a frame of (H, W) pixels."""
    height, width = int(frame_hw[0]), int(frame_hw[1])
    if height < MIN_IMAGE_SIDE or width < MIN_IMAGE_SIDE:
        raise TilingError(f"a {width}x{height} frame is below the {MIN_IMAGE_SIDE}-pixel minimum side")
    return TileGrid(
        (height, width),
        tiling.tile,
        axis_starts(height, tiling.tile, tiling.overlap),
        axis_starts(width, tiling.tile, tiling.overlap),
    )


def cut_tiles(frame: np.ndarray, grid: TileGrid, size: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
    """The grid's tiles of an HxWx3 uint8 frame, each resized to `size` (H, W) with the trainer's
    resize: (count, H, W, 3) uint8, written into `out` (a buffer of at least `count` rows) if given."""
    if frame.shape[:2] != grid.frame:
        raise TilingError(f"frame is {frame.shape[1]}x{frame.shape[0]}, the grid was planned for {grid.frame[::-1]}")
    pad_h, pad_w = grid.padded[0] - grid.frame[0], grid.padded[1] - grid.frame[1]
    if pad_h or pad_w:  # mirror, never upscale: the model sees these pixels at its training scale
        frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="symmetric")
    height, width = int(size[0]), int(size[1])
    tiles = out if out is not None else np.empty((grid.count, height, width, 3), np.uint8)
    t = grid.tile
    for i, (y, x) in enumerate(grid.origins):
        tiles[i] = resize_image(frame[y : y + t, x : x + t], (height, width))
    return tiles[: grid.count]


def stitch_maps(maps: np.ndarray, grid: TileGrid, blend: str = "mean") -> np.ndarray:
    """One (H, W) float32 map at the frame's resolution from the tiles' (count, h, w) maps."""
    if len(maps) != grid.count:
        raise TilingError(f"got {len(maps)} tile maps for a grid of {grid.count} tiles")
    if blend not in BLENDS:
        raise TilingError(f"blend must be one of {list(BLENDS)}, got {blend!r}")
    t = grid.tile
    height, width = grid.padded
    if blend == "max":
        acc = np.full((height, width), -np.inf, np.float32)
    else:
        acc = np.zeros((height, width), np.float32)
        hits = np.zeros((height, width), np.float32)
    for tile_map, (y, x) in zip(maps, grid.origins):
        tile_map = np.asarray(tile_map, np.float32)
        if tile_map.shape != (t, t):
            tile_map = cv2.resize(tile_map, (t, t), interpolation=cv2.INTER_LINEAR)
        if blend == "max":
            np.maximum(acc[y : y + t, x : x + t], tile_map, out=acc[y : y + t, x : x + t])
        else:
            acc[y : y + t, x : x + t] += tile_map
            hits[y : y + t, x : x + t] += 1.0
    if blend == "mean":
        acc /= hits  # every pixel is covered: the starts reach both borders
    return np.ascontiguousarray(acc[: grid.frame[0], : grid.frame[1]])


def frame_score(scores: np.ndarray) -> float:
    """A frame's score: the highest of its tiles' (a defect in any tile fails the frame)."""
    return float(np.max(scores))


def frame_class(class_preds: np.ndarray) -> int:
    """A frame's class: the one most of its tiles predict (ties: the lower index)."""
    values, counts = np.unique(np.asarray(class_preds, np.int64), return_counts=True)
    return int(values[np.argmax(counts)])


def combine_tiles(
    maps: np.ndarray, scores: np.ndarray, class_preds: np.ndarray, grid: TileGrid | None, blend: str = "mean"
) -> tuple[np.ndarray, float, int]:
    """A frame's (map, score, class) from the outputs of its tiles: the one rule that training,
    evaluation and the runtime share. `grid` None: an untiled frame, whose one map is its map."""
    amap = np.asarray(maps[0], np.float32) if grid is None else stitch_maps(maps, grid, blend)
    return amap, frame_score(scores), frame_class(class_preds)


def auto_tile(frame_sizes: Sequence[Sequence[int]], input_size: Sequence[int]) -> int | None:
    """`--tile auto`: the tile side for frames of these (H, W) sizes, or None to resize them whole.

    Frames whose median long side is within AUTO_NATIVE_RATIO of the model's input side lose little to
    the resize and are resized whole; larger ones are tiled at native resolution (tile = input side).
    """
    if not frame_sizes:
        raise TilingError("--tile auto needs at least one training image to measure")
    long_side = float(np.median([max(int(h), int(w)) for h, w in frame_sizes]))
    side = max(int(v) for v in input_size)
    return None if long_side <= AUTO_NATIVE_RATIO * side else side
