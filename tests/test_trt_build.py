"""Engine building: pure helpers, the build flow against fakes of TensorRT / cuda-python (INT8 from the
bundle's Q/DQ graph), and one real build (marked `tensorrt`, skipped without TensorRT and a GPU)."""

from __future__ import annotations

import enum
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hgad_edge.core.bundle_schema import BundleMetadata, onnx_metadata_props
from hgad_edge.core.cuda_api import CudaPython, import_cudart
from hgad_edge.core.engine_records import BuildError, check_batch, engine_entry, engine_name, rebuild_reasons
from hgad_edge.core.errors import EngineError
from hgad_edge.export import trt_build as tb
from hgad_edge.export import trt_devices as devices
from hgad_edge.runtime.backends import tensorrt_backend as trtb
from tests.helpers import FakeCudart, FakeTrtModule

H = W = 64


# ---- a tiny bundle ---------------------------------------------------------------------------------
def tiny_graph(half: bool = False, lse: bool = False) -> bytes:
    """uint8 images -> Cast -> mean over channels = anomaly_map; max = score; class_id passes through.

    half=True computes the map in FP16 with an explicit Cast back to FP32, like the mixed export.
    """
    body = TensorProto.FLOAT16 if half else TensorProto.FLOAT
    ax = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    nodes = [
        helper.make_node("Cast", ["images"], ["f"], to=body),
        helper.make_node("ReduceMean", ["f", "ax3"], ["m"], keepdims=0),
        helper.make_node("Cast", ["m"], ["anomaly_map"], to=TensorProto.FLOAT),
        helper.make_node("ReduceLogSumExp" if lse else "ReduceMax", ["anomaly_map", "ax12"], ["score"], keepdims=0),
        helper.make_node("Identity", ["class_id"], ["class_pred"]),
    ]
    inputs = [
        helper.make_tensor_value_info("images", TensorProto.UINT8, ["B", H, W, 3]),
        helper.make_tensor_value_info("class_id", TensorProto.INT64, ["B"]),
    ]
    f32 = TensorProto.FLOAT
    outputs = [
        helper.make_tensor_value_info("anomaly_map", f32, ["B", H, W]),
        helper.make_tensor_value_info("score", f32, ["B"]),
        helper.make_tensor_value_info("class_pred", TensorProto.INT64, ["B"]),
    ]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, [ax("ax3", [3]), ax("ax12", [1, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    # the copy of the deciding values an export writes into the ONNX file (checked on load)
    props = onnx_metadata_props(BundleMetadata(("a", "b"), (H, W), (0.5, 0.5), (1.0, 1.0), {}), "fp32")
    helper.set_model_props(model, props)
    return model.SerializeToString()


def make_bundle(folder: Path, lse: bool = False, int8: bool = False) -> Path:
    """fp32 + fp16 graphs; int8: also an "int8_trt" entry (the fp32 graph stands in for the Q/DQ one here)."""
    folder.mkdir(parents=True, exist_ok=True)
    models = {}
    for precision, half in (("fp32", False), ("fp16", True), *((("int8_trt", False),) if int8 else ())):
        data = tiny_graph(half, lse)
        (folder / f"model_{precision}.onnx").write_bytes(data)
        models[precision] = {"file": f"model_{precision}.onnx", "sha256": hashlib.sha256(data).hexdigest()}
    meta = {
        "format": "hgad-edge-bundle",
        "format_version": 1,
        "package_version": "0.1.0",
        "classes": ["a", "b"],
        "input_size": [H, W],
        "input": {"name": "images", "dtype": "uint8", "layout": "NHWC", "channels": "RGB"},
        "class_input": {"name": "class_id", "dtype": "int64", "auto": -1},
        "outputs": ["anomaly_map", "score", "class_pred"],
        "thresholds": [0.5, 0.5],
        "scales": [1.0, 1.0],
        "models": models,
        "engines": {},
    }
    (folder / "metadata.json").write_text(json.dumps(meta))
    return folder


def metadata(folder: Path) -> dict:
    return json.loads((folder / "metadata.json").read_text())


# ---- fakes -----------------------------------------------------------------------------------------
class FakeTrt(FakeTrtModule):
    """The TensorRT 10/11 builder API subset build_engines may touch; records what it was asked."""

    MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE")
    LayerType = enum.Enum("LayerType", "CONVOLUTION POOLING ELEMENTWISE MATRIX_MULTIPLY CAST CONSTANT SHAPE IDENTITY")

    def __init__(self, version: str = "10.7.0.23", cudart: FakeCudart | None = None) -> None:
        self.__version__ = version
        self.major = int(version.split(".")[0])
        flags = "STRONGLY_TYPED" if self.major == 10 else "UNUSED"
        self.NetworkDefinitionCreationFlag = enum.IntEnum(
            "NetworkDefinitionCreationFlag", {"EXPLICIT_BATCH": 0, flags: 5}
        )
        names = (
            "FP16 INT8 TF32 OBEY_PRECISION_CONSTRAINTS VERSION_COMPATIBLE"
            if self.major == 10
            else "TF32 VERSION_COMPATIBLE"
        )
        self.BuilderFlag = enum.Enum("BuilderFlag", names)
        self.float32 = self.DataType.FLOAT
        self.cudart = cudart
        self.builders = 0
        self.builds: list[dict] = []
        self.parse_errors: list[tuple[str, str, str]] = []
        trt = self

        class Builder:
            def __init__(self, logger) -> None:
                assert trt.cudart is None or trt.cudart.devices, "a TensorRT object was built without a CUDA device"
                trt.builders += 1

            def create_network(self, flags):
                return FakeNetwork(trt, flags)

            def create_builder_config(self):
                return FakeConfig(trt)

            def create_optimization_profile(self):
                return FakeProfile()

            def build_serialized_network(self, network, config):
                record = {
                    "flags": network.flags,
                    "config_flags": sorted(f.name for f in config.flags),
                    "profiles": [p.shapes for p in config.profiles],
                    "pool": config.pool,
                }
                trt.builds.append(record)
                return json.dumps(record).encode()

        class OnnxParser:
            def __init__(self, network, logger) -> None:
                self.network = network
                self.errors = []

            def parse_from_file(self, path):
                if trt.parse_errors:
                    self.errors = [FakeParserError(*e) for e in trt.parse_errors]
                    return False
                model = onnx.load(path)
                self.network.inputs = [FakeTensor(trt, v) for v in model.graph.input]
                self.network.outputs = [FakeTensor(trt, v) for v in model.graph.output]
                return True

            def get_used_vc_plugin_libraries(self):
                return []

            @property
            def num_errors(self):
                return len(self.errors)

            def get_error(self, i):
                return self.errors[i]

        self.Builder, self.OnnxParser = Builder, OnnxParser


class FakeParserError:
    def __init__(self, name, operator, desc) -> None:
        self._n, self._o, self._d = name, operator, desc

    def node_name(self):
        return self._n

    def node_operator(self):
        return self._o

    def node(self):
        return 3

    def desc(self):
        return self._d


class FakeTensor:
    def __init__(self, trt, value_info) -> None:
        codes = {TensorProto.UINT8: "UINT8", TensorProto.INT64: "INT64", TensorProto.FLOAT: "FLOAT"}
        self.name = value_info.name
        self.dtype = trt.DataType[codes[value_info.type.tensor_type.elem_type]]
        self.shape = tuple(d.dim_value or -1 for d in value_info.type.tensor_type.shape.dim)


class FakeLayer:
    def __init__(self, trt, kind, dtype) -> None:
        self.type, self.num_outputs, self.name = trt.LayerType[kind], 1, kind.lower()
        self._out = type("T", (), {"dtype": trt.DataType[dtype], "name": f"{kind.lower()}_out"})()

    def get_output(self, k):
        return self._out


class FakeNetwork:
    def __init__(self, trt, flags) -> None:
        self.flags, self.inputs, self.outputs = flags, [], []
        self.layers = [
            FakeLayer(trt, k, d)
            for k, d in (
                ("CONVOLUTION", "HALF"),
                ("ELEMENTWISE", "FLOAT"),
                ("MATRIX_MULTIPLY", "FLOAT"),
                ("SHAPE", "INT64"),
                ("CAST", "FLOAT"),
            )
        ]

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, i):
        return self.inputs[i]

    @property
    def num_outputs(self):
        return len(self.outputs)

    def get_output(self, i):
        return self.outputs[i]

    @property
    def num_layers(self):
        return len(self.layers)

    def get_layer(self, i):
        return self.layers[i]


class FakeProfile:
    def __init__(self) -> None:
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = [list(lo), list(opt), list(hi)]


class FakeCache:
    def __init__(self, data: bytes) -> None:
        self.data = data or b"fresh"

    def serialize(self):
        return self.data + b"+"


class FakeConfig:
    def __init__(self, trt) -> None:
        self.trt, self.flags, self.profiles, self.pool = trt, {trt.BuilderFlag.TF32}, [], None
        self.cache = None

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.flags.discard(flag)

    def set_memory_pool_limit(self, pool, size):
        self.pool = [pool.name, size]

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data):
        return FakeCache(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch):
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


@pytest.fixture
def fakes(monkeypatch):
    """Install fake cuda-python + TensorRT (10.7 on an sm87 'Orin') where the builder finds them (trt_devices)."""
    cudart = FakeCudart()
    trt = FakeTrt("10.7.0.23", cudart)
    monkeypatch.setattr(devices, "import_cudart", lambda: cudart)
    monkeypatch.setattr(devices, "import_tensorrt_builder", lambda: trt)
    return trt


# ---- pure helpers ----------------------------------------------------------------------------------
def test_engine_name_format():
    assert engine_name("10.3.0.30", "8.7", "fp16") == "trt10.3.0_sm87_fp16.engine"
    assert engine_name("11.0", (12, 1), "fp32", version_compatible=True) == "trt11.0.0_sm121_fp32_vc.engine"
    with pytest.raises(BuildError, match="precision"):
        engine_name("10.3", "8.7", "bf16")


@pytest.mark.parametrize("batch, expected", [((1, 4, 8), (1, 4, 8)), (8, (1, 8, 8)), ([2], (1, 2, 2))])
def test_batch_profile(batch, expected):
    assert check_batch(batch) == expected


@pytest.mark.parametrize("batch", [(4, 2, 8), (0, 1, 2), (1, 2)])
def test_bad_batch_profile(batch):
    with pytest.raises(BuildError, match="min <= opt <= max"):
        check_batch(batch)


def test_metadata_entry_round_trips_through_choose_engine(tmp_path):
    folder = make_bundle(tmp_path / "b")
    meta = metadata(folder)
    for precision in ("fp16", "fp32"):
        sha = meta["models"][precision]["sha256"]
        name = engine_name("10.7.0.23", "8.7", precision)
        meta["engines"][name] = engine_entry(precision, "10.7.0.23", "8.7", f"model_{precision}.onnx", sha, (1, 4, 8))
    assert trtb.choose_engine(meta, "10.7.0.1", "8.7", "auto", max_batch=8) == "trt10.7.0_sm87_fp16.engine"
    assert trtb.choose_engine(meta, "10.7.0.1", (8, 7), "fp32") == "trt10.7.0_sm87_fp32.engine"
    with pytest.raises(EngineError, match="batch <= 8"):
        trtb.choose_engine(meta, "10.7.0.1", "8.7", "fp16", max_batch=16)
    meta["models"]["fp16"]["sha256"] = "re-exported"
    assert trtb.choose_engine(meta, "10.7.0.1", "8.7", "auto") == "trt10.7.0_sm87_fp32.engine"  # stale fp16 skipped


def test_rebuild_reasons(tmp_path):
    path = tmp_path / "e.engine"
    entry = engine_entry("fp16", "10.7.0.23", "8.7", "model_fp16.onnx", "s", (1, 4, 8))
    args = dict(precision="fp16", trt_version="10.7.0.23", capability="8.7", onnx_sha256="s", batch=(1, 4, 8))
    assert rebuild_reasons(None, path, **args) == ["no engine recorded in metadata.json"]
    assert "missing" in rebuild_reasons(entry, path, **args)[0]
    path.write_bytes(b"plan")
    assert rebuild_reasons(entry, path, **args) == []
    assert rebuild_reasons(entry, path, **{**args, "trt_version": "10.8.0"}) == [
        "built with TensorRT 10.7.0.23, this runtime has 10.8.0"
    ]
    assert "compute capability" in rebuild_reasons(entry, path, **{**args, "capability": "7.2"})[0]
    assert "another ONNX" in rebuild_reasons(entry, path, **{**args, "onnx_sha256": "t"})[0]
    assert "batch" in rebuild_reasons(entry, path, **{**args, "batch": (1, 8, 16)})[0]


# ---- environment errors ----------------------------------------------------------------------------
def test_no_gpu_is_a_build_error_before_any_tensorrt_object(tmp_path, monkeypatch):
    folder = make_bundle(tmp_path / "b")
    monkeypatch.setattr(devices, "import_cudart", lambda: FakeCudart(devices=0))
    monkeypatch.setattr(devices, "import_tensorrt_builder", lambda: pytest.fail("TensorRT touched without a GPU"))
    with pytest.raises(BuildError) as err:
        tb.build_engines(folder)
    assert "no CUDA device" in str(err.value) and "copy the bundle there and run hgad-edge build" in str(err.value)


def test_this_machine_without_gpu_is_reported():
    """Real cuda-python: on a machine without a GPU (like CI) the check says so cleanly."""
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    count, _ = CudaPython(import_cudart()).device_count()
    if count:
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(BuildError, match="no CUDA device"):
        devices.require_cuda_device(0)


def test_missing_tensorrt_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BuildError, match=r"pip install 'hgad-edge\[tensorrt\]'.*python3-libnvinfer"):
        devices.import_tensorrt_builder()


def test_missing_precision_model_and_tampered_onnx(tmp_path, fakes):
    folder = make_bundle(tmp_path / "b")
    (folder / "model_fp16.onnx").write_bytes(tiny_graph(half=False))
    with pytest.raises(BuildError, match="sha256"):
        tb.build_engines(folder, "fp16")
    meta = metadata(folder)
    del meta["models"]["fp16"]
    (folder / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BuildError, match="no fp16 ONNX model"):
        tb.build_engines(folder, "fp16")


# ---- the build flow against fakes ------------------------------------------------------------------
def test_fp16_build_records_engine_and_skips_when_current(tmp_path, fakes):
    folder = make_bundle(tmp_path / "b")
    path = tb.build_engines(folder, "fp16", batch=(1, 4, 8), workspace_mb=512)
    assert path == folder / "engines" / "trt10.7.0_sm87_fp16.engine" and path.is_file()
    build = fakes.builds[-1]
    assert build["flags"] == 1 << 5  # STRONGLY_TYPED on TensorRT 10
    assert "FP16" not in build["config_flags"] and "TF32" not in build["config_flags"]
    assert build["profiles"] == [{"images": [[1, H, W, 3], [4, H, W, 3], [8, H, W, 3]], "class_id": [[1], [4], [8]]}]
    assert build["pool"] == ["WORKSPACE", 512 << 20]
    assert (folder / "engines" / "timing.cache").read_bytes() == b"fresh+"
    meta = metadata(folder)
    entry = meta["engines"]["trt10.7.0_sm87_fp16.engine"]
    assert entry["onnx_sha256"] == meta["models"]["fp16"]["sha256"] and entry["gpu"] == "Fake Orin"
    assert entry["target"] == "tensorrt" and entry["compute_capabilities"] == ["8.7"]
    assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and entry["plugins"] == []
    assert trtb.choose_engine(meta, "10.7.0.23", "8.7", "auto", max_batch=8) == path.name

    builders = fakes.builders
    assert tb.build_engines(folder, "fp16", batch=(1, 4, 8)) == path
    assert fakes.builders == builders  # up to date: nothing built
    tb.build_engines(folder, "fp16", batch=(1, 4, 8), force=True)
    assert fakes.builders == builders + 1
    assert (folder / "engines" / "timing.cache").read_bytes() == b"fresh++"  # the cache was reused
    path.write_bytes(b"swapped")  # an engine file that is not the one recorded is rebuilt
    tb.build_engines(folder, "fp16", batch=(1, 4, 8))
    assert fakes.builders == builders + 2 and path.read_bytes() != b"swapped"


def test_stale_engine_is_rebuilt_and_other_engines_kept(tmp_path, fakes):
    folder = make_bundle(tmp_path / "b")
    tb.build_engines(folder, "fp32")
    other = {
        "precision": "fp16",
        "trt_version": "10.3.0",
        "compute_capability": "7.2",
        "onnx_sha256": "x",
        "batch": [1, 1, 1],
    }
    meta = metadata(folder)
    meta["engines"]["trt10.3.0_sm72_fp16.engine"] = other  # another device's engine
    meta["engines"]["trt10.7.0_sm87_fp32.engine"]["onnx_sha256"] = "old export"
    (folder / "metadata.json").write_text(json.dumps(meta))
    builders = fakes.builders
    tb.build_engines(folder, "fp32")
    assert fakes.builders == builders + 1
    meta = metadata(folder)
    assert meta["engines"]["trt10.7.0_sm87_fp32.engine"]["onnx_sha256"] == meta["models"]["fp32"]["sha256"]
    assert meta["engines"]["trt10.3.0_sm72_fp16.engine"] == other


def test_tensorrt_11_builds_fp16_and_int8_without_flags(tmp_path, monkeypatch):
    """TensorRT 11 has no INT8 calibrator: int8 is the Q/DQ graph, built strongly typed like fp16."""
    cudart = FakeCudart()
    trt = FakeTrt("11.0.0.5", cudart)
    monkeypatch.setattr(devices, "import_cudart", lambda: cudart)
    monkeypatch.setattr(devices, "import_tensorrt_builder", lambda: trt)
    folder = make_bundle(tmp_path / "b", int8=True)
    for precision in ("fp16", "int8"):
        name = f"trt11.0.0_sm87_{precision}.engine"
        assert tb.build_engines(folder, precision).name == name
        assert trt.builds[-1]["flags"] == 0 and metadata(folder)["engines"][name]["strongly_typed"]
        assert trt.builds[-1]["config_flags"] == []


def test_parser_errors_name_the_nodes(tmp_path, fakes):
    folder = make_bundle(tmp_path / "b")
    fakes.parse_errors = [("node_lse_3", "ReduceLogSumExp", "unsupported attribute"), ("node_x", "Foo", "no importer")]
    with pytest.raises(BuildError) as err:
        tb.build_engines(folder, "fp32", check=False)
    text = str(err.value)
    assert (
        "2 error(s)" in text
        and "ReduceLogSumExp node node_lse_3: unsupported attribute" in text
        and "Foo node node_x" in text
    )
    assert not (folder / "engines" / "trt10.7.0_sm87_fp32.engine").exists()


def test_preflight_refuses_reduce_logsumexp(tmp_path, fakes):
    folder = make_bundle(tmp_path / "b", lse=True)
    with pytest.raises(BuildError, match="ReduceLogSumExp.*max shift"):
        tb.build_engines(folder, "fp32")
    assert fakes.builders == 0


def test_int8_builds_the_qdq_graph_strongly_typed(tmp_path, fakes):
    """TensorRT 10: the symmetric Q/DQ graph, STRONGLY_TYPED, no INT8/FP16 builder flag, no calibrator."""
    folder = make_bundle(tmp_path / "b", int8=True)
    path = tb.build_engines(folder, "int8", batch=(1, 2, 4))
    assert path.name == "trt10.7.0_sm87_int8.engine"
    build = fakes.builds[-1]
    assert build["flags"] == 1 << 5 and not {"INT8", "FP16"} & set(build["config_flags"])
    meta = metadata(folder)
    entry = meta["engines"][path.name]
    assert entry["model"] == "int8_trt" and entry["onnx"] == "model_int8_trt.onnx"
    assert entry["onnx_sha256"] == meta["models"]["int8_trt"]["sha256"] and entry["strongly_typed"]
    assert trtb.choose_engine(meta, "10.7.0.23", "8.7", "int8") == path.name
    with pytest.raises(EngineError, match="no fp16/fp32"):  # auto never picks int8
        trtb.choose_engine(meta, "10.7.0.23", "8.7", "auto")
    meta["models"]["int8_trt"]["sha256"] = "quantized again"
    with pytest.raises(EngineError, match="another ONNX model"):
        trtb.choose_engine(meta, "10.7.0.23", "8.7", "int8")


def test_int8_without_a_qdq_graph_says_quantize(tmp_path, fakes):
    folder = make_bundle(tmp_path / "b")
    with pytest.raises(BuildError, match=r"no int8_trt ONNX model.*hgad-edge quantize"):
        tb.build_engines(folder, "int8")
    assert fakes.builders == 0
    with pytest.raises(EngineError, match="hgad-edge quantize .* then hgad-edge build .* --precision int8"):
        trtb.choose_engine(metadata(folder), "10.7.0.23", "8.7", "int8", bundle=folder)


# ---- real TensorRT ---------------------------------------------------------------------------------
@pytest.mark.tensorrt
def test_real_build_runs_in_the_runtime(tmp_path):
    """Builds fp32 and fp16 engines with real TensorRT, then runs them through the runtime."""
    cuda_rt = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    if CudaPython(cuda_rt).device_count()[0] == 0:
        pytest.skip("no CUDA device")
    pytest.importorskip("tensorrt", reason="TensorRT not installed")
    from hgad_edge.runtime import Status, create, destroy, infer, last_error

    folder = make_bundle(tmp_path / "b")
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(3)]
    for precision, tol in (("fp32", 1e-5), ("fp16", 0.5)):
        tb.build_engines(folder, precision, batch=(1, 2, 4))
        status, handle = create(folder, backend="tensorrt", precision=precision, max_batch=4)
        assert status == Status.OK, last_error()
        status, result = infer(handle, frames, [0, 1, -1])
        assert status == Status.OK, last_error(handle)
        expected = np.stack(frames).astype(np.float32).mean(axis=3)
        np.testing.assert_allclose(result.anomaly_map, expected, atol=tol)
        assert destroy(handle) == Status.OK
