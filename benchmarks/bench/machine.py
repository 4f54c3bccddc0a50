"""The machine a report was measured on: CPU, board, cores, GPU, versions, load, folder name."""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def cpu_model(cpuinfo: str | None = None) -> str:
    """CPU name from /proc/cpuinfo ('model name' on x86, 'Model'/'Hardware' on some ARM boards)."""
    cpuinfo = _read("/proc/cpuinfo") if cpuinfo is None else cpuinfo
    for key in ("model name", "Model", "Hardware", "cpu model"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        if match and match.group(1).strip():
            return match.group(1).strip()
    return platform.processor() or platform.machine() or "unknown-cpu"


def board_model() -> str | None:
    """The board of an ARM SoC from the device tree (e.g. 'NVIDIA Jetson Orin Nano ...'); None on PCs."""
    return _read("/proc/device-tree/model").strip("\x00 \n") or None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def physical_cores(cpuinfo: str | None = None) -> int:
    """Distinct (physical id, core id) pairs: what ONNX Runtime's default thread pool uses."""
    cpuinfo = _read("/proc/cpuinfo") if cpuinfo is None else cpuinfo
    cores, phys = set(), "0"
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys = value.strip()
        elif key == "core id":
            cores.add((phys, value.strip()))
    return len(cores) or usable_cores()


def gpu_name() -> str | None:
    """Name of CUDA device 0 through torch, or None (no torch CUDA, no device)."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - a broken driver means no GPU for this report
        return None
    return None


def _slug(text: str, limit: int = 40) -> str:
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    text = re.sub(r"\bcpu\b|@.*$|\d+-core processor|with radeon graphics", " ", text)
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:limit].strip("-")


def machine_name(cpu: str | None, cores: int, gpu: str | None = None, hostname: str | None = None) -> str:
    """Report folder name: `<cpu-model-or-hostname>-<cores>c[-<gpu>]`, lower-case, [a-z0-9-] only.

    >>> machine_name("Intel(R) Xeon(R) CPU @ 2.20GHz", 2)
    'intel-xeon-2c'
    >>> machine_name("AMD EPYC", 16, "NVIDIA H200")
    'amd-epyc-16c-nvidia-h200'
    """
    base = _slug(cpu or "") or _slug(hostname or "") or "machine"
    name = f"{base}-{int(cores)}c"
    gpu_part = _slug(gpu or "")
    return f"{name}-{gpu_part}" if gpu_part else name


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return str(getattr(__import__(module), "__version__", "?"))
    except Exception as err:  # noqa: BLE001 - e.g. tensorrt without its libraries
        return f"unusable ({type(err).__name__})"


def machine_info() -> dict[str, Any]:
    cpu, board, cores, gpu = cpu_model(), board_model(), usable_cores(), gpu_name()
    versions = {m: _version(m) for m in ("torch", "onnxruntime", "tensorrt", "numpy", "cv2", "timm", "onnx")}
    return {
        "name": machine_name(board or cpu, cores, gpu, socket.gethostname()),
        "hostname": socket.gethostname(),
        "cpu_model": cpu,
        "board": board,
        "cores": cores,
        "physical_cores": physical_cores(),
        "gpu": gpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {"hgad_edge": _package_version(), **versions},
    }


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def busy_warning(load_before: Sequence[float] | None, load_after: Sequence[float] | None, cores: int) -> str | None:
    """A warning when other work was running: 1-minute load above half the cores before the
    benchmark started, or above the cores plus 1 at its end (the benchmark itself uses them all)."""
    if load_before and load_before[0] > 0.5 * cores:
        return (
            f"the machine was busy before the benchmark started (1-min load {load_before[0]} on {cores} cores): "
            "numbers are not representative"
        )
    if load_after and load_after[0] > cores + 1:
        return (
            f"other work ran during the benchmark (1-min load {load_after[0]} on {cores} cores at the end): "
            "numbers are not representative"
        )
    return None


def _package_version() -> str:
    from hgad_edge import __version__

    return __version__
