"""Torch-free edge runtime: C-style API, backends, frame sources and the camera app.

Everything runs on the CPU against a tiny ONNX model built here with the bundle's exact signature
(uint8 NHWC images + int64 class ids -> anomaly_map, score, class_pred); score_normalized and the
PASS/FAIL flag are computed on the host from the metadata's per-class thresholds and scales.
The TensorRT runner is exercised against in-process fakes of `tensorrt` and cuda-python's runtime
(which check the TensorRT 10/11 call protocol); the real-TensorRT test skips without a GPU.
"""

from __future__ import annotations

import ctypes
import enum
import gc
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from hgad_edge.core import cuda_api
from hgad_edge.core.bundle import OUTPUT_NAMES, load_bundle
from hgad_edge.core.errors import (
    BackendUnavailableError,
    BundleError,
    EngineError,
    InvalidArgumentError,
    InvalidHandleError,
)
from hgad_edge.core.imaging import resize_image
from hgad_edge.core.tiling import Tiling
from hgad_edge.runtime import (
    Detector,
    RuntimeOptions,
    Status,
    api,
    create,
    create_with_options,
    destroy,
    infer,
    last_error,
)
from hgad_edge.runtime.app import AppError, ServerLostError, run_app
from hgad_edge.runtime.backends import AUTO_ORDER, BACKENDS, LOCAL_BACKENDS, PRECISIONS, REGISTRY, input_specs
from hgad_edge.runtime.backends import tensorrt_backend as trtb
from hgad_edge.runtime.backends.onnxruntime_backend import OnnxRuntimeRunner
from hgad_edge.runtime.sources import FrameSource, SourceError, parse_source
from hgad_edge.threshold_calibration import read_bundle_metadata, write_bundle_metadata
from tests.helpers import (
    BGR,
    CLASSES,
    NOT_IN_BASE_INSTALL,
    SCALES,
    THRESHOLDS,
    FakeCudart,
    FakePyCuda,
    FakeTrtModule,
    H,
    W,
    fake_camera,
    make_bundle,
    read_jsonl,
    reference,
    rng_frames,
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture
def handle(bundle):
    status, h = create(bundle, backend="onnxruntime", max_batch=4)
    assert status == Status.OK, last_error()
    yield h
    destroy(h)


def expected_decision(score, class_pred, thresholds=THRESHOLDS, scales=SCALES):
    """score_normalized and the FAIL flag as the docs define them, written out independently."""
    thr, scale = np.asarray(thresholds)[class_pred], np.asarray(scales)[class_pred]
    return 1.0 / (1.0 + np.exp(-(score.astype(np.float64) - thr) / scale)), score >= thr


# ---- C-style API: status codes -------------------------------------------------------------------
def test_missing_bundle_is_bundle_not_found(tmp_path):
    status, h = create(tmp_path / "nope")
    assert status == Status.BUNDLE_NOT_FOUND and h is None
    assert "hgad-edge export" in last_error()
    status, _ = create(tmp_path)  # a folder without metadata.json
    assert status == Status.BUNDLE_NOT_FOUND and "metadata.json" in last_error()


@pytest.mark.parametrize(
    "override",
    [
        {"format_version": 2},
        {"package_version": "1.0.0"},
        {"format": "something-else"},
        {"thresholds": [0.1]},
        {"scales": [0.1, 0.0]},
        {"scales": None},
        {"thresholds": [0.1, float("nan")]},
    ],
)
def test_incompatible_metadata_is_bundle_incompatible(tmp_path, override):
    folder = make_bundle(tmp_path / "b", **override)
    status, h = create(folder, backend="onnxruntime")
    assert status == Status.BUNDLE_INCOMPATIBLE and h is None
    assert "hgad-edge export" in last_error()


def test_invalid_handle_after_destroy(bundle):
    status, h = create(bundle, backend="onnxruntime")
    assert status == Status.OK
    assert destroy(h) == Status.OK
    status, result = infer(h, rng_frames(1)[0])
    assert status == Status.INVALID_HANDLE and result is None
    assert "create()" in last_error(h)
    assert destroy(h) == Status.INVALID_HANDLE
    assert infer(12345, rng_frames(1)[0])[0] == Status.INVALID_HANDLE


@pytest.mark.parametrize(
    "frames, words",
    [
        (np.zeros((H, W, 3), np.float32), "uint8"),
        (np.zeros((H, W), np.uint8), "HxWx3"),
        (np.zeros((H, W, 4), np.uint8), "HxWx3"),
        (np.zeros((1, 1, H, W, 3), np.uint8), "shape"),
        ([], "empty"),
        ("frame.png", "numpy"),
        (np.zeros((0, W, 3), np.uint8), "empty"),
    ],
)
def test_bad_frames_are_invalid_argument(handle, frames, words):
    status, result = infer(handle, frames)
    assert status == Status.INVALID_ARGUMENT and result is None
    assert words in last_error(handle)
    assert infer(handle, rng_frames(1)[0])[0] == Status.OK  # the handle stays usable


@pytest.mark.parametrize(
    "class_id, words", [("zebra", "['a', 'b']"), (2, "out of range"), (["a"] * 3, "one per frame"), (1.5, "int")]
)
def test_bad_class_is_invalid_argument(handle, class_id, words):
    status, _ = infer(handle, rng_frames(2), class_id)
    assert status == Status.INVALID_ARGUMENT
    assert words in last_error(handle)


@pytest.mark.parametrize("kwargs", [{"backend": "cuda"}, {"precision": "int8"}, {"max_batch": 0}, {"device": -1}])
def test_bad_create_arguments(bundle, kwargs):
    status, h = create(bundle, **kwargs)
    assert status == Status.INVALID_ARGUMENT and h is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"backend": "cuda"},
        {"precision": "fp8"},
        {"max_batch": 0},
        {"max_batch": 2.0},
        {"device": -1},
        {"device": True},
        {"thresholds": ["a", 1.0]},
    ],
)
def test_runtime_options_refuse_what_create_refuses(bundle, kwargs):
    """One set of checks: RuntimeOptions (what the CLI builds once) raises the message create() returns."""
    status, h = create(bundle, **kwargs)
    assert status == Status.INVALID_ARGUMENT and h is None
    with pytest.raises(InvalidArgumentError) as err:
        RuntimeOptions(**kwargs)
    assert str(err.value) == last_error()


def test_options_built_once_run_like_create_keywords(bundle):
    """create_with_options / Detector.from_options take a RuntimeOptions; the keyword forms build the same."""
    overrides = {"a": 0.5}
    options = RuntimeOptions(backend="onnxruntime", max_batch=2, thresholds=overrides)
    overrides["a"] = 9.0  # the options keep their own copy
    status, h = create_with_options(bundle, options)
    assert status == Status.OK, last_error()
    with Detector.from_options(bundle, options) as det, Detector(
        bundle, backend="onnxruntime", max_batch=2, thresholds={"a": 0.5}
    ) as same:
        assert det.info == same.info == api.info(h)[1] and det.info["max_batch"] == 2
        assert det.info["thresholds"][0] == 0.5
    assert destroy(h) == Status.OK
    assert create_with_options(bundle, {"backend": "onnxruntime"}) == (Status.INVALID_ARGUMENT, None)
    assert "RuntimeOptions" in last_error()


def test_missing_precision_names_choices(bundle):
    status, h = create(bundle, backend="onnxruntime", precision="fp16")
    assert status == Status.BUNDLE_INCOMPATIBLE and h is None
    assert "no fp16 model" in last_error() and "'fp32'" in last_error()


def test_forgotten_detector_releases_its_handle(bundle):
    det = Detector(bundle)
    handle_id = det._handle  # no public accessor: a Detector owns its handle
    assert api.info(handle_id)[0] == Status.OK
    del det
    gc.collect()
    assert api.info(handle_id)[0] == Status.INVALID_HANDLE


def test_too_many_frames_for_max_batch(handle):
    status, _ = infer(handle, rng_frames(5))
    assert status == Status.INVALID_ARGUMENT and "max_batch" in last_error(handle)


# ---- ONNX Runtime backend ------------------------------------------------------------------------
def test_outputs_equal_direct_onnxruntime(bundle, handle):
    frames = rng_frames(3, seed=1)
    status, result = infer(handle, frames, [0, "b", "auto"])
    assert status == Status.OK
    ref = reference(bundle, np.stack(frames), [0, 1, -1])
    for got, want in zip((result.anomaly_map, result.score, result.class_pred), ref):
        np.testing.assert_array_equal(got, want)
    assert result.class_names == ["a", "b", "a"]
    normalized, anomalous = expected_decision(ref[1], ref[2])
    np.testing.assert_allclose(result.score_normalized, normalized, rtol=1e-6)
    np.testing.assert_array_equal(result.anomalous, anomalous)
    assert set(result.latency_ms) == {"preprocess", "model", "total"}


def test_frames_of_any_size_are_resized_like_training(bundle, handle):
    frames = rng_frames(1, (100, 80), seed=2) + rng_frames(1, (9, 300), seed=3) + rng_frames(1, (H, W), seed=4)
    status, result = infer(handle, frames, "b")
    assert status == Status.OK and result.anomaly_map.shape == (3, H, W)
    resized = np.stack([resize_image(f, (H, W)) for f in frames])
    np.testing.assert_array_equal(result.anomaly_map, reference(bundle, resized, [1, 1, 1])[0])


def test_single_frame_and_batch_array(handle):
    frame = rng_frames(1, seed=5)[0]
    status, one = infer(handle, frame, 1)
    assert status == Status.OK and one.score.shape == (1,)
    one = one.copy()
    status, batch = infer(handle, np.stack([frame, frame]), 1)
    assert status == Status.OK and len(batch) == 2
    np.testing.assert_array_equal(batch.score, [one.score[0]] * 2)


def test_buffers_are_planned_once_and_reused(handle):
    state = api._handles[handle]
    runner = state.runner
    assert isinstance(runner, OnnxRuntimeRunner) and runner.use_io_binding
    ids = {name: id(buf) for name, buf in {**runner.inputs, **runner.outputs}.items()}
    pointers = {name: buf.ctypes.data for name, buf in {**runner.inputs, **runner.outputs}.items()}
    for n in (1, 3, 1, 2):
        status, result = infer(handle, rng_frames(n, seed=n))
        assert status == Status.OK
        assert {name: id(buf) for name, buf in {**runner.inputs, **runner.outputs}.items()} == ids
        assert {name: buf.ctypes.data for name, buf in {**runner.inputs, **runner.outputs}.items()} == pointers
        assert not np.shares_memory(result.anomaly_map, runner.outputs["anomaly_map"])  # results are the caller's
    assert set(runner._bindings) == {1, 2, 3}  # one IOBinding per batch size, bound once


def test_run_and_copy_fallback_gives_same_outputs(bundle, monkeypatch):
    frames = rng_frames(2, seed=7)
    with Detector(bundle, backend="onnxruntime") as det:
        bound = det.infer(frames)
    monkeypatch.setattr(OnnxRuntimeRunner, "_try_io_binding", lambda self, ref: False)
    with Detector(bundle, backend="onnxruntime") as det:
        assert "run+copy" in det.info["description"]
        copied = det.infer(frames)
    np.testing.assert_array_equal(bound.anomaly_map, copied.anomaly_map)


def test_detector_raises_with_status(bundle, tmp_path):
    with pytest.raises(BundleError) as info:
        Detector(tmp_path / "missing")
    assert info.value.status == Status.BUNDLE_NOT_FOUND
    with Detector(bundle) as det:
        assert det.classes == list(CLASSES) and det.input_size == (H, W)
        assert det.backend == "onnxruntime"  # "auto" without TensorRT here
        first = det.infer(rng_frames(1, seed=8)[0], "a")
        det.infer(rng_frames(1, seed=9)[0], "a")
        assert not np.shares_memory(first.score, det.infer(rng_frames(1)[0]).score)  # copies by default
        with pytest.raises(InvalidArgumentError, match="unknown class"):
            det.infer(rng_frames(1)[0], "zebra")
    with pytest.raises(InvalidHandleError):
        det.infer(rng_frames(1)[0])


# ---- TensorRT: engine choice (pure) --------------------------------------------------------------
def engine_meta(**entries) -> dict:
    models = {"fp32": {"file": "m32.onnx", "sha256": "s32"}, "fp16": {"file": "m16.onnx", "sha256": "s16"}}
    base = {
        "precision": "fp16",
        "trt_version": "10.7.0",
        "compute_capability": "8.7",
        "onnx_sha256": "s16",
        "batch": [1, 4, 8],
    }
    return {"models": models, "engines": {name: {**base, **entry} for name, entry in entries.items()}}


def test_choose_engine_picks_matching_engine():
    meta = engine_meta(**{"x_fp16.engine": {}, "x_fp32.engine": {"precision": "fp32", "onnx_sha256": "s32"}})
    assert trtb.choose_engine(meta, "10.7.0.23", "8.7", "auto") == "x_fp16.engine"
    assert trtb.choose_engine(meta, "10.7.0.23", (8, 7), "fp32") == "x_fp32.engine"
    assert trtb.choose_engine(meta, "10.7.0", "87", "fp16", max_batch=8) == "x_fp16.engine"


@pytest.mark.parametrize(
    "entry, runtime, cc, words",
    [
        ({}, "10.8.0.1", "8.7", "TensorRT 10.7.0"),
        ({}, "10.7.0", "8.9", "compute capability"),
        ({"onnx_sha256": "old"}, "10.7.0", "8.7", "another ONNX model"),
        ({"batch": [1, 1, 1]}, "10.7.0", "8.7", "max_batch<=1"),
    ],
)
def test_choose_engine_detects_stale_engines(entry, runtime, cc, words):
    meta = engine_meta(**{"x.engine": entry})
    with pytest.raises(EngineError) as info:
        trtb.choose_engine(meta, runtime, cc, "fp16", max_batch=4, bundle="bundles/parts")
    assert info.value.status == Status.ENGINE_STALE
    assert words in str(info.value) and "hgad-edge build bundles/parts --precision fp16" in str(info.value)


def test_choose_engine_without_engines_and_version_compatible():
    with pytest.raises(EngineError) as info:
        trtb.choose_engine(engine_meta(), "10.7.0", "8.7", "auto", bundle="b")
    assert info.value.status == Status.ENGINE_NOT_FOUND and "hgad-edge build b --precision fp16" in str(info.value)
    meta = engine_meta(**{"vc.engine": {"version_compatible": True}})
    assert trtb.choose_engine(meta, "10.9.1", "8.7") == "vc.engine"  # newer 10.x runs a version-compatible plan
    with pytest.raises(EngineError):
        trtb.choose_engine(meta, "11.0.0", "8.7")


# ---- TensorRT runner against fakes of tensorrt + cuda-python --------------------------------------
def _device_array(ptr: int, dtype, shape) -> np.ndarray:
    dtype = np.dtype(dtype)
    raw = (ctypes.c_uint8 * (int(np.prod(shape)) * dtype.itemsize)).from_address(ptr)
    return np.frombuffer(raw, dtype).reshape(shape)


class FakeTrt(FakeTrtModule):
    """The TensorRT 10/11 tensor API subset the runner may use; the 'engine file' is the ONNX model."""

    __version__ = "10.7.0.23"
    TensorIOMode = enum.Enum("TensorIOMode", "NONE INPUT OUTPUT")

    def __init__(self, cudart: FakeCudart, version: str = "10.7.0.23") -> None:
        self.cudart = cudart
        self.__version__ = version
        self.host_code = None
        self.runtimes = 0
        self.calls: list[str] = []
        trt = self

        class Runtime:
            engine_host_code_allowed = False

            def __init__(self, logger) -> None:
                trt.runtimes += 1
                assert trt.cudart.devices, "a TensorRT object was built without a CUDA device"

            def deserialize_cuda_engine(self, data):
                trt.host_code = self.engine_host_code_allowed
                return FakeEngine(trt, data)

        self.Runtime = Runtime


TENSORS = {  # name: (is_input, dtype name, per-sample shape)
    "images": (True, "UINT8", (H, W, 3)),
    "class_id": (True, "INT64", ()),
    "anomaly_map": (False, "FLOAT", (H, W)),
    "score": (False, "FLOAT", ()),
    "class_pred": (False, "INT64", ()),
}
NP = {"UINT8": np.uint8, "INT64": np.int64, "FLOAT": np.float32}


class FakeEngine:
    def __init__(self, trt: FakeTrt, data: bytes) -> None:
        self.trt, self.session = trt, ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        self.num_io_tensors = len(TENSORS)

    def get_tensor_name(self, index):
        return list(TENSORS)[index]

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.INPUT if TENSORS[name][0] else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self.trt.DataType[TENSORS[name][1]]

    def get_tensor_profile_shape(self, name, profile):
        assert TENSORS[name][0] and profile == 0
        return tuple((b, *TENSORS[name][2]) for b in (1, 4, 8))

    def create_execution_context(self):
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self.batch, self.addresses = engine, None, {}

    def set_input_shape(self, name, shape):
        self.engine.trt.calls.append("set_input_shape")
        assert tuple(shape[1:]) == TENSORS[name][2]
        self.batch = shape[0]
        return 1 <= shape[0] <= 8

    def get_tensor_shape(self, name):
        return (self.batch, *TENSORS[name][2])

    def set_tensor_address(self, name, ptr):
        assert ptr in self.engine.trt.cudart.blocks and ptr not in self.engine.trt.cudart.pinned  # device memory only
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream_handle):
        assert stream_handle == 7 and set(self.addresses) == set(TENSORS)
        self.engine.trt.calls.append("execute_async_v3")
        arrays = {n: _device_array(self.addresses[n], NP[t], (self.batch, *s)) for n, (_, t, s) in TENSORS.items()}
        outs = self.engine.session.run(None, {"images": arrays["images"], "class_id": arrays["class_id"]})
        for name, value in zip(("anomaly_map", "score", "class_pred"), outs):
            arrays[name][...] = value
        return True


def bundle_with_engine(tmp_path: Path, name: str = "tiny_fp32.engine", **entry) -> Path:
    folder = make_bundle(tmp_path / "trt")
    sha = json.loads((folder / "metadata.json").read_text())["models"]["fp32"]["sha256"]
    plan = (folder / "model_fp32.onnx").read_bytes()  # the fake's "engine" is the ONNX model
    engine = {
        "precision": "fp32",
        "trt_version": "10.7.0",
        "compute_capability": "8.7",
        "onnx_sha256": sha,
        "batch": [1, 4, 8],
        "sha256": hashlib.sha256(plan).hexdigest(),
        **entry,
    }
    (folder / "engines").mkdir()
    (folder / "engines" / "tiny_fp32.engine").write_bytes(plan)
    return make_bundle(folder, engines={name: engine})


def install_fakes(monkeypatch, trt, cuda, target: str = "tensorrt") -> None:
    """Fake `target` runtime module (other targets: not installed) and a fake CUDA adapter."""

    def import_runtime(name):
        if name != target:
            raise BackendUnavailableError(f"{name} is not installed (test)")
        return trt

    monkeypatch.setattr(trtb, "import_runtime", import_runtime)
    monkeypatch.setattr(trtb, "import_cuda", lambda: cuda)


@pytest.fixture
def fake_tensorrt(monkeypatch):
    cudart = FakeCudart()
    trt = FakeTrt(cudart)
    install_fakes(monkeypatch, trt, cuda_api.CudaPython(cudart))
    return trt


def test_tensorrt_runner_protocol_with_fakes(tmp_path, fake_tensorrt):
    folder = bundle_with_engine(tmp_path)
    status, h = create(folder, backend="auto", max_batch=4)
    assert status == Status.OK, last_error()
    runner = api._handles[h].runner
    assert runner.name == "tensorrt" and runner.inputs["images"].ctypes.data in fake_tensorrt.cudart.pinned
    frames = rng_frames(3, (50, 70), seed=11)
    status, result = infer(h, frames, [1, "auto", "a"])
    assert status == Status.OK, last_error(h)
    ref = reference(folder, np.stack([resize_image(f, (H, W)) for f in frames]), [1, -1, 0])
    np.testing.assert_array_equal(result.anomaly_map, ref[0])
    np.testing.assert_array_equal(result.class_pred, ref[2])
    copies = fake_tensorrt.cudart.copies
    assert ("cudaMemcpyHostToDevice", 3 * H * W * 3) in copies and ("cudaMemcpyDeviceToHost", 3 * H * W * 4) in copies
    assert infer(h, frames[:1])[0] == Status.OK
    view = runner.infer(3)["anomaly_map"]  # a runner's results view its pinned output buffer
    assert view.ctypes.data in fake_tensorrt.cudart.pinned
    del runner
    assert destroy(h) == Status.OK
    # after destroy the pinned buffer stays alive (never dangling) until its last view is dropped
    assert fake_tensorrt.cudart.blocks and view.ctypes.data in fake_tensorrt.cudart.pinned
    np.testing.assert_array_equal(view, ref[0])
    del view, result
    gc.collect()
    assert not fake_tensorrt.cudart.blocks  # every cudaMalloc / cudaMallocHost was freed


def test_tensorrt_threshold_path_after_recalibration(tmp_path, fake_tensorrt):
    """New thresholds in metadata.json (what `calibrate` writes) apply to the same engine, unrebuilt;
    a create() override applies on top, for that handle only."""
    folder = bundle_with_engine(tmp_path)
    engine_bytes = (folder / "engines" / "tiny_fp32.engine").read_bytes()
    frames = rng_frames(4, seed=21)
    ref = reference(folder, np.stack(frames), [0, 1, 0, 1])
    new_thr = [float(ref[1][0]), float(ref[1][1]) + 1e-3]  # image 0 exactly at its threshold, image 1 just below
    # written as `calibrate` writes it: through the schema, with the record that lets it differ from the ONNX copy
    recalibrated = read_bundle_metadata(folder).with_calibration(new_thr, [0.05, 0.5], {"policy": "max"})
    write_bundle_metadata(folder, recalibrated)
    for overrides, thr in ((None, new_thr), ({"b": 0.0}, [new_thr[0], 0.0])):
        status, h = create(folder, backend="tensorrt", max_batch=4, thresholds=overrides)
        assert status == Status.OK, last_error()
        assert api.info(h)[1]["backend"] == "tensorrt"
        status, result = infer(h, frames, [0, 1, 0, 1])
        assert status == Status.OK, last_error(h)
        normalized, anomalous = expected_decision(ref[1], ref[2], thr, [0.05, 0.5])
        np.testing.assert_allclose(result.score_normalized, normalized, rtol=1e-6)
        np.testing.assert_array_equal(result.anomalous, anomalous)
        assert bool(result.anomalous[0]) and bool(result.anomalous[1]) == (overrides is not None)
        assert api.info(h)[1]["thresholds"] == thr and api.info(h)[1]["bundle_thresholds"] == new_thr
        assert destroy(h) == Status.OK
    assert (folder / "engines" / "tiny_fp32.engine").read_bytes() == engine_bytes


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"nope": 1.0}, "unknown class 'nope'"),
        ({"a": float("nan")}, "finite"),
        ({"a": "high"}, "finite"),
        (["a", 1.0], "dict"),
    ],
)
def test_bad_threshold_override(bundle, overrides, words):
    status, h = create(bundle, backend="onnxruntime", thresholds=overrides)
    assert status == Status.INVALID_ARGUMENT and h is None and words in last_error()


def test_a_tiled_bundle_takes_any_engine_and_caps_the_batch_to_its_profile(tmp_path, fake_tensorrt, monkeypatch):
    """Untiled, max_batch must fit the engine's profile; tiled, the runtime sends tiles in chunks, so the
    engine is used and the runner takes at most what its profile does (build --frame sizes it)."""
    bundle = load_bundle(bundle_with_engine(tmp_path, batch=[1, 2, 2]))
    specs = input_specs(bundle)
    with pytest.raises(EngineError, match="batch <= 2"):
        trtb.load_tensorrt_runner(bundle, specs, list(OUTPUT_NAMES), max_batch=4)
    monkeypatch.setattr(type(bundle), "tiling", property(lambda self: Tiling(64)))
    runner = trtb.load_tensorrt_runner(bundle, specs, list(OUTPUT_NAMES), max_batch=4)
    assert runner.max_batch == 2
    assert trtb.load_tensorrt_runner(bundle, specs, list(OUTPUT_NAMES), max_batch=1).max_batch == 1


def test_tensorrt_checks_device_before_any_tensorrt_object(tmp_path, fake_tensorrt):
    fake_tensorrt.cudart.devices = 0
    folder = bundle_with_engine(tmp_path)
    status, h = create(folder, backend="tensorrt")
    assert status == Status.NO_DEVICE and "onnxruntime" in last_error()
    assert fake_tensorrt.runtimes == 0
    status, h = create(folder, backend="auto")  # auto falls back to onnxruntime
    assert status == Status.OK and api.info(h)[1]["backend"] == "onnxruntime"
    destroy(h)


def test_tensorrt_stale_engine_is_reported(tmp_path, fake_tensorrt):
    folder = bundle_with_engine(tmp_path, compute_capability="7.2")
    status, _ = create(folder, backend="tensorrt")
    assert status == Status.ENGINE_STALE
    assert "hgad-edge build" in last_error() and "compute capability 7.2" in last_error()
    assert fake_tensorrt.runtimes == 0


def test_pycuda_runs_the_same_buffer_plan_when_cuda_python_is_missing(tmp_path, monkeypatch):
    """Only pycuda installed: the same runner (pinned host + device buffers, one stream) on its driver API."""
    driver = FakePyCuda(cc=(8, 7))

    def no_cuda_python():
        raise BackendUnavailableError("cuda-python is not installed (test)")

    monkeypatch.setattr(cuda_api, "import_cudart", no_cuda_python)
    monkeypatch.setattr(cuda_api, "import_pycuda", lambda: driver)
    cuda = cuda_api.import_cuda()
    assert isinstance(cuda, cuda_api.PyCuda)
    trt = FakeTrt(driver)
    install_fakes(monkeypatch, trt, cuda)
    folder = bundle_with_engine(tmp_path)
    status, h = create(folder, backend="tensorrt", max_batch=4)
    assert status == Status.OK, last_error()
    assert "pycuda" in api.info(h)[1]["description"] and driver.context_stack == [0]
    frames = rng_frames(2, seed=5)
    status, result = infer(h, frames, [0, 1])
    assert status == Status.OK, last_error(h)
    ref = reference(folder, np.stack(frames), [0, 1])
    np.testing.assert_array_equal(result.anomaly_map, ref[0])
    assert ("htod", 2 * H * W * 3) in driver.copies and ("dtoh", 2 * H * W * 4) in driver.copies
    assert destroy(h) == Status.OK
    assert driver.context_stack == [] and not driver.blocks  # context popped, device memory freed
    np.testing.assert_array_equal(result.score, ref[1])


def test_pycuda_without_a_device_is_no_device():
    cuda = cuda_api.PyCuda(FakePyCuda(devices=0))
    with pytest.raises(BackendUnavailableError) as err:
        trtb.require_device(cuda, 0)
    assert err.value.status == Status.NO_DEVICE and "no CUDA-capable device" in str(err.value)


def test_version_compatible_engine_needs_the_explicit_flag(tmp_path, fake_tensorrt):
    folder = bundle_with_engine(tmp_path, version_compatible=True)
    status, _ = create(folder, backend="tensorrt")
    assert status == Status.ENGINE_STALE and "allow_engine_host_code=True" in last_error()
    assert fake_tensorrt.runtimes == 0  # refused before any TensorRT object
    status, h = create(folder, backend="tensorrt", allow_engine_host_code=True)
    assert status == Status.OK, last_error()
    assert fake_tensorrt.host_code is True
    destroy(h)
    plain = bundle_with_engine(tmp_path / "plain")
    status, h = create(plain, backend="tensorrt", allow_engine_host_code=True)  # the flag alone never enables host code
    assert status == Status.OK, last_error()
    assert fake_tensorrt.host_code is False
    destroy(h)


@pytest.mark.parametrize("name", ["../model_fp32.onnx", "/etc/passwd", "sub/x.engine", "..", ""])
def test_engine_names_must_be_bare_files_in_engines(tmp_path, fake_tensorrt, name):
    folder = bundle_with_engine(tmp_path, name=name)
    status, _ = create(folder, backend="tensorrt")
    assert status == Status.BUNDLE_INCOMPATIBLE and "engine" in last_error()
    assert fake_tensorrt.runtimes == 0


def test_engine_symlink_out_of_the_bundle_is_refused(tmp_path, fake_tensorrt):
    folder = bundle_with_engine(tmp_path)
    outside = tmp_path / "elsewhere.engine"
    outside.write_bytes((folder / "engines" / "tiny_fp32.engine").read_bytes())
    (folder / "engines" / "tiny_fp32.engine").unlink()
    (folder / "engines" / "tiny_fp32.engine").symlink_to(outside)
    status, _ = create(folder, backend="tensorrt")
    assert status == Status.BUNDLE_INCOMPATIBLE and "outside the bundle" in last_error()


@pytest.mark.parametrize("tamper, words", [("bytes", "does not match the sha256"), ("no-sha", "records no sha256")])
def test_engine_sha256_is_checked_before_deserialising(tmp_path, fake_tensorrt, tamper, words):
    folder = bundle_with_engine(tmp_path)
    if tamper == "bytes":
        with open(folder / "engines" / "tiny_fp32.engine", "ab") as fh:
            fh.write(b"\0")
    else:
        meta = json.loads((folder / "metadata.json").read_text())
        del meta["engines"]["tiny_fp32.engine"]["sha256"]
        (folder / "metadata.json").write_text(json.dumps(meta))
    status, _ = create(folder, backend="tensorrt")
    assert status == Status.ENGINE_STALE and words in last_error() and "hgad-edge build" in last_error()
    assert fake_tensorrt.runtimes == 0


def test_rtx_engine_runs_through_the_same_backend(tmp_path, monkeypatch):
    """A TensorRT-RTX entry (a list of compute capabilities) loads with the rtx module, same runner."""
    cudart = FakeCudart(cc=(8, 9))
    trt = FakeTrt(cudart, version="1.7.1.116")
    install_fakes(monkeypatch, trt, cuda_api.CudaPython(cudart), target="rtx")
    gpus = ["8.6", "8.9"]
    entry = {"target": "rtx", "trt_version": "1.7.1.116", "compute_capability": None, "compute_capabilities": gpus}
    folder = bundle_with_engine(tmp_path, **entry)
    status, h = create(folder, backend="auto", max_batch=4)
    assert status == Status.OK, last_error()
    assert api.info(h)[1]["description"].startswith("TensorRT-RTX 1.7.1.116 engine")
    assert infer(h, rng_frames(1))[0] == Status.OK
    destroy(h)
    cudart.cc = (9, 0)  # Hopper: not an RTX target
    status, _ = create(folder, backend="tensorrt")
    assert status == Status.ENGINE_STALE and "compute capabilities 8.6, 8.9, this GPU is 9.0" in last_error()
    assert "--target rtx" in last_error()


def test_tensorrt_backend_unavailable_here(bundle):
    if _cuda_device_count() > 0:
        pytest.skip("a CUDA device is present; this checks the error on machines without one")
    status, h = create(bundle, backend="tensorrt")
    assert status in (Status.BACKEND_UNAVAILABLE, Status.NO_DEVICE) and h is None
    assert "onnxruntime" in last_error()


@pytest.mark.parametrize("backend", list(REGISTRY))
def test_registered_backend_runs_or_says_why(bundle, backend):
    """Each registered backend, asked for by name, either runs the bundle or refuses with a status
    and a message (never a traceback, never another backend in its place)."""
    status, h = create(bundle, backend=backend)
    if status == Status.OK:
        assert api.info(h)[1]["backend"] == backend
        assert infer(h, rng_frames(1, (H, W)))[0] == Status.OK
        assert destroy(h) == Status.OK
    else:
        assert h is None and last_error()
    assert set(AUTO_ORDER) <= set(REGISTRY) and BACKENDS == ("auto", *REGISTRY)
    assert set(REGISTRY[backend].precisions) <= set(PRECISIONS)


def test_remote_backends_take_a_url_and_local_ones_a_bundle(bundle):
    """A remote entry (connect, no factory) is asked for with a server URL; the CLI offers it to `run`
    and not to `serve` (which serves a bundle locally); each wrong pairing names the fix."""
    from hgad_edge.cli import main

    remote = [name for name, entry in REGISTRY.items() if entry.factory is None]
    assert remote and all(REGISTRY[name].connect is not None for name in remote)
    assert LOCAL_BACKENDS == ("auto", *(name for name in REGISTRY if name not in remote))
    for name in remote:
        status, h = create(bundle, backend=name)
        assert status == Status.INVALID_ARGUMENT and h is None and "grpc://host:8001" in last_error()
    for name in LOCAL_BACKENDS[1:]:
        status, h = create("grpc://127.0.0.1:9/hgad", backend=name)
        assert status == Status.INVALID_ARGUMENT and h is None and f"backend={remote[0]!r}" in last_error()
    choices = {
        cmd: next(p.type.choices for p in main.commands[cmd].params if p.name == "backend") for cmd in ("run", "serve")
    }
    assert tuple(choices["run"]) == BACKENDS and tuple(choices["serve"]) == LOCAL_BACKENDS


def _cuda_device_count() -> int:
    try:
        return cuda_api.import_cuda().device_count()[0]
    except Exception:
        return 0


@pytest.mark.tensorrt
def test_real_tensorrt_engine_matches_onnxruntime(tmp_path):
    """Builds an engine from the tiny model with real TensorRT; needs TensorRT and a CUDA device."""
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    if _cuda_device_count() == 0:
        pytest.skip("no CUDA device")
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    folder = bundle_with_engine(tmp_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse((folder / "model_fp32.onnx").read_bytes())
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("images", (1, H, W, 3), (4, H, W, 3), (8, H, W, 3))
    profile.set_shape("class_id", (1,), (4,), (8,))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None
    (folder / "engines" / "tiny_fp32.engine").write_bytes(bytes(plan))
    cc = cuda_api.import_cuda().compute_capability(0)
    meta = json.loads((folder / "metadata.json").read_text())
    sha = hashlib.sha256(bytes(plan)).hexdigest()
    meta["engines"]["tiny_fp32.engine"].update(trt_version=trt.__version__, compute_capability=cc, sha256=sha)
    (folder / "metadata.json").write_text(json.dumps(meta))
    status, h = create(folder, backend="tensorrt", max_batch=8)
    assert status == Status.OK, last_error()
    frames = rng_frames(5, seed=12)
    status, result = infer(h, frames, [0, 1, -1, 0, 1])
    assert status == Status.OK, last_error(h)
    ref = reference(folder, np.stack(frames), [0, 1, -1, 0, 1])
    np.testing.assert_allclose(result.anomaly_map, ref[0], atol=1e-5)
    np.testing.assert_allclose(result.score, ref[1], atol=1e-5)
    np.testing.assert_array_equal(result.class_pred, ref[2])
    assert destroy(h) == Status.OK


# ---- torch-free import ---------------------------------------------------------------------------
def test_runtime_runs_with_torch_unimportable(bundle):
    code = f"""
import sys
for name in {NOT_IN_BASE_INSTALL!r}:
    sys.modules[name] = None
import numpy as np
import hgad_edge.runtime, hgad_edge.runtime.api, hgad_edge.runtime.app, hgad_edge.runtime.sources
import hgad_edge.runtime.backends.tensorrt_backend, hgad_edge.cli, hgad_edge.core.overlay
status, h = hgad_edge.runtime.create({str(bundle)!r}, backend="auto")
assert status == 0, hgad_edge.runtime.last_error()
status, result = hgad_edge.runtime.infer(h, np.zeros((20, 30, 3), np.uint8), "b")
assert status == 0 and result.anomaly_map.shape == (1, {H}, {W}), hgad_edge.runtime.last_error(h)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {NOT_IN_BASE_INSTALL!r} and sys.modules[m] is not None)
assert not loaded, loaded
print("torch-free ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "torch-free ok" in done.stdout


# ---- sources -------------------------------------------------------------------------------------
def test_parse_source_names(tmp_path):
    assert parse_source(0).uri == "v4l2:///dev/video0" and parse_source(0).label == "camera 0"
    assert parse_source("--camera 1").target == 1
    assert parse_source("v4l2:///dev/video2").target == 2
    csi = parse_source("csi://0")
    assert csi.kind == "csi" and "nvarguscamerasrc sensor-id=0" in csi.target and csi.api == cv2.CAP_GSTREAMER
    rtsp = parse_source("rtsp://user:secret@10.0.0.5/stream1")
    assert rtsp.kind == "stream" and "secret" not in rtsp.uri and "secret" in rtsp.target
    (tmp_path / "clip.mp4").write_bytes(b"x")
    assert parse_source(str(tmp_path / "clip.mp4")).kind == "video"
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((4, 4, 3), np.uint8))
    assert len(parse_source(str(tmp_path)).paths) == 1
    assert len(parse_source(str(tmp_path / "*.png")).paths) == 1
    with pytest.raises(SourceError, match="camera index"):
        parse_source(str(tmp_path / "missing.mp4"))
    if re.search(r"GStreamer:\s*NO", cv2.getBuildInformation()):
        with pytest.raises(SourceError, match="GStreamer"):
            FrameSource(csi)


def test_unopenable_camera_fails_after_bounded_attempts():
    factory = fake_camera(None)
    source = FrameSource(parse_source(0), reconnect_attempts=2, backoff_s=0.001, capture_factory=factory)
    with pytest.raises(SourceError) as info:
        list(source)
    assert len(factory.calls) == 3
    assert "cannot open camera 0 (v4l2:///dev/video0) after 3 attempts" in str(info.value)
    assert "cable" in str(info.value)


def test_mid_stream_drop_reconnects_and_skips_broken_frames():
    factory = fake_camera([BGR, None, BGR, "drop"], [BGR, BGR, "drop"], None)
    source = FrameSource(parse_source("rtsp://cam/1"), reconnect_attempts=1, backoff_s=0.001, capture_factory=factory)
    frames = []
    with pytest.raises(SourceError, match="lost rtsp://cam/1 and could not reconnect after 2 attempts"):
        for frame in source:
            frames.append(frame)
    assert len(frames) == 4 and source.stats.reconnects == 1 and source.stats.skipped_corrupt == 1
    assert frames[0].image[0, 0].tolist() == [0, 0, 255]  # delivered as RGB
    assert [f.index for f in frames] == [0, 1, 2, 3]


def test_camera_that_opens_but_never_delivers_gives_up():
    factory = fake_camera(["drop"])
    source = FrameSource(parse_source(0), reconnect_attempts=2, backoff_s=0.001, capture_factory=factory)
    with pytest.raises(SourceError, match="opens but delivers no frames"):
        list(source)
    assert len(factory.calls) == 3


def test_live_source_drops_oldest_frames_when_inference_is_slow():
    factory = fake_camera([BGR] * 40, None)
    source = FrameSource(parse_source(0), queue_size=2, reconnect_attempts=0, capture_factory=factory)
    got = []
    with pytest.raises(SourceError):
        for frame in source:
            got.append(frame.index)
            time.sleep(0.01)
    stats = source.stats
    assert stats.dropped > 0 and len(got) + stats.dropped == stats.frames == 40
    assert got == sorted(got) and got[-1] == 39  # the newest frame is never the one dropped


# ---- the app -------------------------------------------------------------------------------------
def write_video(path: Path, n: int) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    assert writer.isOpened()
    for i in range(n):
        writer.write(np.full((48, 64, 3), i * 20, np.uint8))
    writer.release()
    return path


FIELDS = {"frame", "source", "timestamp", "class", "class_id", "score", "score_normalized", "anomalous", "latency_ms"}


def test_app_on_video_file(bundle, tmp_path, capsys):
    video = write_video(tmp_path / "clip.avi", 12)
    out, shots = tmp_path / "out.jsonl", tmp_path / "anomalies"
    seen: list[dict] = []
    summary = run_app(bundle, str(video), headless=True, output_jsonl=out, save_anomalies=shots, on_record=seen.append)
    lines = read_jsonl(out)
    assert len(lines) == 12 == summary["frames"] and all(set(line) == FIELDS for line in lines)
    assert seen == lines  # on_record gets each frame's record as it is written
    assert [line["frame"] for line in lines] == list(range(12))
    assert summary["anomalies"] == sum(line["anomalous"] for line in lines) > 0
    assert len(list(shots.glob("*_overlay.png"))) == len(list(shots.glob("*_raw.png"))) == summary["anomalies"]
    assert summary["dropped_frames"] == 0 and not summary["interrupted"]
    assert "hgad-edge run: 12 frames" in capsys.readouterr().out


def test_app_on_image_folder_with_corrupt_file(bundle, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.png"), np.full((40, 50, 3), i * 100, np.uint8))
    (folder / "3_broken.png").write_bytes((folder / "1.png").read_bytes()[:30])
    out = tmp_path / "out.jsonl"
    summary = run_app(bundle, str(folder), class_name="b", headless=True, output_jsonl=out, max_frames=10)
    lines = read_jsonl(out)
    assert len(lines) == 3 and summary["skipped_corrupt"] == 1
    assert {line["class"] for line in lines} == {"b"} and lines[0]["source"].endswith("0.png")


def test_app_max_frames_and_unknown_class(bundle, tmp_path):
    video = write_video(tmp_path / "clip.avi", 12)
    assert run_app(bundle, str(video), headless=True, max_frames=5, print_summary=False)["frames"] == 5
    with pytest.raises(InvalidArgumentError, match="unknown class"):
        run_app(bundle, str(video), class_name="zebra", headless=True)


def test_app_source_that_cannot_open(bundle):
    factory = fake_camera(None)
    with pytest.raises(SourceError, match="cannot open camera 0 .* after 3 attempts"):
        run_app(bundle, 0, headless=True, reconnect_attempts=2, backoff_s=0.001, capture_factory=factory)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_app_ctrl_c_and_sigterm_return_summary(bundle, capsys, signum):
    def camera():  # endless; the 20th read sends the signal from the capture thread
        for i in itertools.count():
            if i == 20:
                os.kill(os.getpid(), signum)
            yield BGR

    before = signal.getsignal(signal.SIGTERM)
    summary = run_app(bundle, 0, headless=True, capture_factory=fake_camera(camera(), delay=0.002))
    assert summary["interrupted"] and summary["reconnects"] == 0
    assert "(interrupted)" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


def test_app_without_gui_names_headless(bundle):
    if not re.search(r"GUI:\s*NONE", cv2.getBuildInformation()) and os.environ.get("DISPLAY"):
        pytest.skip("this OpenCV can show windows")
    with pytest.raises(AppError, match="--headless"):
        run_app(bundle, 0, headless=False)


def test_app_waits_for_a_lost_server_on_files_and_counts_lost_live_frames(bundle, tmp_path, monkeypatch):
    """A backend that raises BackendUnavailableError (the triton backend while its server is away):
    a file/folder frame is not perishable, it waits (bounded retries) and giving up is a clear error,
    not a crash; a live frame is lost and counted; the outage and the reconnect are counted once each.
    (test_serve.py checks that a real server gone away raises BackendUnavailableError.)"""
    answer = Detector.infer
    unavailable = {"calls": 0}

    def server_away(self, frames, class_id="auto"):
        if unavailable["calls"]:
            unavailable["calls"] -= 1
            raise BackendUnavailableError("the inference server at grpc://127.0.0.1:8001 is unreachable (test)")
        return answer(self, frames, class_id)

    monkeypatch.setattr(Detector, "infer", server_away)
    shots = tmp_path / "shots"
    shots.mkdir()
    cv2.imwrite(str(shots / "000.png"), BGR)
    folder = {"headless": True, "reconnect_attempts": 2, "backoff_s": 0.01, "print_summary": False}
    unavailable["calls"] = 2  # the file frame waits through 2 failures, then is scored
    summary = run_app(bundle, str(shots), **folder)
    assert summary["frames"] == 1
    assert (summary["server_outages"], summary["lost_to_server"], summary["server_reconnects"]) == (1, 0, 1)
    unavailable["calls"] = 3  # one more failure than its 2 retries
    with pytest.raises(ServerLostError, match="gave up on frame 0 after 2 retries"):
        run_app(bundle, str(shots), **folder)
    unavailable["calls"] = 3  # a camera's frames are not waited for
    camera = fake_camera([BGR] * 200, delay=0.002)
    summary = run_app(
        bundle, 0, headless=True, max_frames=2, reconnect_attempts=0, capture_factory=camera, print_summary=False
    )
    assert summary["frames"] == 2 and summary["lost_to_server"] == 3
    assert (summary["server_outages"], summary["server_reconnects"]) == (1, 1)


def test_int8_engines_are_chosen_only_when_asked():
    from hgad_edge.core.errors import EngineError
    from hgad_edge.runtime.backends.tensorrt_backend import choose_engine

    meta = {
        "models": {
            "fp32": {"file": "model_fp32.onnx", "sha256": "a"},
            "fp16": {"file": "model_fp16.onnx", "sha256": "b"},
        },
        "engines": {
            "trt10.7.0_sm87_int8.engine": {
                "precision": "int8",
                "model": "fp32",
                "trt_version": "10.7.0",
                "compute_capability": "8.7",
                "onnx_sha256": "a",
                "batch": [1, 4, 8],
            }
        },
    }
    assert choose_engine(meta, "10.7.0", "8.7", "int8", bundle="b") == "trt10.7.0_sm87_int8.engine"
    with pytest.raises(EngineError, match="--precision fp16"):
        choose_engine(meta, "10.7.0", "8.7", "auto", bundle="b")
    meta["models"]["fp32"]["sha256"] = "changed"  # re-exported: the int8 engine is stale
    with pytest.raises(EngineError, match="hgad-edge quantize b .*then hgad-edge build b --precision int8"):
        choose_engine(meta, "10.7.0", "8.7", "int8", bundle="b")
