"""`hgad-edge calibrate` on a bundle (torch-free, its own runtime backend) and on a run folder:
thresholds as the policy promises, graphs untouched, atomic writes, undo, and every bad input refused
before anything is written."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from hgad_edge.cli import main
from hgad_edge.core.bundle import load_bundle
from hgad_edge.core.bundle_schema import BundleMetadata
from hgad_edge.core.thresholds import PolicyError
from hgad_edge.runtime import Detector
from hgad_edge.threshold_calibration import (
    RUN_RECORD_KEY,
    CalibrationError,
    calibrate_target,
    read_bundle_metadata,
    undo_target,
    write_bundle_metadata,
)
from hgad_edge.training.data import load_image
from tests.helpers import REPO, make_bundle


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def bundle(tiny_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_bundle.bundle, tmp_path / "bundle"))


@pytest.fixture
def normal_dir(tiny_data) -> Path:
    return tiny_data / "stripes" / "train" / "good"  # 24 normal images


def _scores(folder: Path, bundle: Path, cls: str) -> np.ndarray:
    images = [load_image(p) for p in sorted(folder.glob("*.png"))]
    with Detector(bundle, backend="onnxruntime", max_batch=32) as det:
        return det.infer(images, cls).score.astype(np.float64)


def test_bundle_calibration_target_fpr_then_undo(bundle, normal_dir):
    before = _digest(bundle)
    meta0 = json.loads((bundle / "metadata.json").read_text())
    result = calibrate_target(bundle, normal_dir, "target-fpr", 0.02, class_name="stripes", backend="onnxruntime")
    after = _digest(bundle)
    assert {k for k in before if before[k] != after[k]} == {"metadata.json"}  # graphs (and engines) untouched
    meta = json.loads((bundle / "metadata.json").read_text())
    y = meta["classes"].index("stripes")
    assert meta["thresholds"][1 - y] == meta0["thresholds"][1 - y] and meta["thresholds"][y] == result.threshold
    rec = meta["calibration"]
    assert rec["policy"] == "target-fpr" and rec["params"] == {"target-fpr": 0.02} and rec["class"] == "stripes"
    assert rec["images"]["count"] == 24 and len(rec["images"]["sha256"]) == 24 and rec["expected"]["fpr"] == 0.02
    assert rec["previous"] == {"thresholds": meta0["thresholds"], "scales": meta0["scales"]}
    assert rec["history"] == [] and rec["history_dropped"] == 0
    assert load_bundle(bundle).thresholds[y] == pytest.approx(result.threshold)
    scores = _scores(normal_dir, bundle, "stripes")
    with Detector(bundle, backend="onnxruntime", max_batch=32) as det:  # the runtime applies the new threshold
        flags = det.infer([load_image(p) for p in sorted(normal_dir.glob("*.png"))], "stripes").anomalous
    np.testing.assert_array_equal(flags, scores >= result.threshold)
    undo_target(bundle)
    assert _digest(bundle) == before or json.loads((bundle / "metadata.json").read_text()) == meta0


def test_policies_with_defects_and_two_levels_of_undo(bundle, tiny_data):
    good, bad = tiny_data / "dots" / "train" / "good", tiny_data / "dots" / "test" / "blob"
    meta0 = json.loads((bundle / "metadata.json").read_text())
    r1 = calibrate_target(bundle, good, "target-recall", 0.8, defects=bad, class_name="dots", backend="onnxruntime")
    defect_scores = _scores(bad, bundle, "dots")
    assert (defect_scores >= r1.threshold).mean() >= 0.8 and r1.record["defect_images"]["count"] == 6
    meta1 = json.loads((bundle / "metadata.json").read_text())
    r2 = calibrate_target(bundle, good, "f1-max", None, defects=bad, class_name="dots", backend="onnxruntime")
    assert [r["policy"] for r in r2.record["history"]] == ["target-recall"]
    undo_target(bundle)
    assert json.loads((bundle / "metadata.json").read_text()) == meta1
    undo_target(bundle)
    assert json.loads((bundle / "metadata.json").read_text()) == meta0
    with pytest.raises(CalibrationError, match="no calibration to undo"):
        undo_target(bundle)


def test_interrupted_calibration_leaves_the_bundle_intact(bundle, normal_dir, monkeypatch):
    before = _digest(bundle)

    def fail(*args):
        raise OSError("disk full (injected before the rename)")

    monkeypatch.setattr("hgad_edge.core.files.os.replace", fail)
    with pytest.raises(CalibrationError, match="injected before the rename.*nothing was changed"):
        calibrate_target(bundle, normal_dir, "max", class_name="stripes", backend="onnxruntime")
    monkeypatch.undo()
    assert _digest(bundle) == before and not list(bundle.glob(".*tmp"))
    load_bundle(bundle)


def test_bundle_writes_go_through_the_schema(bundle):
    """calibrate writes only metadata the runtime would load: new thresholds need the calibration record
    (else they must equal the ONNX copy), and every value is range-checked; a refused write changes nothing."""
    before = _digest(bundle)
    meta = read_bundle_metadata(bundle)
    moved = [t + 1.0 for t in meta.thresholds]
    with pytest.raises(CalibrationError, match="differs from the copy inside model_fp32.onnx"):
        write_bundle_metadata(bundle, meta.with_calibration(moved, meta.scales, None))
    with pytest.raises(CalibrationError, match="'scales' must all be > 0"):
        write_bundle_metadata(bundle, meta.with_calibration(moved, [0.0] * len(moved), {"policy": "max"}))
    assert _digest(bundle) == before
    write_bundle_metadata(bundle, meta.with_calibration(moved, meta.scales, {"policy": "max"}))
    assert load_bundle(bundle).thresholds == pytest.approx(moved)
    with pytest.raises(CalibrationError, match="keeps no previous thresholds"):  # a record without them: no undo
        undo_target(bundle)


def test_calibration_killed_midway_leaves_the_bundle_loadable(bundle, normal_dir):
    """The process is SIGKILLed at the moment the new metadata would be renamed into place."""
    before = _digest(bundle)
    code = f"""
import os, signal
import hgad_edge.core.files
hgad_edge.core.files.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
from hgad_edge.threshold_calibration import calibrate_target
calibrate_target({str(bundle)!r}, {str(normal_dir)!r}, "quantile", 0.9, class_name="stripes", backend="onnxruntime")
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert proc.returncode == -9, proc.stderr
    after = _digest(bundle)
    assert {k: v for k, v in after.items() if not Path(k).name.startswith(".")} == before  # a stray temp file at most
    load_bundle(bundle)


def test_cli_calibrate_runs_without_torch(bundle, normal_dir):
    code = f"""
import sys
for name in ("torch", "timm", "FrEIA"):
    sys.modules[name] = None
from hgad_edge.cli import main
try:
    main(["calibrate", {str(bundle)!r}, "--normal", {str(normal_dir)!r}, "--class", "stripes", "--quantile", "0.95",
          "--backend", "onnxruntime"])
except SystemExit as exit:
    assert exit.code in (0, None), exit.code
loaded = [m for m in sys.modules if m.split(".")[0] in ("torch", "timm", "FrEIA") and sys.modules[m] is not None]
assert not loaded, loaded
print("torch-free calibrate ok")
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert proc.returncode == 0 and "torch-free calibrate ok" in proc.stdout, proc.stdout + proc.stderr
    assert "threshold" in proc.stdout and "--undo" in proc.stdout
    assert json.loads((bundle / "metadata.json").read_text())["calibration"]["policy"] == "quantile"


def _write(folder: Path, images) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        cv2.imwrite(str(folder / f"{i:03d}.png"), img)
    return folder


@pytest.mark.parametrize(
    "case",
    [
        "empty",
        "missing",
        "truncated",
        "mixed_sizes",
        "unknown_class",
        "no_class",
        "too_few",
        "fpr_below_support",
        "defects_missing",
        "no_policy",
    ],
)
def test_bad_input_is_refused_and_the_bundle_untouched(bundle, normal_dir, tmp_path, case):
    before = _digest(bundle)
    normal = tmp_path / "normal"
    shutil.copytree(normal_dir, normal)
    args = [
        "calibrate",
        str(bundle),
        "--normal",
        str(normal),
        "--class",
        "stripes",
        "--target-fpr",
        "0.01",
        "--backend",
        "onnxruntime",
    ]
    words = {
        "empty": "holds no",
        "missing": "does not exist",
        "truncated": "truncated",
        "mixed_sizes": "differ in size",
        "unknown_class": "not one the model knows",
        "no_class": "--class NAME",
        "too_few": "needs at least 20 normal",
        "fpr_below_support": "support a target FPR down to",
        "defects_missing": "--defects DIR",
        "no_policy": "exactly one threshold policy",
    }[case]
    if case == "empty":
        shutil.rmtree(normal)
        normal.mkdir()
    elif case == "missing":
        args[3] = str(tmp_path / "nope")
    elif case == "truncated":
        data = (normal / "000.png").read_bytes()
        (normal / "000.png").write_bytes(data[: len(data) // 2])
    elif case == "mixed_sizes":
        _write(normal, [np.zeros((80, 64, 3), np.uint8)])
    elif case == "unknown_class":
        args[5] = "bottle"
    elif case == "no_class":
        del args[4:6]
    elif case == "too_few":
        for p in sorted(normal.glob("*.png"))[15:]:
            p.unlink()
    elif case == "fpr_below_support":
        args[7] = "0.001"
    elif case == "defects_missing":
        args[6:8] = ["--target-recall", "0.9"]
    elif case == "no_policy":
        del args[6:8]
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0 and words in res.output, res.output
    assert _digest(bundle) == before


def test_grey_images_are_converted_like_training(bundle, normal_dir, tmp_path):
    grey = _write(
        tmp_path / "grey", [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted(normal_dir.glob("*.png"))]
    )
    result = calibrate_target(bundle, grey, "max", class_name="stripes", backend="onnxruntime")
    assert result.threshold == pytest.approx(_scores(normal_dir, bundle, "stripes").max(), rel=1e-5)


def test_run_time_threshold_override_leaves_the_bundle(bundle, tiny_data, tmp_path):
    before = _digest(bundle)
    frames = tiny_data / "stripes" / "test" / "good"
    out = tmp_path / "o.jsonl"
    res = CliRunner().invoke(
        main,
        [
            "run",
            str(bundle),
            str(frames),
            "--headless",
            "--backend",
            "onnxruntime",
            "--class",
            "stripes",
            "--output",
            str(out),
            "--threshold",
            "stripes=-1e9",
        ],
    )
    assert res.exit_code == 0, res.output
    assert all(json.loads(line)["anomalous"] for line in out.read_text().splitlines())
    res = CliRunner().invoke(main, ["run", str(bundle), str(frames), "--headless", "--threshold", "bottle=1"])
    assert res.exit_code != 0 and "unknown class 'bottle'" in res.output
    res = CliRunner().invoke(main, ["run", str(bundle), str(frames), "--headless", "--threshold", "stripes"])
    assert res.exit_code != 0 and "NAME=VALUE" in res.output
    assert _digest(bundle) == before


@pytest.mark.slow
def test_run_folder_calibration_carries_into_export_and_undo(tiny_run, tiny_data, tmp_path):
    import torch

    from hgad_edge.export.onnx_export import export_bundle
    from hgad_edge.training.checkpoint import load_run

    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    scorer0, _, _ = load_run(run)
    good = tiny_data / "dots" / "train" / "good"
    res = CliRunner().invoke(
        main, ["calibrate", str(run), "--normal", str(good), "--class", "dots", "--quantile", "0.9"]
    )
    assert res.exit_code == 0, res.output
    scorer1, _, meta1 = load_run(run)
    y = scorer1.model.class_names.index("dots")
    assert meta1[RUN_RECORD_KEY]["policy"] == "quantile" and scorer1.threshold[y] != scorer0.threshold[y]
    assert scorer1.threshold[1 - y] == scorer0.threshold[1 - y]
    assert torch.equal(scorer1.ref_loglik_0, scorer0.ref_loglik_0)
    exported = export_bundle(run, tmp_path / "b", precisions=("fp32",))
    assert exported.metadata["thresholds"][y] == pytest.approx(float(scorer1.threshold[y]))
    # refit the statistics from the new normal images (half for the means, half for spreads + threshold)
    calibrate_target(run, good, "max", class_name="dots", refit_statistics=True)
    scorer2, _, meta2 = load_run(run)
    assert meta2[RUN_RECORD_KEY]["refit_statistics"] and not torch.equal(
        scorer2.ref_loglik_0[y], scorer0.ref_loglik_0[y]
    )
    assert torch.equal(scorer2.ref_loglik_0[1 - y], scorer0.ref_loglik_0[1 - y])
    undo_target(run)
    scorer3, _, _ = load_run(run)
    assert torch.equal(scorer3.ref_loglik_0, scorer0.ref_loglik_0) and scorer3.threshold[y] == scorer1.threshold[y]
    undo_target(run)
    scorer4, _, meta4 = load_run(run)
    assert torch.equal(scorer4.threshold, scorer0.threshold) and RUN_RECORD_KEY not in meta4
    with pytest.raises(CalibrationError, match="needs a run folder"):
        calibrate_target(exported.bundle, good, "max", class_name="dots", refit_statistics=True)
    with pytest.raises(PolicyError, match="half of them"):
        calibrate_target(run, good, "target-fpr", 0.01, class_name="dots", refit_statistics=True)


# ---- issue 26: one calibration at a time, --max, ties, read-only, history, memory, orphans ---------------
# These run on the hand-made tiny bundle of tests/helpers (score = the highest per-pixel mean of the
# resized frame / 255), so no trained model is needed and a score is known from the pixels.
def _flat(folder: Path, values, size=(40, 50)) -> Path:
    """One image per value, every pixel that grey value: its score is value / 255 exactly."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, v in enumerate(values):
        cv2.imwrite(str(folder / f"{i:03d}.png"), np.full((*size, 3), v, np.uint8))
    return folder


@pytest.fixture
def small_bundle(tmp_path) -> Path:
    return make_bundle(tmp_path / "small")


def _meta(bundle: Path) -> dict:
    return json.loads((bundle / "metadata.json").read_text())


def test_max_keeps_its_promise_no_normal_image_fails(small_bundle, tmp_path):
    good = _flat(tmp_path / "good", [60, 90, 120, 200])
    res = CliRunner().invoke(
        main,
        ["calibrate", str(small_bundle), "--normal", str(good), "--class", "a", "--max", "--backend", "onnxruntime"],
    )
    assert res.exit_code == 0, res.output
    threshold = _meta(small_bundle)["thresholds"][0]
    assert threshold > np.float32(200 / 255) and threshold == np.nextafter(np.float32(200 / 255), np.float32(2))
    with Detector(small_bundle, backend="onnxruntime", max_batch=4) as det:
        result = det.infer([load_image(p) for p in sorted(good.glob("*.png"))], "a")
    assert not result.anomalous.any() and result.score.max() == np.float32(200 / 255)  # the highest one passes
    assert "expected FPR 0.0000" in res.output
    assert "a running `hgad-edge serve` of this bundle reloads its thresholds within a few seconds" in res.output


def test_a_quantile_on_tied_scores_is_refused_saying_why(small_bundle, tmp_path):
    before = _digest(small_bundle)
    tied = _flat(tmp_path / "tied", [100] * 10)
    args = ["calibrate", str(small_bundle), "--normal", str(tied), "--class", "a", "--backend", "onnxruntime"]
    res = CliRunner().invoke(main, [*args, "--quantile", "0.5"])
    assert res.exit_code == 1 and "degenerate" in res.output and "10 of the 10 normal scores" in res.output
    assert "would fail 100% of the normal images" in res.output and "--max" in res.output, res.output
    assert _digest(small_bundle) == before
    mostly = _flat(tmp_path / "mostly", [50, 60, 70, 100, 100, 100, 100, 100, 100, 100])  # 7 of 10 tied at the median
    res = CliRunner().invoke(main, [*args[:3], str(mostly), *args[4:], "--quantile", "0.5"])
    assert res.exit_code == 1 and "7 of the 10 normal scores" in res.output, res.output
    spread = _flat(tmp_path / "spread", range(40, 240, 20))  # distinct scores: the quantile holds its promise
    res = CliRunner().invoke(main, [*args[:3], str(spread), *args[4:], "--quantile", "0.5"])
    assert res.exit_code == 0 and "expected FPR 0.5000" in res.output, res.output


def _in_read_only_mount(folder: Path, command: list[str]) -> list[str]:
    """`command` with `folder` read-only: a read-only bind mount in a user and mount namespace of its own
    (root ignores file modes), or for other users the folder's write bits removed."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return command
    if shutil.which("unshare") is None:
        pytest.skip("root needs unshare(1) for a read-only mount")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"no user namespaces here: {probe.stderr.decode().strip()}")
    mount = f'mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} && exec "$@"'
    return ["unshare", "-rm", "sh", "-c", mount, "sh", *command]


def test_a_read_only_bundle_is_refused_before_any_image_is_scored(small_bundle, tmp_path):
    good = _flat(tmp_path / "good", [60, 90, 120])
    before = _digest(small_bundle)
    code = f"""
import sys
from hgad_edge.runtime import Detector
real = Detector.infer
def infer(self, *a, **k):
    print("SCORED AN IMAGE", file=sys.stderr)
    return real(self, *a, **k)
Detector.infer = infer
from hgad_edge.cli import main
main(["calibrate", {str(small_bundle)!r}, "--normal", {str(good)!r}, "--class", "a", "--max",
      "--backend", "onnxruntime"])
"""
    command = _in_read_only_mount(small_bundle, [sys.executable, "-c", code])
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    finally:
        small_bundle.chmod(0o755)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "is read-only" in proc.stderr and "no image was scored" in proc.stderr, proc.stderr
    assert "SCORED AN IMAGE" not in proc.stderr and "Traceback" not in proc.stderr
    assert _digest(small_bundle) == before


_SLOW_WRITE = """
import os, sys, time
from pathlib import Path
import hgad_edge.threshold_calibration as tc
real = tc.write_bundle_metadata
def write(folder, meta):  # hold the write until the test says go, so the two runs overlap
    print("WRITING", flush=True)
    go = Path({go!r})
    for _ in range(600):
        if go.exists():
            break
        time.sleep(0.05)
    real(folder, meta)
tc.write_bundle_metadata = write
from hgad_edge.cli import main
main(sys.argv[1:])
"""


def _calibrate_process(bundle: Path, good: Path, cls: str, policy: list[str], go: Path, *extra: str):
    code = _SLOW_WRITE.format(go=str(go))
    args = ["calibrate", str(bundle), "--normal", str(good), "--class", cls, *policy, "--backend", "onnxruntime"]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    return proc, lines


def _wait_for(lines: queue.Queue, *words: str, timeout: float = 120) -> str:
    seen, end = "", time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            seen += lines.get(timeout=0.1)
        except queue.Empty:
            continue
        if any(w in seen for w in words):
            return seen
    raise AssertionError(f"none of {words} within {timeout} s; got: {seen}")


def _drain(proc: subprocess.Popen, lines: queue.Queue, seen: str = "") -> tuple[int, str]:
    rc = proc.wait(timeout=300)
    time.sleep(0.1)
    while not lines.empty():
        seen += lines.get()
    return rc, seen


def test_concurrent_calibrations_never_lose_one(small_bundle, tmp_path):
    """Run B starts while run A is between reading and writing the metadata: B waits for A (a second
    with --no-wait is refused), then both calibrations are in the thresholds and in the undo history."""
    meta0 = _meta(small_bundle)
    good_a, good_b = _flat(tmp_path / "ga", [60, 90, 120]), _flat(tmp_path / "gb", [30, 40, 50])
    go = tmp_path / "go"
    a, a_lines = _calibrate_process(small_bundle, good_a, "a", ["--max"], go)
    try:
        seen_a = _wait_for(a_lines, "WRITING")
        b, b_lines = _calibrate_process(small_bundle, good_b, "b", ["--quantile", "0.5"], go)
        seen_b = _wait_for(b_lines, "waiting for another calibration", "WRITING")
        refused = subprocess.run(
            [sys.executable, "-m", "hgad_edge.cli", "calibrate", str(small_bundle), "--normal", str(good_b)]
            + ["--class", "b", "--max", "--backend", "onnxruntime", "--no-wait"],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=300,
            check=False,
        )
    finally:
        go.touch()
    rc_a, seen_a = _drain(a, a_lines, seen_a)
    rc_b, seen_b = _drain(b, b_lines, seen_b)
    assert rc_a == rc_b == 0, seen_a + seen_b
    meta = _meta(small_bundle)
    assert meta["thresholds"][0] > 120 / 255 and meta["thresholds"][1] == pytest.approx(40 / 255)  # both landed
    assert meta["calibration"]["policy"] == "quantile"
    assert [h["policy"] for h in meta["calibration"]["history"]] == ["max"]  # and A is in B's undo history
    assert "waiting for another calibration" in seen_b and f"pid {a.pid}" in seen_b
    assert refused.returncode == 1 and "another calibration of" in refused.stderr and "is running" in refused.stderr
    undo_target(small_bundle)
    undo_target(small_bundle)
    assert _meta(small_bundle)["thresholds"] == meta0["thresholds"]
    assert not (small_bundle / ".calibrate.lock").exists()


def test_history_is_a_bounded_flat_list_and_undo_is_byte_exact(small_bundle, tmp_path):
    from hgad_edge.threshold_calibration import HISTORY_LIMIT

    good = _flat(tmp_path / "good", range(40, 240, 20))
    files = [(small_bundle / "metadata.json").read_bytes()]
    for i in range(HISTORY_LIMIT + 4):  # the record itself + HISTORY_LIMIT earlier ones + 3 dropped
        calibrate_target(small_bundle, good, "quantile", 0.5 + i / 100, class_name="a", backend="onnxruntime")
        files.append((small_bundle / "metadata.json").read_bytes())
    record = _meta(small_bundle)["calibration"]
    assert len(record["history"]) == HISTORY_LIMIT and record["history_dropped"] == 3
    kept = [h["params"]["quantile"] for h in record["history"]]
    assert kept == pytest.approx([0.5 + i / 100 for i in range(3, HISTORY_LIMIT + 3)])  # oldest first
    for entry in record["history"]:  # flat: no record inside another
        assert "history" not in entry and set(entry["previous"]) == {"thresholds", "scales"}
    assert len(files[-1]) < 2 * len(files[HISTORY_LIMIT])  # bounded: it stops growing
    undo_target(small_bundle)
    assert (small_bundle / "metadata.json").read_bytes() != files[-2]  # history was dropped at that step ...
    assert _meta(small_bundle)["thresholds"] == json.loads(files[-2])["thresholds"]  # ... the thresholds return
    small = make_bundle(tmp_path / "exact")
    steps = [(small / "metadata.json").read_bytes()]
    for q in (0.5, 0.6, 0.7):
        calibrate_target(small, good, "quantile", q, class_name="b", backend="onnxruntime")
        steps.append((small / "metadata.json").read_bytes())
    for expected in (steps[2], steps[1]):  # within the bound --undo restores the file byte for byte
        undo_target(small)
        assert (small / "metadata.json").read_bytes() == expected
    undo_target(small)  # the hand-written first file in the schema's own form: the same values
    assert (
        json.loads((small / "metadata.json").read_bytes()) == BundleMetadata.from_json(json.loads(steps[0])).to_json()
    )


def test_undo_stops_where_the_history_was_dropped(small_bundle, tmp_path):
    from hgad_edge.threshold_calibration import HISTORY_LIMIT

    good = _flat(tmp_path / "good", range(40, 240, 20))
    for i in range(HISTORY_LIMIT + 2):
        calibrate_target(small_bundle, good, "quantile", 0.5 + i / 100, class_name="a", backend="onnxruntime")
    for _ in range(HISTORY_LIMIT):
        undo_target(small_bundle)
    with pytest.raises(CalibrationError, match="dropped from its history"):
        undo_target(small_bundle)


def _nested_record(depth: int, thresholds, scales) -> str:
    """The calibration record of older versions, each one nested in the next (built as text: json.dumps
    itself fails on such depths), `depth` calibrations of class a deep, the oldest innermost."""
    text = "null"
    for i in range(depth):
        t = [0.1 + i / 1000, thresholds[1]]
        text = (
            f'{{"policy": "quantile", "params": {{"quantile": {0.5 + i / 1000}}}, "class": "a", "date": "d{i}", '
            f'"previous": {{"thresholds": {json.dumps(t)}, "scales": {json.dumps(list(scales))}, '
            f'"calibration": {text}}}}}'
        )
    return text


def test_nested_records_of_older_versions_are_read_and_migrated(tmp_path):
    from hgad_edge.threshold_calibration import HISTORY_LIMIT

    bundle = make_bundle(tmp_path / "old")
    meta = _meta(bundle)
    depth = 300  # nested 600 objects deep: the old writer's json.dumps was near its limit
    text = json.dumps({**meta, "thresholds": [0.1 + depth / 1000, meta["thresholds"][1]], "calibration": None})
    text = text.replace(
        '"calibration": null', f'"calibration": {_nested_record(depth, meta["thresholds"], meta["scales"])}'
    )
    (bundle / "metadata.json").write_text(text)
    load_bundle(bundle)  # the runtime reads it as it is
    calibrate_target(bundle, _flat(tmp_path / "good", range(40, 240, 20)), "max", class_name="b", backend="onnxruntime")
    record = _meta(bundle)["calibration"]
    assert record["history_dropped"] == depth - HISTORY_LIMIT and len(record["history"]) == HISTORY_LIMIT
    assert [h["date"] for h in record["history"]] == [f"d{i}" for i in range(depth - HISTORY_LIMIT, depth)]
    assert all("calibration" not in h["previous"] for h in record["history"])
    assert len((bundle / "metadata.json").read_bytes()) < 20_000
    undo_target(bundle)  # back to the newest of the old records, now flat
    record = _meta(bundle)["calibration"]
    assert record["date"] == f"d{depth - 1}" and len(record["history"]) == HISTORY_LIMIT - 1
    undo_target(bundle)
    assert _meta(bundle)["thresholds"][0] == pytest.approx(0.1 + (depth - 1) / 1000)


def test_images_are_decoded_one_at_a_time(small_bundle, tmp_path, monkeypatch):
    """Never all at full resolution: the image being scored is the only one alive."""
    import weakref

    import hgad_edge.threshold_calibration as tc

    good = _flat(tmp_path / "good", [60, 90, 120, 150, 180, 210], size=(600, 800))
    alive, peak, real = [0], [0], tc.load_image

    def counting(path):
        image = real(path)
        alive[0] += 1
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(image, lambda: alive.__setitem__(0, alive[0] - 1))
        return image

    monkeypatch.setattr(tc, "load_image", counting)
    result = calibrate_target(small_bundle, good, "max", class_name="a", backend="onnxruntime")
    assert result.record["images"]["count"] == 6 and peak[0] == 1, peak[0]


def test_orphan_temp_files_of_killed_writes_are_cleaned_on_the_next_run(small_bundle, tmp_path):
    good = _flat(tmp_path / "good", [60, 90, 120])
    code = f"""
import os, signal
import hgad_edge.core.files
hgad_edge.core.files.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
from hgad_edge.threshold_calibration import calibrate_target
calibrate_target({str(small_bundle)!r}, {str(good)!r}, "max", class_name="a", backend="onnxruntime")
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, cwd=REPO)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -9, err
    orphans = sorted(p.name for p in small_bundle.glob(".metadata.json.*.tmp"))
    assert len(orphans) == 1 and orphans[0].startswith(f".metadata.json.{proc.pid}-")  # the killed writer's
    load_bundle(small_bundle)  # the killed write left the old metadata
    old = small_bundle / ".metadata.json.abcdefgh.tmp"  # from before the pid was in the name: by age
    old.write_text("{")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    young = small_bundle / ".metadata.json.zyxwvuts.tmp"
    young.write_text("{")
    live = small_bundle / f".metadata.json.{os.getpid()}-qwertyui.tmp"  # a write in progress (this process)
    live.write_text("{")
    res = CliRunner().invoke(
        main,
        ["calibrate", str(small_bundle), "--normal", str(good), "--class", "a", "--max", "--backend", "onnxruntime"],
    )
    assert res.exit_code == 0 and "removed 2 temporary file(s) an interrupted write left" in res.output, res.output
    assert sorted(p.name for p in small_bundle.iterdir() if p.name.startswith(".")) == sorted([young.name, live.name])
