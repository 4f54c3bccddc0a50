"""`hgad-edge info`: what it reports, which build target it picks, and that it needs neither torch nor
TensorRT nor a GPU (those are blocked in a subprocess, as on a base install)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from click.testing import CliRunner

from hgad_edge import __version__
from hgad_edge.cli import main
from hgad_edge.info import (
    build_target,
    camera_facts,
    extras_status,
    format_info,
    gather,
    tensorrt_facts,
)
from tests.helpers import REPO

HAS_RTX = any(importlib.util.find_spec(m) is not None for m in ("tensorrt_rtx", "tensorrt_rtx_bindings"))
# Modules a base install (pip install hgad-edge, no extras, no GPU stack) does not have.
BLOCKED = (
    "torch",
    "tensorrt",
    "tensorrt_lean",
    "tensorrt_rtx",
    "tensorrt_rtx_bindings",
    "cuda",
    "cuda.bindings",
    "pycuda",
)


def _facts(trt=None, devices=()):
    return {"tensorrt": trt or {}, "cuda": {"devices": list(devices), "reason": "no driver"}}


def _gpu(cc, name="GPU"):
    return {"index": 0, "name": name, "compute_capability": cc}


FULL_TRT = {"tensorrt": {"module": "tensorrt", "version": "10.3.0", "broken": None, "builder": True}}
# capabilities: TensorRT-RTX 1.7's ComputeCapability enum (SM75 ... SM121), as tensorrt_facts reads it
RTX = {
    "tensorrt_rtx": {
        "module": "tensorrt_rtx_bindings",
        "version": "1.7.1",
        "broken": None,
        "builder": True,
        "capabilities": ["7.5", "8.0", "8.6", "8.9", "12.0", "12.1"],
    }
}


@pytest.mark.parametrize(
    ("trt", "devices", "target", "words"),
    [
        (FULL_TRT, [_gpu("8.7", "Orin")], "tensorrt", "Orin (sm87)"),
        ({**FULL_TRT, **RTX}, [_gpu("8.6")], "tensorrt", "TensorRT 10.3.0"),
        (RTX, [_gpu("8.9", "RTX 4090")], "rtx", "RTX 4090 (sm89)"),
        (RTX, [_gpu("8.0", "A100")], "rtx", "A100 (sm80)"),
        (RTX, [], "rtx", "builds on this CPU"),
        (RTX, [_gpu("8.7", "Orin")], None, "needs full TensorRT"),
        (RTX, [_gpu("9.0", "H200")], None, "needs full TensorRT"),
        (FULL_TRT, [], None, "no CUDA device"),
        (
            {"tensorrt_lean": {"module": "tensorrt_lean", "version": "10.3", "broken": None, "builder": False}},
            [],
            None,
            "no TensorRT",
        ),
        ({}, [], None, "no TensorRT"),
    ],
)
def test_build_target_fits_library_and_gpu(trt, devices, target, words):
    got, why = build_target(_facts(trt, devices))
    assert got == target and words in why


@pytest.mark.skipif(not HAS_RTX, reason="TensorRT-RTX is not installed")
def test_rtx_capabilities_come_from_the_installed_library():
    """The GPUs `info` offers RTX builds for are the library's own targets: never Jetson (8.7) nor Hopper (9.0)."""
    ccs = tensorrt_facts()["tensorrt_rtx"]["capabilities"]
    assert "8.6" in ccs and "8.7" not in ccs and "9.0" not in ccs


def test_extras_status_lists_what_is_missing():
    requires = ["numpy>=1.24", 'click>=8; extra == "a"', 'no-such-dist-hgad>=1; extra == "a"', "pytest; extra == 'b'"]
    assert extras_status(requires) == {"a": ["no-such-dist-hgad"], "b": []}
    assert extras_status(None) is None


def test_cameras_are_listed_in_device_order(tmp_path):
    for n in (10, 2, 0):
        (tmp_path / f"video{n}").touch()
    assert [c["device"].rsplit("/", 1)[1] for c in camera_facts(str(tmp_path / "video*"))] == [
        "video0",
        "video2",
        "video10",
    ]


def test_info_command_here():
    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(None, 1) for line in result.output.splitlines())
    assert lines["hgad-edge"] == __version__
    assert "CPUExecutionProvider" in lines["onnxruntime"] and "onnxruntime" in lines["packages"]
    assert "devices:" in lines["cuda"] and lines["cameras"] and lines["build"]
    if HAS_RTX:
        assert "TensorRT-RTX" in lines["tensorrt"]
    facts = gather()
    target, _ = build_target(facts)
    assert lines["build"].startswith(f"--target {target}" if target else "no --target fits")
    if not facts["cuda"]["devices"]:  # no GPU (this machine, CI): the CPU-only wording
        assert "devices: none (" in lines["cuda"]
        assert ("--target rtx: TensorRT-RTX" in lines["build"]) == HAS_RTX


def test_info_without_torch_tensorrt_or_cuda():
    """The base install: every GPU/TensorRT module and torch blocked; info still works and says so."""
    code = (
        "import sys\n"
        f"for name in {BLOCKED!r}: sys.modules[name] = None\n"
        "from hgad_edge.cli import main\n"
        "main(['info'], standalone_mode=False)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(None, 1) for line in proc.stdout.splitlines())
    assert lines["tensorrt"].startswith("not installed")
    assert (
        lines["cuda"].startswith("cuda-python")
        and "devices: none (neither cuda-python nor pycuda is importable" in lines["cuda"]
    )
    assert lines["build"].startswith("no --target fits: no TensorRT here")


def test_format_info_is_one_fact_per_line():
    text = format_info(gather())
    keys = [line.split(None, 1)[0] for line in text.splitlines()]
    assert keys == [
        "hgad-edge",
        "python",
        "machine",
        "packages",
        "extras",
        "onnxruntime",
        "tensorrt",
        "cuda",
        "cameras",
        "build",
    ]
