"""Benchmark report: pure helpers (stats, machine name, sampling, profile summary, targets), FLOP
counting on the tiny run, and one small end-to-end report (export + timing, few iterations)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hgad_edge import bench
from hgad_edge.training.checkpoint import load_run
from hgad_edge.training.config import HGADConfig
from tests.helpers import load_benchmark

# An official-like configuration small enough to build and time in seconds (the real one is B6 at 1024).
SMALL_OFFICIAL = {
    "input_size": [64, 64],
    "backbone": {"name": "tf_efficientnet_lite0", "stages": [3], "pool": 1, "pyramid": [1.0, 0.5]},
    "flow": {"coupling_blocks": 2, "pos_dim": 32},
}


# ---- pure helpers ---------------------------------------------------------------------------------
def test_latency_stats_percentiles_on_known_arrays():
    s = bench.latency_stats(np.arange(1, 101, dtype=float), batch=4)
    assert s.n == 100 and s.min_ms == 1 and s.max_ms == 100
    assert s.p50_ms == pytest.approx(50.5) and s.p90_ms == pytest.approx(90.1) and s.p99_ms == pytest.approx(99.01)
    assert s.mean_ms == pytest.approx(50.5) and s.images_per_s == pytest.approx(4 * 1000 / 50.5)
    one = bench.latency_stats([10.0])
    assert one.p50_ms == one.p90_ms == one.p99_ms == 10.0 and one.images_per_s == pytest.approx(100.0)
    empty = bench.latency_stats([])
    assert empty.n == 0 and empty.p50_ms is None and empty.images_per_s is None


def test_machine_folder_name():
    assert bench.machine_name("Intel(R) Xeon(R) CPU @ 2.20GHz", 2) == "intel-xeon-2c"
    assert bench.machine_name("AMD EPYC", 16, "NVIDIA H200") == "amd-epyc-16c-nvidia-h200"
    assert bench.machine_name("AMD Ryzen 7 5800X 8-Core Processor", 16) == "amd-ryzen-7-5800x-16c"
    assert (
        bench.machine_name("NVIDIA Jetson Orin Nano Developer Kit", 6, "Orin")
        == "nvidia-jetson-orin-nano-developer-kit-6c-orin"
    )
    assert bench.machine_name("", 4, None, hostname="Line-3.local") == "line-3-local-4c"
    assert bench.machine_name(None, 1) == "machine-1c"
    name = bench.machine_info()["name"]
    assert name and all(c.isalnum() or c == "-" for c in name) and name == name.lower()


def test_cpu_model_and_physical_cores_from_cpuinfo():
    x86 = (
        "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nphysical id\t: 0\ncore id\t: 0\n\n"
        "processor\t: 1\nmodel name\t: AMD EPYC 7B13\nphysical id\t: 0\ncore id\t: 0\n"
    )
    assert bench.cpu_model(x86) == "AMD EPYC 7B13"
    assert bench.physical_cores(x86) == 1  # two hyper-threads of one core
    arm = "processor\t: 0\nBogoMIPS\t: 62.50\nCPU implementer\t: 0x41\n\nHardware\t: tegra\n"
    assert bench.cpu_model(arm) == "tegra"


def test_cap_samples_keeps_both_labels_evenly():
    samples = [SimpleNamespace(label=0, i=i) for i in range(30)] + [SimpleNamespace(label=1, i=i) for i in range(10)]
    capped = bench.cap_samples(samples, 8)
    labels = [s.label for s in capped]
    assert len(capped) == 8 and labels.count(0) == 6 and labels.count(1) == 2
    assert capped[0].i == 0 and capped[5].i == 29  # evenly spaced, first and last included
    assert len(bench.cap_samples(samples, 2)) == 2 and {s.label for s in bench.cap_samples(samples, 2)} == {0, 1}
    assert bench.cap_samples(samples, None) == samples and bench.cap_samples(samples[:3], 10) == samples[:3]


def test_summarize_ort_profile():
    def node(name, op, dur):
        return {"cat": "Node", "name": f"{name}_kernel_time", "dur": dur, "args": {"op_name": op}}

    events = [{"cat": "Session", "name": "model_run", "dur": 1}] * 2
    events += [
        node("conv1", "Conv", 3000),
        node("conv1", "Conv", 1000),
        node("mm", "MatMul", 2000),
        node("add", "Add", 2000),
    ]
    events += [{"cat": "Node", "name": "conv1_fence_before", "dur": 99999, "args": {"op_name": "Conv"}}]
    s = bench.summarize_ort_profile(events, top=2)
    assert s["runs"] == 2 and s["kernel_ms_per_run"] == pytest.approx(4.0)
    assert [o.op_type for o in s["top_ops"]] == ["Conv", "MatMul", "(other)"]
    assert s["top_ops"][0].ms_per_run == pytest.approx(2.0) and s["top_ops"][0].share == pytest.approx(0.5)
    assert s["top_ops"][0].nodes == 1 and s["top_ops"][2].ms_per_run == pytest.approx(1.0)  # Add, the rest


def _row(backend, precision, batch, ips, device="cpu"):
    stats = bench.LatencyStats(n=1, images_per_s=ips)
    return bench.LatencyRow(backend, precision, batch, "ok", device=device, e2e=stats, model=stats)


def test_targets_pass_miss_and_not_applicable():
    cfg = HGADConfig.from_dict({})  # the default backbone at 256x256
    cpu = {"cores": 2, "gpu": None}
    rows = [_row("onnxruntime", "fp32", 1, 30.0), _row("onnxruntime", "fp32", 8, 40.0), _row("torch", "fp32", 8, 25.0)]
    targets = bench.check_targets(rows, None, cfg, cpu)
    assert [x.status for x in targets] == ["PASS", "MISS", "N/A", "N/A"]  # 40 >= 25; 1.6 < 2; no int8; no GPU
    assert targets[0].value == pytest.approx(40.0) and targets[1].value == pytest.approx(1.6)
    int8 = {"speedup": 1.5, "reference_ms_p50": 30.0, "ms_p50": 20.0, "pairs": 40}
    verdict = bench.check_targets(rows, None, cfg, cpu, int8)[2]
    assert verdict.status == "MISS" and verdict.value == pytest.approx(1.5) and "30.0 ms -> 20.0 ms" in verdict.detail
    assert bench.check_targets(rows, None, cfg, cpu, {**int8, "speedup": 1.9})[2].status == "PASS"
    tiny = HGADConfig.from_dict({"input_size": [64, 64]})
    assert [x.status for x in bench.check_targets(rows, None, tiny, cpu, int8)] == ["N/A"] * 4
    official = _row("official torch eager", "fp32", 1, 2.0, "cuda")
    gpu_rows = rows + [_row("tensorrt", "fp16", 8, 50.0, "cuda")]
    gpu = bench.check_targets(gpu_rows, official, cfg, {"cores": 16, "gpu": "NVIDIA H200"})[3]
    assert gpu.status == "PASS" and gpu.value == pytest.approx(25.0) and "tensorrt fp16 batch 8" in gpu.detail
    ratios = bench.compute_ratios(gpu_rows, official)
    assert any(r.ratio == pytest.approx(20.0) and "onnxruntime fp32 (best batch: 8)" in r.what for r in ratios)
    assert bench.compute_ratios(gpu_rows, None) == []


# ---- FLOP counting --------------------------------------------------------------------------------
def test_flops_per_component_add_up(tiny_run):
    scorer, cfg, _ = load_run(tiny_run)
    c = bench.count_complexity(scorer)
    names = [x.name for x in c.components]
    assert names == ["backbone", *[f"flow {lv.name}" for lv in scorer.model.levels], bench.REST]
    assert all(x.flops > 0 and x.params > 0 for x in c.components)
    assert c.sum_components_flops == c.total_flops
    backbone, *flows, head = c.components
    assert backbone.learnable_params == 0  # frozen
    learnable = sum(
        p.numel() for m in (*scorer.model.flows, scorer.model.heads) for p in m.parameters() if p.requires_grad
    )
    assert c.learnable_params == learnable == sum(x.learnable_params for x in c.components)
    assert c.params == sum(p.numel() for p in scorer.parameters()) and c.input_size == list(cfg.input_size)
    # what the one forward attributes to the backbone is what the backbone costs on its own
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as alone, torch.no_grad():
        scorer.model.features(torch.zeros(1, 3, *cfg.input_size))
    assert backbone.flops == alone.get_total_flops()


def test_component_clock_times_the_one_forward(tiny_run):
    """Hooks on the model's own modules: one span per forward and component; nothing left behind."""
    scorer, cfg, _ = load_run(tiny_run)
    images = torch.randint(0, 256, (2, *cfg.input_size, 3), dtype=torch.uint8)
    cls = torch.tensor([0, -1])
    with torch.no_grad():
        ref = scorer(images, cls)
        with bench.component_clock(scorer) as times:
            got = scorer(images, cls)
            scorer(images, cls)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))  # instrumenting changes no output
    assert list(times) == [*bench.component_modules(scorer), bench.REST]
    assert all(len(v) == 2 and all(ms >= 0 for ms in v) for v in times.values())
    modules = [scorer, *bench.component_modules(scorer).values()]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


# ---- the report -------------------------------------------------------------------------------------
def test_report_written_even_when_the_budget_is_spent(tiny_run, tmp_path):
    folder = bench.run_bench(
        tiny_run, tmp_path, backends=("torch",), precisions=("fp32",), batches=(1,), iters=1, official=False, budget_s=0
    )
    assert folder.parent == tmp_path and folder.name == bench.machine_info()["name"]
    report = json.loads((folder / "report.json").read_text())
    assert report["schema"] == bench.SCHEMA and report["latency"] == [] and report["settings"]["budget_s"] == 0
    assert any("budget" in s["reason"] for s in report["skipped"])
    assert "# hgad-edge benchmark" in (folder / "report.md").read_text()


def _retrained_copy(run: Path, dest: Path) -> Path:
    """The run with one weight changed: the same model files, another checkpoint."""
    import shutil

    from safetensors.torch import load_file, save_file

    from hgad_edge.training.checkpoint import WEIGHTS_FILE

    shutil.copytree(run, dest)
    weights = load_file(dest / WEIGHTS_FILE)
    key = next(k for k, v in weights.items() if v.is_floating_point())
    weights[key] = weights[key] + 1e-3
    save_file(weights, dest / WEIGHTS_FILE)
    return dest


def test_bundle_of_another_checkpoint_is_refused(tiny_run, tiny_bundle, tmp_path):
    assert bench.bundle_problem(tiny_bundle.bundle, tiny_run, ("fp32", "fp16")) is None
    assert "no metadata.json" in bench.bundle_problem(tmp_path, tiny_run, ("fp32",))
    other = _retrained_copy(tiny_run, tmp_path / "retrained")
    assert "another checkpoint" in bench.bundle_problem(tiny_bundle.bundle, other, ("fp32",))
    with pytest.raises(bench.BenchError, match="Re-export"):
        bench.run_bench(other, tmp_path / "out", backends=("onnxruntime",), bundle=tiny_bundle.bundle, official=False)


@pytest.mark.slow
def test_own_stale_bundle_is_re_exported(tiny_run, tiny_bundle, tmp_path):
    import shutil

    # The report folder holds a bundle of an earlier model (what a rerun after retraining finds).
    other = _retrained_copy(tiny_run, tmp_path / "retrained")
    folder = tmp_path / "out" / bench.machine_info()["name"]
    shutil.copytree(tiny_bundle.bundle, folder / "bundle")
    assert bench.bundle_problem(folder / "bundle", other, ("fp32",))
    bench.run_bench(
        other,
        tmp_path / "out",
        backends=("onnxruntime",),
        precisions=("fp32",),
        batches=(1,),
        warmup=0,
        iters=1,
        official=False,
    )
    assert bench.bundle_problem(folder / "bundle", other, ("fp32",)) is None


@pytest.mark.slow
def test_bench_report_end_to_end(tiny_run, tiny_data, tiny_bundle, tmp_path):
    """Export reused from a copy of the session bundle (int8 quantizes it), ORT + torch timed with 2
    iterations, accuracy on 4 images per class, the small official-like configuration timed beside it."""
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.bundle, bundle)
    folder = bench.run_bench(
        tiny_run,
        tmp_path,
        data_roots=(tiny_data,),
        precisions=("fp32", "fp16", "int8"),
        batches=(1, 2),
        warmup=1,
        iters=2,
        max_images=4,
        official=SMALL_OFFICIAL,
        bundle=bundle,
    )
    for name in ("report.md", "report.json", "throughput.png", "breakdown.png"):
        assert (folder / name).is_file(), name
    r = json.loads((folder / "report.json").read_text())
    required = {
        "schema",
        "machine",
        "run",
        "settings",
        "complexity",
        "latency",
        "official",
        "ratios",
        "accuracy",
        "breakdown",
        "targets",
        "skipped",
        "stages",
        "errors",
    }
    assert required <= set(r) and r["errors"] == [], r["errors"]
    assert {"name", "cpu_model", "cores", "gpu", "versions"} <= set(r["machine"]) and r["machine"]["versions"][
        "onnxruntime"
    ]
    rows = {(x["backend"], x["precision"], x["batch"]): x for x in r["latency"]}
    ok = rows[("onnxruntime", "fp32", 2)]
    assert (
        ok["status"] == "ok"
        and ok["iters"] == 2
        and ok["e2e"]["p99_ms"] >= ok["e2e"]["p50_ms"] > 0
        and ok["model"]["images_per_s"] > 0
    )
    assert rows[("torch", "fp32", 1)]["status"] == "ok"
    assert rows[("onnxruntime", "int8", 1)]["status"] == "ok"  # the bundle's Q/DQ graph, on the CPU
    assert r["int8_speedup"]["pairs"] == 2 and r["int8_speedup"]["speedup"] > 0
    assert "int8" in r["targets"][2]["target"] and r["targets"][2]["status"] == "N/A"  # not the default model
    if not torch.cuda.is_available():
        assert "CPU half" in rows[("torch", "fp16", 1)]["reason"]
    assert r["official"]["random_weights"] and r["official"]["latency"]["e2e"]["images_per_s"] > 0
    assert r["complexity"]["paper_config"]["total_flops"] > 0 and r["ratios"]
    drift = {(d["backend"], d["precision"]): d for d in r["accuracy"]["drift"]}
    assert (
        drift[("onnxruntime", "fp32")]["max_abs_score_diff"] < 1e-3 and drift[("onnxruntime", "fp32")]["n_images"] == 8
    )
    assert all(per["torch fp32"]["image_auroc"] is not None for per in r["accuracy"]["classes"].values())
    assert drift[("onnxruntime", "int8")]["n_images"] == 8 and drift[("onnxruntime", "int8")]["nonfinite"] == 0
    assert [t["status"] for t in r["targets"]][:2] == ["N/A", "N/A"]  # 64x64 is not the 256x256 default
    assert r["breakdown"]["torch_components"]["components"] and r["breakdown"]["ort_profile"]["top_ops"]
    md = (folder / "report.md").read_text()
    for heading in (
        "## Targets",
        "## FLOPs and parameters",
        "## Latency and throughput",
        "## Accuracy and drift",
        "## INT8 against FP32, interleaved",
        "## Where the time goes",
        "RANDOM weights",
    ):
        assert heading in md, heading


@pytest.mark.parametrize("script", ["bench.py", "gpu_check.py"])
def test_script_front_ends_share_the_cli_options(script, tiny_run, tmp_path, capsys):
    """Both scripts are the `hgad-edge bench` verb: same options, same errors (exit 2, no traceback)."""
    module = load_benchmark(script, script[:-3] + "_script")
    default_out = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    before = sorted(default_out.glob("*/rtx.md"))
    assert module.main([str(tiny_run), "--backends", "nope"]) == 2
    assert "choose from" in capsys.readouterr().err
    assert sorted(default_out.glob("*/rtx.md")) == before  # a refused command writes no report
    assert (
        module.main([str(tiny_run), "--out", str(tmp_path), "--backends", "torch", "--no-official", "--budget-s", "0"])
        == 0
    )
    assert "report:" in capsys.readouterr().out
    (report,) = tmp_path.glob("*/report.json")
    settings = json.loads(report.read_text())["settings"]
    assert settings["backends"] == ["torch"] and settings["budget_s"] == 0  # the user's options win over gpu_check's


def test_cli_bench_on_a_tiny_run(tiny_run, tiny_bundle, tmp_path):
    from click.testing import CliRunner

    from hgad_edge.cli import main

    res = CliRunner().invoke(
        main,
        [
            "bench",
            str(tiny_run),
            "--out",
            str(tmp_path),
            "--backends",
            "onnxruntime",
            "--precisions",
            "fp32",
            "--batch",
            "1",
            "--warmup",
            "0",
            "--iters",
            "1",
            "--no-official",
            "--bundle",
            str(tiny_bundle.bundle),
        ],
    )
    assert res.exit_code == 0, res.output
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    rows = json.loads((folder / "report.json").read_text())["latency"]
    assert [(r["backend"], r["precision"], r["batch"], r["status"]) for r in rows] == [("onnxruntime", "fp32", 1, "ok")]
    assert rows[0]["iters"] == 1 and rows[0]["e2e"]["images_per_s"] > 0 and "report:" in res.output


@pytest.mark.parametrize("backend", bench.BACKENDS)
def test_every_engine_runs_or_says_why(backend, tiny_run, tiny_bundle, tmp_path):
    """Each registered engine at fp32 either refuses with a reason or scores frames like torch."""
    from hgad_edge.bench.context import Setup
    from hgad_edge.bench.log import Budget, Log

    scorer, cfg, meta = load_run(tiny_run)
    setup = Setup(tiny_run, tmp_path, tiny_bundle.bundle, scorer, cfg, meta, "cpu", (2,), 0, 1, Log(Budget(None)))
    reason = bench.skip_reason(setup, backend, "fp32")
    if reason is not None:
        assert isinstance(reason, str) and reason
        return
    frames = bench.latency.camera_frames(2)
    engine = bench.open_engine(setup, backend, "fp32")
    try:
        maps, scores, model_ms = engine.run(frames, [0, 1])
    finally:
        engine.close()
    ref_maps, ref_scores, _ = bench.engines.TorchEngine(scorer, "cpu").run(frames, [0, 1])
    assert maps.shape == (2, *cfg.input_size) and model_ms > 0
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-3)
