"""`hgad-edge calibrate` on a bundle (torch-free, its own runtime backend) and on a run folder:
thresholds as the policy promises, graphs untouched, atomic writes, undo, and every bad input refused
before anything is written."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from hgad_edge.cli import main
from hgad_edge.core.bundle import load_bundle
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
from tests.helpers import REPO


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
    assert rec["previous"] == {"thresholds": meta0["thresholds"], "scales": meta0["scales"], "calibration": None}
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
    assert r2.record["previous"]["calibration"]["policy"] == "target-recall"
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
    with pytest.raises(OSError, match="injected"):
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
