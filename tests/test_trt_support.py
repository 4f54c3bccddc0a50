"""Static TensorRT-support check on small hand-made ONNX graphs (CPU only, no TensorRT)."""

from __future__ import annotations

from importlib.resources import files

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hgad_edge.export.trt_support import TRT_OPS, check_trt_support, format_report, op_info

F = TensorProto.FLOAT


def model(nodes, inputs=None, outputs=None, inits=(), opset=18, functions=(), extra_opsets=()):
    inputs = inputs or [helper.make_tensor_value_info("x", F, ["B", 4])]
    outputs = outputs or [helper.make_tensor_value_info("y", F, None)]
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    opsets = [helper.make_opsetid("", opset), *[helper.make_opsetid(d, v) for d, v in extra_opsets]]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions))


def axes(name, values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


def op(report, op_type):
    return next(o for o in report.ops if o.op_type == op_type)


def test_table_comes_from_operators_md():
    table = files("hgad_edge.export") / "trt_operators.md"  # package data: setup.cfg ships it in the wheel
    assert len(TRT_OPS) == len(table.read_text(encoding="utf-8").splitlines()) > 180
    assert op_info("Conv").supported and "FP16" in op_info("Conv").types
    assert not op_info("Unique").supported
    assert op_info("Attention").since == (10, 14)
    assert op_info("NoSuchOp") is None


def test_supported_graph_is_ok():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Add", ["r", "r"], ["a"]),
        helper.make_node("Sigmoid", ["a"], ["y"]),
    ]
    report = check_trt_support(model(nodes))
    assert report.ok and report.opset == 18
    assert {o.op_type: o.count for o in report.ops} == {"Relu": 1, "Add": 1, "Sigmoid": 1}
    assert all(o.supported and o.level == "ok" for o in report.ops)


@pytest.mark.parametrize(
    "node, words",
    [
        (helper.make_node("FancyOp", ["x"], ["y"]), "not in onnx-tensorrt"),
        (helper.make_node("Unique", ["x"], ["y"]), "unsupported"),
        (helper.make_node("Gelu2", ["x"], ["y"], domain="com.example"), "custom domain"),
    ],
)
def test_unsupported_and_unknown_ops_are_errors(node, words):
    extra = [("com.example", 1)] if node.domain else []
    report = check_trt_support(model([node], extra_opsets=extra))
    assert not report.ok
    entry = op(report, node.op_type)
    assert not entry.supported and entry.level == "error" and words in entry.note


def test_reduce_logsumexp_is_flagged_even_though_supported():
    nodes = [helper.make_node("ReduceLogSumExp", ["x", "ax"], ["y"], keepdims=0)]
    report = check_trt_support(model(nodes, inits=[axes("ax", [1])]))
    entry = op(report, "ReduceLogSumExp")
    assert entry.supported and entry.level == "error" and "max shift" in entry.note
    assert not report.ok and any("ReduceLogSumExp" in e for e in report.errors)


def test_logsumexp_inside_a_local_function_is_found():
    body = [
        helper.make_node("ReduceLogSumExp", ["a", "ax"], ["b"]),
        helper.make_node("Constant", [], ["ax"], value=axes("v", [1])),
    ]
    fn = helper.make_function("local", "LSE", ["a"], ["b"], body, [helper.make_opsetid("", 18)])
    report = check_trt_support(
        model([helper.make_node("LSE", ["x"], ["y"], domain="local")], functions=[fn], extra_opsets=[("local", 1)])
    )
    assert not report.ok and op(report, "ReduceLogSumExp").level == "error"


def test_nodes_inside_if_branches_are_checked():
    branch = helper.make_graph(
        [helper.make_node("Unique", ["x"], ["u"])], "b", [], [helper.make_tensor_value_info("u", F, None)]
    )
    cond = numpy_helper.from_array(np.array(True), "c")
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)
    report = check_trt_support(model([node], inits=[cond]))
    assert op(report, "Unique").level == "error" and op(report, "If").supported


def test_uint8_input_must_go_straight_into_a_cast():
    images = [helper.make_tensor_value_info("images", TensorProto.UINT8, ["B", 8, 8, 3])]
    good = [
        helper.make_node("Cast", ["images"], ["f"], to=F),
        helper.make_node("Transpose", ["f"], ["y"], perm=[0, 3, 1, 2]),
    ]
    report = check_trt_support(model(good, inputs=images))
    assert report.ok and any(i.level == "note" and "Cast" in i.message for i in report.issues)
    bad = [
        helper.make_node("Transpose", ["images"], ["t"], perm=[0, 3, 1, 2]),
        helper.make_node("Cast", ["t"], ["y"], to=F),
    ]
    report = check_trt_support(model(bad, inputs=images))
    assert not report.ok and any("uint8" in e and "Transpose" in e for e in report.errors)


def test_int64_io_is_a_note():
    inputs = [helper.make_tensor_value_info("class_id", TensorProto.INT64, ["B"])]
    report = check_trt_support(model([helper.make_node("Identity", ["class_id"], ["y"])], inputs=inputs))
    assert report.ok and any("int64" in i.message for i in report.issues)


def test_attribute_restrictions():
    nodes = [
        helper.make_node("Resize", ["x", "", "sc"], ["r"], mode="cubic"),
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("ReduceSum", ["r", "s"], ["y"]),  # axes computed at run time
    ]
    scales = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "sc")
    report = check_trt_support(model(nodes, inits=[scales]))
    assert "cubic" in op(report, "Resize").note and op(report, "Resize").level == "error"
    assert op(report, "ReduceSum").level == "error" and "constant" in op(report, "ReduceSum").note


@pytest.mark.parametrize("opset, level", [(8, "error"), (18, None), (21, "warning"), (25, "error")])
def test_opset_range(opset, level):
    report = check_trt_support(model([helper.make_node("Relu", ["x"], ["y"])], opset=opset))
    levels = [i.level for i in report.issues if "opset" in i.message]
    assert levels == ([level] if level else [])


def test_ops_added_within_10x_depend_on_the_version():
    node = helper.make_node("RMSNormalization", ["x", "w"], ["y"])
    weight = numpy_helper.from_array(np.ones(4, np.float32), "w")
    assert op(check_trt_support(model([node], inits=[weight], opset=23)), "RMSNormalization").level == "warning"
    old = check_trt_support(model([node], inits=[weight], opset=23), trt_version="10.3.0")
    assert op(old, "RMSNormalization").level == "error" and "10.15" in op(old, "RMSNormalization").note


def test_check_accepts_a_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(model([helper.make_node("Relu", ["x"], ["y"])]), str(path))
    assert check_trt_support(path).source == str(path)
    with pytest.raises(FileNotFoundError, match="hgad-edge export"):
        check_trt_support(tmp_path / "missing.onnx")


def test_format_report_is_a_markdown_table():
    nodes = [helper.make_node("ReduceLogSumExp", ["x", "ax"], ["l"]), helper.make_node("Relu", ["l"], ["y"])]
    text = format_report(check_trt_support(model(nodes, inits=[axes("ax", [1])])))
    assert text.startswith("## TensorRT 10 ONNX-parser check: 1 error(s)")
    assert "| Op | Count | Supported | Level | Note |" in text
    assert "| ReduceLogSumExp | 1 | yes | error |" in text and "| Relu | 1 | yes | ok |" in text
    assert text.index("ReduceLogSumExp") < text.index("| Relu")  # errors first
