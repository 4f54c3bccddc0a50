"""INT8 as explicitly quantized (Q/DQ) graphs: the deployment rule on hand-made graphs (nothing
quantized at or after z - mu; symmetric for TensorRT), the calibration images, and on the tiny
trained model: `hgad-edge quantize` / `export --int8` write both graphs from one calibration,
record them, the runtime checks them on load and runs model_int8.onnx on ONNX Runtime."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from hgad_edge.cli import main
from hgad_edge.core.bundle import load_bundle
from hgad_edge.core.bundle_schema import BundleMetadata, SchemaError, read_onnx_metadata_props
from hgad_edge.core.errors import BundleError, InvalidArgumentError
from hgad_edge.core.files import sha256_file
from hgad_edge.export import int8_calibration as calib
from hgad_edge.export.graph_check import HEAD_CLASSES, HIERARCHY_KEY, MODEL_CLASSES, check_graph
from hgad_edge.export.int8_quantize import INT8_GRAPHS, POLICY, graph_parts, part_names, quantize_bundle
from hgad_edge.runtime import Detector, RuntimeOptions

SCORER, FLOW = MODEL_CLASSES[0], "hgad_edge.training.flows.PrecomputedConditionFlow"


# ---- the rule on hand-made graphs -------------------------------------------------------------------
def _node(op: str, inputs: list[str], outputs: list[str], name: str, classes: list[str]) -> onnx.NodeProto:
    node = helper.make_node(op, inputs, outputs, name=name)
    prop = node.metadata_props.add()
    prop.key, prop.value = HIERARCHY_KEY, str(classes)
    return node


def _qdq(tensor: str, out: str, zero: np.ndarray, tag: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), f"s_{tag}"), numpy_helper.from_array(zero, f"z_{tag}")]
    nodes = [
        helper.make_node("QuantizeLinear", [tensor, f"s_{tag}", f"z_{tag}"], [f"q_{tag}"], name=f"Q_{tag}"),
        helper.make_node("DequantizeLinear", [f"q_{tag}", f"s_{tag}", f"z_{tag}"], [out], name=f"DQ_{tag}"),
    ]
    return nodes, inits


SYMMETRIC_ZERO = np.array(0, np.int8)


def toy_graph(where: str | None, zero: np.ndarray = SYMMETRIC_ZERO) -> onnx.ModelProto:
    """x -> MatMul (flow) -> Reshape (glue) -> Sub mu (head) -> ReduceSum (head) -> score, with one Q/DQ
    pair `where`: "flow" (on the MatMul input), "z" (between the flow and the head), "head" (after z - mu)."""
    taps = {"flow": "x", "z": "y", "head": "d"}
    rename = {taps[where]: f"{taps[where]}_q"} if where else {}
    use = lambda t: rename.get(t, t)  # noqa: E731
    nodes = [
        _node("MatMul", [use("x"), "w"], ["y"], "flow_mm", [SCORER, FLOW, "aten.matmul.default"]),
        _node("Reshape", [use("y"), "shape"], ["z"], "glue_reshape", [SCORER, "aten.view.default"]),
        _node("Sub", ["z", "mu"], ["d"], "head_sub", [SCORER, HEAD_CLASSES[0], "aten.sub.Tensor"]),
        _node("ReduceSum", [use("d"), "axes"], ["score"], "head_sum", [SCORER, HEAD_CLASSES[0], "aten.sum"]),
    ]
    inits = [
        numpy_helper.from_array(np.ones((4, 4), np.float32), "w"),
        numpy_helper.from_array(np.array([-1, 4], np.int64), "shape"),
        numpy_helper.from_array(np.zeros((4,), np.float32), "mu"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
    ]
    if where:
        qdq, more = _qdq(taps[where], rename[taps[where]], zero, where)
        nodes, inits = qdq + nodes, inits + more
    graph = helper.make_graph(
        nodes,
        "toy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["B"])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_qdq_before_the_head_passes():
    assert check_graph(toy_graph("flow"), mixed=False, quantized=True, symmetric=True) == []


@pytest.mark.parametrize(
    "where, words",
    [("z", "DequantizeLinear node DQ_z feeds Sub node head_sub"), ("head", "downstream of the mixture head")],
)
def test_qdq_at_or_after_z_minus_mu_is_refused(where, words):
    problems = check_graph(toy_graph(where), mixed=False, quantized=True)
    assert problems and any(words in p for p in problems), problems


def test_a_quantized_graph_needs_qdq_nodes_and_the_head_metadata():
    assert check_graph(toy_graph(None), mixed=False, quantized=True) == [
        "quantized graph has no QuantizeLinear/DequantizeLinear node"
    ]
    model = toy_graph("flow")
    for node in model.graph.node:
        del node.metadata_props[:]
    assert any("cannot prove" in p for p in check_graph(model, mixed=False, quantized=True))


@pytest.mark.parametrize(
    "zero, words", [(np.array(3, np.int8), "non-zero zero point"), (np.array(128, np.uint8), "non-int8 zero point")]
)
def test_tensorrt_graph_must_be_symmetric(zero, words):
    model = toy_graph("flow", zero)
    assert check_graph(model, mixed=False, quantized=True) == []  # fine for ONNX Runtime
    assert any(words in p for p in check_graph(model, mixed=False, quantized=True, symmetric=True))


# ---- calibration images -------------------------------------------------------------------------------
def _images(folder: Path, n: int) -> Path:
    import cv2

    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / ("a" if i % 2 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(sub / f"{i:02d}.png"), rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_calibration_folder_errors(tmp_path):
    with pytest.raises(calib.CalibrationError, match="does not exist"):
        calib.folder_set(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(calib.CalibrationError, match="no images"):
        calib.folder_set(tmp_path / "empty")


def test_calibration_set_picks_evenly_and_records_a_digest(tmp_path):
    folder = _images(tmp_path / "n", 9)
    chosen = calib.folder_set(folder, limit=3)
    everything = calib.find_images(folder)
    assert [p.name for p in chosen.paths] == [everything[i].name for i in (0, 4, 8)]
    record = chosen.record()
    assert record["images"] == 3 and "9 images" in record["source"]
    (chosen.paths[1]).write_bytes(chosen.paths[0].read_bytes())  # same names, other pixels: another set
    assert calib.folder_set(folder, limit=3).record()["sha256"] != record["sha256"]
    batches = list(calib.graph_inputs(calib.folder_set(folder), (32, 64), None))
    assert [b.shape for b in batches] == [(8, 32, 64, 3), (1, 32, 64, 3)] and batches[0].dtype == np.uint8


def test_schema_needs_a_float_graph_beside_int8():
    meta = {
        "format": "hgad-edge-bundle",
        "format_version": 1,
        "package_version": "0.1.0",
        "classes": ["a"],
        "input_size": [64, 64],
        "thresholds": [1.0],
        "scales": [1.0],
        "models": {"int8": {"file": "model_int8.onnx", "sha256": "0" * 64}},
    }
    with pytest.raises(SchemaError, match="no fp32 or fp16 graph"):
        BundleMetadata.from_json(meta)


def test_int8_is_a_runtime_precision():
    assert RuntimeOptions(backend="onnxruntime", precision="int8").precision == "int8"


# ---- the tiny trained model (slow: it needs the session's trained run) ------------------------------
@pytest.fixture(scope="module")
def int8_bundle(tiny_bundle, tiny_data, tmp_path_factory) -> Path:
    """A copy of the tiny bundle quantized by the CLI on one class's normal training images."""
    folder = tmp_path_factory.mktemp("int8") / "bundle"
    shutil.copytree(tiny_bundle.bundle, folder)
    done = CliRunner().invoke(main, ["quantize", str(folder), "--calib-dir", str(tiny_data / "stripes/train/good")])
    assert done.exit_code == 0, done.output
    assert "model_int8.onnx" in done.output and "model_int8_trt.onnx" in done.output
    return folder


def test_quantize_writes_both_graphs_and_records_them(int8_bundle):
    meta = json.loads((int8_bundle / "metadata.json").read_text())
    fp32 = onnx.load(str(int8_bundle / "model_fp32.onnx"))
    policy_nodes = {n for p in part_names(graph_parts(fp32), POLICY) for n in graph_parts(fp32)[p]}
    for key, graph in INT8_GRAPHS.items():
        entry = meta["models"][key]
        path = int8_bundle / entry["file"]
        assert entry["file"] == graph.file and entry["sha256"] == sha256_file(path)
        assert entry["runs_on"] == graph.runs_on and entry["quantized_nodes"] == len(policy_nodes) > 0
        props = read_onnx_metadata_props(path)
        assert json.loads(props["precision"]) == key and json.loads(props["classes"]) == meta["classes"]
        assert check_graph(path, mixed=False, quantized=True, symmetric=graph.symmetric_activations) == []
    record = meta["quantization"]
    assert record["calibration"]["images"] == 24 and record["calibration"]["method"] == "MinMax"
    assert "stripes/train/good" in record["calibration"]["source"] and len(record["calibration"]["sha256"]) == 64
    assert record["policy"] == list(POLICY) and any(record["parts"].values()) and not record["parts"]["backbone"]
    assert load_bundle(int8_bundle).models.keys() == {"fp32", "fp16", "int8", "int8_trt"}


def test_onnxruntime_runs_int8_only_when_asked(int8_bundle):
    frames = list(np.random.default_rng(1).integers(0, 256, (4, 48, 40, 3), dtype=np.uint8))
    results = {}
    for precision in ("auto", "fp32", "int8"):
        with Detector(int8_bundle, backend="onnxruntime", precision=precision) as det:
            assert det.info["precision"] == ("fp32" if precision == "auto" else precision)
            results[precision] = det.infer(frames, "auto")
    ref, q = results["fp32"], results["int8"]
    assert np.array_equal(results["auto"].score, ref.score)
    assert np.isfinite(q.anomaly_map).all() and not np.array_equal(q.score, ref.score)
    assert np.abs(q.score - ref.score).max() < 0.2 * np.abs(ref.score).max()  # quantized, not broken


def test_a_changed_int8_graph_is_refused_on_load(int8_bundle, tmp_path):
    folder = tmp_path / "b"
    shutil.copytree(int8_bundle, folder)
    model = onnx.load(str(folder / "model_int8.onnx"))
    model.doc_string = "edited"
    onnx.save(model, str(folder / "model_int8.onnx"))
    with pytest.raises(BundleError, match="does not match the sha256"):
        load_bundle(folder)


def test_bundle_without_int8_says_how_to_add_it(tiny_bundle):
    with pytest.raises(InvalidArgumentError, match="hgad-edge quantize"):
        Detector(tiny_bundle.bundle, backend="onnxruntime", precision="int8")


def test_failed_quantize_leaves_the_bundle_as_it_was(tiny_bundle, tmp_path):
    folder = tmp_path / "b"
    shutil.copytree(tiny_bundle.bundle, folder)
    before = {p.name: sha256_file(p) for p in folder.iterdir() if p.is_file()}
    images = _images(tmp_path / "n", 2)
    (images / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(calib.CalibrationError, match="broken.png"):
        quantize_bundle(folder, calib.folder_set(images))
    assert {p.name: sha256_file(p) for p in folder.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "n"]  # no staging folder left behind


def test_quantize_cli_needs_images_and_the_right_run(tiny_bundle, tiny_run, tmp_path):
    runner = CliRunner()
    done = runner.invoke(main, ["quantize", str(tiny_bundle.bundle)])
    assert done.exit_code == 2 and "--calib-dir NORMAL_DIR or --run RUN" in done.output
    other = tmp_path / "run"
    shutil.copytree(tiny_run, other)
    (other / "model.safetensors").write_bytes(b"other weights")
    done = runner.invoke(main, ["quantize", str(tiny_bundle.bundle), "--run", str(other)])
    assert done.exit_code == 1 and "not exported from run" in done.output


def test_export_int8_calibrates_on_the_runs_training_images(tiny_run, tmp_path):
    out = tmp_path / "bundle"
    done = CliRunner().invoke(main, ["export", str(tiny_run), "--out", str(out), "--precision", "fp32", "--int8"])
    assert done.exit_code == 0, done.output
    meta = load_bundle(out).metadata
    assert set(meta["models"]) == {"fp32", "int8", "int8_trt"}
    calibration = meta["quantization"]["calibration"]
    assert "training images of run" in calibration["source"] and set(calibration["per_class"]) == {"dots", "stripes"}
    assert calibration["images"] < 48  # the held-out normals (thresholds) are not calibrated on
    done = CliRunner().invoke(main, ["export", str(tiny_run), "--out", str(out), "--precision", "fp16", "--int8"])
    assert done.exit_code == 1 and "--precision fp32" in done.output
