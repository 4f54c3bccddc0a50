"""The torch-free runtime on a model trained and exported in the test: a generated video file and an
image folder through `hgad-edge run`, JSON lines checked against the PyTorch scores."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import torch
from click.testing import CliRunner

from hgad_edge.cli import main
from hgad_edge.runtime import Detector
from hgad_edge.training.checkpoint import load_run
from hgad_edge.training.data import load_image, open_roots, resize_image
from tests.helpers import NOT_IN_BASE_INSTALL


def _torch_scores(run, frames_rgb: list[np.ndarray], class_id: int = -1):
    scorer, cfg, _ = load_run(run)
    images = torch.from_numpy(np.stack([resize_image(f, cfg.input_size) for f in frames_rgb]))
    with torch.no_grad():
        _, score, cls = scorer(images, torch.full((len(frames_rgb),), class_id, dtype=torch.long))
        norm = scorer.normalize(score, cls)
    return score.numpy(), norm.numpy(), cls.numpy()


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_image_folder_jsonl_matches_pytorch(tiny_bundle, tiny_run, tiny_data, tmp_path):
    samples = open_roots([tiny_data]).samples("test")[:8]
    folder = tmp_path / "frames"
    folder.mkdir()
    frames = []
    for i, s in enumerate(samples):
        img = load_image(s.path)
        big = cv2.resize(img, (96, 80))  # any frame size: the runtime resizes on the host
        cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(big, cv2.COLOR_RGB2BGR))
        frames.append(big)
    out = tmp_path / "res.jsonl"
    res = CliRunner().invoke(
        main,
        ["run", str(tiny_bundle.bundle), str(folder), "--headless", "--backend", "onnxruntime", "--output", str(out)],
    )
    assert res.exit_code == 0, res.output
    lines = _lines(out)
    assert len(lines) == len(frames)
    score, norm, cls = _torch_scores(tiny_run, frames)
    np.testing.assert_allclose([ln["score"] for ln in lines], score, rtol=1e-4, atol=1e-3)
    assert [ln["anomalous"] for ln in lines] == [bool(v >= 0.5) for v in norm]
    assert [ln["class_id"] for ln in lines] == cls.tolist()


def test_video_file_with_given_class(tiny_bundle, tiny_run, tiny_data, tmp_path):
    samples = [s for s in open_roots([tiny_data]).samples("test") if s.class_name == "stripes"]
    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 64))
    for s in samples:
        writer.write(cv2.cvtColor(load_image(s.path), cv2.COLOR_RGB2BGR))
    writer.release()
    # What the runtime sees are the decoded (MJPG-compressed) frames: score those in PyTorch too.
    cap, decoded = cv2.VideoCapture(str(video)), []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        decoded.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    out = tmp_path / "v.jsonl"
    res = CliRunner().invoke(
        main,
        [
            "run",
            str(tiny_bundle.bundle),
            str(video),
            "--headless",
            "--class",
            "stripes",
            "--backend",
            "onnxruntime",
            "--output",
            str(out),
            "--save-anomalies",
            str(tmp_path / "bad"),
        ],
    )
    assert res.exit_code == 0, res.output
    lines = _lines(out)
    assert len(lines) == len(decoded) == len(samples)
    score, norm, _ = _torch_scores(tiny_run, decoded, class_id=1)
    np.testing.assert_allclose([ln["score"] for ln in lines], score, rtol=1e-4, atol=1e-3)
    assert all(ln["class"] == "stripes" for ln in lines)
    n_bad = sum(ln["anomalous"] for ln in lines)
    assert n_bad >= 1 and len(list((tmp_path / "bad").glob("*"))) >= n_bad  # the blobs are flagged and saved


def test_detector_without_torch(tiny_bundle, tiny_data):
    """The bundle of a real model runs with no package of the train extra importable (torch, onnx, yaml, ...)."""
    sample = next(s for s in open_roots([tiny_data]).samples("test") if s.label == 1)
    code = f"""
import sys
for name in {NOT_IN_BASE_INSTALL!r}:
    sys.modules[name] = None
from hgad_edge.training.data import load_image
from hgad_edge.runtime import Detector
with Detector({str(tiny_bundle.bundle)!r}, backend="onnxruntime") as det:
    r = det.infer(load_image({str(sample.path)!r}), "auto")
    print(float(r.score[0]), bool(r.anomalous[0]))
assert not [m for m in sys.modules if m.split(".")[0] in {NOT_IN_BASE_INSTALL!r} and sys.modules[m] is not None]
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    score, anomalous = proc.stdout.split()
    with Detector(tiny_bundle.bundle, backend="onnxruntime") as det:
        assert abs(float(det.infer(load_image(sample.path), "auto").score[0]) - float(score)) < 1e-6
