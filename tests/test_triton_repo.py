"""Triton model repository writer: every config.pbtxt parsed with Triton's own ModelConfig schema,
tensor dims checked against the bundle's ONNX (read with onnx, not the writer's onnxruntime path)."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
from click.testing import CliRunner

from hgad_edge.cli import main
from hgad_edge.core.engine_records import engine_entry
from hgad_edge.core.errors import BundleError, InvalidArgumentError
from hgad_edge.runtime.triton.client import (
    METADATA_PARAMETER,
    SHAPES_PARAMETER,
    bundle_from_config,
    parse_url,
)
from hgad_edge.runtime.triton.repository import RepositoryError, write_repository

model_config_pb2 = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2", reason="tritonclient is not installed: pip install '.[serve]'"
)
text_format = pytest.importorskip("google.protobuf.text_format")
json_format = pytest.importorskip("google.protobuf.json_format")

TYPES = {
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.FLOAT: "TYPE_FP32",
}


def parse(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def onnx_tensors(path):
    """{name: (Triton type, per-sample dims)} straight from the ONNX graph."""
    graph = onnx.load(str(path)).graph
    out = {}
    for value in (*graph.input, *graph.output):
        tensor = value.type.tensor_type
        dims = [d.dim_value for d in tensor.shape.dim]
        assert tensor.shape.dim[0].dim_param, f"{value.name} has no symbolic batch axis"
        out[value.name] = (TYPES[tensor.elem_type], dims[1:])
    return out


def check_against_onnx(config, onnx_path):
    want = onnx_tensors(onnx_path)
    got = {}
    for tensor in (*config.input, *config.output):
        shape = list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)
        got[tensor.name] = (model_config_pb2.DataType.Name(tensor.data_type), shape)
        if tensor.HasField("reshape"):
            assert list(tensor.dims) == [1] and shape == []  # Triton's rule for batch-only tensors
    assert got == want


def test_onnx_models_parse_and_match_the_graphs(tiny_bundle, tmp_path):
    repo = tmp_path / "repo"
    models = write_repository(tiny_bundle.bundle, repo, max_batch=12, queue_delay_us=500, instances=2, kind="cpu")
    assert sorted(m.name for m in models) == ["hgad_onnx_fp16", "hgad_onnx_fp32"]
    meta = json.loads((tiny_bundle.bundle / "metadata.json").read_text())
    for model in models:
        config = parse(repo / model.name / "config.pbtxt")
        assert config.name == model.name and config.platform == "onnxruntime_onnx"
        assert (repo / model.name / "1" / "model.onnx").read_bytes() == (
            tiny_bundle.bundle / f"model_{model.precision}.onnx"
        ).read_bytes()
        check_against_onnx(config, repo / model.name / "1" / "model.onnx")
        assert config.max_batch_size == 12
        assert list(config.dynamic_batching.preferred_batch_size) == [12]
        assert config.dynamic_batching.max_queue_delay_microseconds == 500
        assert [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group] == [
            (2, "KIND_CPU")
        ]
        assert sorted(w.batch_size for w in config.model_warmup) == [1, 12]
        for warmup in config.model_warmup:
            assert set(warmup.inputs) == {i.name for i in config.input}
            assert warmup.inputs["class_id"].zero_data  # a random class id would index out of range
        params = {k: v.string_value for k, v in config.parameters.items()}
        assert json.loads(params[METADATA_PARAMETER]) == meta
        assert json.loads(params["hgad_edge.classes"]) == meta["classes"]
        assert json.loads(params["hgad_edge.input_size"]) == meta["input_size"]
        assert json.loads(params["hgad_edge.thresholds"]) == meta["thresholds"]
        assert params["hgad_edge.precision"] == model.precision
        # the client reads the same config (JSON form, as Triton returns it) back into a Bundle
        bundle, precision = bundle_from_config(
            json_format.MessageToDict(config, preserving_proto_field_name=True), "grpc://x:1"
        )
        assert bundle.classes == tuple(meta["classes"]) and precision == model.precision
        assert json.loads(params[SHAPES_PARAMETER])["score"] == []


def test_tensorrt_models_get_one_plan_per_compute_capability(tiny_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.bundle, bundle)
    meta = json.loads((bundle / "metadata.json").read_text())
    (bundle / "engines").mkdir()
    sha = meta["models"]["fp16"]["sha256"]
    # Engine files cannot be built without a GPU: the writer only copies them, so any bytes do here.
    for name, trt, cc, batch in (
        ("trt10.3.0_sm87_fp16.engine", "10.3.0", "8.7", (1, 4, 8)),
        ("trt10.8.0_sm90_fp16.engine", "10.8.0", "9.0", (1, 2, 16)),
        ("trt10.2.0_sm87_fp16.engine", "10.2.0", "8.7", (1, 4, 8)),
    ):
        (bundle / "engines" / name).write_bytes(name.encode())
        meta["engines"][name] = engine_entry("fp16", trt, cc, "model_fp16.onnx", sha, batch)
    rtx = "rtx1.7.1_sm89_fp16.engine"  # Triton's tensorrt backend cannot run TensorRT-RTX engines
    (bundle / "engines" / rtx).write_bytes(b"rtx")
    meta["engines"][rtx] = engine_entry("fp16", "1.7.1", ["8.9"], "model_fp16.onnx", sha, (1, 4, 8), target="rtx")
    (bundle / "metadata.json").write_text(json.dumps(meta))
    repo = tmp_path / "repo"
    models = {m.name: m for m in write_repository(bundle, repo)}
    trt = models["hgad_trt_fp16"]
    config = parse(repo / "hgad_trt_fp16" / "config.pbtxt")
    assert config.platform == "tensorrt_plan"
    # of two engines for sm87 the newer TensorRT wins, and the writer says so
    assert dict(config.cc_model_filenames) == {"8.7": "trt10.3.0_sm87_fp16.engine", "9.0": "trt10.8.0_sm90_fp16.engine"}
    assert any("replaced" in note for note in trt.notes)
    assert any(note.startswith(f"engine {rtx} is a rtx engine") for note in trt.notes)
    assert sorted(p.name for p in (repo / "hgad_trt_fp16" / "1").iterdir()) == [
        "trt10.3.0_sm87_fp16.engine",
        "trt10.8.0_sm90_fp16.engine",
    ]
    assert config.max_batch_size == 8  # the smallest profile maximum: every plan must take the batch
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 8]
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_GPU"
    check_against_onnx(config, bundle / "model_fp16.onnx")


def test_rewrite_replaces_only_its_models(tiny_bundle, tmp_path):
    repo = tmp_path / "repo"
    other = repo / "someone_else" / "config.pbtxt"
    other.parent.mkdir(parents=True)
    other.write_text('name: "someone_else"\n')
    write_repository(tiny_bundle.bundle, repo, max_batch=4)
    write_repository(tiny_bundle.bundle, repo, max_batch=8)
    assert other.read_text() == 'name: "someone_else"\n'
    assert parse(repo / "hgad_onnx_fp32" / "config.pbtxt").max_batch_size == 8
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]  # no staging folders left behind


def test_bad_options_fail_before_writing(tiny_bundle, tmp_path):
    for kwargs, match in (
        ({"max_batch": 0}, "max_batch"),
        ({"kind": "tpu"}, "instance kind"),
        ({"prefix": "a b"}, "prefix"),
    ):
        with pytest.raises(RepositoryError, match=match):
            write_repository(tiny_bundle.bundle, tmp_path / "repo", **kwargs)
    assert not (tmp_path / "repo").exists()


def test_cli_triton_repo(tiny_bundle, tmp_path):
    res = CliRunner().invoke(
        main, ["triton-repo", str(tiny_bundle.bundle), str(tmp_path / "repo"), "--kind", "cpu", "--max-batch", "4"]
    )
    assert res.exit_code == 0, res.output
    assert "tritonserver --model-repository" in res.output
    assert parse(tmp_path / "repo" / "hgad_onnx_fp32" / "config.pbtxt").max_batch_size == 4


def served_config(tiny_bundle, tmp_path) -> dict:
    write_repository(tiny_bundle.bundle, tmp_path / "repo", kind="cpu")
    config = parse(tmp_path / "repo" / "hgad_onnx_fp32" / "config.pbtxt")
    return json_format.MessageToDict(config, preserving_proto_field_name=True)


def _with_metadata(config: dict, **changes) -> dict:
    meta = {**json.loads(config["parameters"][METADATA_PARAMETER]["string_value"]), **changes}
    params = {**config["parameters"], METADATA_PARAMETER: {"string_value": json.dumps(meta)}}
    return {**config, "parameters": params}


def test_client_refuses_a_model_that_does_not_match(tiny_bundle, tmp_path):
    config = served_config(tiny_bundle, tmp_path)
    bare = {**config, "parameters": {}}
    with pytest.raises(BundleError, match="carries no hgad-edge metadata.*hgad-edge serve"):
        bundle_from_config(bare, "grpc://h:1/m")
    with pytest.raises(BundleError, match="major versions differ"):
        bundle_from_config(_with_metadata(config, package_version="99.0.0"), "grpc://h:1/m")
    with pytest.raises(BundleError, match=r"does not take uint8 images \[128, 128, 3\]"):
        bundle_from_config(_with_metadata(config, input_size=[128, 128]), "grpc://h:1/m")
    with pytest.raises(BundleError, match="one per class"):
        bundle_from_config(_with_metadata(config, classes=["a", "b", "c"]), "grpc://h:1/m")


def test_server_urls():
    assert parse_url("grpc://10.0.0.5:9001/hgad_trt_fp16") == ("10.0.0.5:9001", "hgad_trt_fp16")
    assert parse_url("grpc://server") == ("server:8001", None)
    with pytest.raises(InvalidArgumentError, match="grpc://host:port"):
        parse_url("grpc://a:b:c")
