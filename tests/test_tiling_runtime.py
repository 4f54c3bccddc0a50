"""Tiled inference in the torch-free runtime: bundle format, cutting, batching, stitching, Triton, build --frame.

A tiny hand-made ONNX model with the bundle's signature stands in for HGAD: its map is each pixel's
mean colour (so a stitched map can be checked pixel by pixel), its score the map's max and its
class 1 for a bright tile, 0 for a dark one (unless a class is given). Every runtime result is
compared with an independent computation: the same ONNX run by onnxruntime directly on
`cut_tiles` output, then `stitch_maps`, `frame_score` and `frame_class` (hgad_edge.core.tiling).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from hgad_edge.cli import main
from hgad_edge.core.bundle import load_bundle
from hgad_edge.core.bundle_schema import BundleMetadata, SchemaError, onnx_metadata_props
from hgad_edge.core.errors import BundleError, InvalidArgumentError
from hgad_edge.core.tiling import Tiling, cut_tiles, frame_class, frame_score, plan_tiles, stitch_maps
from hgad_edge.runtime import Detector, RuntimeOptions, Status, api, create, destroy, infer, last_error
from hgad_edge.runtime.app import run_app
from tests.helpers import CLASSES, SCALES, THRESHOLDS, make_bundle

S = 64  # the tiny model's (square) input side
DARK, BRIGHT = CLASSES  # the class a tile predicts: 0 when its mean colour is <= 0.5, else 1
TILED = {"tile": 96, "overlap": 0.25, "blend": "mean"}  # tiles of 96 px resized to 64: maps resized back
NATIVE = {"tile": S, "overlap": 0.125, "blend": "max"}  # tiles of the input side: native pixels


# ---- tiny tiled bundle ---------------------------------------------------------------------------
def tiny_model(tiling: dict | None) -> bytes:
    """map = mean_c(images / 255); score = max(map); class = given, else 1 if mean(map) > 0.5 else 0."""
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    nodes = [
        helper.make_node("Cast", ["images"], ["xf"], to=f32),
        helper.make_node("Div", ["xf", "c255"], ["xn"]),
        helper.make_node("ReduceMean", ["xn"], ["anomaly_map"], axes=[3], keepdims=0),
        helper.make_node("ReduceMax", ["anomaly_map"], ["score"], axes=[1, 2], keepdims=0),
        helper.make_node("ReduceMean", ["anomaly_map"], ["level"], axes=[1, 2], keepdims=0),
        helper.make_node("Greater", ["level", "half"], ["is_bright"]),
        helper.make_node("Cast", ["is_bright"], ["predicted"], to=i64),
        helper.make_node("GreaterOrEqual", ["class_id", "zero"], ["given"]),
        helper.make_node("Where", ["given", "class_id", "predicted"], ["class_pred"]),
    ]
    consts = [
        numpy_helper.from_array(np.array(255, np.float32), "c255"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
    ]
    inputs = [
        helper.make_tensor_value_info("images", TensorProto.UINT8, ["B", S, S, 3]),
        helper.make_tensor_value_info("class_id", i64, ["B"]),
    ]
    outputs = [
        helper.make_tensor_value_info("anomaly_map", f32, ["B", S, S]),
        helper.make_tensor_value_info("score", f32, ["B"]),
        helper.make_tensor_value_info("class_pred", i64, ["B"]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "tiny_tiled", inputs, outputs, consts), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    schema = BundleMetadata(CLASSES, (S, S), THRESHOLDS, SCALES, {}, tiling=Tiling.from_dict(tiling))
    helper.set_model_props(model, onnx_metadata_props(schema, "fp32"))  # the copy an export writes
    return model.SerializeToString()


def make_tiled_bundle(folder: Path, tiling: dict | None = TILED, onnx_tiling: dict | None = "same", **overrides):
    """The runtime tests' tiny bundle (tests/helpers.py) with this module's square model and `tiling`;
    `onnx_tiling` is the tiling copied into the ONNX file (default: the metadata's)."""
    data = tiny_model(tiling if onnx_tiling == "same" else onnx_tiling)
    model = {"fp32": {"file": "model_fp32.onnx", "sha256": hashlib.sha256(data).hexdigest()}}
    fields = {"input_size": [S, S], "models": model, "display_range": [0.0, 1.0], **overrides}
    make_bundle(folder, **fields, **({} if tiling is None else {"tiling": tiling}))
    (folder / "model_fp32.onnx").write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def tiled(tmp_path_factory) -> Path:
    return make_tiled_bundle(tmp_path_factory.mktemp("tiled") / "bundle")


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> Path:
    return make_tiled_bundle(tmp_path_factory.mktemp("native") / "bundle", NATIVE)


@pytest.fixture
def open_handle():
    handles = []

    def _open(bundle: Path, max_batch: int = 64) -> int:
        status, handle = create(bundle, backend="onnxruntime", max_batch=max_batch)
        assert status == Status.OK, last_error()
        handles.append(handle)
        return handle

    yield _open
    for handle in handles:
        destroy(handle)


def frames_of(n: int, hw=(150, 230), seed: int = 0) -> list[np.ndarray]:
    """Smooth random frames (bright and dark regions, so tiles predict different classes)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
        smooth = cv2.resize(coarse, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
        noise = rng.integers(-20, 21, smooth.shape)
        out.append(np.clip(smooth.astype(np.int64) + noise, 0, 255).astype(np.uint8))
    return out


def reference(bundle: Path, frame: np.ndarray, class_id: int = -1) -> tuple[np.ndarray, float, int, int]:
    """(stitched map, frame score, frame class, tiles) computed without the runtime: cut_tiles,
    onnxruntime on the tile batch, stitch_maps / frame_score / frame_class."""
    tiling = Tiling.from_dict(json.loads((bundle / "metadata.json").read_text())["tiling"])
    grid = plan_tiles(frame.shape[:2], tiling)
    tiles = cut_tiles(frame, grid, (S, S))
    session = ort.InferenceSession(str(bundle / "model_fp32.onnx"), providers=["CPUExecutionProvider"])
    maps, scores, preds = session.run(None, {"images": tiles, "class_id": np.full(len(tiles), class_id, np.int64)})
    return stitch_maps(maps, grid, tiling.blend), frame_score(scores), frame_class(preds), grid.count


KEYS = ("anomaly_map", "score", "score_normalized", "anomalous", "class_pred")


def assert_same_result(a, b) -> None:
    for key in KEYS:
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)
    assert a.class_names == b.class_names


# ---- the bundle format -----------------------------------------------------------------------------
def test_tiling_round_trips_through_metadata(tiled, tmp_path):
    bundle = load_bundle(tiled)
    assert bundle.tiling == Tiling(96, 0.25, "mean")
    schema = BundleMetadata.from_json(bundle.metadata)
    assert schema.to_json()["tiling"] == TILED and BundleMetadata.from_json(schema.to_json()) == schema
    assert json.loads(onnx_metadata_props(schema, "fp32")["tiling"]) == TILED
    # untiled: absent (older bundles) and null both mean no tiling, and an untiled bundle writes no key
    for value in ("absent", None):
        folder = make_tiled_bundle(tmp_path / f"untiled_{value}", None)
        if value is None:
            meta = json.loads((folder / "metadata.json").read_text())
            (folder / "metadata.json").write_text(json.dumps({**meta, "tiling": None}))
        untiled = load_bundle(folder)
        assert untiled.tiling is None and "tiling" not in untiled.schema.to_json()
        assert "tiling" not in onnx_metadata_props(untiled.schema, "fp32")


@pytest.mark.parametrize(
    "tiling, words",
    [
        ({"tile": 8}, "tiling.tile must be within"),
        ({"tile": "96"}, "whole number"),
        ({"tile": 96.0}, "whole number"),
        ({"tile": 96, "overlap": 0.9}, "tiling.overlap"),
        ({"tile": 96, "overlap": -0.1}, "tiling.overlap"),
        ({"tile": 96, "blend": "median"}, "tiling.blend"),
        ({"overlap": 0.1}, "needs `tile`"),
        ({"tile": 96, "stride": 32}, "unknown keys"),
        ([96, 0.25], "mapping"),
        (96, "mapping"),
    ],
)
def test_bad_tiling_values_are_refused_with_the_fix(tmp_path, tiling, words):
    with pytest.raises(SchemaError, match=words):
        BundleMetadata.from_json(
            {**json.loads((make_tiled_bundle(tmp_path / "ok") / "metadata.json").read_text()), "tiling": tiling}
        )
    folder = make_tiled_bundle(tmp_path / "b", tiling, onnx_tiling=None)
    status, handle = create(folder, backend="onnxruntime")
    assert status == Status.BUNDLE_INCOMPATIBLE and handle is None
    assert words in last_error() and "re-export" in last_error() and "tiling" in last_error()


def test_tiling_needs_a_square_input(tmp_path):
    meta = json.loads((make_tiled_bundle(tmp_path / "b") / "metadata.json").read_text())
    with pytest.raises(SchemaError, match="square input_size"):
        BundleMetadata.from_json({**meta, "input_size": [64, 96]})


@pytest.mark.parametrize(
    "tiling, onnx_tiling, words",
    [
        ({**TILED, "overlap": 0.5}, TILED, "differs from the copy"),  # metadata.json edited
        (None, TILED, "differs from the copy"),  # tiling deleted from metadata.json: scores would change meaning
        (TILED, None, "carries no copy of 'tiling'"),  # tiling added to an untiled export
    ],
)
def test_metadata_that_disagrees_with_the_onnx_copy_is_refused(tmp_path, tiling, onnx_tiling, words):
    with pytest.raises(BundleError, match=words):
        load_bundle(make_tiled_bundle(tmp_path / "b", tiling, onnx_tiling=onnx_tiling))


# ---- inference ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["tiled", "native"])
def test_stitched_map_is_the_independent_stitch_of_the_tiles(which, request, open_handle):
    bundle = request.getfixturevalue(which)
    handle = open_handle(bundle)
    frame = frames_of(1, (150, 230))[0]
    status, result = infer(handle, frame)
    assert status == Status.OK, last_error()
    amap, score, cls, tiles = reference(bundle, frame)
    assert tiles > 1 and result.anomaly_map.shape == (1, 150, 230) and result.anomaly_map.dtype == np.float32
    np.testing.assert_array_equal(result.anomaly_map[0], amap)
    assert result.score[0] == np.float32(score) and result.class_pred[0] == cls
    assert result.class_names == [CLASSES[cls]] and result.latency_ms["tiles"] == tiles
    thr, scale = THRESHOLDS[cls], SCALES[cls]
    np.testing.assert_allclose(result.score_normalized[0], 1 / (1 + math.exp(-(score - thr) / scale)), rtol=1e-6)
    assert bool(result.anomalous[0]) == (score >= thr)
    if which == "native":  # tile == input side: each map pixel is that frame pixel's mean colour
        np.testing.assert_allclose(result.anomaly_map[0], frame.astype(np.float32).mean(-1) / 255, atol=1e-6)


def test_frame_score_is_the_max_and_class_the_majority_of_its_tiles(tmp_path, open_handle):
    bundle = make_tiled_bundle(tmp_path / "b", {"tile": S, "overlap": 0.0, "blend": "mean"})
    handle = open_handle(bundle)
    frame = np.full((S, 3 * S, 3), 40, np.uint8)  # three side-by-side tiles: dark, bright, bright
    frame[:, S:] = 200
    frame[5, 10] = 255  # the highest pixel sits in the dark tile: the frame score is still the max
    status, result = infer(handle, frame)
    assert status == Status.OK, last_error()
    assert result.latency_ms["tiles"] == 3
    assert result.class_pred[0] == 1 and result.class_names == [BRIGHT]  # 2 of 3 tiles
    assert result.score[0] == np.float32(1.0)
    given = infer(handle, frame, DARK)[1]  # a given class goes to all of the frame's tiles
    assert given.class_pred[0] == 0 and given.score[0] == result.score[0]
    np.testing.assert_array_equal(given.anomaly_map, result.anomaly_map)
    amap, _, cls, _ = reference(bundle, frame, 0)
    assert cls == 0 and np.array_equal(given.anomaly_map[0], amap)


def test_a_frame_smaller_than_a_tile_is_mirrored_not_upscaled(native, open_handle):
    handle = open_handle(native)
    frame = frames_of(1, (40, 50), seed=3)[0]
    status, result = infer(handle, frame)
    assert status == Status.OK, last_error()
    assert result.anomaly_map.shape == (1, 40, 50) and result.latency_ms["tiles"] == 1
    # not upscaled: each map pixel is that pixel's own mean colour at the model's scale
    np.testing.assert_allclose(result.anomaly_map[0], frame.astype(np.float32).mean(-1) / 255, atol=1e-6)
    amap, score, _, _ = reference(native, frame)
    np.testing.assert_array_equal(result.anomaly_map[0], amap)
    padded = np.pad(frame, ((0, S - 40), (0, S - 50), (0, 0)), mode="symmetric")
    assert result.score[0] == np.float32(score) == np.float32((padded.astype(np.float32) / 255).mean(-1).max())


def test_a_batch_equals_its_frames_one_by_one(tiled, open_handle):
    handle = open_handle(tiled)
    frames = frames_of(3, seed=5)
    status, batch = infer(handle, frames, ["auto", BRIGHT, 0])
    assert status == Status.OK, last_error()
    assert batch.anomaly_map.shape == (3, 150, 230) and len(batch) == 3
    for i, (frame, class_id) in enumerate(zip(frames, ["auto", BRIGHT, 0])):
        one = infer(handle, frame, class_id)[1]
        for key in KEYS:
            np.testing.assert_array_equal(getattr(one, key)[0], getattr(batch, key)[i], err_msg=key)
        assert one.class_names == batch.class_names[i : i + 1]
    as_array = infer(handle, np.stack(frames))[1]  # a BxHxWx3 array is the same batch
    np.testing.assert_array_equal(as_array.anomaly_map, infer(handle, frames)[1].anomaly_map)


def test_frames_of_different_sizes_in_one_call_are_refused(tiled, open_handle):
    handle = open_handle(tiled)
    frames = [*frames_of(1, (150, 230)), *frames_of(1, (150, 200))]
    status, result = infer(handle, frames)
    assert status == Status.INVALID_ARGUMENT and result is None
    assert "230x150" in last_error() and "200x150" in last_error() and "one size" in last_error()
    with Detector(tiled, backend="onnxruntime") as det, pytest.raises(InvalidArgumentError, match="separate calls"):
        det.infer(frames)


@pytest.mark.parametrize("max_batch", [1, 2, 5, 6, 7, 64])
def test_a_max_batch_below_the_tile_count_takes_several_calls_and_gives_the_same(tiled, open_handle, max_batch):
    frames = frames_of(4, seed=7)
    full = infer(open_handle(tiled, 64), frames, [0, "auto", 1, "auto"])[1]
    tiles = plan_tiles((150, 230), Tiling.from_dict(TILED)).count
    assert tiles == 6 and full.latency_ms["tiles"] == 4 * tiles
    handle = open_handle(tiled, max_batch)
    runner = api._lookup(handle).runner
    calls, run = [], runner.infer
    runner.infer = lambda batch: calls.append(batch) or run(batch)
    status, result = infer(handle, frames, [0, "auto", 1, "auto"])
    assert status == Status.OK, last_error()
    assert len(calls) == math.ceil(4 * tiles / max_batch) and sum(calls) == 4 * tiles  # as few calls as possible
    assert_same_result(result, full)
    buffer = api._lookup(handle).tiler._staging
    assert len(buffer) <= tiles  # staging holds one frame's tiles at most, whatever the batch


def test_info_and_detector_report_tiling(tiled, open_handle):
    status, info = api.info(open_handle(tiled))
    assert status == Status.OK and info["tiling"] == TILED and info["input_size"] == (S, S)


def test_untiled_bundles_report_no_tiling(tmp_path, open_handle):
    handle = open_handle(make_tiled_bundle(tmp_path / "b", None))
    assert api.info(handle)[1]["tiling"] is None
    result = infer(handle, frames_of(1, (150, 230))[0])[1]
    assert result.anomaly_map.shape == (1, S, S) and set(result.latency_ms) == {"preprocess", "model", "total"}


def test_the_app_saves_anomalies_at_the_frame_resolution(tiled, tmp_path):
    shots = tmp_path / "shots"
    shots.mkdir()
    frame = frames_of(1, (150, 230), seed=9)[0]
    cv2.imwrite(str(shots / "a.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    saved = tmp_path / "saved"
    summary = run_app(
        tiled,
        shots,
        headless=True,
        save_anomalies=saved,
        options=RuntimeOptions(backend="onnxruntime", thresholds={DARK: 0.0, BRIGHT: 0.0}),
        print_summary=False,
    )
    assert summary["frames"] == summary["anomalies"] == 1
    overlay = next(saved.glob("*_overlay.png"))
    assert cv2.imread(str(overlay)).shape == (150, 230, 3)


# ---- Triton: tiles cut on the client, sent as a batch --------------------------------------------------
@pytest.mark.slow
def test_a_triton_server_gives_the_local_stitched_result(tiled, tmp_path):
    pytest.importorskip("pytriton.triton", reason="pip install '.[serve]'")
    from hgad_edge.runtime.triton.server import ServeProcess

    server = ServeProcess(tiled, tmp_path / "serve", max_batch=4)  # 6 tiles a frame: two requests per frame
    try:
        server.start()
        frames = frames_of(3, seed=11)
        with Detector(server.url, backend="triton") as remote, Detector(tiled, backend="onnxruntime") as local:
            assert remote.info["tiling"] == TILED and remote.info["max_batch"] == 4
            for batch, class_id in ((frames[:1], "auto"), (frames, "auto"), (frames, BRIGHT)):
                got, want = remote.infer(batch, class_id), local.infer(batch, class_id)
                np.testing.assert_allclose(got.anomaly_map, want.anomaly_map, rtol=1e-6, atol=1e-6)
                np.testing.assert_allclose(got.score, want.score, rtol=1e-6, atol=1e-6)
                np.testing.assert_array_equal(got.class_pred, want.class_pred)
                np.testing.assert_array_equal(got.anomalous, want.anomalous)
                assert got.anomaly_map.shape == (len(batch), 150, 230) and got.latency_ms["tiles"] == 6 * len(batch)
    finally:
        server.stop()


# ---- hgad-edge build --frame ---------------------------------------------------------------------------
def test_build_frame_is_refused_for_an_untiled_bundle(tmp_path):
    folder = make_tiled_bundle(tmp_path / "b", None)
    done = CliRunner().invoke(main, ["build", str(folder), "--target", "rtx", "--frame", "640x480"])
    assert done.exit_code != 0 and "--frame" in done.output and "not tiled" in done.output
    assert not (folder / "engines").exists()


@pytest.mark.parametrize("frame", ["640", "640x", "0x480", "axb", "640x480x3"])
def test_build_frame_must_be_width_x_height(tiled, frame):
    done = CliRunner().invoke(main, ["build", str(tiled), "--target", "rtx", "--frame", frame])
    assert done.exit_code != 0 and "WIDTHxHEIGHT" in done.output


def test_build_frame_sizes_the_profile_to_the_tiles_of_a_frame(tiled, tmp_path):
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed")
    folder = tmp_path / "bundle"
    shutil.copytree(tiled, folder)
    done = CliRunner().invoke(
        main, ["build", str(folder), "--target", "rtx", "--precision", "fp32", "--frame", "230x150"]
    )
    assert done.exit_code == 0, done.output
    tiles = plan_tiles((150, 230), Tiling.from_dict(TILED)).count
    assert f"{tiles} tiles" in done.output
    entries = json.loads((folder / "metadata.json").read_text())["engines"]
    (entry,) = entries.values()
    assert entry["batch"] == [1, tiles, tiles] and entry["frame"] == "230x150" and entry["tiles_per_frame"] == tiles
