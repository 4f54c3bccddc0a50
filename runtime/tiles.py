"""Tiled inference on the host: each frame cut into tiles, all tiles through the runner, maps stitched back.

For a bundle with `tiling` (hgad_edge.core.tiling) a frame is not resized whole: `cut_tiles` cuts it
into the bundle's tiles, resized to the graph's input (the graph and its dynamic batch axis do not
change), and the tiles of every frame of a call go through the runner as batches: one runner call
when they all fit in its max_batch, otherwise as few calls as max_batch allows (a frame's tiles may
span two calls). Each frame's tile maps are stitched at the frame's own resolution (`stitch_maps`
with the bundle's blend), its score is the highest of its tiles' (`frame_score`) and its class the
one most of its tiles predict (`frame_class`); a class given for a frame is given to all its tiles.
PASS/FAIL is then decided on the frame score by the caller (api.py), as for untiled bundles.

Buffers: tiles are cut straight into the runner's preallocated input rows where a frame's tiles fit
in the rows left; otherwise into a staging buffer that grows to the largest frame seen and is
reused, as is the buffer that gathers the maps of a frame split across runner calls. So host memory
per frame is bounded by the tiles of the biggest frame, whatever the number of frames per call.
One call takes frames of one size (one tile grid).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from hgad_edge.core.errors import InvalidArgumentError
from hgad_edge.core.tiling import TileGrid, Tiling, combine_tiles, cut_tiles, plan_tiles
from hgad_edge.runtime.backends.base import Runner

__all__ = ["TiledOutputs", "TiledRunner", "frame_size"]


def frame_size(frames: Sequence[np.ndarray]) -> tuple[int, int]:
    """The (H, W) all frames share; InvalidArgumentError naming the sizes when they differ."""
    sizes = list(dict.fromkeys((int(f.shape[0]), int(f.shape[1])) for f in frames))
    if len(sizes) > 1:
        shown = ", ".join(f"{w}x{h}" for h, w in sizes)
        msg = (
            f"a tiled bundle scores frames of one size per call, got {shown}: one tile grid serves the whole "
            "batch; pass frames of different sizes in separate calls"
        )
        raise InvalidArgumentError(msg)
    return sizes[0]


@dataclass
class TiledOutputs:
    """Per-frame outputs of one tiled call (fresh arrays, owned by the caller) and where time went."""

    anomaly_map: np.ndarray  # (N, H, W) float32 at the frames' resolution
    score: np.ndarray  # (N,) float32: the max of each frame's tile scores
    class_pred: np.ndarray  # (N,) int64: the majority of each frame's tile classes
    tiles: int  # tiles scored (N x tiles per frame)
    calls: int  # runner calls
    seconds: dict[str, float] = field(default_factory=dict)  # cut, model, stitch


@dataclass
class _Segment:
    """Rows [row, row + count) of the runner's buffers hold tiles [first, first + count) of frame `frame`."""

    frame: int
    first: int
    count: int
    row: int


class TiledRunner:
    """Cuts frames into the runner's preallocated input buffers, runs them, stitches (module doc)."""

    def __init__(self, runner: Runner, tiling: Tiling) -> None:
        specs = runner.input_specs
        self.runner = runner
        self.tiling = tiling
        self.images = runner.inputs[specs[0].name]  # (max_batch, h, w, 3) uint8, owned by the runner
        self.class_ids = runner.inputs[specs[1].name]  # (max_batch,) int64, owned by the runner
        self.size = (int(self.images.shape[1]), int(self.images.shape[2]))
        self._staging = np.empty((0, *self.images.shape[1:]), self.images.dtype)  # a frame's tiles, when needed
        self._split: dict[str, np.ndarray] = {}  # outputs of a frame whose tiles span runner calls

    @property
    def max_batch(self) -> int:
        return int(self.images.shape[0])

    def grid(self, frame_hw: Sequence[int]) -> TileGrid:
        return plan_tiles(frame_hw, self.tiling)

    def run(self, frames: Sequence[np.ndarray], class_ids: Sequence[int]) -> TiledOutputs:
        """Score checked HxWx3 uint8 frames of one size; class_ids: one per frame (-1 = the tiles predict)."""
        grid = self.grid(frame_size(frames))
        state = _Call(self, grid, len(frames))
        for index, frame in enumerate(frames):
            state.add(index, frame, int(class_ids[index]))
        state.flush()
        return state.outputs()

    def staging(self, count: int) -> np.ndarray:
        """`count` rows of tile staging, grown (never shrunk) to the biggest frame's tile count."""
        if len(self._staging) < count:
            self._staging = np.empty((count, *self._staging.shape[1:]), self._staging.dtype)
        return self._staging[:count]

    def split_buffers(self, count: int, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Row buffers shaped like the runner's outputs for the `count` tiles of one frame split across calls."""
        have = self._split.get("anomaly_map")
        if have is None or len(have) < count:
            self._split = {name: np.empty((count, *value.shape[1:]), value.dtype) for name, value in out.items()}
        return {name: value[:count] for name, value in self._split.items()}


class _Call:
    """One `TiledRunner.run`: fills the runner's rows frame by frame and flushes them when full."""

    def __init__(self, tiler: TiledRunner, grid: TileGrid, frames: int) -> None:
        self.tiler, self.grid = tiler, grid
        self.count = grid.count
        self.maps = np.empty((frames, *grid.frame), np.float32)
        self.scores = np.empty(frames, np.float32)
        self.classes = np.empty(frames, np.int64)
        self.segments: list[_Segment] = []
        self.fill = 0
        self.calls = 0
        self.seconds = {"cut": 0.0, "model": 0.0, "stitch": 0.0}

    def add(self, index: int, frame: np.ndarray, class_id: int) -> None:
        tiler, count = self.tiler, self.count
        start = time.perf_counter()
        if count <= tiler.max_batch - self.fill:  # the whole frame fits: cut straight into the runner's rows
            cut_tiles(frame, self.grid, tiler.size, out=tiler.images[self.fill : self.fill + count])
            self._take(index, 0, count, class_id)
            self.seconds["cut"] += time.perf_counter() - start
        else:  # spread over the rows left and the next call(s): as few calls as max_batch allows
            tiles = cut_tiles(frame, self.grid, tiler.size, out=tiler.staging(count))
            self.seconds["cut"] += time.perf_counter() - start
            done = 0
            while done < count:
                if self.fill == tiler.max_batch:
                    self.flush()
                take = min(tiler.max_batch - self.fill, count - done)
                np.copyto(tiler.images[self.fill : self.fill + take], tiles[done : done + take])
                self._take(index, done, take, class_id)
                done += take
        if self.fill == tiler.max_batch:
            self.flush()

    def _take(self, index: int, first: int, count: int, class_id: int) -> None:
        self.tiler.class_ids[self.fill : self.fill + count] = class_id
        self.segments.append(_Segment(index, first, count, self.fill))
        self.fill += count

    def flush(self) -> None:
        """Run the filled rows; stitch every frame whose last tile came back."""
        if not self.fill:
            return
        start = time.perf_counter()
        out = self.tiler.runner.infer(self.fill)
        ran = time.perf_counter()
        self.calls += 1
        for seg in self.segments:
            rows = {name: value[seg.row : seg.row + seg.count] for name, value in out.items()}
            if seg.first or seg.count < self.count:  # part of a frame: gather its rows across calls
                gathered = self.tiler.split_buffers(self.count, out)
                for name, value in rows.items():
                    gathered[name][seg.first : seg.first + seg.count] = value
                if seg.first + seg.count < self.count:
                    continue
                rows = gathered
            self._finish(seg.frame, rows)
        self.segments.clear()
        self.fill = 0
        self.seconds["model"] += ran - start
        self.seconds["stitch"] += time.perf_counter() - ran

    def _finish(self, index: int, rows: dict[str, np.ndarray]) -> None:
        self.maps[index], self.scores[index], self.classes[index] = combine_tiles(
            rows["anomaly_map"], rows["score"], rows["class_pred"], self.grid, self.tiler.tiling.blend
        )

    def outputs(self) -> TiledOutputs:
        tiles = self.count * len(self.scores)
        return TiledOutputs(self.maps, self.scores, self.classes, tiles, self.calls, dict(self.seconds))
