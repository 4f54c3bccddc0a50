"""Builders and fakes shared by more than one test module (fixtures live in conftest.py).

- paths: REPO, REALAD (../shared/data/realad), NOT_IN_BASE_INSTALL, load_benchmark
- the tiny training data set: TINY_SIZE, TINY_CONFIG, make_tiny_dataset
- the tiny runtime bundle: a real ONNX graph with the bundle's exact signature (H x W, CLASSES,
  THRESHOLDS, SCALES), make_bundle, reference, rng_frames, read_jsonl, image_folder
- servers a test starts: free_port
- camera fakes: FakeCapture, fake_camera, BGR
- CUDA and TensorRT fakes: cuda-python's runtime bindings (host memory plays device memory, calls
  return (err, value) tuples like cuda.bindings.runtime), pycuda's driver, and the parts of the
  tensorrt module both TensorRT fakes (runtime and builder tests) expose
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
import json
import time
import weakref
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from hgad_edge.core.bundle_schema import BundleMetadata, onnx_metadata_props

# ---- paths and the tiny training data set -------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]


def _train_extra_modules() -> tuple[str, ...]:
    """Import names of setup.cfg's `train` extra: what the base (runtime) install does not have."""
    import configparser
    import re

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    names = [
        re.split(r"[<>=!~ ;\[]", line.strip())[0]
        for line in cfg["options.extras_require"]["train"].splitlines()
        if line.strip()
    ]
    import_names = {"pyyaml": "yaml"}
    return tuple(import_names.get(n.lower(), n.replace("-", "_")) for n in names)


# Made unimportable in the subprocess tests that prove the runtime and the CLI need no train extra.
NOT_IN_BASE_INSTALL = _train_extra_modules()
REALAD = REPO.parent / "shared" / "data" / "realad"

TINY_SIZE = 64
TINY_CONFIG = {
    "input_size": [TINY_SIZE, TINY_SIZE],
    "flow": {"coupling_blocks": 2, "pos_dim": 32},
    "head": {"intra_centers": 3},
    "train": {"epochs": 6, "batch_size": 8, "vectors_per_image": 32, "warmup_epochs": 0.5, "calib_min": 3},
    "score": {"smooth_sigma": 1.0},
}


def _texture(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """'stripes': vertical sinusoidal stripes; 'dots': a regular grid of dark dots. Mild noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    if kind == "stripes":
        img = 128 + 60 * np.sin(xx / 3.0 + phase)
    else:
        img = 170 - 90 * ((np.sin(xx / 2.5 + phase) > 0.7) & (np.sin(yy / 2.5 + phase) > 0.7))
    img = img + rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _defect(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A bright filled square blob: visible, and its mask."""
    size = img.shape[0]
    s = size // 4
    y, x = rng.integers(4, size - s - 4, 2)
    out, mask = img.copy(), np.zeros_like(img)
    out[y : y + s, x : x + s] = 255
    mask[y : y + s, x : x + s] = 255
    return out, mask


def make_tiny_dataset(root: Path, n_train: int = 24, n_good: int = 6, n_bad: int = 6, size: int = TINY_SIZE) -> Path:
    rng = np.random.default_rng(0)
    for kind in ("stripes", "dots"):
        base = root / kind
        for sub in ("train/good", "test/good", "test/blob", "ground_truth/blob"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n_train):
            cv2.imwrite(str(base / "train/good" / f"{i:03d}.png"), _texture(kind, rng, size))
        for i in range(n_good):
            cv2.imwrite(str(base / "test/good" / f"{i:03d}.png"), _texture(kind, rng, size))
        for i in range(n_bad):
            img, mask = _defect(_texture(kind, rng, size), rng)
            cv2.imwrite(str(base / "test/blob" / f"{i:03d}.png"), img)
            cv2.imwrite(str(base / "ground_truth/blob" / f"{i:03d}_mask.png"), mask)
    return root


def load_benchmark(script: str, name: str | None = None):
    """A script of benchmarks/ loaded by path (benchmarks/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name or Path(script).stem, REPO / "benchmarks" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- the tiny runtime bundle ---------------------------------------------------------------------
H, W = 64, 96  # non-square so that an H/W swap anywhere fails
CLASSES = ("a", "b")
THRESHOLDS = (0.41, 0.37)
SCALES = (0.1, 0.2)


def tiny_model() -> bytes:
    """map = mean_c(images/255); score = max(map); c = max(id, 0)."""
    f32 = TensorProto.FLOAT
    nodes = [
        helper.make_node("Cast", ["images"], ["xf"], to=f32),
        helper.make_node("Div", ["xf", "c255"], ["xn"]),
        helper.make_node("ReduceMean", ["xn"], ["anomaly_map"], axes=[3], keepdims=0),
        helper.make_node("ReduceMax", ["anomaly_map"], ["score"], axes=[1, 2], keepdims=0),
        helper.make_node("GreaterOrEqual", ["class_id", "zero"], ["given"]),
        helper.make_node("Where", ["given", "class_id", "zero"], ["class_pred"]),
    ]
    consts = [
        numpy_helper.from_array(np.array(255, np.float32), "c255"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
    ]
    inputs = [
        helper.make_tensor_value_info("images", TensorProto.UINT8, ["B", H, W, 3]),
        helper.make_tensor_value_info("class_id", TensorProto.INT64, ["B"]),
    ]
    outputs = [
        helper.make_tensor_value_info("anomaly_map", f32, ["B", H, W]),
        helper.make_tensor_value_info("score", f32, ["B"]),
        helper.make_tensor_value_info("class_pred", TensorProto.INT64, ["B"]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "tiny", inputs, outputs, consts), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    # the copy of the deciding values an export writes into the ONNX file (checked on load)
    helper.set_model_props(model, onnx_metadata_props(BundleMetadata(CLASSES, (H, W), THRESHOLDS, SCALES, {}), "fp32"))
    return model.SerializeToString()


def make_bundle(folder: Path, **overrides) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = tiny_model()
    (folder / "model_fp32.onnx").write_bytes(data)
    meta = {
        "format": "hgad-edge-bundle",
        "format_version": 1,
        "package_version": "0.1.0",
        "classes": list(CLASSES),
        "input_size": [H, W],
        "input": {"name": "images", "dtype": "uint8", "layout": "NHWC", "channels": "RGB"},
        "class_input": {"name": "class_id", "dtype": "int64", "auto": -1},
        "outputs": ["anomaly_map", "score", "class_pred"],
        "thresholds": list(THRESHOLDS),
        "scales": list(SCALES),
        "normalized_threshold": 0.5,
        "checkpoint_sha256": "0" * 64,
        "models": {"fp32": {"file": "model_fp32.onnx", "sha256": hashlib.sha256(data).hexdigest()}},
        "engines": {},
    }
    meta.update(overrides)
    (folder / "metadata.json").write_text(json.dumps(meta))
    return folder


def reference(bundle: Path, images: np.ndarray, class_ids) -> list[np.ndarray]:
    """The tiny model run by onnxruntime directly, without the runtime in between."""
    session = ort.InferenceSession(str(bundle / "model_fp32.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images, "class_id": np.asarray(class_ids, np.int64)})


def rng_frames(n: int, shape=(H, W), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for _ in range(n)]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def image_folder(folder: Path, n: int, seed: int = 0) -> Path:
    """n PNG frames of the tiny bundle's size, 000.png, 001.png, ... (a source for `run`): the tiny model
    FAILs the even ones (noise up to 255) and PASSes the odd ones (dimmed to a third)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(rng_frames(n, seed=seed)):
        cv2.imwrite(str(folder / f"{i:03d}.png"), frame if i % 2 == 0 else frame // 3)
    return folder


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (for a server a test starts)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- camera fakes --------------------------------------------------------------------------------
class FakeCapture:
    """cv2.VideoCapture stand-in fed from a script: arrays are frames, None an empty frame, "drop" a failed read."""

    def __init__(self, script, delay: float = 0.0) -> None:
        self.script = None if script is None else iter(script)
        self.delay = delay

    def isOpened(self):
        return self.script is not None

    def read(self):
        time.sleep(self.delay)
        item = next(self.script, "drop")
        if isinstance(item, str):
            return False, None
        return True, item

    def set(self, prop, value):
        return True

    def release(self):
        pass


def fake_camera(*scripts, delay: float = 0.0):
    """Factory returning one scripted capture per open; the last script repeats (None = cannot open)."""
    calls = []

    def factory(target, api, *params):
        calls.append(target)
        return FakeCapture(scripts[min(len(calls), len(scripts)) - 1], delay)

    factory.calls = calls
    return factory


BGR = np.full((24, 36, 3), (255, 0, 0), np.uint8)  # pure blue in BGR


# ---- CUDA and TensorRT fakes ----------------------------------------------------------------------
class FakeTrtModule:
    """The tensorrt module's enums and logger base, identical for the builder and runtime fakes."""

    DataType = enum.Enum("DataType", "FLOAT HALF INT8 INT32 INT64 BOOL UINT8")

    class ILogger:
        Severity = enum.Enum("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE")

        def __init__(self) -> None:
            pass


class FakeCudart:
    """cuda.bindings.runtime stand-in: host memory plays device memory; calls return (err, value)."""

    class cudaError_t(enum.IntEnum):
        cudaSuccess = 0
        cudaErrorNoDevice = 100

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    class cudaDeviceAttr(enum.IntEnum):
        cudaDevAttrComputeCapabilityMajor = 75
        cudaDevAttrComputeCapabilityMinor = 76

    def __init__(self, devices: int = 1, cc=(8, 7)) -> None:
        self.devices, self.cc = devices, cc
        self.blocks: dict[int, np.ndarray] = {}
        self.pinned: set[int] = set()
        self.copies: list[tuple[str, int]] = []
        self.ok = self.cudaError_t.cudaSuccess

    def cudaGetDeviceCount(self):
        return (self.ok, self.devices) if self.devices else (self.cudaError_t.cudaErrorNoDevice, 0)

    def cudaGetErrorName(self, err):
        return self.ok, err.name.encode()

    def cudaSetDevice(self, device):
        return (self.ok,)

    def cudaDeviceGetAttribute(self, attr, device):
        return self.ok, self.cc[0] if attr == self.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor else self.cc[1]

    def cudaStreamCreate(self):
        return self.ok, 7

    def cudaStreamSynchronize(self, stream):
        return (self.ok,)

    def cudaStreamDestroy(self, stream):
        return (self.ok,)

    def cudaGetDeviceProperties(self, device):
        return self.ok, type("Props", (), {"name": b"Fake Orin"})()

    def cudaMalloc(self, nbytes):
        block = np.zeros(nbytes, np.uint8)
        self.blocks[block.ctypes.data] = block
        return self.ok, block.ctypes.data

    def cudaMallocHost(self, nbytes):
        err, ptr = self.cudaMalloc(nbytes)
        self.pinned.add(ptr)
        return err, ptr

    def cudaFree(self, ptr):
        self.blocks.pop(ptr)
        self.pinned.discard(ptr)  # the address may be handed out again
        return (self.ok,)

    cudaFreeHost = cudaFree

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        assert isinstance(dst, int) and isinstance(src, int) and stream == 7
        ctypes.memmove(dst, src, nbytes)
        self.copies.append((kind.name, nbytes))
        return (self.ok,)

    def cudaMemcpy(self, dst, src, nbytes, kind):
        ctypes.memmove(dst, src, nbytes)
        return (self.ok,)


class FakePyCuda:
    """pycuda.driver stand-in on the same model: host memory plays device memory, errors raise."""

    class Error(Exception):
        pass

    def __init__(self, devices: int = 1, cc=(8, 6)) -> None:
        self.devices, self.cc = devices, cc
        self.blocks: dict[int, np.ndarray] = {}
        self.pinned: set[int] = set()
        self.copies: list[tuple[str, int]] = []
        self.context_stack: list[int] = []
        driver = self

        class Device:
            def __init__(self, index: int) -> None:
                if not 0 <= index < driver.devices:
                    raise driver.Error(f"invalid device ordinal {index}")
                self.index = index

            @staticmethod
            def count() -> int:
                return driver.devices

            def compute_capability(self):
                return driver.cc

            def name(self) -> str:
                return "Fake RTX"

            def retain_primary_context(self):
                index = self.index

                class Context:
                    def push(self) -> None:
                        driver.context_stack.append(index)

                    def pop(self) -> None:
                        driver.context_stack.pop()

                return Context()

        class Allocation:
            def __init__(self, ptr: int) -> None:
                self.ptr = ptr

            def __int__(self) -> int:
                return self.ptr

            def free(self) -> None:
                driver.blocks.pop(self.ptr)

        class Stream:
            handle = 7

            def synchronize(self) -> None:
                pass

        self.Device, self.Allocation, self.Stream = Device, Allocation, Stream

    def init(self) -> None:
        if not self.devices:
            raise self.Error("cuInit failed: no CUDA-capable device is detected")

    def _require_context(self) -> None:
        if not self.context_stack:
            raise self.Error("no current context (push the primary context first)")

    def mem_alloc(self, nbytes: int):
        self._require_context()
        block = np.zeros(nbytes, np.uint8)
        self.blocks[block.ctypes.data] = block
        return self.Allocation(block.ctypes.data)

    def pagelocked_empty(self, shape, dtype):
        self._require_context()
        array = np.zeros(shape, dtype)
        self.pinned.add(array.ctypes.data)
        weakref.finalize(array, self.pinned.discard, array.ctypes.data)  # like pycuda: freed with the array
        return array

    def memcpy_htod_async(self, dest: int, src: np.ndarray, stream) -> None:
        assert isinstance(dest, int) and dest in self.blocks and src.flags.c_contiguous
        ctypes.memmove(dest, src.ctypes.data, src.nbytes)
        self.copies.append(("htod", src.nbytes))

    def memcpy_dtoh_async(self, dest: np.ndarray, src: int, stream) -> None:
        assert isinstance(src, int) and src in self.blocks and dest.flags.c_contiguous
        ctypes.memmove(dest.ctypes.data, src, dest.nbytes)
        self.copies.append(("dtoh", dest.nbytes))
