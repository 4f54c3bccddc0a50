"""What this machine offers hgad-edge, as `hgad-edge info` prints it for a bug report.

Torch-free and safe on any machine: versions come from package metadata where importing would be
heavy (torch) and no TensorRT object is ever constructed (that can crash without a GPU); CUDA is
asked through cuda-python only. `gather()` collects the facts, `build_target()` says which
`hgad-edge build --target` fits them, `format_info()` writes the text.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import platform
import re
from importlib import metadata
from pathlib import Path
from typing import Any

from hgad_edge import __version__

__all__ = ["build_target", "format_info", "gather"]

# Python modules of each TensorRT flavour, in the order they are tried.
TENSORRT_MODULES = {
    "tensorrt": ("tensorrt",),
    "tensorrt_lean": ("tensorrt_lean",),
    "tensorrt_rtx": ("tensorrt_rtx", "tensorrt_rtx_bindings"),
}
TENSORRT_NAMES = {"tensorrt": "TensorRT", "tensorrt_lean": "TensorRT lean runtime", "tensorrt_rtx": "TensorRT-RTX"}


# ---- facts -----------------------------------------------------------------------------------------
def dist_version(*names: str) -> str | None:
    """Installed version of the first distribution found among `names` (no import), else None."""
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def extras_status(requires: list[str] | None) -> dict[str, list[str]] | None:
    """{extra: requirements of it that are not installed} from Requires-Dist lines; None if unknown."""
    if requires is None:
        return None
    out: dict[str, list[str]] = {}
    for line in requires:
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", line)
        if not extra:
            continue
        name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line).group(1)
        missing = out.setdefault(extra.group(1), [])
        if dist_version(name) is None and name not in missing:
            missing.append(name)
    return out


def _module_version(module: str) -> tuple[str | None, str | None]:
    """(version, None) if `module` imports, (None, why) if it is installed but broken, (None, None) if absent."""
    if importlib.util.find_spec(module) is None:
        return None, None
    try:
        mod = importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - e.g. bindings without their shared libraries
        return None, f"{type(err).__name__}: {err}"
    return str(getattr(mod, "__version__", "?")), None


def tensorrt_facts() -> dict[str, dict[str, Any]]:
    """Per TensorRT flavour: module, version, whether it has a builder, or why it does not import."""
    from hgad_edge.core.trt_common import rtx_capabilities

    out: dict[str, dict[str, Any]] = {}
    for flavour, modules in TENSORRT_MODULES.items():
        for module in modules:
            version, broken = _module_version(module)
            if version or broken:
                mod = importlib.import_module(module) if version else None
                builder = hasattr(mod, "Builder")
                out[flavour] = {"module": module, "version": version, "broken": broken, "builder": builder}
                if flavour == "tensorrt_rtx" and hasattr(mod, "ComputeCapability"):
                    # the GPUs its engines can target, from the library's own enum: no list of ours to go stale
                    out[flavour]["capabilities"] = list(rtx_capabilities(mod)[0])
                break
    return out


def cuda_facts() -> dict[str, Any]:
    """cuda-python / pycuda versions and the CUDA devices with their compute capability."""
    from hgad_edge.core.cuda_api import import_cuda
    from hgad_edge.core.errors import BackendUnavailableError

    bindings = dist_version("cuda-python") or (
        f"{dist_version('cuda-bindings')} (cuda-bindings)" if dist_version("cuda-bindings") else None
    )
    facts: dict[str, Any] = {"cuda_python": bindings, "pycuda": dist_version("pycuda"), "devices": [], "reason": ""}
    try:
        cuda = import_cuda()
    except BackendUnavailableError:
        facts["reason"] = "neither cuda-python nor pycuda is importable"
        return facts
    count, facts["reason"] = cuda.device_count()
    for index in range(count):
        device = {"index": index, "name": "unknown GPU", "compute_capability": "?"}
        try:
            device["compute_capability"] = cuda.compute_capability(index)
            device["name"] = cuda.device_name(index)
        except Exception as err:  # noqa: BLE001 - a device that cannot be queried is still listed
            device["error"] = str(err)
        facts["devices"].append(device)
    return facts


def camera_facts(pattern: str = "/dev/video*") -> list[dict[str, str]]:
    """V4L2 devices with the driver's name for them (/sys/class/video4linux/videoN/name)."""
    cameras = []
    for dev in sorted(glob.glob(pattern), key=lambda p: (len(p), p)):
        name_file = Path("/sys/class/video4linux") / Path(dev).name / "name"
        try:
            name = name_file.read_text().strip()
        except OSError:
            name = ""
        cameras.append({"device": dev, "name": name})
    return cameras


def gather() -> dict[str, Any]:
    """Every fact `hgad-edge info` prints (no torch import, no TensorRT object)."""
    from hgad_edge.bench.machine import board_model, cpu_model, usable_cores
    from hgad_edge.runtime.backends.onnxruntime_backend import available_providers

    try:
        requires = metadata.distribution("hgad-edge").requires or []
    except metadata.PackageNotFoundError:
        requires = None
    import cv2
    import numpy as np
    import onnxruntime

    return {
        "hgad_edge": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "board": board_model(),
        "cores": usable_cores(),
        "versions": {
            "numpy": np.__version__,
            "opencv": cv2.__version__,
            "onnxruntime": onnxruntime.__version__,
            "torch": dist_version("torch"),
        },
        "extras": extras_status(requires),
        "onnxruntime_providers": available_providers(),
        "tensorrt": tensorrt_facts(),
        "cuda": cuda_facts(),
        "cameras": camera_facts(),
    }


# ---- which build target ---------------------------------------------------------------------------
def build_target(facts: dict[str, Any]) -> tuple[str | None, str]:
    """(`hgad-edge build --target` value or None, why) for these facts.

    Full TensorRT needs the GPU it builds for; TensorRT-RTX builds without one (CPU ahead of time),
    but its engines only run on RTX-class GPUs.
    """
    trt, devices = facts["tensorrt"], facts["cuda"]["devices"]
    full = trt.get("tensorrt") if trt.get("tensorrt", {}).get("builder") else None
    rtx = trt.get("tensorrt_rtx") if trt.get("tensorrt_rtx", {}).get("version") else None
    gpu = devices[0] if devices else None
    if full and gpu:
        return "tensorrt", f"TensorRT {full['version']} builds engines for {gpu['name']} (sm{_sm(gpu)}) here"
    rtx_ccs = rtx.get("capabilities", []) if rtx else []
    if rtx and gpu and gpu["compute_capability"] in rtx_ccs:
        return "rtx", f"TensorRT-RTX {rtx['version']} builds engines for {gpu['name']} (sm{_sm(gpu)}) here"
    if rtx and not gpu:
        return "rtx", (
            f"TensorRT-RTX {rtx['version']} builds on this CPU; its engines run on GPUs of compute capability "
            f"{', '.join(rtx_ccs)}, not on Jetson"
        )
    if gpu:
        return None, (
            f"{gpu['name']} (sm{_sm(gpu)}) needs full TensorRT: pip install 'hgad-edge[tensorrt]' "
            "(JetPack's python3-libnvinfer on Jetson); meanwhile `run` uses ONNX Runtime"
        )
    if full:
        return None, f"TensorRT {full['version']} is installed but there is no CUDA device: build on the target GPU"
    return None, (
        "no TensorRT here, so `run` uses ONNX Runtime; engines are built on the target: "
        "pip install 'hgad-edge[tensorrt]' there (or TensorRT-RTX for RTX GPUs, which also builds on a CPU)"
    )


def _sm(device: dict[str, Any]) -> str:
    return str(device["compute_capability"]).replace(".", "")


# ---- text -------------------------------------------------------------------------------------------
def _or_absent(version: str | None) -> str:
    return version if version else "not installed"


def _extras_line(extras: dict[str, list[str]] | None) -> str:
    if extras is None:
        return "unknown (hgad-edge is not pip-installed here)"
    return "; ".join(
        f"{name}: {'installed' if not missing else 'missing ' + ', '.join(missing)}" for name, missing in extras.items()
    )


def _tensorrt_line(trt: dict[str, dict[str, Any]]) -> str:
    if not trt:
        return "not installed (no tensorrt, tensorrt_lean or TensorRT-RTX module)"
    parts = []
    for flavour, fact in trt.items():
        what = f"{TENSORRT_NAMES[flavour]} {fact['version']} ({fact['module']}{', builder' if fact['builder'] else ''})"
        parts.append(what if fact["version"] else f"{TENSORRT_NAMES[flavour]} broken ({fact['broken']})")
    return "; ".join(parts)


def _cuda_line(cuda: dict[str, Any]) -> str:
    devices = [f"{d['index']}: {d['name']} (compute capability {d['compute_capability']})" for d in cuda["devices"]]
    listed = "; ".join(devices) if devices else f"none ({cuda['reason']})"
    return f"cuda-python {_or_absent(cuda['cuda_python'])}, pycuda {_or_absent(cuda['pycuda'])}; devices: {listed}"


def format_info(facts: dict[str, Any]) -> str:
    """The text a user pastes into a bug report: one fact per line."""
    v = facts["versions"]
    target, why = build_target(facts)
    cameras = ", ".join(f"{c['device']} ({c['name']})" if c["name"] else c["device"] for c in facts["cameras"])
    rows = [
        ("hgad-edge", facts["hgad_edge"]),
        ("python", f"{facts['python']} on {facts['platform']}"),
        ("machine", f"{facts['board'] or facts['cpu']}, {facts['cores']} usable cores"),
        (
            "packages",
            f"numpy {v['numpy']}, opencv {v['opencv']}, onnxruntime {v['onnxruntime']}, torch {_or_absent(v['torch'])}",
        ),
        ("extras", _extras_line(facts["extras"])),
        ("onnxruntime", "providers " + ", ".join(facts["onnxruntime_providers"] or ["none"])),
        ("tensorrt", _tensorrt_line(facts["tensorrt"])),
        ("cuda", _cuda_line(facts["cuda"])),
        ("cameras", cameras or "none (no /dev/video*)"),
        ("build", f"--target {target}: {why}" if target else f"no --target fits: {why}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {val}" for k, val in rows)


# ---- a bundle -------------------------------------------------------------------------------------
def format_bundle(path: Path | str) -> str:
    """`hgad-edge info BUNDLE`: what the bundle holds and where its model came from (its lineage: the
    class changes since training from scratch), verified as the runtime loads it."""
    from hgad_edge.core.bundle import load_bundle
    from hgad_edge.core.bundle_schema import describe_lineage

    bundle = load_bundle(path)
    calibration = bundle.calibration
    rows = [
        ("bundle", str(bundle.path)),
        ("classes", ", ".join(bundle.classes)),
        ("models", ", ".join(f"{p} ({m['sha256'][:12]})" for p, m in bundle.models.items())),
        ("checkpoint", str(bundle.metadata.get("checkpoint_sha256"))),
        (
            "calibration",
            f"{calibration['policy']} of {calibration['class']} on {calibration['date']}"
            if calibration
            else "as exported",
        ),
    ]
    width = max(len(k) for k, _ in rows + [("lineage", "")])
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    for i, line in enumerate(describe_lineage(bundle.lineage)):
        lines.append(f"{'lineage' if i == 0 else '':<{width}}  {line}")
    return "\n".join(lines)
