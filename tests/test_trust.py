"""Issue 13, "trust nothing a bundle or a frame says": one test per row of the issue's table.

Bundles are tampered copies of the tiny bundle of tests/helpers.py (a real ONNX graph with the exporter's
metadata copy in its metadata_props); frames are generated files (a PNG header claiming
30000x30000 pixels, a truncated MJPG video written by OpenCV). Torch-free except the export rows,
which use run folders broken by hand (no training needed).
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from hgad_edge import cli
from hgad_edge.core.bundle import load_bundle
from hgad_edge.core.bundle_schema import BundleMetadata, SchemaError, check_file_name, read_onnx_metadata_props
from hgad_edge.core.imaging import DataError, image_size, load_image
from hgad_edge.core.redact import redact_text, redact_url
from hgad_edge.runtime import Status, api, create, destroy, infer, last_error
from hgad_edge.runtime import app as app_module
from hgad_edge.runtime.app import AppError, run_app, run_problems
from hgad_edge.runtime.sources import FrameSource, SourceError, parse_source
from tests.helpers import (
    BGR,
    CLASSES,
    THRESHOLDS,
    H,
    W,
    fake_camera,
    make_bundle,
    read_jsonl,
    reference,
    rng_frames,
)

PASSWORDS = ["p@ss", "pa/ss", "a:b@c/d", "s3cr3t"]


def tampered(tmp_path: Path, **changes) -> Path:
    """The tiny bundle with metadata.json entries replaced (None deletes the key)."""
    folder = make_bundle(tmp_path / "b")
    meta = json.loads((folder / "metadata.json").read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    (folder / "metadata.json").write_text(json.dumps(meta))
    return folder


def refused(folder: Path, *words: str) -> str:
    status, handle = create(folder, backend="onnxruntime")
    assert status != Status.OK and handle is None
    message = last_error()
    for word in words:
        assert word in message, message
    return message


# ---- bundle integrity ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../evil/always_pass.onnx", "/tmp/x.onnx", "sub/m.onnx", "..", "C:evil.onnx"])
def test_model_file_outside_the_bundle_is_refused(tmp_path, name):
    folder = make_bundle(tmp_path / "b")
    meta = json.loads((folder / "metadata.json").read_text())
    meta["models"]["fp32"]["file"] = name
    (folder / "metadata.json").write_text(json.dumps(meta))
    refused(folder, "bare file name" if name != ".." else "file name", "hgad-edge export")


def test_symlink_out_of_the_bundle_is_refused(tmp_path):
    folder = make_bundle(tmp_path / "b")
    outside = tmp_path / "evil.onnx"
    os.replace(folder / "model_fp32.onnx", outside)  # same bytes: the sha256 alone would pass
    (folder / "model_fp32.onnx").symlink_to(outside)
    refused(folder, "outside the bundle")


def test_replaced_model_is_refused_by_its_sha256(tmp_path):
    folder = make_bundle(tmp_path / "b")
    data = bytearray((folder / "model_fp32.onnx").read_bytes())
    data[-1] ^= 1  # another graph, metadata unchanged
    (folder / "model_fp32.onnx").write_bytes(bytes(data))
    message = refused(folder, "sha256", "hgad-edge export")
    assert api.last_error() == message


def test_engine_name_with_a_path_is_refused(tmp_path):
    engine = {"precision": "fp16", "trt_version": "10.7.0", "compute_capability": "8.7", "version_compatible": True}
    folder = tampered(tmp_path, engines={"../../../../etc/passwd": engine})
    refused(folder, "'../../../../etc/passwd' is not a bare file name")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 2.0, -1.0, 0.0, 1.0, "0.5", True])
def test_normalized_threshold_out_of_range_is_refused(tmp_path, value):
    refused(tampered(tmp_path, normalized_threshold=value), "normalized_threshold", "hgad-edge export")


def test_reversed_classes_disagree_with_the_onnx_copy(tmp_path):
    folder = tampered(tmp_path, classes=list(reversed(CLASSES)))
    refused(folder, "'classes'", "differs from the copy inside model_fp32.onnx")


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"classes": "ab"}, "'classes' must be a non-empty list"),
        ({"classes": ["a", "a"]}, "distinct"),
        ({"classes": ["a", ""]}, "non-empty names"),
        ({"input_size": [H, 50]}, "multiples of 32"),
        ({"input_size": [32, 32]}, ">= 64"),
        ({"input_size": "64x96"}, "input_size"),
        ({"thresholds": [0.1, float("nan")]}, "'thresholds'[1] must be a finite number"),
        ({"thresholds": [0.1]}, "list of 2 numbers"),
        ({"scales": [1.0, 0.0]}, "> 0"),
        ({"display_range": [1.0, 0.5]}, "increase"),
        ({"models": {"fp8": {"file": "model_fp32.onnx", "sha256": "0" * 64}}}, "unknown precision"),
        ({"classes": None}, "no 'classes' entry"),
    ],
)
def test_deciding_values_are_type_and_range_checked(tmp_path, changes, words):
    refused(tampered(tmp_path, **changes), words)


def test_changed_thresholds_need_a_calibration_record(tmp_path):
    refused(tampered(tmp_path, thresholds=[0.9, 0.9]), "'thresholds'", "differs from the copy")
    folder = tampered(tmp_path / "calibrated", thresholds=[0.9, 0.9], calibration={"policy": "fpr", "images": 40})
    bundle = load_bundle(folder)  # a deliberate recalibration: loads, with the new values
    assert bundle.thresholds == (0.9, 0.9) and bundle.calibration == {"policy": "fpr", "images": 40}
    assert bundle.classes == CLASSES  # classes still checked against the ONNX copy
    refused(tampered(tmp_path / "c2", classes=["b", "a"], calibration={"policy": "fpr"}), "differs from the copy")


def test_schema_round_trip_and_onnx_copy(tmp_path):
    folder = make_bundle(tmp_path / "b")
    meta = json.loads((folder / "metadata.json").read_text())
    schema = BundleMetadata.from_json(meta)
    assert BundleMetadata.from_json(schema.to_json()) == schema
    props = read_onnx_metadata_props(folder / "model_fp32.onnx")  # without the onnx package
    assert json.loads(props["classes"]) == list(CLASSES) and json.loads(props["input_size"]) == [H, W]
    assert json.loads(props["thresholds"]) == list(THRESHOLDS)
    with pytest.raises(SchemaError, match="bare file name"):
        check_file_name("a/b.engine", "engine")


# ---- outputs never lose data -------------------------------------------------------------------------
def image_folder(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cv2.imwrite(str(folder / f"{i}.png"), np.full((40, 50, 3), 80 + i * 80, np.uint8))
    return folder


def test_output_survives_a_bad_class_and_is_appended_or_replaced(tmp_path):
    bundle, shots, out = make_bundle(tmp_path / "b"), image_folder(tmp_path / "shots"), tmp_path / "results.jsonl"
    out.write_text('{"earlier": 1}\n')
    with pytest.raises(Exception, match="unknown class"):
        run_app(bundle, str(shots), class_name="zebra", headless=True, output_jsonl=out)
    assert out.read_text() == '{"earlier": 1}\n'
    run_app(bundle, str(shots), headless=True, output_jsonl=out, print_summary=False)
    lines = out.read_text().splitlines()
    assert lines[0] == '{"earlier": 1}' and len(lines) == 4  # appended
    run_app(bundle, str(shots), headless=True, output_jsonl=out, overwrite=True, print_summary=False)
    assert len(read_jsonl(out)) == 3 and "earlier" not in out.read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary left


def test_saved_anomalies_are_unique_per_run(tmp_path, monkeypatch):
    bundle, shots, saved = make_bundle(tmp_path / "b"), image_folder(tmp_path / "shots"), tmp_path / "fails"
    ids = iter(["run-1", "run-2"])
    monkeypatch.setattr(app_module, "run_id", lambda: next(ids))
    first = run_app(bundle, str(shots), headless=True, save_anomalies=saved, print_summary=False)
    second = run_app(bundle, str(shots), headless=True, save_anomalies=saved, print_summary=False)
    assert first["anomalies"] == second["anomalies"] > 0
    files = sorted(p.name for p in saved.iterdir())
    assert len(files) == 4 * first["anomalies"] and {f.split("_")[0] for f in files} == {"run-1", "run-2"}


def test_run_ids_differ_within_one_process():
    first, second = app_module.run_id(), app_module.run_id()
    assert first != second and f"-{os.getpid()}-" in first


def test_unwritable_anomaly_folder_fails_before_the_model_loads(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(AppError, match="is a file"):
        run_app(tmp_path / "no-bundle", str(image_folder(tmp_path / "shots")), headless=True, save_anomalies=blocker)


def test_failed_anomaly_writes_are_counted_and_exit_non_zero(tmp_path, monkeypatch):
    bundle, shots = make_bundle(tmp_path / "b"), image_folder(tmp_path / "shots")

    def disk_full(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(app_module, "atomic_path", disk_full)
    summary = run_app(bundle, str(shots), headless=True, save_anomalies=tmp_path / "fails", print_summary=False)
    assert summary["save_failures"] == summary["anomalies"] > 0
    assert "could not be saved" in run_problems(summary)[0]
    args = ["run", str(bundle), str(shots), "--headless", "--save-anomalies", str(tmp_path / "f2")]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 1 and "NOT saved" in result.output and "could not be saved" in result.output


def test_all_corrupt_folder_exits_non_zero(tmp_path):
    bundle, shots = make_bundle(tmp_path / "b"), tmp_path / "shots"
    shots.mkdir()
    for i in range(3):
        (shots / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    summary = run_app(bundle, str(shots), headless=True, print_summary=False)
    assert summary["frames"] == 0 and summary["skipped_corrupt"] == 3
    assert "all 3 frames/files were corrupt" in run_problems(summary)[0]
    result = CliRunner().invoke(cli.main, ["run", str(bundle), str(shots), "--headless"])
    assert result.exit_code == 1 and "no frame was scored" in result.output and "Traceback" not in result.output


# ---- decoding limits ---------------------------------------------------------------------------------
def png_header(width: int, height: int) -> bytes:
    """A small complete PNG whose header claims width x height (an all-zero image bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096)  # far too few rows: a decoder would allocate first
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_image_over_the_pixel_cap_is_refused_before_decoding(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(30000, 30000))
    assert image_size(bomb.read_bytes()) == (30000, 30000)
    with pytest.raises(DataError, match="30000x30000 pixels .* over the 50 MP cap"):
        load_image(bomb)
    monkeypatch.setenv("HGAD_EDGE_MAX_IMAGE_PIXELS", "100")
    with pytest.raises(DataError, match="over the 0 MP cap"):
        load_image(image_folder(tmp_path / "small", 1) / "0.png")  # the cap is overridable


def test_header_sizes_of_every_format(tmp_path):
    img = np.zeros((37, 53, 3), np.uint8)
    for ext in (".png", ".jpg", ".bmp", ".tif"):
        assert cv2.imwrite(str(tmp_path / f"x{ext}"), img)
        assert image_size((tmp_path / f"x{ext}").read_bytes()) == (37, 53), ext


def test_oversized_and_tiny_images_in_a_folder_are_counted_corrupt(tmp_path):
    shots = image_folder(tmp_path / "shots", 2)
    (shots / "bomb.png").write_bytes(png_header(30000, 30000))
    cv2.imwrite(str(shots / "dot.png"), np.zeros((1, 1, 3), np.uint8))
    with pytest.raises(DataError, match="1x1 pixels, below the 8x8 minimum"):
        load_image(shots / "dot.png")
    summary = run_app(make_bundle(tmp_path / "b"), str(shots), headless=True, print_summary=False)
    assert summary["frames"] == 2 and summary["skipped_corrupt"] == 2


def test_tiny_raw_frame_is_invalid_argument(tmp_path):
    status, handle = create(make_bundle(tmp_path / "b"), backend="onnxruntime")
    try:
        status, _ = infer(handle, np.zeros((1, 1, 3), np.uint8))
        assert status == Status.INVALID_ARGUMENT and "below the 8x8 minimum" in last_error(handle)
    finally:
        destroy(handle)


def test_truncated_video_last_frame_is_skipped(tmp_path):
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    rng = np.random.default_rng(0)
    for _ in range(12):
        writer.write(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    writer.release()
    data = video.read_bytes()
    video.write_bytes(data[: len(data) * 3 // 4])  # an interrupted copy
    cap, reads = cv2.VideoCapture(str(video)), 0
    while cap.read()[0]:
        reads += 1
    assert 0 < reads < 12  # OpenCV delivers the half-decoded last frame as if it were whole
    summary = run_app(make_bundle(tmp_path / "b"), str(video), headless=True, print_summary=False)
    assert summary["frames"] == reads - 1 and summary["skipped_corrupt"] == 1


# ---- thread safety -----------------------------------------------------------------------------------
def test_two_threads_on_one_handle_never_see_each_others_results(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    status, handle = create(bundle, backend="onnxruntime", max_batch=1)
    assert status == Status.OK
    frames = {name: rng_frames(1, seed=seed)[0] for name, seed in (("dark", 1), ("light", 2))}
    frames["dark"] //= 4  # clearly different scores
    expected = {name: float(reference(bundle, f[None], [0])[1][0]) for name, f in frames.items()}
    assert abs(expected["dark"] - expected["light"]) > 0.1
    results, barrier = {name: [] for name in frames}, threading.Barrier(2)

    def worker(name):
        barrier.wait()
        for _ in range(40):
            status, result = infer(handle, frames[name], 0)
            assert status == Status.OK
            assert float(result.score[0]) == expected[name]  # right when returned...
            results[name].append(result)

    threads = [threading.Thread(target=worker, args=(name,)) for name in frames]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    destroy(handle)
    got = {name: [float(r.score[0]) for r in rs] for name, rs in results.items()}
    assert got == {name: [expected[name]] * 40 for name in frames}  # ...and after the other thread's calls and destroy


# ---- secrets ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("password", PASSWORDS)
def test_stream_credentials_are_masked_everywhere(tmp_path, password, caplog):
    url = f"rtsp://user:{password}@cam.local:554/live?channel=1"
    assert redact_url(url) == "rtsp://***@cam.local:554/live?channel=1"
    spec = parse_source(url)
    assert spec.target == url and password not in spec.name + spec.uri
    with pytest.raises(SourceError) as info:
        list(FrameSource(spec, reconnect_attempts=0, capture_factory=fake_camera(None)))
    assert password not in str(info.value) and "***@cam.local" in str(info.value)
    out = tmp_path / "out.jsonl"
    camera = fake_camera([BGR] * 200, delay=0.002)
    summary = run_app(make_bundle(tmp_path / "b"), url, headless=True, output_jsonl=out, max_frames=3,
                      reconnect_attempts=0, capture_factory=camera)
    lines = read_jsonl(out)
    assert len(lines) == 3 and all(line["source"] == redact_url(url) for line in lines)
    assert password not in out.read_text() + json.dumps(summary) + caplog.text
    assert password not in redact_text(f"cv2 error while opening {url} (timeout)")


def test_query_secrets_are_masked():
    assert redact_url("http://cam/snap.jpg?user=a&pwd=x/y&res=2") == "http://cam/snap.jpg?user=***&pwd=***&res=2"


# ---- folders of folders --------------------------------------------------------------------------------
def test_image_folder_with_sub_folders(tmp_path):
    test = tmp_path / "test"
    for sub in ("good", "crack", "scratch"):
        image_folder(test / sub, 2)
    (test / ".hidden").mkdir()
    cv2.imwrite(str(test / ".hidden" / "x.png"), BGR)
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    out = tmp_path / "out.jsonl"
    summary = run_app(make_bundle(tmp_path / "b"), str(test), headless=True, output_jsonl=out, print_summary=False)
    sources = [line["source"] for line in read_jsonl(out)]
    assert summary["frames"] == 6 and sources == sorted(sources)
    assert sources[:2] == ["crack/0.png", "crack/1.png"] and "good/1.png" in sources
    with pytest.raises(SourceError, match="or its sub-folders holds no images"):
        parse_source(str(tmp_path / "empty"))


# ---- export of broken runs ------------------------------------------------------------------------------
def broken_run(folder: Path, meta: str | None, config: str = "input_size: [64, 64]\n") -> Path:
    folder.mkdir(parents=True)
    if meta is not None:
        (folder / "meta.json").write_text(meta)
    (folder / "config.yaml").write_text(config)
    (folder / "model.safetensors").write_bytes(b"not weights")
    return folder


@pytest.mark.parametrize(
    "meta, config, words",
    [
        ('{"classes": ["a"', "input_size: [64, 64]\n", "cannot read"),
        ('{"thresholds": [1]}', "input_size: [64, 64]\n", "no list of class names"),
        ('["a", "b"]', "input_size: [64, 64]\n", "no list of class names"),
        (None, "input_size: [64, 64]\n", "is not a trained run"),
        ('{"classes": ["a", "b"]}', "input_size: [64, 64\n  flow: {", "is not a valid config"),
        ('{"classes": ["a", "b"]}', "input_size: [64, 64]\n", "model.safetensors"),
    ],
)
def test_export_of_a_broken_run_is_a_clean_error(tmp_path, meta, config, words):
    pytest.importorskip("torch")
    run = broken_run(tmp_path / "run", meta, config)
    out = tmp_path / "bundle"
    result = CliRunner().invoke(cli.main, ["export", str(run), "--out", str(out), "--precision", "fp32"])
    assert result.exit_code == 1 and words in result.output, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, (KeyError, json.JSONDecodeError))
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["run"]  # no empty --out, no staging


def test_export_refuses_a_folder_that_is_not_a_bundle(tmp_path):
    from hgad_edge.export.onnx_export import ExportError, export_bundle

    precious = tmp_path / "Documents"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    with pytest.raises(ExportError, match="not a bundle"):
        export_bundle(tmp_path / "any-run", precious)
    assert (precious / "thesis.txt").read_text() == "years of work"
