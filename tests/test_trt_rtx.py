"""Real TensorRT-RTX engines, built on this CPU from the freshly exported tiny bundle.

TensorRT-RTX builds ahead of time without a GPU, so CI checks the real builder and ONNX parser on
every run: FP32, mixed-FP16 and INT8 (the explicitly quantized Q/DQ graph) engines for a dynamic
batch profile, the precision policy on the parsed network (no layer of the mixture head or scoring
in HALF or INT8, none reading a dequantized tensor), I/O names/dtypes/batch axis, no plugin, the
metadata record and the staleness logic. Running an engine needs a GPU: without one the
deserialisation error must become a clear NO_DEVICE status; the inference check skips with the reason.
CI sets HGAD_EDGE_REQUIRE_RTX=1 so that a missing [tensorrt-rtx] extra fails instead of skipping.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from hgad_edge.cli import main
from hgad_edge.core.cuda_api import import_cuda
from hgad_edge.core.engine_records import BuildError, engine_name, rebuild_reasons
from hgad_edge.core.errors import EngineError
from hgad_edge.core.files import sha256_file
from hgad_edge.core.trt_common import rtx_capabilities
from hgad_edge.export import trt_build as tb
from hgad_edge.export.graph_check import HEAD_CLASSES, HIERARCHY_KEY, check_graph, fp32_node_names
from hgad_edge.export.int8_calibration import folder_set
from hgad_edge.export.int8_quantize import quantize_bundle
from hgad_edge.export.trt_check import check_onnx
from hgad_edge.export.trt_network import ParsedNetwork, network_facts, parse_network
from hgad_edge.runtime import Status, create, destroy, infer, last_error
from hgad_edge.runtime.backends import tensorrt_backend as trtb

if os.environ.get("HGAD_EDGE_REQUIRE_RTX"):
    import tensorrt_rtx_bindings as trt
else:
    trt = pytest.importorskip(
        "tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed: pip install 'hgad-edge[tensorrt-rtx]'"
    )

BATCH = (1, 2, 4)
GPUS = ["8.6", "8.9"]  # the fp16 engine names its GPUs; the fp32 one takes TensorRT-RTX's default set
ONNX_TO_TRT = {onnx.TensorProto.UINT8: "UINT8", onnx.TensorProto.INT64: "INT64", onnx.TensorProto.FLOAT: "FLOAT"}


@pytest.fixture(scope="module")
def rtx_bundle(tiny_bundle, tmp_path_factory) -> Path:
    """A copy of the tiny bundle with real fp32 (CLI) and mixed fp16 (API) TensorRT-RTX engines."""
    folder = tmp_path_factory.mktemp("rtx") / "bundle"
    shutil.copytree(tiny_bundle.bundle, folder)
    done = CliRunner().invoke(
        main, ["build", str(folder), "--target", "rtx", "--precision", "fp32", "--batch", "1:2:4"]
    )
    assert done.exit_code == 0, done.output
    assert "engine:" in done.output and "TensorRT-RTX" in done.output
    tb.build_engines(folder, "fp16", BATCH, target="rtx", compute_capabilities=GPUS)
    return folder


def meta(folder: Path) -> dict:
    return json.loads((folder / "metadata.json").read_text())


def entry_of(folder: Path, precision: str) -> tuple[str, dict]:
    return next(
        (n, e) for n, e in meta(folder)["engines"].items() if e["precision"] == precision and e["target"] == "rtx"
    )


def parsed(folder: Path, precision: str) -> ParsedNetwork:
    return parse_network(trt, folder / meta(folder)["models"][precision]["file"], precision, target="rtx")


# ---- the builds and their records -------------------------------------------------------------------
def test_fp32_and_fp16_engines_are_built_and_recorded(rtx_bundle):
    data = meta(rtx_bundle)
    default = list(rtx_capabilities(trt)[1])
    for precision, gpus in (("fp32", default), ("fp16", GPUS)):
        name, entry = entry_of(rtx_bundle, precision)
        path = rtx_bundle / "engines" / name
        assert name == engine_name(trt.__version__, gpus, precision, target="rtx") and name.startswith("rtx")
        assert entry["trt_version"] == trt.__version__ and entry["compute_capabilities"] == gpus
        assert entry["sha256"] == sha256_file(path) and entry["size_bytes"] == path.stat().st_size > 100_000
        assert entry["onnx_sha256"] == data["models"][precision]["sha256"] and entry["batch"] == list(BATCH)
        assert entry["plugins"] == [] and entry["strongly_typed"] and entry["fp32_policy_layers"] > 0
        assert trtb.choose_engine(data, trt.__version__, gpus[-1], precision, max_batch=4, target="rtx") == name
    assert entry_of(rtx_bundle, "fp16")[1]["half_layers"] > 0 and entry_of(rtx_bundle, "fp32")[1]["half_layers"] == 0
    with pytest.raises(EngineError, match="this GPU is 8.7"):  # a Jetson runs JetPack's TensorRT, not RTX engines
        trtb.choose_engine(data, trt.__version__, "8.7", "fp16", target="rtx")
    assert not (rtx_bundle / "engines" / tb.TIMING_CACHE).exists()  # TensorRT-RTX has no timing cache (no-op since 1.2)


# ---- the parsed network -----------------------------------------------------------------------------
def _onnx_layers(network) -> list[tuple[object, list[str]]]:
    """(layer, ONNX node names from the parser's "[ONNX Layer: ...]" tag) for every tagged layer."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    return [(layer, re.findall(r"\[ONNX Layer: ([^\]]+)\]", layer.metadata or "")) for layer in layers]


def test_mixed_network_keeps_head_and_scoring_out_of_half(rtx_bundle):
    """What export/graph_check.py proves on the ONNX side, checked on TensorRT's own network."""
    model = onnx.load(str(rtx_bundle / "model_fp16.onnx"))
    policy = fp32_node_names(model)
    net = parsed(rtx_bundle, "fp16")
    tagged = [(layer, nodes) for layer, nodes in _onnx_layers(net.network) if nodes]
    head = [layer for layer, nodes in tagged if set(nodes) & policy]
    half = trt.DataType.HALF
    outputs_half = lambda layer: [layer.get_output(k).dtype == half for k in range(layer.num_outputs)]  # noqa: E731
    assert len(head) > 50  # the head and scoring are there, and mapped to the exporter's nodes
    assert not [layer.name for layer in head if any(outputs_half(layer))]
    assert sum(any(outputs_half(layer)) for layer, _ in tagged) > 50  # the body does run in HALF
    facts = network_facts(trt, net.network, net.parser, model)  # the build's own check agrees, untagged helpers too
    assert facts.violations == [] and facts.unmapped == [] and len(facts.fp32_policy_layers) >= len(head)
    fp32 = parsed(rtx_bundle, "fp32").network
    assert not any(any(outputs_half(fp32.get_layer(i))) for i in range(fp32.num_layers))


def test_precision_check_catches_a_half_layer_in_the_head(rtx_bundle):
    """Label one FP16 backbone node as mixture head: the network check must name it."""
    model = onnx.load(str(rtx_bundle / "model_fp16.onnx"))
    net = parsed(rtx_bundle, "fp16")
    half_nodes = {
        n
        for layer, nodes in _onnx_layers(net.network)
        for n in nodes
        if any(layer.get_output(k).dtype == trt.DataType.HALF for k in range(layer.num_outputs))
    }
    victim = next(node for node in model.graph.node if node.name in half_nodes and node.op_type == "Conv")
    prop = next((p for p in victim.metadata_props if p.key == HIERARCHY_KEY), None) or victim.metadata_props.add()
    prop.key, prop.value = HIERARCHY_KEY, f"['{HEAD_CLASSES[0]}']"
    facts = network_facts(trt, net.network, net.parser, model)
    assert facts.violations and all(victim.name in v for v in facts.violations)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_network_io_and_no_plugin(rtx_bundle, precision):
    """I/O names, dtypes and shapes as the ONNX graph declares them, batch axis dynamic, no plugin."""
    model = onnx.load(str(rtx_bundle / f"model_{precision}.onnx"), load_external_data=False)
    net = parsed(rtx_bundle, precision)
    network = net.network
    for declared, count, get in (
        (model.graph.input, network.num_inputs, network.get_input),
        (model.graph.output, network.num_outputs, network.get_output),
    ):
        tensors = [get(i) for i in range(count)]
        assert [t.name for t in tensors] == [v.name for v in declared]
        for tensor, value in zip(tensors, declared):
            dims = value.type.tensor_type.shape.dim
            assert tensor.dtype.name == ONNX_TO_TRT[value.type.tensor_type.elem_type]
            assert tensor.shape[0] == -1 and dims[0].dim_param  # dynamic batch
            assert tuple(tensor.shape[1:]) == tuple(d.dim_value for d in dims[1:])
    assert [network.get_output(i).name for i in range(network.num_outputs)] == meta(rtx_bundle)["outputs"]
    assert list(net.parser.get_used_vc_plugin_libraries()) == []
    plugins = {trt.LayerType.PLUGIN, trt.LayerType.PLUGIN_V2, trt.LayerType.PLUGIN_V3}
    assert not [network.get_layer(i).name for i in range(network.num_layers) if network.get_layer(i).type in plugins]


# ---- rebuilds: up to date vs stale ------------------------------------------------------------------
def test_rebuild_skips_current_engine_and_rebuilds_stale_one(rtx_bundle, tmp_path):
    folder = tmp_path / "bundle"
    shutil.copytree(rtx_bundle, folder)
    name, entry = entry_of(folder, "fp16")
    engine = folder / "engines" / name
    before = engine.stat().st_mtime_ns
    assert tb.build_engines(folder, "fp16", BATCH, target="rtx", compute_capabilities=list(reversed(GPUS))) == engine
    assert engine.stat().st_mtime_ns == before and entry_of(folder, "fp16")[1] == entry  # current: nothing built

    with open(engine, "ab") as fh:  # a damaged or swapped engine file is not current
        fh.write(b"\0")
    assert any(
        "changed since it was built" in r
        for r in rebuild_reasons(entry, engine, "fp16", trt.__version__, GPUS, entry["onnx_sha256"], BATCH)
    )

    model = onnx.load(str(folder / "model_fp16.onnx"))  # "re-export": same graph, new bytes, new sha256
    model.doc_string = "re-exported"
    onnx.save(model, str(folder / "model_fp16.onnx"))
    data = meta(folder)
    data["models"]["fp16"]["sha256"] = sha256_file(folder / "model_fp16.onnx")
    (folder / "metadata.json").write_text(json.dumps(data))
    tb.build_engines(folder, "fp16", BATCH, target="rtx", compute_capabilities=GPUS)
    rebuilt = entry_of(folder, "fp16")[1]
    assert rebuilt["onnx_sha256"] == data["models"]["fp16"]["sha256"] != entry["onnx_sha256"]
    assert rebuilt["sha256"] == sha256_file(engine) and rebuilt["built_at"] >= entry["built_at"]
    assert entry_of(folder, "fp32")[1] == entry_of(rtx_bundle, "fp32")[1]  # the other engine is kept


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"compute_capabilities": ["8.7"]}, "Jetson Orin: use --target tensorrt"),
        ({"compute_capabilities": ["9.0"]}, "Hopper"),
        ({"compute_capabilities": ["fast"]}, "not a compute capability"),
        ({"precision": "int8"}, "no int8_trt ONNX model.*hgad-edge quantize"),
        ({"target": "tensorrt", "compute_capabilities": ["8.6"]}, "applies to ahead-of-time targets"),
    ],
)
def test_bad_build_requests_fail_before_building(rtx_bundle, kwargs, words):
    args = {"precision": "fp16", "target": "rtx", **kwargs}
    with pytest.raises(BuildError, match=words):
        tb.build_engines(rtx_bundle, args.pop("precision"), BATCH, **args)


# ---- INT8: the explicitly quantized graph ------------------------------------------------------------
@pytest.fixture(scope="module")
def rtx_int8_bundle(rtx_bundle, tiny_data, tmp_path_factory) -> Path:
    """rtx_bundle quantized on one class's normal images, with a real INT8 engine built by the CLI."""
    folder = tmp_path_factory.mktemp("rtx_int8") / "bundle"
    shutil.copytree(rtx_bundle, folder)
    quantize_bundle(folder, folder_set(tiny_data / "stripes" / "train" / "good"))
    done = CliRunner().invoke(
        main, ["build", str(folder), "--target", "rtx", "--precision", "int8", "--batch", "1:2:4"]
    )
    assert done.exit_code == 0, done.output
    return folder


def test_int8_engine_is_built_from_the_qdq_graph(rtx_int8_bundle, rtx_bundle):
    data = meta(rtx_int8_bundle)
    name, entry = entry_of(rtx_int8_bundle, "int8")
    assert name == engine_name(trt.__version__, list(rtx_capabilities(trt)[1]), "int8", target="rtx")
    assert entry["model"] == "int8_trt" and entry["onnx_sha256"] == data["models"]["int8_trt"]["sha256"]
    assert entry["sha256"] == sha256_file(rtx_int8_bundle / "engines" / name) and entry["batch"] == list(BATCH)
    assert entry["strongly_typed"] and entry["int8_layers"] > 0 and entry["half_layers"] == 0
    assert entry["plugins"] == [] and entry["fp32_policy_layers"] > 50
    assert trtb.choose_engine(data, trt.__version__, "8.6", "int8", max_batch=4, target="rtx") == name
    assert entry_of(rtx_int8_bundle, "fp16")[1] == entry_of(rtx_bundle, "fp16")[1]  # quantize kept the engines


def test_int8_network_keeps_head_and_scoring_unquantized(rtx_int8_bundle):
    """No head/scoring layer outputs INT8 or reads a dequantized tensor, on TensorRT's own network."""
    model = onnx.load(str(rtx_int8_bundle / "model_int8_trt.onnx"))
    net = parse_network(trt, rtx_int8_bundle / "model_int8_trt.onnx", "int8", target="rtx")
    facts = network_facts(trt, net.network, net.parser, model)
    assert facts.violations == [] and facts.unmapped == [] and len(facts.int8_layers) > 10
    layers = [net.network.get_layer(i) for i in range(net.network.num_layers)]
    kinds = {layer.type for layer in layers}
    assert trt.LayerType.QUANTIZE in kinds and trt.LayerType.DEQUANTIZE in kinds


def test_int8_check_catches_a_dequantized_tensor_in_the_head(rtx_int8_bundle):
    """Label a node that reads a dequantized tensor as mixture head: both checks must name it."""
    model = onnx.load(str(rtx_int8_bundle / "model_int8_trt.onnx"))
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    victim = next(n for n in model.graph.node if n.op_type == "MatMul" and set(n.input) & dequantized)
    prop = next((p for p in victim.metadata_props if p.key == HIERARCHY_KEY), None) or victim.metadata_props.add()
    prop.key, prop.value = HIERARCHY_KEY, f"['{HEAD_CLASSES[0]}']"
    problems = check_graph(model, mixed=False, quantized=True, symmetric=True)
    assert any(victim.name in p for p in problems), problems
    net = parse_network(trt, rtx_int8_bundle / "model_int8_trt.onnx", "int8", target="rtx")
    facts = network_facts(trt, net.network, net.parser, model)
    assert facts.violations and all(victim.name in v for v in facts.violations)
    assert any("reads a dequantized tensor" in v for v in facts.violations)


# ---- check-trt with the real parser -----------------------------------------------------------------
def test_check_trt_uses_the_parser_and_agrees_with_the_table(rtx_bundle, tmp_path):
    result = check_onnx(rtx_bundle / "model_fp16.onnx")
    assert result.used_parser and result.ok and "TensorRT-RTX" in result.checker and "agrees" in result.markdown
    helper = onnx.helper
    f32 = onnx.TensorProto.FLOAT
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu0"),
        helper.make_node("Unique", ["r"], ["u"], name="uniq1"),
        helper.make_node("Gelu2", ["r"], ["g"], name="custom2", domain="com.example"),
        helper.make_node("ReduceLogSumExp", ["g"], ["y"], name="lse3", keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "bad",
        [helper.make_tensor_value_info("x", f32, ["B", 4])],
        [helper.make_tensor_value_info("u", f32, None), helper.make_tensor_value_info("y", f32, None)],
    )
    bad = tmp_path / "bad.onnx"
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)]),
        str(bad),
    )
    result = check_onnx(bad)
    assert not result.ok and {(f.name, f.op_type) for f in result.failures} == {
        ("uniq1", "Unique"),
        ("custom2", "Gelu2"),
        ("lse3", "ReduceLogSumExp"),
    }
    assert "Plugin not found" in next(f.reason for f in result.failures if f.name == "custom2")
    table = check_onnx(bad, use_parser=False)
    assert not table.used_parser and "operator table" in table.checker and not table.ok


# ---- running: GPU-only -----------------------------------------------------------------------------
def _gpu() -> tuple[int, str]:
    cuda = import_cuda()
    count, _ = cuda.device_count()
    return count, cuda.compute_capability(0) if count else ""


def test_without_gpu_deserialisation_is_no_device(rtx_bundle):
    """The real bindings on a machine without a GPU: a clear NO_DEVICE, never a crash or 'stale'."""
    if _gpu()[0]:
        pytest.skip("a CUDA device is present: deserialisation works here (see the inference test)")
    status, _ = create(rtx_bundle, backend="tensorrt")  # the device check comes first
    assert status == Status.NO_DEVICE and "no CUDA device" in last_error()
    status, h = create(rtx_bundle, backend="auto")  # and auto falls back to ONNX Runtime
    assert status == Status.OK, last_error()
    destroy(h)
    name, entry = entry_of(rtx_bundle, "fp16")
    code = textwrap.dedent(f"""
        import tensorrt_rtx_bindings as trt
        from hgad_edge.runtime.backends.tensorrt_backend import EngineFromPath
        from hgad_edge.core.errors import HgadRuntimeError
        loader = EngineFromPath(trt, {str(rtx_bundle / "engines" / name)!r}, "rebuild", {entry["sha256"]!r})
        try:
            loader()
        except HgadRuntimeError as err:
            print("STATUS", err.status.name, err)
    """)  # a subprocess: TensorRT objects without a GPU must not be able to take pytest down
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=os.environ.copy()
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "STATUS NO_DEVICE" in done.stdout and "backend='onnxruntime'" in done.stdout, (
        done.stdout + done.stderr[-2000:]
    )


@pytest.mark.tensorrt
def test_rtx_engine_matches_onnxruntime_on_an_rtx_gpu(rtx_bundle):
    count, cc = _gpu()
    if not count:
        pytest.skip(
            "running a TensorRT-RTX engine needs a CUDA GPU (none here); the build and network checks above ran"
        )
    if cc not in entry_of(rtx_bundle, "fp32")[1]["compute_capabilities"]:
        pytest.skip(f"this GPU (compute capability {cc}) is not a TensorRT-RTX target")
    frames = list(np.random.default_rng(0).integers(0, 256, (3, *meta(rtx_bundle)["input_size"], 3), dtype=np.uint8))
    results = {}
    for backend in ("tensorrt", "onnxruntime"):
        status, h = create(rtx_bundle, backend=backend, precision="fp32", max_batch=4)
        assert status == Status.OK, last_error()
        status, result = infer(h, frames, [0, 1, -1])
        assert status == Status.OK, last_error(h)
        results[backend] = result.copy()
        destroy(h)
    np.testing.assert_allclose(results["tensorrt"].score, results["onnxruntime"].score, rtol=1e-3, atol=1e-3)


def test_gpu_check_rtx_stage_says_why_it_did_not_measure(rtx_bundle, monkeypatch):
    from hgad_edge.bench import rtx_latency
    from hgad_edge.core.cuda_api import CudaPython
    from tests.helpers import FakeCudart

    if not _gpu()[0]:
        result = rtx_latency.time_rtx_engine(rtx_bundle)
        assert not result.rows and "no CUDA device" in result.note
    monkeypatch.setattr(rtx_latency, "tensorrt_status", lambda target: (True, ""))
    monkeypatch.setattr(rtx_latency, "import_cuda", lambda: CudaPython(FakeCudart(cc=(9, 0))))  # an H100/H200
    result = rtx_latency.time_rtx_engine(rtx_bundle)
    assert not result.rows and result.engine is None and "compute capability 9.0 (Hopper" in result.note
