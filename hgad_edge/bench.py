"""Benchmark report of a trained run: what it costs, how fast it runs where, and what precision costs.

`run_bench(run_dir, out_dir, ...)` writes one folder per machine, `<out>/<machine_name()>/`:

  report.md         the report a person reads (tables, targets PASS/MISS, where the time goes)
  report.json       the same numbers, machine-readable (schema SCHEMA, see `run_bench`)
  throughput.png    images/s per backend / precision / batch, end to end and model only
  breakdown.png     torch eager latency per component + ONNX Runtime time per op type
  bundle/           the run exported for the runtime (unless `bundle=` names an existing one)

What is measured:
- FLOPs and parameters per component (backbone, each flow level, head+scoring), counted by
  torch.utils.flop_counter.FlopCounterMode on fake tensors (shapes only, no arithmetic), for the
  run's own configuration and for the official HGAD configuration beside the paper's Tab. 5.
- Latency p50/p90/p99 and throughput per backend (torch eager; ONNX Runtime and TensorRT through
  the torch-free runtime's Detector), precision and batch, after warm-up: end to end (host resize
  from a 640x480 camera frame, inference, outputs on the host) and model only.
- Accuracy per backend and precision on real data (image AUROC, pixel AUROC where masks exist) and
  the largest score / map drift against PyTorch FP32.
- The official configuration (random weights: timing only) in PyTorch eager FP32 in the same run,
  so speed-ups are ratios measured side by side.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import math
import os
import platform
import re
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

SCHEMA = "hgad-edge-bench/1"
CAMERA_FRAME = (480, 640)  # (H, W) of the simulated camera frame the host resizes
# The official HGAD pipeline (deployment-facts.md): one stride-16 stage of EfficientNet-B6 on a
# 1024/512/256 image pyramid, 12 couplings per level; 15 classes as on MVTec AD.
PAPER_CONFIG: dict[str, Any] = {
    "input_size": [1024, 1024],
    "backbone": {"name": "tf_efficientnet_b6", "stages": [3], "pyramid": [1.0, 0.5, 0.25]},
    "flow": {"coupling_blocks": 12},
}
PAPER_CLASSES = 15
PAPER_TAB5 = {"gflops": 32.8, "learnable_params_m": 30.8, "input_size": [256, 256], "fps": 24.3}
OFFICIAL_MAX_ITERS = 5  # the official configuration is timed on a few images at batch 1 only
OFFICIAL_BUDGET_S = 240.0
BACKENDS = ("torch", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
# (backend, precision) pairs whose speed-up over the official configuration is reported
RATIO_CASES = (("onnxruntime", "fp32"), ("torch", "fp32"), ("onnxruntime", "fp16"), ("tensorrt", "fp16"), ("torch", "fp16"), ("tensorrt", "int8"))
TARGET_CPU_IPS, TARGET_CPU_VS_TORCH, TARGET_GPU_VS_OFFICIAL = 25.0, 2.0, 20.0


# ---- machine ------------------------------------------------------------------------------------
def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def cpu_model(cpuinfo: Optional[str] = None) -> str:
    """CPU name from /proc/cpuinfo ('model name' on x86, 'Model'/'Hardware' on some ARM boards)."""
    cpuinfo = _read("/proc/cpuinfo") if cpuinfo is None else cpuinfo
    for key in ("model name", "Model", "Hardware", "cpu model"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        if match and match.group(1).strip():
            return match.group(1).strip()
    return platform.processor() or platform.machine() or "unknown-cpu"


def board_model() -> Optional[str]:
    """The board of an ARM SoC from the device tree (e.g. 'NVIDIA Jetson Orin Nano ...'); None on PCs."""
    return _read("/proc/device-tree/model").strip("\x00 \n") or None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def physical_cores(cpuinfo: Optional[str] = None) -> int:
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


def gpu_name() -> Optional[str]:
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


def machine_name(cpu: Optional[str], cores: int, gpu: Optional[str] = None, hostname: Optional[str] = None) -> str:
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


def _version(module: str) -> Optional[str]:
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


def load_average() -> Optional[list[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def busy_warning(load_before: Optional[Sequence[float]], load_after: Optional[Sequence[float]], cores: int) -> Optional[str]:
    """A warning when other work was running: 1-minute load above half the cores before the
    benchmark started, or above the cores plus 1 at its end (the benchmark itself uses them all)."""
    if load_before and load_before[0] > 0.5 * cores:
        return f"the machine was busy before the benchmark started (1-min load {load_before[0]} on {cores} cores): numbers are not representative"
    if load_after and load_after[0] > cores + 1:
        return f"other work ran during the benchmark (1-min load {load_after[0]} on {cores} cores at the end): numbers are not representative"
    return None


def _package_version() -> str:
    from . import __version__

    return __version__


# ---- statistics ---------------------------------------------------------------------------------
def latency_stats(ms: Sequence[float], batch: int = 1) -> dict[str, Any]:
    """p50/p90/p99 (linear interpolation), mean, min, max of per-call latencies in ms, and the
    throughput they imply (batch images per mean call). Empty input -> n=0 and None values."""
    values = np.asarray(list(ms), dtype=np.float64)
    if values.size == 0:
        return {"n": 0, **{k: None for k in ("mean_ms", "p50_ms", "p90_ms", "p99_ms", "min_ms", "max_ms", "images_per_s")}}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    mean = float(values.mean())
    return {
        "n": int(values.size),
        "mean_ms": mean,
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "min_ms": float(values.min()),
        "max_ms": float(values.max()),
        "images_per_s": batch * 1e3 / mean if mean > 0 else None,
    }


# ---- budget and stages --------------------------------------------------------------------------
class Budget:
    """Wall-clock allowance of the whole benchmark; None = unlimited."""

    def __init__(self, seconds: Optional[float]) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - (time.perf_counter() - self.start)

    def spent(self) -> bool:
        return self.left() <= 0


@dataclass
class Log:
    """What ran, what was skipped and why, and the tracebacks of what failed; never raises."""

    budget: Budget
    stages: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)

    def skip(self, what: str, reason: str) -> None:
        self.skipped.append({"what": what, "reason": reason})

    @contextlib.contextmanager
    def stage(self, name: str):
        if self.budget.spent():
            self.skip(name, f"time budget of {self.budget.seconds:.0f} s used up")
            self.stages.append({"name": name, "status": "skipped (budget)", "seconds": 0.0})
            yield False
            return
        t0 = time.perf_counter()
        status = "ok"
        try:
            yield True
        except Exception as err:  # noqa: BLE001 - one failed stage must not lose the report
            status = f"failed: {type(err).__name__}: {err}"
            self.errors.append({"stage": name, "traceback": traceback.format_exc(limit=8)})
        self.stages.append({"name": name, "status": status, "seconds": round(time.perf_counter() - t0, 2)})


# ---- the pipeline stage by stage ----------------------------------------------------------------
@contextlib.contextmanager
def _no_stage(name: str):
    yield


def staged_forward(scorer, images, class_id, stage: Callable[[str], Any] = _no_stage):
    """AnomalyScorer.forward split into components, each run inside `stage(name)` (a context
    manager factory: a FLOP counter, a timer). Components: "backbone" (cast, normalisation,
    pyramid, backbone), "flow <level>" per level, "head+scoring" (mixture heads, class choice,
    standardisation, upsampling, smoothing, image score, calibrated normalisation).
    Returns the same 4 outputs as scorer(images, class_id)."""
    from .scoring import image_score

    model = scorer.model
    with stage("backbone"):
        feats = model.features(model.preprocess(images))
    latents = []
    for k, feat in enumerate(feats):
        with stage(f"flow {model.levels[k].name}"):
            latents.append(model.flow_map(k, feat))
    with stage("head+scoring"):
        terms = []
        for k, (feat, (z, log_jac)) in enumerate(zip(feats, latents)):
            b, _, h, w = feat.shape
            loglik, nh, log_post = model.heads[k](z, log_jac)
            y = loglik.shape[1]
            terms.append((loglik.reshape(b, h, w, y).permute(0, 3, 1, 2), nh.reshape(b, h, w), log_post.reshape(b, h, w, y).permute(0, 3, 1, 2)))
        cls, _ = scorer.select_class(terms, class_id)
        lls, nhs = scorer.level_maps(terms, cls)
        amap = scorer.anomaly_map(lls, nhs, cls)
        score = image_score(amap, scorer.cfg.topk)
        out = (amap, score, scorer.normalize(score, cls), cls)
    return out


def component_modules(scorer) -> dict[str, list]:
    """The modules whose parameters belong to each component of `staged_forward`."""
    model = scorer.model
    parts = {"backbone": [model.backbone]}
    parts.update({f"flow {lv.name}": [model.flows[k]] for k, lv in enumerate(model.levels)})
    parts["head+scoring"] = [model.heads]
    return parts


def _params(modules: Iterable) -> tuple[int, int]:
    params = [p for m in modules for p in m.parameters()]
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def count_complexity(scorer, batch: int = 1) -> dict[str, Any]:
    """FLOPs (FlopCounterMode: 2 per multiply-add of conv/matmul; elementwise ops uncounted) and
    parameters per component at the scorer's input size, on fake tensors (no arithmetic runs).
    `total_flops` is one whole forward counted on its own, to check the components add up."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    h, w = scorer.model.cfg.input_size
    flops: dict[str, int] = {}

    @contextlib.contextmanager
    def counted(name: str):
        with FlopCounterMode(display=False) as counter:
            yield
        flops[name] = flops.get(name, 0) + int(counter.get_total_flops())

    device = next(scorer.parameters()).device
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        images = torch.zeros(batch, h, w, 3, dtype=torch.uint8, device=device)
        cls = torch.full((batch,), -1, dtype=torch.long, device=device)
        staged_forward(scorer, images, cls, counted)
        with FlopCounterMode(display=False) as whole:
            scorer(images, cls)
    components = []
    for name, modules in component_modules(scorer).items():
        total, learnable = _params(modules)
        components.append({"name": name, "flops": flops.get(name, 0), "gmacs": flops.get(name, 0) / 2e9, "params": total, "learnable_params": learnable})
    total_params, learnable = _params([scorer])
    return {
        "counter": "torch.utils.flop_counter.FlopCounterMode (FakeTensorMode)",
        "input_size": [int(h), int(w)],
        "batch": batch,
        "components": components,
        "sum_components_flops": sum(c["flops"] for c in components),
        "total_flops": int(whole.get_total_flops()),
        "total_gflops": whole.get_total_flops() / 1e9,
        "total_gmacs": whole.get_total_flops() / 2e9,
        "params": total_params,
        "learnable_params": learnable,
    }


# ---- engines: one interface over torch eager and the runtime ------------------------------------
class TorchEngine:
    """PyTorch eager on `device`: host resize (the runtime's own resize) -> tensor -> forward -> host."""

    backend = "torch"

    def __init__(self, scorer, device: str, precision: str = "fp32") -> None:
        self.scorer, self.device, self.precision = scorer, device, precision
        self.size = tuple(scorer.model.cfg.input_size)
        self.description = f"torch {__import__('torch').__version__} eager on {device}"

    def _sync(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def run(self, frames: Sequence[np.ndarray], class_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray, float]:
        """-> (anomaly maps, scores, model-only ms). Wall time around this call is end to end."""
        import torch

        from .data import resize_image

        batch = np.stack([f if f.shape[:2] == self.size else resize_image(f, self.size) for f in frames])
        images = torch.from_numpy(batch).to(self.device)
        cls = torch.as_tensor(np.asarray(class_ids, dtype=np.int64)).to(self.device)
        self._sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.scorer(images, cls)
        self._sync()
        model_ms = (time.perf_counter() - t0) * 1e3
        host = [o.float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy() for o in out]
        return host[0], host[1], model_ms

    def close(self) -> None:
        self.scorer = None


class RuntimeEngine:
    """The torch-free runtime's Detector (ONNX Runtime or TensorRT); latency_ms['model'] is model only."""

    def __init__(self, detector, backend: str, precision: str) -> None:
        self.detector, self.backend, self.precision = detector, backend, precision
        self.description = detector.info["description"]

    def run(self, frames: Sequence[np.ndarray], class_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray, float]:
        result = self.detector.infer(list(frames), list(class_ids))
        return result.anomaly_map.copy(), result.score.copy(), float(result.latency_ms["model"])

    def close(self) -> None:
        self.detector.close()


class RunnerEngine:
    """A bare runtime runner + packer (TensorRT INT8: the runtime's Detector loads fp16/fp32 only)."""

    def __init__(self, runner, classes: Sequence[str], backend: str, precision: str) -> None:
        from .runtime.preprocess import BatchPacker

        self.runner, self.backend, self.precision = runner, backend, precision
        specs = runner.input_specs
        self.packer = BatchPacker(runner.inputs[specs[0].name], runner.inputs[specs[1].name], classes)
        self.description = runner.description

    def run(self, frames: Sequence[np.ndarray], class_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray, float]:
        batch = self.packer.pack(list(frames), list(class_ids))
        t0 = time.perf_counter()
        out = self.runner.infer(batch)
        model_ms = (time.perf_counter() - t0) * 1e3
        return out["anomaly_map"].copy(), out["score"].copy(), model_ms

    def close(self) -> None:
        self.runner.deactivate()


def tensorrt_status() -> tuple[bool, str]:
    """Whether TensorRT can run here, checked without constructing any TensorRT object."""
    if importlib.util.find_spec("tensorrt") is None:
        return False, "tensorrt is not installed (pip install hgad-edge[tensorrt] on a CUDA machine)"
    try:
        from .runtime.backends.tensorrt_backend import cuda_device_count, import_cudart

        count, reason = cuda_device_count(import_cudart())
    except Exception as err:  # noqa: BLE001
        return False, f"cuda-python unavailable ({err})"
    return (True, "") if count > 0 else (False, f"no CUDA device ({reason})")


@dataclass
class Setup:
    """Everything the stages share."""

    run_dir: Path
    folder: Path
    bundle: Path
    scorer: Any
    cfg: Any
    meta: dict
    device: str
    batches: tuple[int, ...]
    warmup: int
    iters: int
    log: Log
    calib_dir: Optional[Path] = None
    trt_ok: bool = False
    trt_reason: str = ""

    @property
    def max_batch(self) -> int:
        return max(self.batches)


def skip_reason(setup: Setup, backend: str, precision: str) -> Optional[str]:
    """Why (backend, precision) is not measured here, or None when it is."""
    gpu = setup.device.startswith("cuda")
    if precision == "int8" and backend != "tensorrt":
        return "int8 only through TensorRT (calibrated engine); no int8 path for " + backend
    if backend == "torch" and precision == "fp16" and not gpu:
        return "torch fp16 on CPU skipped: CPU half precision is not a deployment target"
    if backend == "tensorrt" and not setup.trt_ok:
        return f"TensorRT unavailable: {setup.trt_reason}"
    if backend == "tensorrt" and precision == "int8" and setup.calib_dir is None:
        return "TensorRT int8 needs calibration images: pass --data"
    return None


def open_engine(setup: Setup, backend: str, precision: str):
    """An engine for (backend, precision), building the TensorRT engine first if needed."""
    if backend == "torch":
        scorer = setup.scorer
        if precision == "fp16":
            scorer = copy.deepcopy(scorer)
            scorer.model.set_body_dtype(__import__("torch").float16)
        return TorchEngine(scorer, setup.device, precision)
    from .runtime import Detector

    if backend == "tensorrt":
        path = _build_trt(setup, precision)
        if precision == "int8":
            return _int8_engine(setup, path)
    det = Detector(setup.bundle, backend=backend, precision=precision, max_batch=setup.max_batch)
    return RuntimeEngine(det, backend, precision)


def _build_trt(setup: Setup, precision: str) -> Path:
    from .export.trt_build import build_engines

    top = setup.max_batch
    return build_engines(setup.bundle, precision, batch=(1, max(1, top // 2), top), calib_dir=setup.calib_dir if precision == "int8" else None)


def _int8_engine(setup: Setup, path: Path) -> RunnerEngine:
    from .runtime.backends import input_specs
    from .runtime.backends.tensorrt_backend import EngineFromPath, TensorRTRunner, import_cudart, import_tensorrt
    from .runtime.bundle import OUTPUT_NAMES, load_bundle

    bundle = load_bundle(setup.bundle)
    trt, cudart = import_tensorrt(), import_cudart()
    loader = EngineFromPath(trt, path, f"hgad-edge build {setup.bundle} --precision int8")
    runner = TensorRTRunner(loader, input_specs(bundle), list(OUTPUT_NAMES), setup.max_batch, 0, cudart)
    runner.precision = "int8"
    return RunnerEngine(runner.activate(), bundle.classes, "tensorrt", "int8")


# ---- latency --------------------------------------------------------------------------------------
def camera_frames(batch: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return list(rng.integers(0, 256, (batch, *CAMERA_FRAME, 3), dtype=np.uint8))


def time_engine(engine, batch: int, warmup: int, iters: int, budget: Budget, desc: str) -> dict[str, Any]:
    """Warm-up, then `iters` timed calls on camera-size frames (fewer if the budget runs out)."""
    frames, cls = camera_frames(batch), [-1] * batch
    for _ in range(warmup):
        engine.run(frames, cls)
    e2e, model = [], []
    for _ in tqdm(range(iters), desc=desc, leave=False, unit="call"):
        t0 = time.perf_counter()
        _, _, model_ms = engine.run(frames, cls)
        e2e.append((time.perf_counter() - t0) * 1e3)
        model.append(model_ms)
        if budget.spent():
            break
    return {"e2e": latency_stats(e2e, batch), "model": latency_stats(model, batch), "iters": len(e2e), "truncated": len(e2e) < iters}


def bench_latency(setup: Setup, backends: Sequence[str], precisions: Sequence[str], budget: Budget) -> list[dict[str, Any]]:
    rows = []
    for backend in backends:
        for precision in precisions:
            reason = skip_reason(setup, backend, precision)
            base = {"backend": backend, "precision": precision}
            if reason:
                rows += [{**base, "batch": b, "status": "skipped", "reason": reason} for b in setup.batches]
                continue
            rows += _time_case(setup, backend, precision, budget)
    return rows


def _time_case(setup: Setup, backend: str, precision: str, budget: Budget) -> list[dict[str, Any]]:
    base = {"backend": backend, "precision": precision}
    try:
        engine = open_engine(setup, backend, precision)
    except Exception as err:  # noqa: BLE001 - e.g. ORT without fp16 kernels: a note, not a crash
        setup.log.errors.append({"stage": f"open {backend} {precision}", "traceback": traceback.format_exc(limit=6)})
        return [{**base, "batch": b, "status": "failed", "reason": f"{type(err).__name__}: {err}"} for b in setup.batches]
    rows = []
    try:
        for batch in setup.batches:
            row = {**base, "batch": batch, "device": _engine_device(setup, engine), "description": engine.description}
            if budget.spent():
                rows.append({**row, "status": "skipped", "reason": "time budget used up"})
                continue
            try:
                timed = time_engine(engine, batch, setup.warmup, setup.iters, budget, f"{backend} {precision} b{batch}")
                rows.append({**row, "status": "ok", **timed})
            except Exception as err:  # noqa: BLE001
                rows.append({**row, "status": "failed", "reason": f"{type(err).__name__}: {err}"})
    finally:
        engine.close()
    return rows


def _engine_device(setup: Setup, engine) -> str:
    if engine.backend == "torch":
        return setup.device
    if engine.backend == "tensorrt":
        return "cuda"
    return "cuda" if "CUDA" in engine.description or "Tensorrt" in engine.description else "cpu"


# ---- accuracy and drift ---------------------------------------------------------------------------
def cap_samples(samples: Sequence[Any], n: Optional[int]) -> list[Any]:
    """At most n samples, normal and anomalous in their original proportion (at least one of each
    where both exist and n >= 2), picked evenly spaced so every defect type stays represented."""
    samples = list(samples)
    if n is None or len(samples) <= n:
        return samples
    groups = [[s for s in samples if s.label == v] for v in (0, 1)]
    groups = [g for g in groups if g]
    if len(groups) == 1 or n < 2:
        return _evenly(samples, n)
    normal, anomalous = groups
    k_normal = min(len(normal), max(1, round(n * len(normal) / len(samples))))
    k_normal = min(k_normal, n - 1)
    k_anomalous = min(len(anomalous), n - k_normal)
    return _evenly(normal, k_normal) + _evenly(anomalous, k_anomalous)


def _evenly(items: list, k: int) -> list:
    if k <= 0:
        return []
    idx = np.unique(np.linspace(0, len(items) - 1, k).round().astype(int))
    return [items[i] for i in idx]


def _predict(engine, images: np.ndarray, class_id: int, max_batch: int) -> tuple[np.ndarray, np.ndarray]:
    maps, scores = [], []
    for i in range(0, len(images), max_batch):
        chunk = list(images[i : i + max_batch])
        m, s, _ = engine.run(chunk, [class_id] * len(chunk))
        maps.append(np.asarray(m, dtype=np.float32))
        scores.append(np.asarray(s, dtype=np.float64))
    return np.concatenate(maps), np.concatenate(scores)


def _class_data(setup: Setup, dataset, name: str, max_images: Optional[int]):
    from .data import load_mask
    from .batching import load_batch

    samples = cap_samples([s for s in dataset.samples("test") if s.class_name == name], max_images)
    size = tuple(setup.cfg.input_size)
    images = load_batch(samples, size).numpy()
    labels = np.array([s.label for s in samples], dtype=np.int64)
    masks = None
    if dataset.has_masks(name):
        masks = np.stack([load_mask(s.mask_path, shape=size) if s.mask_path else np.zeros(size, bool) for s in samples])
    return images, labels, masks


def _metrics(labels: np.ndarray, scores: np.ndarray, masks, maps: np.ndarray) -> dict[str, Any]:
    from .metrics import auroc

    finite = np.isfinite(scores).all() and np.isfinite(maps).all()
    out: dict[str, Any] = {"n": int(labels.size), "n_anomalous": int(labels.sum()), "finite": bool(finite)}
    both = 0 < labels.sum() < labels.size
    out["image_auroc"] = auroc(labels, np.nan_to_num(scores, nan=np.inf)) if both else None
    out["pixel_auroc"] = auroc(masks, np.nan_to_num(maps, nan=np.inf)) if masks is not None and masks.any() and not masks.all() else None
    return out


def bench_accuracy(setup: Setup, data_roots: Sequence[Path], backends, precisions, max_images: Optional[int], budget: Budget) -> dict[str, Any]:
    """Per class image/pixel AUROC per backend and precision; drift against torch FP32."""
    from .data import open_roots

    dataset = open_roots([Path(r) for r in data_roots])
    names = list(setup.scorer.model.class_names)
    classes = [c for c in dataset.classes if c in names]
    unknown = [c for c in dataset.classes if c not in names]
    if not classes:
        raise ValueError(f"none of the data's classes {dataset.classes} is a class of the model {names}")
    engines = {("torch", "fp32"): TorchEngine(setup.scorer, setup.device)}
    cases = [(b, p) for b in backends for p in precisions if (b, p) != ("torch", "fp32") and skip_reason(setup, b, p) is None]
    for case in cases:
        try:
            engines[case] = open_engine(setup, *case)
        except Exception as err:  # noqa: BLE001
            setup.log.skip(f"accuracy {case[0]} {case[1]}", f"{type(err).__name__}: {err}")
    result: dict[str, Any] = {"data_roots": [str(r) for r in data_roots], "max_images": max_images, "classes": {}, "drift": {}, "unknown_classes": unknown}
    drift = {f"{b} {p}": {"backend": b, "precision": p, "max_abs_score_diff": 0.0, "max_abs_map_diff": 0.0, "n_images": 0, "nonfinite": 0} for b, p in engines}
    try:
        for name in tqdm(classes, desc="accuracy", unit="class"):
            if budget.spent():
                setup.log.skip(f"accuracy {name}", "time budget used up")
                continue
            images, labels, masks = _class_data(setup, dataset, name, max_images)
            class_id = names.index(name)
            ref_maps = ref_scores = None
            per_engine = {}
            for (b, p), engine in engines.items():
                maps, scores = _predict(engine, images, class_id, setup.max_batch)
                per_engine[f"{b} {p}"] = _metrics(labels, scores, masks, maps)
                if ref_maps is None:
                    ref_maps, ref_scores = maps, scores
                _update_drift(drift[f"{b} {p}"], maps, scores, ref_maps, ref_scores)
            result["classes"][name] = per_engine
    finally:
        for engine in engines.values():
            if engine.backend != "torch" or engine.precision != "fp32":
                engine.close()
    result["drift"] = list(drift.values())
    return result


def _update_drift(entry: dict, maps, scores, ref_maps, ref_scores) -> None:
    bad = ~(np.isfinite(maps).all(axis=(1, 2)) & np.isfinite(scores))
    entry["nonfinite"] += int(bad.sum())
    entry["n_images"] += int(scores.size)
    ok = ~bad
    if ok.any():
        entry["max_abs_score_diff"] = max(entry["max_abs_score_diff"], float(np.abs(scores[ok] - ref_scores[ok]).max()))
        entry["max_abs_map_diff"] = max(entry["max_abs_map_diff"], float(np.abs(maps[ok] - ref_maps[ok]).max()))


# ---- the official configuration -------------------------------------------------------------------
def build_scorer(config: dict, num_classes: int = PAPER_CLASSES):
    """An uncalibrated scorer with RANDOM weights for `config` (counting and timing only)."""
    from .config import HGADConfig
    from .model import HGADModel
    from .scoring import AnomalyScorer

    cfg = HGADConfig.from_dict(config)
    model = HGADModel(cfg, [f"class{i}" for i in range(num_classes)], load_backbone_weights=False)
    return AnomalyScorer(model, cfg.score).eval(), cfg


def bench_official(setup: Setup, config: dict, label: str, budget: Budget) -> dict[str, Any]:
    """Complexity and batch-1 eager FP32 speed of the official configuration (random weights)."""
    t0 = time.perf_counter()
    scorer, cfg = build_scorer(config)
    out: dict[str, Any] = {"label": label, "config": config, "random_weights": True, "build_s": time.perf_counter() - t0}
    out["complexity"] = count_complexity(scorer)
    scorer = scorer.to(setup.device)
    engine = TorchEngine(scorer, setup.device)
    allowance = Budget(min(OFFICIAL_BUDGET_S, budget.left()))
    timed = time_engine(engine, 1, 1, min(setup.iters, OFFICIAL_MAX_ITERS), allowance, "official eager fp32 b1")
    out["latency"] = {"backend": "official torch eager", "precision": "fp32", "batch": 1, "device": setup.device, "status": "ok", **timed}
    return out


def paper_config_at(size: int) -> dict:
    return {**PAPER_CONFIG, "input_size": [size, size]}


# ---- where the time goes --------------------------------------------------------------------------
def component_latency(scorer, device: str, warmup: int, iters: int, budget: Budget) -> dict[str, Any]:
    """Torch eager ms per component of `staged_forward` at batch 1 (synchronised on CUDA)."""
    import torch

    h, w = scorer.model.cfg.input_size
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, h, w, 3), dtype=np.uint8)).to(device)
    cls = torch.full((1,), -1, dtype=torch.long, device=device)
    times: dict[str, list[float]] = {}

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def timed(name: str):
        sync()
        t0 = time.perf_counter()
        yield
        sync()
        times.setdefault(name, []).append((time.perf_counter() - t0) * 1e3)

    with torch.inference_mode():
        for _ in range(warmup):
            staged_forward(scorer, images, cls)
        for _ in tqdm(range(iters), desc="component latency", leave=False):
            staged_forward(scorer, images, cls, timed)
            if budget.spent():
                break
    total = sum(float(np.median(v)) for v in times.values())
    comps = [{"name": k, "p50_ms": float(np.median(v)), "share": float(np.median(v)) / total if total else None} for k, v in times.items()]
    return {"device": device, "batch": 1, "backend": "torch eager fp32", "components": comps, "sum_p50_ms": total}


def ort_op_profile(model_path: Path, input_size: Sequence[int], threads: int, warmup: int, iters: int, work_dir: Path, top: int = 10) -> dict[str, Any]:
    """ONNX Runtime's own profiler (SessionOptions.enable_profiling) at batch 1: kernel time per
    op type, averaged per run, top `top` plus the rest. The raw trace is deleted afterwards."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(work_dir / "ort_profile")
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])
    h, w = input_size
    feeds = {"images": np.random.default_rng(0).integers(0, 256, (1, h, w, 3), dtype=np.uint8), "class_id": np.full((1,), -1, np.int64)}
    for _ in range(warmup + iters):
        session.run(None, feeds)
    trace = Path(session.end_profiling())
    try:
        summary = summarize_ort_profile(json.loads(trace.read_text()), top)
    finally:
        trace.unlink(missing_ok=True)
    return {"model": model_path.name, "batch": 1, "intra_op_threads": threads, **summary}


def summarize_ort_profile(events: list[dict], top: int = 10) -> dict[str, Any]:
    """Aggregate an ORT profile trace: per op type, kernel ms per run, share and node count."""
    runs = sum(1 for e in events if e.get("cat") == "Session" and e.get("name") == "model_run") or 1
    per_op: dict[str, float] = {}
    nodes: dict[str, set] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        op = (e.get("args") or {}).get("op_name", "?")
        per_op[op] = per_op.get(op, 0.0) + float(e.get("dur", 0)) / 1e3
        nodes.setdefault(op, set()).add(e["name"])
    total = sum(per_op.values())
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1])
    rows = [{"op_type": op, "ms_per_run": ms / runs, "share": ms / total if total else None, "nodes": len(nodes[op])} for op, ms in ranked[:top]]
    rest = sum(ms for _, ms in ranked[top:])
    if rest:
        rows.append({"op_type": "(other)", "ms_per_run": rest / runs, "share": rest / total, "nodes": sum(len(nodes[o]) for o, _ in ranked[top:])})
    return {"runs": runs, "kernel_ms_per_run": total / runs, "top_ops": rows}


# ---- targets and ratios ---------------------------------------------------------------------------
def _best(rows: list[dict], key: str = "e2e", **where) -> Optional[dict]:
    ok = [r for r in rows if r.get("status") == "ok" and all(r.get(k) == v for k, v in where.items()) and r[key]["images_per_s"]]
    return max(ok, key=lambda r: r[key]["images_per_s"]) if ok else None


def _ips(row: Optional[dict], key: str = "e2e") -> Optional[float]:
    return None if row is None else row[key]["images_per_s"]


def compute_ratios(rows: list[dict], official: Optional[dict]) -> list[dict[str, Any]]:
    """Speed-ups against the official configuration's eager FP32 at batch 1, end to end and model only."""
    if not official or "latency" not in official:
        return []
    ratios = []
    for key in ("e2e", "model"):
        ref = official["latency"][key]["images_per_s"]
        for backend, precision in RATIO_CASES:
            first = _best(rows, key, backend=backend, precision=precision, batch=1)
            best = _best(rows, key, backend=backend, precision=precision)
            for name, row in (("batch 1", first), ("best batch", best if best is not first else None)):
                if row is None or not ref:
                    continue
                ratios.append({
                    "what": f"ours {backend} {precision} ({name}: {row['batch']}) / official eager fp32 (batch 1)",
                    "timing": key, "ours_images_per_s": _ips(row, key), "official_images_per_s": ref, "ratio": _ips(row, key) / ref,
                })
    return ratios


def check_targets(rows: list[dict], official: Optional[dict], cfg, machine: dict) -> list[dict[str, Any]]:
    """The issue's performance targets, PASS / MISS / N/A with the numbers behind each verdict."""
    default = tuple(cfg.input_size) == (256, 256) and cfg.backbone.name == "tf_efficientnet_lite0"
    why_na = None if default else f"the run is {cfg.backbone.name} at {list(cfg.input_size)}, the target is for the Lite0 default at 256x256"
    cores_note = f"measured on {machine['cores']} cores" + ("" if machine["cores"] == 2 else " (the target is stated for 2)")
    ort_cpu = _best(rows, backend="onnxruntime", precision="fp32", device="cpu")
    torch_cpu = _best(rows, backend="torch", precision="fp32", device="cpu")
    targets = [
        _target("CPU ONNX Runtime fp32 >= 25 images/s end to end (best batch)", _ips(ort_cpu), TARGET_CPU_IPS,
                why_na or (None if ort_cpu else "no CPU ONNX Runtime fp32 measurement"), cores_note),
        _target("CPU ONNX Runtime fp32 >= 2x PyTorch eager fp32 (best batch each, end to end)",
                _ips(ort_cpu) / _ips(torch_cpu) if ort_cpu and torch_cpu else None, TARGET_CPU_VS_TORCH,
                why_na or (None if ort_cpu and torch_cpu else "needs both ONNX Runtime and torch eager fp32 on the CPU"), cores_note),
    ]
    gpu16 = [r for r in (_best(rows, backend=b, precision="fp16", device="cuda") for b in BACKENDS) if r]
    best16 = max(gpu16, key=_ips) if gpu16 else None
    ref = official["latency"]["e2e"]["images_per_s"] if official and "latency" in official else None
    gpu_official = official is not None and str(official.get("latency", {}).get("device", "")).startswith("cuda")
    na = None
    if not machine.get("gpu"):
        na = "no GPU on this machine"
    elif not (best16 and ref and gpu_official):
        na = "needs a GPU fp16 measurement and the official configuration timed on the GPU"
    detail = f"best: {best16['backend']} fp16 batch {best16['batch']}" if best16 else ""
    targets.append(_target("GPU fp16 >= 20x the official configuration's eager fp32 images/s (end to end)",
                           _ips(best16) / ref if best16 and ref else None, TARGET_GPU_VS_OFFICIAL, na, detail))
    return targets


def _target(name: str, value: Optional[float], threshold: float, not_applicable: Optional[str], detail: str = "") -> dict[str, Any]:
    status = "N/A" if not_applicable or value is None else ("PASS" if value >= threshold else "MISS")
    return {"target": name, "value": value, "threshold": threshold, "status": status, "reason": not_applicable, "detail": detail}


# ---- report ---------------------------------------------------------------------------------------
def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def _pct(share: Optional[float]) -> str:
    return "n/a" if share is None else f"{100 * share:.1f}%"


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_f(c).replace("|", "/") for c in row) + " |" for row in rows]
    return lines + [""]


def _complexity_md(c: dict, title: str) -> list[str]:
    lines = [f"**{title}** — input {c['input_size'][0]}x{c['input_size'][1]}, batch {c['batch']}", ""]
    rows = [(x["name"], x["flops"] / 1e9, x["gmacs"], x["params"] / 1e6, x["learnable_params"] / 1e6) for x in c["components"]]
    rows.append(("**sum of components**", c["sum_components_flops"] / 1e9, c["sum_components_flops"] / 2e9, c["params"] / 1e6, c["learnable_params"] / 1e6))
    rows.append(("**one whole forward**", c["total_flops"] / 1e9, c["total_gmacs"], None, None))
    return lines + _table(["component", "GFLOPs", "GMACs", "params (M)", "learnable (M)"], rows)


def _latency_rows(rows: list[dict]) -> list[tuple]:
    out = []
    for r in rows:
        if r.get("status") != "ok":
            blank = (None,) * 6
            out.append((r["backend"], r["precision"], r["batch"], r.get("device", ""), *blank, f"{r['status']}: {r.get('reason', '')}"))
            continue
        e, m = r["e2e"], r["model"]
        note = f"{r['iters']} iters" + (" (budget)" if r.get("truncated") else "")
        timing = (e["p50_ms"], e["p90_ms"], e["p99_ms"], e["images_per_s"], m["p50_ms"], m["images_per_s"])
        out.append((r["backend"], r["precision"], r["batch"], r["device"], *timing, note))
    return out


def write_markdown(report: dict, path: Path) -> None:
    m, s, run = report["machine"], report["settings"], report["run"]
    lines = [f"# hgad-edge benchmark: {m['name']}", "", f"Run `{run['path']}` ({run['backbone']}, input {run['input_size']}, "
             f"{run['levels']} levels, {run['coupling_blocks']} couplings, {len(run['classes'])} classes), {report['created']}.", ""]
    if report.get("busy_warning"):
        lines += [f"> **Warning:** {report['busy_warning']}.", ""]
    lines += ["## Machine", ""]
    board = f" on {m['board']}" if m.get("board") else ""
    lines += [f"- CPU: {m['cpu_model']}{board}, {m['cores']} usable cores ({m['physical_cores']} physical); GPU: {m['gpu'] or 'none'}",
              f"- host {m['hostname']}, {m['platform']}, Python {m['python']}; 1/5/15-min load before {report['load_average']['before']}, "
              f"after {report['load_average']['after']}",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
              f"- threads: torch {s['threads']['torch']}; ONNX Runtime intra-op: runtime Detector {s['threads']['onnxruntime_detector_intra_op']} "
              f"(ORT default: {s['threads']['onnxruntime_default_means']}), op profile session {s['threads']['onnxruntime_profile_intra_op']}; "
              f"TF32 {'on' if s['tf32'] else 'off'}",
              f"- timing: {s['warmup']} warm-up + {s['iters']} timed calls per case; end to end = host resize of a "
              f"{CAMERA_FRAME[1]}x{CAMERA_FRAME[0]} RGB frame + inference + outputs on the host; model only = the inference call", ""]
    lines += _targets_md(report) + _complexity_section(report) + _latency_section(report)
    lines += _official_section(report) + _accuracy_section(report) + _breakdown_section(report)
    if report["skipped"]:
        lines += ["## Skipped", ""] + [f"- {x['what']}: {x['reason']}" for x in report["skipped"]] + [""]
    lines += ["## Stages", ""] + _table(["stage", "status", "seconds"], [(x["name"], x["status"], x["seconds"]) for x in report["stages"]])
    for err in report["errors"]:
        lines += [f"### Error in {err['stage']}", "", "```", err["traceback"].rstrip(), "```", ""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _targets_md(report: dict) -> list[str]:
    rows = [(t["target"], t["value"], t["threshold"], f"**{t['status']}**", t["reason"] or t["detail"]) for t in report["targets"]]
    return ["## Targets", ""] + _table(["target", "measured", "needed", "verdict", "note"], rows)


def _complexity_section(report: dict) -> list[str]:
    cx = report["complexity"]
    lines = ["## FLOPs and parameters", "",
             "Counted by `torch.utils.flop_counter.FlopCounterMode` (2 FLOPs per multiply-add of convolutions and matrix "
             "products; elementwise ops are not counted). GMACs = GFLOPs / 2, the unit most papers call 'FLOPs'. "
             "Learnable = flows + heads (the backbone is frozen); FrEIA's fixed permutation matrices are parameters "
             "without gradients, so they count in the total only.", ""]
    if cx.get("ours"):
        lines += _complexity_md(cx["ours"], "This run")
    official = report.get("official") or {}
    titles = {
        "paper_config": f"{official.get('label', 'official configuration')} at its real input ({_config_text(official.get('config'))}; random weights)",
        "paper_config_tab5_input": "official HGAD configuration at 256x256 (the input of the paper's Tab. 5)",
    }
    for key, title in titles.items():
        if cx.get(key):
            lines += _complexity_md(cx[key], title[0].upper() + title[1:])
    t5 = PAPER_TAB5
    lines += [f"Paper Tab. 5 (HGAD, at 256x256): {t5['gflops']} GFLOPs, {t5['learnable_params_m']}M learnable parameters, {t5['fps']} fps. "
              "Our counts of the official configuration above are at its real input unless labelled 256x256; the paper does not "
              "say whether its 'FLOPs' are multiply-adds.", ""]
    return lines


def _config_text(config: Optional[dict]) -> str:
    if not config:
        return "?"
    bb, flow = config.get("backbone", {}), config.get("flow", {})
    return (f"{bb.get('name', 'tf_efficientnet_lite0')} stages {bb.get('stages', '?')}, pyramid {bb.get('pyramid', [1.0])}, "
            f"{flow.get('coupling_blocks', 8)} couplings")


def _latency_section(report: dict) -> list[str]:
    headers = ["backend", "precision", "batch", "device", "e2e p50 ms", "e2e p90 ms", "e2e p99 ms", "e2e img/s", "model p50 ms", "model img/s", "note"]
    return ["## Latency and throughput", ""] + _table(headers, _latency_rows(report["latency"])) + ["![throughput](throughput.png)", ""]


def _official_section(report: dict) -> list[str]:
    off = report.get("official")
    lines = ["## Official configuration, same machine, same run", ""]
    if not off:
        return lines + ["Not measured (see Skipped).", ""]
    lines += [f"{off['label']}: PyTorch eager FP32, batch 1, RANDOM weights (timing only; its scores mean nothing), "
              f"input {off['config']['input_size']}.", ""]
    headers = ["backend", "precision", "batch", "device", "e2e p50 ms", "e2e p90 ms", "e2e p99 ms", "e2e img/s", "model p50 ms", "model img/s", "note"]
    lines += _table(headers, _latency_rows([off["latency"]]))
    if report["ratios"]:
        lines += ["Speed-ups (images/s ratios, measured side by side):", ""]
        rows = [(r["what"], r["timing"], r["ours_images_per_s"], r["official_images_per_s"], r["ratio"]) for r in report["ratios"]]
        lines += _table(["ratio", "timing", "ours img/s", "official img/s", "x"], rows)
    return lines


def _accuracy_section(report: dict) -> list[str]:
    acc = report.get("accuracy")
    lines = ["## Accuracy and drift", ""]
    if not acc:
        return lines + ["No data root given (--data): accuracy not measured.", ""]
    lines += [f"Data: {', '.join(acc['data_roots'])}; at most {acc['max_images'] or 'all'} test images per class, class id given (not auto).", ""]
    cases = sorted({k for per in acc["classes"].values() for k in per})
    rows = []
    for name, per in acc["classes"].items():
        for case in cases:
            r = per.get(case, {})
            rows.append((name, case, r.get("n"), r.get("image_auroc"), r.get("pixel_auroc"), r.get("finite")))
    lines += _table(["class", "backend precision", "images", "image AUROC", "pixel AUROC", "finite"], rows)
    lines += ["Largest drift against PyTorch FP32 (same images, same class ids):", ""]
    lines += _table(["backend", "precision", "images", "max |score diff|", "max |map diff|", "non-finite images"],
                    [(d["backend"], d["precision"], d["n_images"], d["max_abs_score_diff"], d["max_abs_map_diff"], d["nonfinite"]) for d in acc["drift"]])
    return lines


def _breakdown_section(report: dict) -> list[str]:
    bd = report.get("breakdown") or {}
    lines = ["## Where the time goes", ""]
    comp = bd.get("torch_components")
    if comp:
        lines += [f"PyTorch eager FP32 on {comp['device']}, batch 1, p50 per component (sum {comp['sum_p50_ms']:.3g} ms):", ""]
        lines += _table(["component", "p50 ms", "share"], [(c["name"], c["p50_ms"], _pct(c["share"])) for c in comp["components"]])
    prof = bd.get("ort_profile")
    if prof:
        lines += [f"ONNX Runtime profile of {prof['model']} (CPU, batch 1, {prof['intra_op_threads']} intra-op threads, {prof['runs']} runs, "
                  f"{prof['kernel_ms_per_run']:.3g} ms kernel time per run), top op types:", ""]
        lines += _table(["op type", "ms per run", "share", "nodes"], [(o["op_type"], o["ms_per_run"], _pct(o["share"]), o["nodes"]) for o in prof["top_ops"]])
    return lines + (["![breakdown](breakdown.png)", ""] if comp or prof else ["Not measured (see Skipped).", ""])


def write_plots(report: dict, folder: Path) -> list[str]:
    """throughput.png and breakdown.png on a bare Agg canvas (no pyplot state touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written = []
    rows = [r for r in report["latency"] if r.get("status") == "ok"]
    off = (report.get("official") or {}).get("latency")
    if off:
        rows = rows + [off]
    if rows:
        fig = Figure(figsize=(max(6.0, 0.7 * len(rows) + 2), 4.5), tight_layout=True)
        ax = fig.add_subplot()
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [r["e2e"]["images_per_s"] for r in rows], 0.4, label="end to end")
        ax.bar(x + 0.2, [r["model"]["images_per_s"] for r in rows], 0.4, label="model only")
        ax.set_xticks(x, [f"{r['backend']}\n{r['precision']} b{r['batch']}" for r in rows], fontsize=7)
        ax.set_ylabel("images / s")
        values = [r[k]["images_per_s"] for r in rows for k in ("e2e", "model") if r[k]["images_per_s"]]
        if values and max(values) / max(min(values), 1e-9) > 50:
            ax.set_yscale("log")
        ax.set_title(f"Throughput on {report['machine']['name']}")
        ax.legend()
        FigureCanvasAgg(fig).print_png(str(folder / "throughput.png"))
        written.append("throughput.png")
    bd = report.get("breakdown") or {}
    panels = [(k, bd[k]) for k in ("torch_components", "ort_profile") if bd.get(k)]
    if panels:
        fig = Figure(figsize=(6.0 * len(panels), 4.5), tight_layout=True)
        for i, (key, data) in enumerate(panels):
            ax = fig.add_subplot(1, len(panels), i + 1)
            if key == "torch_components":
                names, ms, title = [c["name"] for c in data["components"]], [c["p50_ms"] for c in data["components"]], "torch eager fp32, batch 1"
            else:
                names, ms, title = [o["op_type"] for o in data["top_ops"]], [o["ms_per_run"] for o in data["top_ops"]], "ONNX Runtime CPU, op types"
            ax.barh(np.arange(len(names)), ms)
            ax.set_yticks(np.arange(len(names)), names, fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel("ms per image (p50)" if key == "torch_components" else "ms per run")
            ax.set_title(title)
        FigureCanvasAgg(fig).print_png(str(folder / "breakdown.png"))
        written.append("breakdown.png")
    return written


# ---- the benchmark ----------------------------------------------------------------------------------
def _check_choices(values: Sequence[str], allowed: Sequence[str], what: str) -> tuple[str, ...]:
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ValueError(f"{what} must be a non-empty subset of {', '.join(allowed)}; got {list(values)}")
    return tuple(values)


def _torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _calib_dir(data_roots: Sequence[Path], classes: Sequence[str]) -> Optional[Path]:
    """The folder of the first model class's normal training images (TensorRT int8 calibration)."""
    if not data_roots:
        return None
    from .data import open_roots

    train = [s for s in open_roots([Path(r) for r in data_roots]).samples("train") if s.class_name in classes]
    return Path(train[0].path).parent if train else None


def _run_facts(run_dir: Path, cfg, meta: dict, scorer) -> dict[str, Any]:
    return {
        "path": str(run_dir),
        "backbone": cfg.backbone.name,
        "input_size": list(cfg.input_size),
        "stages": list(cfg.backbone.stages),
        "pyramid": list(cfg.backbone.pyramid),
        "levels": len(scorer.model.levels),
        "coupling_blocks": cfg.flow.coupling_blocks,
        "classes": list(meta["classes"]),
    }


def run_bench(
    run_dir: Path | str,
    out_dir: Path | str,
    data_roots: Sequence[Path | str] = (),
    backends: Sequence[str] = BACKENDS,
    precisions: Sequence[str] = ("fp32", "fp16"),
    batches: Sequence[int] = (1, 8),
    warmup: int = 3,
    iters: int = 20,
    max_images: Optional[int] = None,
    official: bool | dict = True,
    budget_s: Optional[float] = None,
    bundle: Optional[Path | str] = None,
) -> Path:
    """Benchmark a trained run on this machine; returns the report folder `<out_dir>/<machine>`.

    official: True = the paper's configuration (random weights) timed beside ours; False = skip
    it; a config dict = time that configuration instead (labelled as such; for quick tests).
    budget_s: wall-clock cap of the whole benchmark; stages past it are recorded as skipped.
    bundle: an exported bundle to reuse (TensorRT engines get built into it); default: export
    the run into `<report folder>/bundle`. Stage failures are written into the report, not raised.
    """
    import torch

    from .checkpoint import load_run

    backends = _check_choices(backends, BACKENDS, "backends")
    precisions = _check_choices(precisions, PRECISIONS, "precisions")
    batches = tuple(sorted({int(b) for b in batches}))
    if not batches or batches[0] < 1 or warmup < 0 or iters < 1:
        raise ValueError(f"need batches >= 1, warmup >= 0 and iters >= 1; got {batches}, {warmup}, {iters}")
    machine = machine_info()
    folder = Path(out_dir) / machine["name"]
    folder.mkdir(parents=True, exist_ok=True)
    budget = Budget(budget_s)
    log = Log(budget)
    scorer, cfg, meta = load_run(run_dir)
    if bundle and set(backends) - {"torch"}:
        problem = bundle_problem(Path(bundle), Path(run_dir), _bundle_precisions(precisions))
        if problem:
            raise BenchError(f"bundle {bundle} does not match run {run_dir}: {problem}. Re-export it "
                             f"(hgad-edge export {run_dir} --out {bundle}) or leave out --bundle.")
    device = _torch_device()
    previous = (torch.get_num_threads(), torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.set_num_threads(machine["cores"])
    # FP32 means FP32: no TF32 convolutions / matmuls in the reference (TensorRT builds without TF32 too)
    torch.backends.cudnn.benchmark = device.startswith("cuda")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    trt_ok, trt_reason = tensorrt_status() if "tensorrt" in backends else (False, "not requested")
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "run": _run_facts(Path(run_dir), cfg, meta, scorer),
        "settings": {
            "backends": list(backends), "precisions": list(precisions), "batches": list(batches), "warmup": warmup,
            "iters": iters, "max_images": max_images, "camera_frame_hw": list(CAMERA_FRAME), "budget_s": budget_s,
            "torch_device": device,
            "tf32": False,
            "threads": {
                "torch": torch.get_num_threads(),
                # The runtime's create() has no thread option: its sessions use ORT's default pool.
                "onnxruntime_detector_intra_op": 0,
                "onnxruntime_default_means": f"one thread per physical core = {machine['physical_cores']}",
                "onnxruntime_profile_intra_op": machine["cores"],
            },
        },
        "load_average": {"before": load_average(), "after": None},
        "complexity": {}, "latency": [], "official": None, "ratios": [], "accuracy": None, "breakdown": {}, "targets": [],
    }
    try:
        setup = Setup(Path(run_dir), folder, Path(bundle) if bundle else folder / "bundle", scorer.to(device), cfg, meta, device,
                      batches, warmup, iters, log, trt_ok=trt_ok, trt_reason=trt_reason)
        _run_stages(setup, report, data_roots, backends, precisions, max_images, official, budget)
    finally:
        torch.set_num_threads(previous[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous[1:]
    report["load_average"]["after"] = load_average()
    report["busy_warning"] = busy_warning(report["load_average"]["before"], report["load_average"]["after"], machine["cores"])
    report.update(skipped=log.skipped, stages=log.stages, errors=log.errors, elapsed_s=round(time.perf_counter() - budget.start, 1))
    with log.stage("plots") as ok:
        if ok:
            report["plots"] = write_plots(report, folder)
    report["stages"] = log.stages
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    write_markdown(report, folder / "report.md")
    return folder


class BenchError(ValueError):
    """The benchmark cannot run as asked (e.g. a bundle of another model); the message says the fix."""


def _bundle_precisions(precisions: Iterable[str]) -> tuple[str, ...]:
    return ("fp32", "fp16") if "fp16" in precisions else ("fp32",)


def bundle_problem(bundle: Path, run_dir: Path, precisions: Sequence[str]) -> Optional[str]:
    """Why `bundle` cannot stand for this run's model (None: it can). A bundle is identified by the
    sha256 of the checkpoint it was exported from: a report must never time or score old weights."""
    from .checkpoint import WEIGHTS_FILE
    from .files import sha256_file

    path = bundle / "metadata.json"
    if not path.is_file():
        return "it has no metadata.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("checkpoint_sha256") != sha256_file(run_dir / WEIGHTS_FILE):
        return "it was exported from another checkpoint (checkpoint_sha256 differs)"
    missing = [p for p in precisions if p not in meta.get("models", {})]
    if missing:
        return f"it has no {', '.join(missing)} model"
    return None


def _run_stages(setup: Setup, report: dict, data_roots, backends, precisions, max_images, official, budget: Budget) -> None:
    log = setup.log
    with log.stage("complexity: this run") as ok:
        if ok:
            report["complexity"]["ours"] = count_complexity(setup.scorer)
    if set(backends) - {"torch"}:
        with log.stage("export bundle") as ok:
            wanted = _bundle_precisions(precisions)
            if ok and bundle_problem(setup.bundle, setup.run_dir, wanted):  # ours, from an earlier run or model
                from .export.onnx_export import export_bundle

                export_bundle(setup.run_dir, setup.bundle, precisions=wanted)
        report["bundle"] = str(setup.bundle)
    if "int8" in precisions and "tensorrt" in backends and data_roots:
        with log.stage("int8 calibration folder") as ok:
            if ok:
                setup.calib_dir = _calib_dir(data_roots, setup.scorer.model.class_names)
    with log.stage("latency") as ok:
        if ok:
            report["latency"] = bench_latency(setup, backends, precisions, budget)
    if official:
        config, label = (PAPER_CONFIG, "official HGAD configuration") if official is True else (dict(official), "official-like configuration (overridden)")
        with log.stage("official configuration") as ok:
            if ok:
                report["official"] = bench_official(setup, config, label, budget)
                report["complexity"]["paper_config"] = report["official"].pop("complexity")
        if official is True:
            with log.stage("complexity: official configuration at 256x256") as ok:
                if ok:
                    report["complexity"]["paper_config_tab5_input"] = count_complexity(build_scorer(paper_config_at(256))[0])
    else:
        log.skip("official configuration", "official=False")
    report["ratios"] = compute_ratios(report["latency"], report["official"])
    report["targets"] = check_targets(report["latency"], report["official"], setup.cfg, report["machine"])
    if data_roots:
        with log.stage("accuracy") as ok:
            if ok:
                report["accuracy"] = bench_accuracy(setup, data_roots, backends, precisions, max_images, budget)
    else:
        log.skip("accuracy", "no data root given (--data)")
    _where_time_goes(setup, report, backends, budget)


def _where_time_goes(setup: Setup, report: dict, backends, budget: Budget) -> None:
    log = setup.log
    with log.stage("breakdown: torch eager components") as ok:
        if ok:
            report["breakdown"]["torch_components"] = component_latency(setup.scorer, setup.device, setup.warmup, setup.iters, budget)
    if "onnxruntime" not in backends:
        return
    with log.stage("breakdown: ONNX Runtime op profile") as ok:
        if ok:
            from .runtime.bundle import load_bundle

            path = load_bundle(setup.bundle).model_path("fp32")
            report["breakdown"]["ort_profile"] = ort_op_profile(path, setup.cfg.input_size, report["machine"]["cores"], setup.warmup, setup.iters, setup.folder)
