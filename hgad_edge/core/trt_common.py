"""What the TensorRT builder, the TensorRT runtime backend and the benchmarks share (torch-free).

One home for: the registry of TensorRT *targets* (which library, what it supports), version and
compute-capability normalisation, importing a target's module, the TensorRT logger, and the
"can TensorRT run here" check. The CUDA side (device count, buffers) is `cuda_api.py`.

Two targets today, same C++/Python API where it matters (builder, ONNX parser, optimisation
profiles, build_serialized_network, Runtime, execute_async_v3):

* ``tensorrt``: TensorRT 10/11 (`import tensorrt`), for Jetson (JetPack's TensorRT) and data-centre
  GPUs. Builds on the GPU that will run the engine (the engine is tied to its compute capability).
* ``rtx``: TensorRT for RTX (`import tensorrt_rtx_bindings`, PyPI wheels
  tensorrt-rtx-cu12-libs/-bindings), for RTX / RTX PRO GPUs (industrial vision PCs). Builds ahead of
  time on a CPU without a GPU; one engine runs on a list of compute capabilities (by default its
  portable set: Ampere 8.0/8.6, Ada 8.9, Blackwell 12.x; Turing 7.5 only when asked for; no Jetson
  8.7, no Hopper 9.0). Networks are always strongly typed; timing caches are no-ops (deprecated
  since TensorRT-RTX 1.2), kernels are specialised just in time on the target GPU instead.
"""

from __future__ import annotations

import collections
import importlib
import importlib.util
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Any

from hgad_edge.core.errors import BackendUnavailableError

__all__ = [
    "ENGINE_PRECISIONS",
    "TARGETS",
    "TrtTarget",
    "cc_text",
    "get_target",
    "import_target",
    "make_logger",
    "rtx_capabilities",
    "sm_text",
    "tensorrt_status",
    "version3",
    "version_tuple",
]

log = logging.getLogger("hgad_edge.runtime")


@dataclass(frozen=True)
class TrtTarget:
    """One TensorRT flavour: its module(s), engine-file prefix and what it can build."""

    name: str  # --target value, metadata "target"
    label: str  # for people
    builder_module: str  # has Builder + OnnxParser
    runtime_modules: tuple[str, ...]  # tried in order to run engines (lean runtime: version-compatible plans)
    file_prefix: str  # engine file names start with <prefix><major.minor.patch>
    precisions: tuple[str, ...]
    builds_without_gpu: bool  # CPU-only ahead-of-time builds
    timing_cache: bool  # the builder honours timing caches
    selectable_capabilities: bool  # --compute-capability picks the engine's GPUs
    install: str  # how to get it
    hardware: str  # which machines it is for


TARGETS: dict[str, TrtTarget] = {
    t.name: t
    for t in (
        TrtTarget(
            "tensorrt",
            "TensorRT",
            "tensorrt",
            ("tensorrt", "tensorrt_lean"),
            "trt",
            ("fp16", "fp32", "int8"),
            builds_without_gpu=False,
            timing_cache=True,
            selectable_capabilities=False,
            install="pip install 'hgad-edge[tensorrt]' (or JetPack's python3-libnvinfer on Jetson)",
            hardware="Jetson (JetPack TensorRT) and data-centre GPUs",
        ),
        TrtTarget(
            "rtx",
            "TensorRT-RTX",
            "tensorrt_rtx_bindings",
            ("tensorrt_rtx_bindings",),
            "rtx",
            ("fp16", "fp32", "int8"),
            builds_without_gpu=True,
            timing_cache=False,
            selectable_capabilities=True,
            install="pip install 'hgad-edge[tensorrt-rtx]'",
            hardware="RTX / RTX PRO GPUs (compute capability 7.5 opt-in, 8.0, 8.6, 8.9, 12.x)",
        ),
    )
}


ENGINE_PRECISIONS = tuple(dict.fromkeys(p for t in TARGETS.values() for p in t.precisions))


def get_target(name: str) -> TrtTarget:
    if name not in TARGETS:
        raise ValueError(f"TensorRT target must be one of {list(TARGETS)}, got {name!r}")
    return TARGETS[name]


def entry_target(entry: dict[str, Any]) -> str:
    """Target of a metadata engines entry (entries written before targets existed are TensorRT)."""
    return str(entry.get("target", "tensorrt"))


# ---- versions and compute capabilities (pure) ----------------------------------------------------
def version_tuple(version: Any, parts: int) -> tuple[int, ...]:
    """First `parts` numeric components of a version string ("10.3.0.30" -> (10, 3, 0))."""
    numbers = []
    for piece in str(version).split(".")[:parts]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        numbers.append(int(digits) if digits else 0)
    return tuple(numbers + [0] * (parts - len(numbers)))


def version3(version: Any) -> str:
    """ "major.minor.patch" of a version ("10.3" -> "10.3.0")."""
    return ".".join(str(n) for n in version_tuple(version, 3))


def cc_text(value: Any) -> str:
    """Normalise a compute capability ("8.7", "87", 8.7, (8, 7), "sm120") to "8.7" / "12.0"."""
    if isinstance(value, (tuple, list)):
        return f"{int(value[0])}.{int(value[1])}"
    text = str(value).strip().lower().removeprefix("sm").removeprefix("_")
    if "." in text:
        major, minor = text.split(".", 1)
        return f"{int(major)}.{int(minor)}"
    return f"{int(text[:-1])}.{int(text[-1:])}"


def sm_text(value: Any) -> str:
    """Compute capability without the dot, as in file names: "8.7" -> "87"."""
    return cc_text(value).replace(".", "")


def rtx_capabilities(trt: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(all compute capabilities TensorRT-RTX can target, its default portable set).

    Read from the bindings' ComputeCapability enum (SM75, SM80, ...). Per NVIDIA's TensorRT-RTX docs
    ("CPU-only AOT and TensorRT-RTX engines") the default covers Ampere and later; Turing (7.5) must be
    requested explicitly.
    """
    names = [n for n in trt.ComputeCapability.__members__ if n.startswith("SM")]
    every = tuple(sorted((cc_text(n) for n in names), key=lambda c: version_tuple(c, 2)))
    return every, tuple(c for c in every if version_tuple(c, 2) >= (8, 0))


# ---- importing a target --------------------------------------------------------------------------
def import_target(target: str, build: bool = False) -> Any:
    """The module of `target` (builder module when `build`); BackendUnavailableError naming the install."""
    spec = get_target(target)
    names = (spec.builder_module,) if build else spec.runtime_modules
    first_error: Exception | None = None
    for name in names:
        try:
            return importlib.import_module(name)
        except (ImportError, OSError) as err:  # OSError: the wheel is there, its shared libraries are not
            first_error = first_error or err
    raise BackendUnavailableError(f"{spec.label} is not installed ({first_error}): {spec.install}")


def importable(target: str, build: bool = False) -> bool:
    """Whether a module of `target` is installed, without importing it."""
    spec = get_target(target)
    names = (spec.builder_module,) if build else spec.runtime_modules
    return any(importlib.util.find_spec(n) is not None for n in names)


def tensorrt_status(target: str | None = None) -> tuple[bool, str]:
    """Whether TensorRT engines can run here, checked without constructing any TensorRT object.

    `target` None: any target. Returns (ok, reason when not).
    """
    from hgad_edge.core.cuda_api import import_cuda

    names = [target] if target else list(TARGETS)
    if not any(importable(n) for n in names):
        return False, " / ".join(f"{TARGETS[n].label} is not installed ({TARGETS[n].install})" for n in names)
    try:
        count, reason = import_cuda().device_count()
    except BackendUnavailableError as err:
        return False, str(err)
    return (True, "") if count > 0 else (False, f"no CUDA device ({reason})")


# ---- logger ----------------------------------------------------------------------------------------
_LOGGERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def make_logger(trt: Any) -> Any:
    """The TensorRT logger of module `trt`: forwards to Python logging and keeps the last errors.

    One per module and process: TensorRT keeps the first logger it was given and ignores later ones
    ("the current new logger is ignored"), so a second instance would never see an error. Callers
    read what a call logged with `mark = logger.count` before and `logger.errors_since(mark)` after.
    """
    if trt in _LOGGERS:
        return _LOGGERS[trt]
    sev = trt.ILogger.Severity
    levels = {
        sev.INTERNAL_ERROR: logging.CRITICAL,
        sev.ERROR: logging.ERROR,
        sev.WARNING: logging.WARNING,
        sev.INFO: logging.DEBUG,
        sev.VERBOSE: logging.DEBUG,
    }

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: collections.deque[str] = collections.deque(maxlen=200)
            self.count = 0
            self.lock = threading.Lock()

        def log(self, severity: Any, msg: str) -> None:
            level = levels.get(severity, logging.INFO)
            if level >= logging.ERROR:
                with self.lock:
                    self.errors.append(msg)
                    self.count += 1
            log.log(level, "TensorRT: %s", msg)

        def errors_since(self, mark: int) -> list[str]:
            with self.lock:
                new = min(self.count - mark, len(self.errors))
                return list(self.errors)[-new:] if new > 0 else []

    logger = _LOGGERS[trt] = _Logger()
    return logger
