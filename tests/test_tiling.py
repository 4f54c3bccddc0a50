"""hgad_edge.core.tiling on hand-checkable frames: where tiles start, cutting, stitching, frame score."""

from __future__ import annotations

import numpy as np
import pytest

from hgad_edge.core.imaging import resize_image
from hgad_edge.core.tiling import (
    AUTO_NATIVE_RATIO,
    BLENDS,
    MIN_TILE,
    Tiling,
    TilingError,
    auto_tile,
    axis_starts,
    combine_tiles,
    cut_tiles,
    frame_class,
    frame_score,
    plan_tiles,
    stitch_maps,
)


@pytest.mark.parametrize(
    ("length", "tile", "overlap", "starts"),
    [
        (256, 256, 0.125, (0,)),  # one tile exactly
        (100, 256, 0.125, (0,)),  # shorter than a tile: one (padded) tile
        (512, 256, 0.0, (0, 256)),  # no overlap: side by side
        (480, 256, 0.125, (0, 224)),  # stride 224 reaches 224 = 480 - 256
        (481, 256, 0.125, (0, 112, 225)),  # one pixel more needs a third tile, spread evenly
        (1000, 256, 0.5, (0, 124, 248, 372, 496, 620, 744)),  # stride <= 128: 7 tiles over 744
    ],
)
def test_axis_starts(length, tile, overlap, starts):
    assert axis_starts(length, tile, overlap) == starts
    got = axis_starts(length, tile, overlap)
    assert got[0] == 0 and got[-1] == max(0, length - tile)  # both borders reached, none hangs over
    steps = np.diff(got)
    assert (steps <= int(tile * (1 - overlap))).all()  # the overlap is kept


def test_every_pixel_is_covered_and_the_overlap_kept():
    rng = np.random.default_rng(0)
    for _ in range(200):
        length, tile = int(rng.integers(32, 3000)), int(rng.integers(32, 600))
        overlap = float(rng.uniform(0, 0.75))
        starts = axis_starts(length, tile, overlap)
        covered = np.zeros(max(length, tile), bool)
        for s in starts:
            covered[s : s + tile] = True
        assert covered.all()
        if len(starts) > 1:
            assert min(np.diff(starts)) >= 1 and max(np.diff(starts)) <= int(tile * (1 - overlap))


def test_setting_checks_name_the_key():
    with pytest.raises(TilingError, match="tiling.tile"):
        Tiling(tile=MIN_TILE - 1)
    with pytest.raises(TilingError, match="tiling.tile"):
        Tiling(tile=256.0)  # type: ignore[arg-type]
    with pytest.raises(TilingError, match="tiling.overlap"):
        Tiling(tile=256, overlap=0.9)
    with pytest.raises(TilingError, match="tiling.blend"):
        Tiling(tile=256, blend="median")
    with pytest.raises(TilingError, match="unknown keys"):
        Tiling.from_dict({"tile": 256, "stride": 3})
    assert Tiling.from_dict(None) is None
    assert Tiling.from_dict(Tiling(300, 0.25, "max").to_dict()) == Tiling(300, 0.25, "max")


def test_cut_tiles_are_the_frame_squares_resized_like_training():
    frame = np.random.default_rng(1).integers(0, 256, (300, 520, 3), np.uint8)
    grid = plan_tiles(frame.shape[:2], Tiling(tile=256, overlap=0.125))
    assert grid.ys == (0, 44) and grid.xs == (0, 132, 264) and grid.count == 6
    tiles = cut_tiles(frame, grid, (128, 128))
    assert tiles.shape == (6, 128, 128, 3) and tiles.dtype == np.uint8
    y, x = grid.origins[4]
    np.testing.assert_array_equal(tiles[4], resize_image(frame[y : y + 256, x : x + 256], (128, 128)))
    native = cut_tiles(frame, grid, (256, 256))  # tile == input: the frame's own pixels
    np.testing.assert_array_equal(native[5], frame[44:300, 264:520])


def test_a_small_frame_is_mirrored_not_upscaled():
    frame = np.random.default_rng(2).integers(0, 256, (100, 300, 3), np.uint8)
    grid = plan_tiles(frame.shape[:2], Tiling(tile=256))
    assert grid.ys == (0,) and grid.padded == (256, 300)
    tiles = cut_tiles(frame, grid, (256, 256))
    np.testing.assert_array_equal(tiles[0][:100], frame[:100, :256])  # same scale: pixels unchanged
    np.testing.assert_array_equal(tiles[0][100:200], frame[::-1, :256])  # then its mirror image


@pytest.mark.parametrize("blend", BLENDS)
def test_stitch_puts_each_tile_map_back_where_it_was_cut(blend):
    frame_hw = (300, 520)
    grid = plan_tiles(frame_hw, Tiling(tile=256, overlap=0.125, blend=blend))
    truth = np.add.outer(np.arange(300.0), np.arange(520.0)).astype(np.float32)  # a smooth map
    maps = np.stack([truth[y : y + 256, x : x + 256] for y, x in grid.origins])
    np.testing.assert_allclose(stitch_maps(maps, grid, blend), truth)  # consistent tiles: exact
    # overlaps: mean averages, max keeps the highest
    maps = np.stack([np.full((256, 256), float(i), np.float32) for i in range(grid.count)])
    stitched = stitch_maps(maps, grid, blend)
    assert stitched.shape == frame_hw
    # pixel (0, 140) is seen by tiles 0 (x 0..255) and 1 (x 132..387)
    assert stitched[0, 140] == pytest.approx(0.5 if blend == "mean" else 1.0)
    assert stitched[299, 519] == 5.0  # only the last tile


def test_stitch_resizes_model_sized_maps_to_the_tile():
    grid = plan_tiles((512, 512), Tiling(tile=256, overlap=0.0))
    maps = np.stack([np.full((64, 64), float(i), np.float32) for i in range(4)])
    stitched = stitch_maps(maps, grid)
    assert stitched.shape == (512, 512)
    assert stitched[0, 0] == 0 and stitched[0, 300] == 1 and stitched[300, 0] == 2 and stitched[511, 511] == 3


def test_stitch_of_a_padded_frame_cuts_the_padding_away():
    grid = plan_tiles((100, 300), Tiling(tile=256))
    maps = np.zeros((grid.count, 256, 256), np.float32)
    assert stitch_maps(maps, grid).shape == (100, 300)
    with pytest.raises(TilingError, match="3 tile maps for a grid of 2"):
        stitch_maps(np.zeros((3, 256, 256), np.float32), grid)


def test_frame_score_and_class():
    assert frame_score(np.array([0.1, 2.5, -1.0])) == 2.5
    assert frame_class(np.array([2, 1, 2, 1, 0])) == 1  # tie between 1 and 2: the lower
    assert frame_class(np.array([3, 3, 0])) == 3


def test_auto_tile():
    assert auto_tile([(300, 300), (256, 400)], (256, 256)) is None  # near the input size: resize whole
    assert auto_tile([(2048, 2448)] * 3, (256, 256)) == 256  # high resolution: native tiles
    edge = int(AUTO_NATIVE_RATIO * 256)
    assert auto_tile([(edge, edge)], (256, 256)) is None and auto_tile([(edge + 1, 10)], (256, 256)) == 256
    with pytest.raises(TilingError):
        auto_tile([], (256, 256))


def test_combine_tiles_is_the_stitch_the_max_and_the_majority():
    grid = plan_tiles((300, 520), Tiling(tile=256, overlap=0.125, blend="max"))
    maps = np.stack([np.full((256, 256), float(i), np.float32) for i in range(grid.count)])
    scores, classes = np.array([0.5, 3.0, 1.0, 0, 0, 0]), np.array([1, 0, 1, 2, 1, 0])
    amap, score, cls = combine_tiles(maps, scores, classes, grid, "max")
    np.testing.assert_array_equal(amap, stitch_maps(maps, grid, "max"))
    assert score == 3.0 and cls == 1
    one, score, cls = combine_tiles(maps[:1], np.array([0.25]), np.array([2]), None)  # untiled: the one map
    np.testing.assert_array_equal(one, maps[0])
    assert score == 0.25 and cls == 2
