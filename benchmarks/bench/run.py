"""The benchmark of a trained run: every stage in turn, one report folder per machine."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hgad_edge.bench.accuracy import bench_accuracy
from hgad_edge.bench.components import component_latency
from hgad_edge.bench.context import Setup
from hgad_edge.bench.engines import BACKENDS, DEFAULT_BACKENDS, ENGINES, PRECISIONS
from hgad_edge.bench.flops import count_complexity
from hgad_edge.bench.latency import CAMERA_FRAME, bench_latency, interleaved_speedup
from hgad_edge.bench.log import Budget, Log
from hgad_edge.bench.machine import busy_warning, load_average, machine_info
from hgad_edge.bench.official import PAPER_CONFIG, bench_official, build_scorer, paper_config_at
from hgad_edge.bench.ort_profile import ort_op_profile
from hgad_edge.bench.plots import write_plots
from hgad_edge.bench.report import write_markdown
from hgad_edge.bench.rows import SCHEMA, as_dict
from hgad_edge.bench.targets import check_targets, compute_ratios
from hgad_edge.core.files import atomic_write_json


def _check_choices(values: Sequence[str], allowed: Sequence[str], what: str) -> tuple[str, ...]:
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ValueError(f"{what} must be a non-empty subset of {', '.join(allowed)}; got {list(values)}")
    return tuple(values)


def _torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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
    backends: Sequence[str] = DEFAULT_BACKENDS,
    precisions: Sequence[str] = ("fp32", "fp16"),
    batches: Sequence[int] = (1, 8),
    warmup: int = 3,
    iters: int = 20,
    max_images: int | None = None,
    official: bool | dict = True,
    budget_s: float | None = None,
    bundle: Path | str | None = None,
    classes: Sequence[str] | None = None,
) -> Path:
    """Benchmark a trained run on this machine; returns the report folder `<out_dir>/<machine>`.

    official: True = the paper's configuration (random weights) timed beside ours; False = skip
    it; a config dict = time that configuration instead (labelled as such; for quick tests).
    budget_s: wall-clock cap of the whole benchmark; stages past it are recorded as skipped.
    bundle: an exported bundle to reuse (TensorRT engines, and for int8 its Q/DQ graphs calibrated on
    the run's training images, get built into it); default: export the run into `<report
    folder>/bundle`. classes: accuracy on these classes only.
    Stage failures are written into the report, not raised.
    """
    import torch

    from hgad_edge.training.checkpoint import load_run

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
    if bundle and _needs_bundle(backends):
        problem = bundle_problem(Path(bundle), Path(run_dir), _bundle_precisions(precisions))
        if problem:
            raise BenchError(
                f"bundle {bundle} does not match run {run_dir}: {problem}. Re-export it "
                f"(hgad-edge export {run_dir} --out {bundle}) or leave out --bundle."
            )
    device = _torch_device()
    previous = (
        torch.get_num_threads(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
    )
    torch.set_num_threads(machine["cores"])
    # FP32 means FP32: no TF32 convolutions / matmuls in the reference (TensorRT builds without TF32 too)
    torch.backends.cudnn.benchmark = device.startswith("cuda")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "run": _run_facts(Path(run_dir), cfg, meta, scorer),
        "settings": {
            "backends": list(backends),
            "precisions": list(precisions),
            "batches": list(batches),
            "warmup": warmup,
            "iters": iters,
            "max_images": max_images,
            "camera_frame_hw": list(CAMERA_FRAME),
            "budget_s": budget_s,
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
        "complexity": {},
        "latency": [],
        "official": None,
        "ratios": [],
        "accuracy": None,
        "int8_speedup": None,
        "breakdown": {},
        "targets": [],
    }
    try:
        setup = Setup(
            Path(run_dir),
            folder,
            Path(bundle) if bundle else folder / "bundle",
            scorer.to(device),
            cfg,
            meta,
            device,
            batches,
            warmup,
            iters,
            log,
        )
        _run_stages(setup, report, data_roots, backends, precisions, max_images, official, budget, classes)
    finally:
        torch.set_num_threads(previous[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = (
            previous[1:]
        )
    report["load_average"]["after"] = load_average()
    report["busy_warning"] = busy_warning(
        report["load_average"]["before"], report["load_average"]["after"], machine["cores"]
    )
    report.update(
        skipped=log.skipped,
        stages=log.stages,
        errors=log.errors,
        elapsed_s=round(time.perf_counter() - budget.start, 1),
    )
    report = as_dict(report)
    with log.stage("plots") as ok:
        if ok:
            report["plots"] = write_plots(report, folder)
    report["stages"] = log.stages
    atomic_write_json(folder / "report.json", json.loads(json.dumps(report, default=str)))
    write_markdown(report, folder / "report.md")
    return folder


def _needs_bundle(backends: Iterable[str]) -> bool:
    return any(not ENGINES[b].torch for b in backends)


class BenchError(ValueError):
    """The benchmark cannot run as asked (e.g. a bundle of another model); the message says the fix."""


def _bundle_precisions(precisions: Iterable[str]) -> tuple[str, ...]:
    return ("fp32", "fp16") if "fp16" in precisions else ("fp32",)


def bundle_problem(bundle: Path, run_dir: Path, precisions: Sequence[str]) -> str | None:
    """Why `bundle` cannot stand for this run's model (None: it can). A bundle is identified by the
    sha256 of the checkpoint it was exported from: a report must never time or score old weights."""
    from hgad_edge.core.files import sha256_file
    from hgad_edge.training.checkpoint import WEIGHTS_FILE

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


def _ensure_int8(setup: Setup) -> None:
    """The bundle's Q/DQ graphs, quantized on the run's own training images unless it has them."""
    from hgad_edge.core.bundle import load_bundle

    if "int8" in load_bundle(setup.bundle).models:
        return
    from hgad_edge.export.int8_calibration import run_set
    from hgad_edge.export.int8_quantize import quantize_bundle

    quantize_bundle(setup.bundle, run_set(setup.run_dir))


def _run_stages(
    setup: Setup, report: dict, data_roots, backends, precisions, max_images, official, budget: Budget, classes=None
) -> None:
    log = setup.log
    with log.stage("complexity: this run") as ok:
        if ok:
            report["complexity"]["ours"] = count_complexity(setup.scorer)
    if _needs_bundle(backends):
        with log.stage("export bundle") as ok:
            wanted = _bundle_precisions(precisions)
            if ok and bundle_problem(setup.bundle, setup.run_dir, wanted):  # ours, from an earlier run or model
                from hgad_edge.export.onnx_export import export_bundle

                export_bundle(setup.run_dir, setup.bundle, precisions=wanted)
        report["bundle"] = str(setup.bundle)
    if "int8" in precisions and _needs_bundle(backends):
        with log.stage("int8 graphs") as ok:
            if ok:
                _ensure_int8(setup)
    with log.stage("latency") as ok:
        if ok:
            report["latency"] = bench_latency(setup, backends, precisions, budget)
    if "int8" in precisions and "onnxruntime" in backends:
        with log.stage("int8 vs fp32, interleaved") as ok:
            if ok:
                report["int8_speedup"] = interleaved_speedup(setup, "onnxruntime", "int8", "fp32", budget)
    off = None
    if official:
        config, label = (
            (PAPER_CONFIG, "official HGAD configuration")
            if official is True
            else (dict(official), "official-like configuration (overridden)")
        )
        with log.stage("official configuration") as ok:
            if ok:
                off = report["official"] = bench_official(setup, config, label, budget)
                report["complexity"]["paper_config"] = off.complexity
        if official is True:
            with log.stage("complexity: official configuration at 256x256") as ok:
                if ok:
                    report["complexity"]["paper_config_tab5_input"] = count_complexity(
                        build_scorer(paper_config_at(256))[0]
                    )
    else:
        log.skip("official configuration", "official=False")
    report["ratios"] = compute_ratios(report["latency"], off.latency if off else None)
    report["targets"] = check_targets(
        report["latency"], off.latency if off else None, setup.cfg, report["machine"], report["int8_speedup"]
    )
    if data_roots:
        with log.stage("accuracy") as ok:
            if ok:
                report["accuracy"] = bench_accuracy(
                    setup, data_roots, backends, precisions, max_images, budget, classes
                )
    else:
        log.skip("accuracy", "no data root given (--data)")
    _where_time_goes(setup, report, backends, budget)


def _where_time_goes(setup: Setup, report: dict, backends, budget: Budget) -> None:
    log = setup.log
    with log.stage("breakdown: torch eager components") as ok:
        if ok:
            report["breakdown"]["torch_components"] = component_latency(
                setup.scorer, setup.device, setup.warmup, setup.iters, budget
            )
    if "onnxruntime" not in backends:
        return
    with log.stage("breakdown: ONNX Runtime op profile") as ok:
        if ok:
            from hgad_edge.core.bundle import load_bundle

            path = load_bundle(setup.bundle).model_path("fp32")
            report["breakdown"]["ort_profile"] = ort_op_profile(
                path, setup.cfg.input_size, report["machine"]["cores"], setup.warmup, setup.iters, setup.folder
            )
