"""The CLI verbs on the tiny run, as a user types them: export, build (no GPU here), check-trt;
errors without tracebacks; importing the CLI and every verb's --help stay light. (train/eval:
test_train_eval.py; bench: test_bench.py; run: test_runtime_integration.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from hgad_edge.cli import main


def _invoke(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    return res


@pytest.mark.slow
def test_export_writes_a_checked_bundle(tiny_run, tmp_path):
    res = _invoke("export", tiny_run, "--out", tmp_path / "b", "--precision", "fp32", "--no-simplify")
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "b" / "metadata.json").read_text())
    assert list(meta["models"]) == ["fp32"] and (tmp_path / "b" / "model_fp32.onnx").is_file()
    assert f"opset {meta['models']['fp32']['opset']}" in res.output and "imports into TensorRT (" in res.output
    assert "next: hgad-edge build" in res.output


def test_export_refuses_what_is_not_a_run(tmp_path):
    res = _invoke("export", tmp_path, "--out", tmp_path / "b")
    assert res.exit_code == 1 and "Error:" in res.output and not (tmp_path / "b" / "metadata.json").exists()
    res = _invoke("export", tmp_path, "--out", tmp_path / "b", "--precision", "fp8")
    assert res.exit_code == 2 and "fp8" in res.output


def test_build_without_a_gpu_says_what_is_missing(tiny_bundle):
    from hgad_edge.core.engine_records import BuildError
    from hgad_edge.export.trt_devices import require_cuda_device

    try:
        require_cuda_device(0)
        pytest.skip("a CUDA device is present: this checks the error on machines without one")
    except BuildError:
        pass
    res = _invoke("build", tiny_bundle.bundle, "--precision", "fp16")
    assert res.exit_code == 1, res.output
    assert "Error:" in res.output and ("CUDA" in res.output or "TensorRT" in res.output)
    assert not (tiny_bundle.bundle / "engines").exists() or not list((tiny_bundle.bundle / "engines").glob("*.engine"))
    res = _invoke("build", tiny_bundle.bundle, "--batch", "8:1")
    assert res.exit_code == 2 and "min:opt:max" in res.output
    res = _invoke("build", tiny_bundle.bundle, "--precision", "int8")
    assert res.exit_code == 1 and "hgad-edge quantize" in res.output  # int8 is the bundle's Q/DQ graph


def test_check_trt_passes_the_exported_graph_and_fails_an_unsupported_one(tiny_bundle, tmp_path):
    res = _invoke("check-trt", tiny_bundle.files["fp32"])
    assert res.exit_code == 0, res.output
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Unique", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "bad.onnx")
    res = _invoke("check-trt", tmp_path / "bad.onnx")
    assert res.exit_code == 1 and "Unique" in res.output and "will not build" in res.output


def test_cli_and_every_help_import_no_torch_bench_or_training():
    """Importing the CLI, `hgad-edge --help` and each verb's --help load no torch, no bench stage (only
    the bench's choices) and no training side; `train --help` reads only its head-mode registry (plain Python)."""
    code = """
import json, sys
from click.testing import CliRunner
import hgad_edge.cli
from hgad_edge.cli import main

def heavy():
    prefixes = ("torch.", "hgad_edge.bench", "hgad_edge.training")
    light = ("hgad_edge.bench", "hgad_edge.bench.choices")  # the lazy package and the verb's choices
    return sorted(m for m in sys.modules if (m == "torch" or m.startswith(prefixes)) and m not in light)

loaded = {"import": heavy()}
runner = CliRunner()
for args in (["--help"], *([verb, "--help"] for verb in sorted(main.commands) if verb != "train")):
    result = runner.invoke(main, args)
    assert result.exit_code == 0 and "Usage:" in result.output, (args, result.output)
loaded["help"] = heavy()
assert runner.invoke(main, ["train", "--help"]).exit_code == 0
loaded["train"] = heavy()
print(json.dumps(loaded))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    assert loaded["import"] == loaded["help"] == []
    assert loaded["train"] == ["hgad_edge.training", "hgad_edge.training.config"]


def test_bench_choices_name_the_bench_engines():
    """The bench verb's --backends / --precisions (hgad_edge.bench.choices, light) are the keys and
    precisions of the engine registry."""
    from hgad_edge.bench.choices import BACKENDS, DEFAULT_BACKENDS, PRECISIONS
    from hgad_edge.bench.engines import ENGINES

    assert tuple(ENGINES) == BACKENDS and set(DEFAULT_BACKENDS) <= set(BACKENDS)
    assert PRECISIONS == tuple(dict.fromkeys(p for kind in ENGINES.values() for p in kind.precisions))
    backends = next(p for p in main.commands["bench"].params if p.name == "backends")
    assert backends.default == ",".join(DEFAULT_BACKENDS) and ",".join(BACKENDS) in backends.help


def test_python_m_runs_the_cli():
    """`python -m hgad_edge.cli` (how ServeProcess starts `serve`) is the same group."""
    done = subprocess.run(
        [sys.executable, "-m", "hgad_edge.cli", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and "triton-repo" in done.stdout, done.stderr
