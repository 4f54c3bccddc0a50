#!/usr/bin/env python
"""GPU check for a lent machine: speed and FP16 numerics of a trained run, in under 5 minutes.

    python benchmarks/gpu_check.py --run RUN_DIR [--bundle DIR] [--data ROOT --class NAME] \
        [--official] [--device cuda|cpu] --out FILE.md

What it measures, each stage on its own (a failing stage is written into the report with its
error and the script goes on):

1. TensorRT (only when `tensorrt` imports and a CUDA device exists, and --bundle is given):
   build the fp16 engine with hgad_edge.export.trt_build.build_engines and time it through the
   torch-free runtime API (create/infer, host frames in, host results out).
2. PyTorch on the device: FP32 eager vs mixed FP16 (backbone + flows FP16, heads FP32) eager vs
   mixed FP16 replayed as a CUDA graph, at batch 1 and 8, in images/s after warm-up. Inputs are
   already on the device, so this is model time without host transfers.
3. FP16-vs-FP32 drift: max |score| and |map| differences, NaN/inf counts, and image AUROC of
   both, on the test split of one real class (--data/--class) or, without data, random frames.
4. --official: the paper configuration (tf_efficientnet_b6 stage 3 on a 1024/512/256 pyramid,
   12 couplings) with RANDOM weights, for timing only, in eager FP32 (and mixed FP16).

--device cpu runs the same stages on CPU with few iterations: a smoke test of the script, not a
measurement. Needs torch and the train extra (timm, FrEIA, safetensors, pyyaml) for stages 2-4.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import math
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional



# ---- imports that work from a plain checkout -------------------------------------------------------
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ itself, also when loaded by path
from _bootstrap import bootstrap_package as _bootstrap_package  # noqa: E402


# ---- report ----------------------------------------------------------------------------------------
class Report:
    """Markdown report built stage by stage; `stage` records failures instead of raising."""

    def __init__(self, budget_s: float) -> None:
        self.started = time.perf_counter()
        self.budget_s = budget_s
        self.env: list[tuple[str, str]] = []
        self.speed: list[dict[str, Any]] = []
        self.drift: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.stages: list[tuple[str, str, float]] = []
        self.errors: list[tuple[str, str]] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def over_budget(self) -> bool:
        return self.elapsed() > self.budget_s

    @contextlib.contextmanager
    def stage(self, name: str):
        """Run one stage; on error keep the traceback tail in the report and carry on."""
        if self.over_budget():
            self.stages.append((name, f"skipped: time budget of {self.budget_s:.0f} s used", 0.0))
            print(f"[skip] {name}: time budget used", flush=True)
            yield False
            return
        print(f"[....] {name}", flush=True)
        t0 = time.perf_counter()
        try:
            yield True
            status = "ok"
        except Exception as err:  # noqa: BLE001 - the report must survive any stage
            status = f"failed: {type(err).__name__}: {err}"
            self.errors.append((name, traceback.format_exc(limit=6)))
        duration = time.perf_counter() - t0
        self.stages.append((name, status, duration))
        print(f"[{'ok' if status == 'ok' else 'FAIL':>4}] {name} ({duration:.1f} s) {'' if status == 'ok' else status}", flush=True)

    def markdown(self) -> str:
        lines = ["# hgad-edge GPU check", ""]
        lines += [f"- {k}: {v}" for k, v in self.env]
        lines += [f"- total time: {self.elapsed():.0f} s", ""]
        if self.speed:
            lines += ["## Throughput", "", "| What | Precision | Batch | images/s | ms/batch | iters | Notes |", "|---|---|---:|---:|---:|---:|---|"]
            for r in self.speed:
                lines.append(f"| {r['what']} | {r['precision']} | {r['batch']} | {r['ips']:.3g} | {r['ms']:.4g} | {r['iters']} | {r.get('note', '')} |")
            lines.append("")
        if self.drift:
            lines += ["## FP16 vs FP32 numerics", "", "| Data | Images | max abs score diff | max abs map diff | NaN/inf (fp16) | NaN/inf (fp32) | AUROC fp32 | AUROC fp16 | class agreement |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for r in self.drift:
                lines.append(
                    f"| {r['data']} | {r['n']} | {r['score_diff']:.4g} | {r['map_diff']:.4g} | {r['bad16']} | {r['bad32']} | "
                    f"{_fmt(r.get('auroc32'))} | {_fmt(r.get('auroc16'))} | {r['agree']:.3f} |"
                )
            lines.append("")
        if self.notes:
            lines += ["## Notes", ""] + [f"- {n}" for n in self.notes] + [""]
        lines += ["## Stages", "", "| Stage | Status | Seconds |", "|---|---|---:|"]
        lines += [f"| {n} | {s.replace('|', '/')} | {d:.1f} |" for n, s, d in self.stages]
        for name, tb in self.errors:
            lines += ["", f"### Error in {name}", "", "```", tb.rstrip(), "```"]
        return "\n".join(lines) + "\n"


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


# ---- timing ----------------------------------------------------------------------------------------
def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_callable(fn: Callable[[], Any], device: str, warmup: int, min_time: float, max_iters: int) -> tuple[float, int]:
    """Seconds per call after `warmup` calls; repeats until min_time has passed or max_iters."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    iters, t0 = 0, time.perf_counter()
    while iters < max_iters and (iters < 3 or time.perf_counter() - t0 < min_time):
        fn()
        iters += 1
        if iters % 10 == 0:
            synchronize(device)
    synchronize(device)
    return (time.perf_counter() - t0) / iters, iters


def record_speed(report: Report, what: str, precision: str, batch: int, seconds: float, iters: int, note: str = "") -> None:
    report.speed.append({"what": what, "precision": precision, "batch": batch, "ips": batch / seconds, "ms": seconds * 1e3, "iters": iters, "note": note})


def cuda_graph_call(scorer: Any, images: Any, class_id: Any) -> Callable[[], Any]:
    """Capture one forward pass as a CUDA graph over static inputs; returns a replay function.

    Warm-up on a side stream first (cuDNN/cuBLAS pick algorithms and allocate outside capture).
    """
    import torch

    static_images, static_cls = images.clone(), class_id.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(3):
            scorer(static_images, static_cls)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        outputs = scorer(static_images, static_cls)

    def replay() -> Any:
        graph.replay()
        return outputs

    return replay


# ---- model loading ---------------------------------------------------------------------------------
def load_scorers(run_dir: Path, device: str) -> tuple[Any, Any, Any]:
    """(FP32 scorer, mixed FP16 scorer, cfg) of a trained run on `device`."""
    from hgad_edge.checkpoint import load_run

    scorer, cfg, _meta = load_run(run_dir)
    fp32 = scorer.to(device).eval()
    fp16 = copy.deepcopy(fp32)
    fp16.model.set_body_dtype(__import__("torch").float16)
    return fp32, fp16, cfg


def random_frames(input_size: tuple[int, int], batch: int, device: str, seed: int = 0) -> tuple[Any, Any]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, *input_size, 3), generator=gen, dtype=torch.uint8).to(device)
    return images, torch.full((batch,), -1, dtype=torch.int64, device=device)


def time_pytorch(
    report: Report, fp32: Any, fp16: Any, cfg: Any, device: str, batches: list[int], timing: dict, what: str = "pytorch", with_fp16: bool = True
) -> None:
    """Eager FP32, eager mixed FP16 and (CUDA only) mixed FP16 as a CUDA graph, per batch size."""
    import torch

    variants = [("fp32", fp32)] + ([("fp16-mixed", fp16)] if with_fp16 else [])
    if not device.startswith("cuda"):
        report.notes.append(f"{what}: CUDA graphs skipped on {device}")
    for batch in batches:
        images, cls = random_frames(tuple(cfg.input_size), batch, device)
        for precision, scorer in variants:
            with report.stage(f"{what} eager {precision} batch {batch}") as run:
                if run:
                    with torch.inference_mode():
                        seconds, iters = time_callable(lambda: scorer(images, cls), device, **timing)
                    record_speed(report, f"{what} eager", precision, batch, seconds, iters)
        if not device.startswith("cuda") or not with_fp16:
            continue
        with report.stage(f"{what} CUDA graph fp16-mixed batch {batch}") as run:
            if run:
                replay = cuda_graph_call(fp16, images, cls)
                seconds, iters = time_callable(replay, device, **timing)
                record_speed(report, f"{what} CUDA graph", "fp16-mixed", batch, seconds, iters, "static input buffers, replay only")


# ---- numerics --------------------------------------------------------------------------------------
def drift_batches(data: Optional[Path], class_name: Optional[str], cfg: Any, max_images: int, device: str):
    """(label, list of (uint8 images, labels or None)) from a real class, else random frames."""
    import torch

    if data is None:
        frames = [random_frames(tuple(cfg.input_size), 8, device, seed=s)[0] for s in range(2)]
        return "random frames", [(f, None) for f in frames], -1
    from hgad_edge.data import open_roots
    from hgad_edge.batching import load_batch

    samples = open_roots(data, classes=[class_name]).samples("test")[:max_images]
    if not samples:
        raise ValueError(f"class {class_name!r} under {data} has no test images")
    chunks = [samples[i : i + 8] for i in range(0, len(samples), 8)]
    out = [(load_batch(c, tuple(cfg.input_size)).to(device), torch.tensor([s.label for s in c])) for c in chunks]
    return f"{data.name}/{class_name} test", out, None


def measure_drift(report: Report, fp32: Any, fp16: Any, cfg: Any, device: str, data: Optional[Path], class_name: Optional[str], max_images: int) -> None:
    """Max abs differences FP16-mixed vs FP32, NaN/inf counts, AUROC of both (real class only)."""
    import numpy as np
    import torch

    from hgad_edge.metrics import auroc

    label, batches, class_index = drift_batches(data, class_name, cfg, max_images, device)
    names = list(fp32.model.class_names)
    if class_name is not None:
        class_index = names.index(class_name) if class_name in names else -1
        if class_index < 0:
            report.notes.append(f"class {class_name!r} is not one of the model's classes {names}: scored with class_id=-1 (auto)")
    stats = {"score_diff": 0.0, "map_diff": 0.0, "bad16": 0, "bad32": 0, "agree": 0, "n": 0}
    scores32, scores16, labels = [], [], []
    with torch.inference_mode():
        for images, lab in batches:
            cls = torch.full((images.shape[0],), class_index, dtype=torch.int64, device=device)
            m32, s32, _, c32 = fp32(images, cls)
            m16, s16, _, c16 = fp16(images, cls)
            stats["bad32"] += int((~torch.isfinite(m32)).sum()) + int((~torch.isfinite(s32)).sum())
            stats["bad16"] += int((~torch.isfinite(m16)).sum()) + int((~torch.isfinite(s16)).sum())
            finite = torch.isfinite(m16) & torch.isfinite(m32)
            if finite.any():
                stats["map_diff"] = max(stats["map_diff"], float((m16 - m32).abs()[finite].max()))
            stats["score_diff"] = max(stats["score_diff"], float(torch.nan_to_num((s16 - s32).abs(), nan=float("inf")).max()))
            stats["agree"] += int((c16 == c32).sum())
            stats["n"] += int(images.shape[0])
            scores32.append(s32.float().cpu().numpy())
            scores16.append(s16.float().cpu().numpy())
            if lab is not None:
                labels.append(lab.numpy())
    row = {"data": label, **stats, "agree": stats["agree"] / max(stats["n"], 1)}
    if labels:
        y = np.concatenate(labels)
        if 0 < y.sum() < y.size:
            row["auroc32"] = auroc(y, np.nan_to_num(np.concatenate(scores32), nan=np.inf))
            row["auroc16"] = auroc(y, np.nan_to_num(np.concatenate(scores16), nan=np.inf))
    report.drift.append(row)


# ---- TensorRT ----------------------------------------------------------------------------------------
def tensorrt_available() -> tuple[bool, str]:
    """Whether TensorRT imports and a CUDA device exists (checked without building TRT objects)."""
    try:
        from hgad_edge.runtime.backends.tensorrt_backend import cuda_device_count, import_cudart

        count, reason = cuda_device_count(import_cudart())
    except Exception as err:  # noqa: BLE001
        return False, f"cuda-python unavailable ({err})"
    if count == 0:
        return False, f"no CUDA device ({reason})"
    if importlib.util.find_spec("tensorrt") is None:
        return False, "tensorrt is not installed"
    return True, ""


def time_tensorrt(report: Report, bundle: Path, batches: list[int], timing: dict) -> None:
    """Build (or reuse) the fp16 engine, then time host-to-host inference through the runtime API."""
    import numpy as np

    from hgad_edge.export.trt_build import build_engines
    from hgad_edge.runtime import Status, create, destroy, infer, last_error

    with report.stage("tensorrt build fp16") as run:
        if run:
            t0 = time.perf_counter()
            engine = build_engines(bundle, "fp16", batch=(1, max(1, max(batches) // 2), max(batches)))
            report.notes.append(f"TensorRT fp16 engine {engine.name} ready in {time.perf_counter() - t0:.0f} s (0 s = up to date, reused)")
    status, handle = create(bundle, backend="tensorrt", precision="fp16", max_batch=max(batches))
    if status != Status.OK:
        raise RuntimeError(f"runtime create failed: {last_error()}")
    try:
        from hgad_edge.runtime.bundle import load_bundle

        height, width = load_bundle(bundle).input_size
        rng = np.random.default_rng(0)
        for batch in batches:
            frames = list(rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8))
            with report.stage(f"tensorrt runtime fp16 batch {batch}") as run:
                if run:
                    def call() -> None:
                        st, _ = infer(handle, frames, [-1] * batch)
                        if st != Status.OK:
                            raise RuntimeError(last_error(handle))

                    seconds, iters = time_callable(call, "cpu", **timing)
                    record_speed(report, "tensorrt runtime api", "fp16", batch, seconds, iters, "host frames in, host results out")
    finally:
        destroy(handle)


# ---- the official configuration --------------------------------------------------------------------
OFFICIAL = {"input_size": [1024, 1024], "backbone": {"name": "tf_efficientnet_b6", "stages": [3], "pyramid": [1.0, 0.5, 0.25]}, "flow": {"coupling_blocks": 12}}


def official_scorers(device: str, num_classes: int = 15) -> tuple[Any, Any, Any]:
    """Paper-sized model with RANDOM weights (timing only; its scores mean nothing)."""
    import torch

    from hgad_edge.config import HGADConfig
    from hgad_edge.model import HGADModel
    from hgad_edge.scoring import AnomalyScorer

    cfg = HGADConfig.from_dict(OFFICIAL)
    model = HGADModel(cfg, [f"class{i}" for i in range(num_classes)], load_backbone_weights=False)
    fp32 = AnomalyScorer(model, cfg.score).to(device).eval()
    fp16 = copy.deepcopy(fp32)
    fp16.model.set_body_dtype(torch.float16)
    return fp32, fp16, cfg


# ---- main ------------------------------------------------------------------------------------------
def environment(report: Report, device: str) -> None:
    import torch

    report.env += [("python", platform.python_version()), ("torch", torch.__version__), ("device", device)]
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        report.env += [
            ("gpu", f"{props.name} (sm{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"),
            ("cudnn.benchmark", str(torch.backends.cudnn.benchmark)),
            ("TF32 matmul / cudnn", f"{torch.backends.cuda.matmul.allow_tf32} / {torch.backends.cudnn.allow_tf32}"),
        ]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="trained run folder (hgad-edge train --out)")
    p.add_argument("--bundle", type=Path, help="exported bundle, for the TensorRT stage")
    p.add_argument("--data", type=Path, help="dataset root for the FP16 drift check on a real class")
    p.add_argument("--class", dest="class_name", help="class name under --data")
    p.add_argument("--out", type=Path, required=True, help="markdown report to write")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu (smoke test only)")
    p.add_argument("--batches", default="1,8", help="batch sizes to time (default 1,8)")
    p.add_argument("--official", action="store_true", help="also time the paper configuration (random weights)")
    p.add_argument("--max-images", type=int, default=200, help="test images used for the drift check")
    p.add_argument("--budget-s", type=float, default=270.0, help="skip remaining stages after this many seconds")
    args = p.parse_args(argv)
    if (args.data is None) != (args.class_name is None):
        p.error("--data and --class go together")
    return args


def run_checks(args: argparse.Namespace, report: Report) -> None:
    import torch

    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        report.notes.append("CUDA requested but torch.cuda.is_available() is False: nothing measured on a GPU")
        return
    on_gpu = device.startswith("cuda")
    torch.backends.cudnn.benchmark = on_gpu
    environment(report, device)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    timing = {"warmup": 5, "min_time": 2.0, "max_iters": 200} if on_gpu else {"warmup": 1, "min_time": 0.0, "max_iters": 2}

    ok, why = tensorrt_available()
    if ok and args.bundle is not None:
        with report.stage("tensorrt") as run:
            if run:
                time_tensorrt(report, args.bundle, batches, timing)
    else:
        report.notes.append(f"TensorRT stage skipped: {why or 'no --bundle given'}")

    fp32 = fp16 = cfg = None
    with report.stage("load run") as run:
        if run:
            fp32, fp16, cfg = load_scorers(args.run, device)
            report.env.append(("run", f"{args.run} ({cfg.backbone.name}, input {list(cfg.input_size)}, {len(fp32.model.levels)} levels)"))
    if fp32 is not None:
        time_pytorch(report, fp32, fp16, cfg, device, batches, timing)
        with report.stage("fp16 drift") as run:
            if run:
                measure_drift(report, fp32, fp16, cfg, device, args.data, args.class_name, args.max_images)
        del fp32, fp16
        if on_gpu:
            torch.cuda.empty_cache()

    if args.official:
        official = None
        with report.stage("official config: build (random weights)") as run:
            if run:
                official = official_scorers(device)
        if official is not None:
            o32, o16, ocfg = official
            report.notes.append("official configuration rows use RANDOM weights: timing only, scores meaningless")
            official_timing = timing if on_gpu else {"warmup": 0, "min_time": 0.0, "max_iters": 1}
            official_batches = batches if on_gpu else batches[:1]
            # FP16 convolutions on CPU take minutes: the CPU smoke test times FP32 only
            time_pytorch(report, o32, o16, ocfg, device, official_batches, official_timing, what="official b6 1024", with_fp16=on_gpu)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    report = Report(args.budget_s)
    try:
        _bootstrap_package()
        run_checks(args, report)
    except Exception:  # noqa: BLE001 - still write what we have
        report.errors.append(("setup", traceback.format_exc(limit=8)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report.markdown(), encoding="utf-8")
    print(f"report written to {args.out} ({len(report.errors)} error(s))", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
