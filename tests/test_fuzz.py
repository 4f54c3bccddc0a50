"""Property-based fuzzing (Hypothesis) of what reads untrusted bytes: the bundle loader (mutated
metadata.json, truncated or garbage model files), the image decoder behind folder sources and
calibration (garbage, truncated and bit-flipped PNG/JPEG/BMP/TIFF), the capture-frame conversion and
the runtime's infer/preprocess (odd shapes, dtypes and class ids).

The property everywhere: a documented outcome (a result, or the project's own error: BundleError /
DataError / InvalidArgumentError and their Status codes), never another exception, a crash, a hang
or unbounded memory. What runs native code on fuzzed bytes (OpenCV's decoders, ONNX Runtime on a
corrupted graph) runs in a worker process with a memory limit, so a crash or a hang fails the test
instead of killing pytest. Examples are derandomized (the same in every CI run) and few, so the
module takes seconds; HGAD_EDGE_FUZZ_EXAMPLES=5000 explores more, with fresh random examples.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import select
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hgad_edge.core.bundle import load_bundle
from hgad_edge.core.errors import BundleError, InvalidArgumentError, Status
from hgad_edge.runtime import Detector, api
from hgad_edge.runtime.sources import FrameSource, SourceError, parse_source, to_rgb
from tests.helpers import CLASSES, REPO, fake_camera, make_bundle

EXAMPLES = int(os.environ.get("HGAD_EDGE_FUZZ_EXAMPLES", "0"))


def fuzz(examples: int):
    """Settings of one fuzz test: `examples` derandomized examples (HGAD_EDGE_FUZZ_EXAMPLES: that many, random)."""
    return settings(
        max_examples=EXAMPLES or examples,
        derandomize=not EXAMPLES,
        database=None,
        deadline=None,  # a hang is caught by the worker's timeout; per-example times vary on a loaded machine
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("fuzz") / "bundle")


def _copy_bundle(base: Path, where: Path) -> Path:
    where.mkdir()
    for name in ("metadata.json", "model_fp32.onnx"):
        (where / name).write_bytes((base / name).read_bytes())
    return where


# ---- the worker: native code on fuzzed bytes, in a process of its own ----------------------------------
WORKER = r"""
import json, os, resource, sys, traceback
resource.setrlimit(resource.RLIMIT_DATA, (MEMORY_LIMIT, MEMORY_LIMIT))
replies = os.fdopen(os.dup(1), "w")  # the answers; whatever a library prints goes to stderr instead
os.dup2(2, 1)
import numpy as np
from hgad_edge.core.imaging import DataError, load_image
from hgad_edge.runtime import api
for line in sys.stdin:
    request = json.loads(line)
    try:
        if request["op"] == "decode":
            image = load_image(request["path"])
            reply = {"kind": "ok", "shape": list(image.shape), "dtype": str(image.dtype)}
        else:
            status, handle = api.create(request["bundle"], backend="onnxruntime", max_batch=2)
            reply = {"kind": "create", "status": int(status), "error": api.last_error()}
            if status == api.Status.OK:
                status, result = api.infer(handle, np.zeros((64, 96, 3), np.uint8), 0)
                reply["infer"], reply["error"] = int(status), api.last_error(handle)
                api.destroy(handle)
    except DataError as err:
        reply = {"kind": "DataError", "msg": str(err)}
    except BaseException as err:
        reply = {"kind": "other", "type": type(err).__name__, "msg": traceback.format_exc()[-600:]}
    print(json.dumps(reply), file=replies, flush=True)
"""
WORKER_MEMORY = 1536 << 20  # a decoder that allocates more than this is unbounded: 1 MP frames need ~10 MB
WORKER_PIXELS = "1000000"  # the pixel cap in the worker: a header claiming more is refused unread
WORKER_TIMEOUT_S = 30.0


class Worker:
    """One long-lived process answering JSON requests; `ask` fails the test on a crash or a hang."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "HGAD_EDGE_MAX_IMAGE_PIXELS": WORKER_PIXELS, "OMP_NUM_THREADS": "1"}
        code = WORKER.replace("MEMORY_LIMIT", str(WORKER_MEMORY))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=REPO,
            env=env,
        )

    def ask(self, request: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], WORKER_TIMEOUT_S)
        if not ready:
            self.stop()
            raise AssertionError(f"hang: no answer within {WORKER_TIMEOUT_S} s to {request}")
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait(timeout=10)
            self.proc = None
            raise AssertionError(f"crash: the worker died (exit {code}) on {request}")
        return json.loads(line)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    try:
        yield w
    finally:
        w.stop()


# ---- the bundle loader: mutated metadata.json -------------------------------------------------------------
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=8,
)
DELETE = object()
PATHS = [
    ("format",),
    ("format_version",),
    ("package_version",),
    ("classes",),
    ("input_size",),
    ("thresholds",),
    ("scales",),
    ("normalized_threshold",),
    ("display_range",),
    ("outputs",),
    ("input",),
    ("input", "name"),
    ("class_input",),
    ("models",),
    ("models", "fp32"),
    ("models", "fp32", "file"),
    ("models", "fp32", "sha256"),
    ("models", "fp16"),
    ("models", "int8"),
    ("engines",),
    ("calibration",),
    ("tiling",),
    ("checkpoint_sha256",),
]
NAMES = st.sampled_from(
    ["model_fp32.onnx", "../model_fp32.onnx", "/etc/passwd", "", ".", "a/b", "x" * 300, "n\x00", "\ud800.onnx"]
)
MUTATION = st.tuples(
    st.sampled_from(PATHS), st.one_of(st.just(DELETE), JSON, NAMES, st.sampled_from([[1, 2], [64, 96]]))
)


def _mutate(meta: dict, path: tuple[str, ...], value) -> None:
    node = meta
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, dict):
        return
    if value is DELETE:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value


def _loads_or_bundle_error(folder: Path):
    """load_bundle's result, or None after a BundleError with a Status of the loader and a message."""
    try:
        return load_bundle(folder)
    except BundleError as err:
        assert err.status in (Status.BUNDLE_NOT_FOUND, Status.BUNDLE_INCOMPATIBLE) and str(err)
        return None


@fuzz(150)
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4), cut=st.none() | st.integers(0, 4000))
@example(mutations=[(("models", "fp32", "file"), "x" * 300)], cut=None)  # found: ENAMETOOLONG escaped as OSError
@example(mutations=[(("engines",), {"\ud800.engine": {}})], cut=None)  # a name the file system cannot encode
def test_mutated_metadata_is_loaded_or_refused_with_a_bundle_error(base, mutations, cut):
    meta = json.loads((base / "metadata.json").read_text())
    for path, value in mutations:
        _mutate(meta, path, value if value is DELETE else copy.deepcopy(value))
    text = json.dumps(meta)
    with tempfile.TemporaryDirectory() as tmp:
        folder = _copy_bundle(base, Path(tmp) / "b")
        (folder / "metadata.json").write_text(text if cut is None else text[:cut])
        bundle = _loads_or_bundle_error(folder)
        if bundle is not None:  # whatever loads is what the schema promises
            assert len(bundle.thresholds) == len(bundle.scales) == len(bundle.classes) > 0
            assert all(np.isfinite(bundle.thresholds)) and all(s > 0 for s in bundle.scales)
            status, handle = api.create(folder, backend="onnxruntime")
            assert status in (Status.OK, Status.BUNDLE_INCOMPATIBLE, Status.BUNDLE_NOT_FOUND), api.last_error()
            if status == Status.OK:
                api.destroy(handle)


@fuzz(60)
@given(data=st.binary(max_size=600) | st.sampled_from([b"", b"{", b"[]", b"null", b"\xff\xfe{}", b'"x"']))
def test_garbage_metadata_bytes_are_refused_with_a_bundle_error(base, data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = _copy_bundle(base, Path(tmp) / "b")
        (folder / "metadata.json").write_bytes(data)
        assert _loads_or_bundle_error(folder) is None


# ---- the bundle loader: truncated and garbage model files --------------------------------------------------
MODEL_DAMAGE = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 2000)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1, max_size=6)),
    st.tuples(st.just("garbage"), st.binary(max_size=400)),
)


def _damage(model: bytes, damage) -> bytes:
    kind, arg = damage
    if kind == "truncate":
        return model[: arg % (len(model) + 1)]
    if kind == "garbage":
        return arg
    data = bytearray(model)
    for pos, value in arg:
        data[pos % len(data)] = value
    return bytes(data)


@fuzz(80)
@given(damage=MODEL_DAMAGE, rehash=st.booleans())
@example(damage=("garbage", b"\x02\x80\x80\x80\x80\x80\x80\x04"), rehash=True)  # found: a length past 2**48
@example(damage=("garbage", b"\x72\xff\xff\xff\xff\x0f"), rehash=True)  # metadata_props claiming 4 GB
@example(damage=("flip", [(344, 0)]), rehash=True)  # found: a graph input of 0 channels fails create's warm-up
def test_damaged_model_files_are_refused_or_fail_with_a_status(base, worker, damage, rehash):
    """The sha256 refuses any change; with the sha256 rewritten to match (a tampered bundle), the ONNX
    reader and then ONNX Runtime (in the worker) must still answer with a documented Status."""
    model = _damage((base / "model_fp32.onnx").read_bytes(), damage)
    with tempfile.TemporaryDirectory() as tmp:
        folder = _copy_bundle(base, Path(tmp) / "b")
        (folder / "model_fp32.onnx").write_bytes(model)
        if rehash:
            meta = json.loads((folder / "metadata.json").read_text())
            meta["models"]["fp32"]["sha256"] = hashlib.sha256(model).hexdigest()
            (folder / "metadata.json").write_text(json.dumps(meta))
        bundle = _loads_or_bundle_error(folder)
        changed = model != (base / "model_fp32.onnx").read_bytes()
        assert bundle is None or (rehash or not changed)
        if bundle is not None and changed:
            reply = worker.ask({"op": "create", "bundle": str(folder)})
            assert reply["kind"] == "create", reply
            # create's warm-up batch runs the graph: a tampered one may fail there (INFERENCE_FAILED, with ORT's reason)
            documented = (Status.OK, Status.BUNDLE_INCOMPATIBLE, Status.BUNDLE_NOT_FOUND, Status.INFERENCE_FAILED)
            documented += (Status.BACKEND_UNAVAILABLE,)
            assert reply["status"] in documented and "unexpected" not in reply["error"], reply
            if reply["status"] == Status.OK:
                assert reply["infer"] in (Status.OK, Status.INFERENCE_FAILED), reply


# ---- image files: what folder sources and calibration decode ----------------------------------------------
def _encoded() -> dict[str, bytes]:
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    out = {}
    for ext, image in (
        (".png", rgb),
        (".png", rgb[..., 0]),
        (".png", np.dstack([rgb, rgb[..., :1]])),
        (".png", (rgb.astype(np.uint16) * 257)),
        (".jpg", rgb),
        (".bmp", rgb),
        (".tif", rgb),
    ):
        ok, data = cv2.imencode(ext, image)
        assert ok
        out[f"{ext}-{image.ndim}-{image.dtype}-{len(out)}"] = data.tobytes()
    return out


ENCODED = _encoded()
IMAGE_DAMAGE = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 3000)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 255)), min_size=1, max_size=8)),
    st.tuples(st.just("size"), st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))),
    st.tuples(st.just("garbage"), st.binary(max_size=300)),
)


def _damaged_image(name: str, damage) -> bytes:
    data = ENCODED[name]
    kind, arg = damage
    if kind == "size" and name.startswith(".png"):  # an IHDR that claims another size (a decompression bomb)
        return data[:16] + arg[0].to_bytes(4, "big") + arg[1].to_bytes(4, "big") + data[24:]
    if kind == "garbage":
        return data[:4] + arg  # the right magic number, then anything
    if kind == "truncate":
        return data[: arg % (len(data) + 1)]
    if kind == "size":
        return data
    out = bytearray(data)
    for pos, value in arg:
        out[pos % len(out)] = value
    return bytes(out)


@fuzz(150)
@given(name=st.sampled_from(sorted(ENCODED)), damage=IMAGE_DAMAGE)
def test_damaged_image_files_decode_or_raise_a_data_error(worker, name, damage):
    data = _damaged_image(name, damage)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"frame{name.split('-')[0]}"
        path.write_bytes(data)
        reply = worker.ask({"op": "decode", "path": str(path)})
    assert reply["kind"] in ("ok", "DataError"), reply
    if reply["kind"] == "ok":
        h, w, c = reply["shape"]
        assert c == 3 and reply["dtype"] == "uint8" and h * w <= int(WORKER_PIXELS), reply


# ---- capture frames (cv2.VideoCapture sources) -----------------------------------------------------------
DTYPES = st.sampled_from(["uint8", "int8", "uint16", "int32", "float16", "float32", "float64", "bool", "complex64"])
ODD_ARRAYS = DTYPES.flatmap(lambda dt: hnp.arrays(np.dtype(dt), hnp.array_shapes(min_dims=0, max_dims=4, max_side=20)))


@fuzz(200)
@given(frame=ODD_ARRAYS | st.none() | st.integers() | st.text(max_size=4))
def test_capture_frames_convert_to_rgb_or_are_rejected(frame):
    rgb = to_rgb(frame)
    if rgb is not None:
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.shape[:2] == frame.shape[:2]


@fuzz(15)
@given(frames=st.lists(ODD_ARRAYS | st.none(), min_size=1, max_size=6))
def test_a_camera_of_odd_frames_delivers_rgb_and_counts_the_rest(frames):
    """A camera delivering these frames, then lost for good (reconnect_attempts=0): the usable ones
    arrive as RGB uint8, every other one is counted as corrupt, and the loss is a SourceError."""
    factory = fake_camera([*frames, "drop"], None)
    source = FrameSource(parse_source(0), queue_size=8, reconnect_attempts=0, capture_factory=factory)
    got = []
    with pytest.raises(SourceError, match="camera"):
        for frame in source:
            got.append(frame)
    usable = [f for f in frames if to_rgb(f) is not None]
    assert len(got) == len(usable) and all(f.image.dtype == np.uint8 and f.image.shape[2] == 3 for f in got)
    assert source.stats.skipped_corrupt == len(frames) - len(usable)


# ---- the runtime's infer / preprocess ---------------------------------------------------------------------
FRAMES = st.one_of(
    ODD_ARRAYS,
    st.lists(ODD_ARRAYS, max_size=5),
    hnp.arrays(np.uint8, st.tuples(st.integers(0, 40), st.integers(0, 40), st.integers(1, 4))),
    hnp.arrays(np.uint8, st.tuples(st.integers(0, 6), st.integers(6, 30), st.integers(6, 30), st.just(3))),
    st.none(),
    st.text(max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)
CLASS_IDS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from(["auto", *CLASSES, "", "zebra", -1, 0, 1, 2, True, None, 1.5, float("nan")]),
    st.lists(st.integers(-3, 3) | st.sampled_from(["auto", *CLASSES, "x"]), max_size=6),
    st.builds(np.int64, st.integers(-5, 5)),
)


@pytest.fixture(scope="module")
def handle(base):
    status, h = api.create(base, backend="onnxruntime", max_batch=4)
    assert status == Status.OK, api.last_error()
    try:
        yield h
    finally:
        api.destroy(h)


@pytest.fixture(scope="module")
def detector(base):
    with Detector(base, backend="onnxruntime", max_batch=4) as det:
        yield det


@fuzz(300)
@given(frames=FRAMES, class_id=CLASS_IDS)
def test_infer_on_odd_frames_and_class_ids_answers_ok_or_invalid_argument(handle, detector, frames, class_id):
    status, result = api.infer(handle, frames, class_id)
    assert status in (Status.OK, Status.INVALID_ARGUMENT), api.last_error(handle)
    if status == Status.OK:
        batch = len(result)
        assert result.score.shape == result.anomalous.shape == result.class_pred.shape == (batch,)
        assert result.anomaly_map.shape[0] == batch and np.isfinite(result.score).all()
        assert set(result.class_names) <= set(CLASSES)
    else:
        assert api.last_error(handle) and "unexpected" not in api.last_error(handle)
        with pytest.raises(InvalidArgumentError):  # what Detector raises for the same input
            detector.infer(frames, class_id)
