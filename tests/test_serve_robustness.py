"""A server and stations you can leave running (issue 26), with real processes on loopback ports: `hgad-edge
serve` is ready only once its model answers (four `hgad-edge run grpc://...` stations started on the
server's own readiness probe get every answer), a server killed with SIGKILL and started again while
four stations stream folders (every frame of every station answered exactly once), one client sending
bad class ids while others stream (every valid frame answered, the bad ones refused alone in one
line), a second `serve` on taken ports (one line, the first server untouched), credentials in a
grpc:// URL never shown, the "no ready model" hint followed to a working URL, a recalibrated bundle
reloaded by the running server (and a damaged one not). The request check and the masking are also
tested as functions (quick).

One server process serves the module (a copy of the tiny bundle, so that the reload test may change
it); tests that stop, kill or change it leave it running again. Teardown stops whatever is still running.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from hgad_edge.core.files import atomic_write_text
from hgad_edge.core.redact import redact_text, redact_url
from hgad_edge.runtime import BackendUnavailableError, Detector
from hgad_edge.runtime.triton.backend_model import RequestError, check_request, one_line
from hgad_edge.runtime.triton.client import parse_url, url_credentials
from hgad_edge.runtime.triton.server import ServeProcess, free_ports
from tests.helpers import REPO

SECRET = "s3cr:t@pw/x"  # every character a URL parser could trip on


# ---- quick: the request check, the error line and the URL masking as functions ---------------------
def test_check_request_refuses_each_bad_field_in_one_line():
    images = np.zeros((2, 64, 96, 3), np.uint8)
    ok_images, ok_ids = check_request(images, np.array([[0], [-1]], np.int64), (64, 96), 2)
    assert ok_images is images and ok_ids.tolist() == [0, -1]
    bad = {
        "class_id: 2 is out of range": (images, np.array([0, 2], np.int64)),
        "class_id: -5 is out of range": (images, np.array([-5, 0], np.int64)),  # not taken as "auto"
        "class_id: 9223372036854775807 is out of range": (images, np.array([0, 2**63 - 1], np.int64)),
        "class_id: expected one value per frame (2), got 1": (images, np.array([0], np.int64)),
        "class_id: expected int64": (images, np.array([0, 1], np.int32)),
        "images: expected uint8": (images.astype(np.float32), np.array([0, 1], np.int64)),
        "images: expected shape (n, 64, 96, 3)": (np.zeros((2, 96, 64, 3), np.uint8), np.array([0, 1], np.int64)),
    }
    for message, (frames, ids) in bad.items():
        with pytest.raises(RequestError) as info:
            check_request(frames, ids, (64, 96), 2)
        assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_one_line_keeps_no_path_or_traceback():
    try:
        raise RuntimeError("[ONNXRuntimeError] /opt/venv/lib/python3.11/site-packages/x.py:12 failed\nTraceback ...")
    except RuntimeError as err:
        line = one_line(err)
    assert line == "RuntimeError: [ONNXRuntimeError] <path>:12 failed"


def test_server_urls_with_credentials_are_parsed_and_masked():
    url = f"grpc://operator:{SECRET}@10.0.0.5:9001/hgad_onnx_fp32"
    assert parse_url(url) == ("10.0.0.5:9001", "hgad_onnx_fp32")
    assert url_credentials(url) == ("operator", SECRET) and url_credentials("grpc://h:1") is None
    assert redact_url(url) == "grpc://***@10.0.0.5:9001/hgad_onnx_fp32"
    for text in (f"no server at {url}.", f"bad URL '{url}'", f'{{"url": "{url}"}}', f"({url})"):
        assert SECRET not in redact_text(text) and "***@10.0.0.5:9001" in redact_text(text)
    with pytest.raises(Exception, match=r"grpc://\*\*\*@h:99999") as info:
        parse_url(f"grpc://u:{SECRET}@h:99999")
    assert SECRET not in str(info.value)


# ---- real processes ------------------------------------------------------------------------------
try:
    import tritonclient.grpc as grpcclient
except ImportError:  # the serve extra: the quick tests above still run
    grpcclient = None


def needs_server(test):
    """A real Triton server: slow, and skipped only where the serve extra is not installed."""
    missing = grpcclient is None or importlib.util.find_spec("pytriton") is None
    return pytest.mark.slow(pytest.mark.skipif(missing, reason="pip install '.[serve]'")(test))


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hgad_edge.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ServeProcess._env(),
        cwd=REPO,
    )


def _station(url: str, folder: Path, attempts: int) -> subprocess.Popen:
    """`hgad-edge run URL FOLDER` writing its JSON lines to stdout (read as they come)."""
    cmd = [sys.executable, "-m", "hgad_edge.cli", "run", url, str(folder), "--headless", "--output", "-"]
    cmd += ["--reconnect-attempts", str(attempts)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ServeProcess._env())


class Lines:
    """A station's stdout (one JSON line per answered frame) and stderr, read on threads as they come."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.records, self.err = proc, [], []
        self.threads = [
            threading.Thread(target=self._read, args=(proc.stdout, True), daemon=True),
            threading.Thread(target=self._read, args=(proc.stderr, False), daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _read(self, stream, records: bool) -> None:
        for line in stream:
            if records:
                self.records.append(json.loads(line))
            else:
                self.err.append(line)

    def finish(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        for t in self.threads:
            t.join(10)
        return code


def _write_frames(folder: Path, frames: list[np.ndarray], n: int) -> list[str]:
    """n distinct PNG frames (real images, each shifted by its own index) named 000.png..."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"{i:03d}.png"
        image = np.roll(frames[i % len(frames)], i, axis=1)
        cv2.imwrite(str(folder / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        names.append(name)
    return names


@pytest.fixture(scope="module")
def frames(tiny_data):
    from hgad_edge.training.data import load_image, open_roots

    return [load_image(s.path) for s in open_roots([tiny_data]).samples("test")]


@pytest.fixture(scope="module")
def served_bundle(tiny_bundle, tmp_path_factory) -> Path:
    """A copy of the tiny bundle: the reload test recalibrates it under the running server."""
    copy = tmp_path_factory.mktemp("served") / "bundle"
    shutil.copytree(tiny_bundle.bundle, copy)
    return copy


@pytest.fixture(scope="module")
def server(served_bundle, tmp_path_factory):
    # a batcher that waits 20 ms for more requests: concurrent clients share batches (the bad-id test)
    proc = ServeProcess(
        served_bundle, tmp_path_factory.mktemp("serve"), max_batch=8, extra_args=("--queue-delay-us", "20000")
    )
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def running(server):
    """The module's server, started again if an earlier test stopped or killed it."""
    if server.proc is None or server.proc.poll() is not None:
        server.start()
    return server


@pytest.fixture(scope="module")
def local(tiny_bundle):
    with Detector(tiny_bundle.bundle, backend="onnxruntime", max_batch=16) as det:
        yield det


@needs_server
def test_stations_started_on_the_servers_readiness_get_every_answer(running, frames, local, tmp_path):
    """Readiness means the model answers: the moment HTTP /v2/health/ready says 200 (polled as Kubernetes
    does), four stations that do not wait (--reconnect-attempts 0) get every frame scored, with the
    local runtime's scores. Before the fix the probe said ready seconds before the model was loaded,
    and the four exited at once ("serves none of ['hgad', ...]"). A fifth station, started before the
    server, waits for it (as for a server lost mid-run) instead of exiting."""
    folder = tmp_path / "shots"
    names = _write_frames(folder, frames, 12)
    expected = {
        name: float(local.infer(cv2.cvtColor(cv2.imread(str(folder / name)), cv2.COLOR_BGR2RGB)).score[0])
        for name in names
    }
    running.stop()
    early = Lines(_station(running.url, folder, attempts=8))  # started before the server: it waits
    running.launch()
    deadline = time.monotonic() + 180
    while not running.ready():  # the server's own readiness, nothing else
        assert running.proc.poll() is None and time.monotonic() < deadline, running.tail()
        time.sleep(0.05)
    stations = [Lines(_station(running.url, folder, attempts=0)) for _ in range(4)] + [early]
    for k, station in enumerate(stations):
        assert station.finish(120) == 0, (k, "".join(station.err)[-2000:])
        assert sorted(r["source"] for r in station.records) == names
        for r in station.records:
            assert abs(r["score"] - expected[r["source"]]) < 1e-5


@needs_server
def test_server_killed_and_restarted_while_four_stations_stream(running, frames, tmp_path):
    """SIGKILL to `serve`, tritonserver and its stubs at once (a crash, an OOM kill), a new server on the
    same ports: four stations streaming folders wait for it (--reconnect-attempts) and answer every
    frame exactly once; the new server removed the killed one's shared memory."""
    folder = tmp_path / "line"
    names = _write_frames(folder, frames, 300)
    stations = [Lines(_station(running.url, folder, attempts=8)) for _ in range(4)]
    deadline = time.monotonic() + 120
    while min(len(s.records) for s in stations) < 10:  # every station is streaming
        assert time.monotonic() < deadline and all(s.proc.poll() is None for s in stations)
        time.sleep(0.02)
    killed = running.proc.pid
    running.kill()
    answered_at_kill = [len(s.records) for s in stations]
    assert all(n < len(names) for n in answered_at_kill), answered_at_kill  # killed mid-stream
    running.start()  # same ports
    assert not list(Path("/dev/shm").glob(f"hgad-edge-serve-{killed}-*"))  # a killed server's regions: removed
    for k, station in enumerate(stations):
        assert station.finish(300) == 0, (k, "".join(station.err)[-2000:])
        sources = [r["source"] for r in station.records]
        assert len(sources) == len(names) and sorted(sources) == names, k  # each frame once, none lost
        assert "server away 1x" in "".join(station.err), "".join(station.err)[-500:]


def _raw_request(client, ids: list[int], size: tuple[int, int]):
    images = np.zeros((len(ids), *size, 3), np.uint8)
    inputs = [
        grpcclient.InferInput("images", list(images.shape), "UINT8"),
        grpcclient.InferInput("class_id", [len(ids), 1], "INT64"),
    ]
    inputs[0].set_data_from_numpy(images)
    inputs[1].set_data_from_numpy(np.array(ids, np.int64).reshape(-1, 1))
    return client.infer("hgad", inputs)


@needs_server
def test_a_client_with_bad_class_ids_fails_alone(running, frames, local):
    """One client sends class ids out of range (2 of 2 classes, 10^9, INT64_MAX) and negative ones other
    than -1 while six others stream real frames into the same dynamic batches: every valid frame is
    answered with its own local result, every bad request is refused alone with one line naming the
    field, no traceback, no path."""
    size = tuple(local.input_size)
    work = {
        (c, i): np.roll(frames[(c * 10 + i) % len(frames)], c * 10 + i, axis=0) for c in range(6) for i in range(10)
    }
    expected = {key: local.infer(frame) for key, frame in work.items()}
    answers, errors, refusals = {}, [], []
    start = threading.Barrier(7)

    def good(c: int) -> None:
        try:
            with Detector(running.url, backend="triton", max_batch=1) as det:
                start.wait()
                for i in range(10):
                    answers[(c, i)] = det.infer(work[(c, i)])
        except Exception as err:  # reported below, with the client
            errors.append((c, repr(err)))

    def bad() -> None:
        client = grpcclient.InferenceServerClient(running.url.removeprefix("grpc://"))
        start.wait()
        for ids in ([2], [10**9], [2**63 - 1], [-5], [0, -2], [1, 2]) * 4:
            try:
                _raw_request(client, ids, size)
                refusals.append((ids, "answered"))
            except grpcclient.InferenceServerException as err:
                refusals.append((ids, err.status(), err.message()))
        client.close()

    threads = [threading.Thread(target=good, args=(c,)) for c in range(6)] + [threading.Thread(target=bad)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for key, result in expected.items():
        np.testing.assert_allclose(answers[key].score, result.score, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(answers[key].class_pred, result.class_pred)
    assert len(refusals) == 24
    for ids, status, *message in refusals:
        assert status == "StatusCode.INVALID_ARGUMENT", (ids, status, message)
        assert message[0].startswith("class_id: ") and "out of range" in message[0], message
        assert "\n" not in message[0] and "Traceback" not in message[0] and "/" not in message[0]
    # the valid rows of the same kind of request are still served
    client = grpcclient.InferenceServerClient(running.url.removeprefix("grpc://"))
    assert _raw_request(client, [1, -1], size).as_numpy("score").shape[0] == 2
    client.close()


@needs_server
def test_a_second_serve_on_taken_ports_fails_in_one_line(running, served_bundle):
    """Ports of a running server: one line naming the port, exit 1, before anything starts; the first
    server still answers. A --host that is not this machine's: one line too."""
    http, metrics = free_ports(2)
    for port_args, port in (
        (
            ("--grpc-port", str(running.grpc_port), "--http-port", str(http), "--metrics-port", str(metrics)),
            running.grpc_port,
        ),
        (
            ("--grpc-port", str(metrics), "--http-port", str(running.http_port), "--metrics-port", str(http)),
            running.http_port,
        ),
    ):
        done = _cli("serve", str(served_bundle), "--host", "127.0.0.1", *port_args, timeout=60)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1 and "Traceback" not in done.stderr + done.stdout, done.stderr
        assert lines[0].startswith(f"Error: port {port} (") and "already in use on 127.0.0.1" in lines[0]
    done = _cli("serve", str(served_bundle), "--host", "192.0.2.1", "--grpc-port", str(http), timeout=60)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1 and "--host" in done.stderr
    assert running.ready()
    with Detector(running.url) as det:
        assert det.infer(np.zeros((32, 32, 3), np.uint8)).score.shape == (1,)


@needs_server
def test_credentials_in_a_server_url_are_never_shown(running, tmp_path, caplog):
    """A password in a grpc:// URL (sent as basic auth to a proxy) is masked in every message and log
    line: a server that is not there, a model it does not serve, a malformed URL."""
    folder = tmp_path / "shots"
    _write_frames(folder, [np.zeros((64, 64, 3), np.uint8)], 2)
    closed = free_ports(1)[0]
    for url in (
        f"grpc://operator:{SECRET}@127.0.0.1:{closed}",
        f"grpc://operator:{SECRET}@127.0.0.1:{running.grpc_port}/no_such_model",
        f"grpc://operator:{SECRET}@127.0.0.1:99999",
    ):
        done = _cli("run", url, str(folder), "--headless", "--reconnect-attempts", "1", timeout=60)
        out = done.stdout + done.stderr
        assert done.returncode != 0 and SECRET not in out and "s3cr" not in out, out
        assert "grpc://***@127.0.0.1:" in out and "Traceback" not in out, out
    with Detector(f"grpc://operator:{SECRET}@127.0.0.1:{running.grpc_port}") as det:  # the server ignores it
        assert det.info["bundle"] == f"grpc://127.0.0.1:{running.grpc_port}/hgad"
        det.infer(np.zeros((32, 32, 3), np.uint8))
    assert SECRET not in caplog.text


@needs_server
def test_the_no_ready_model_hint_names_a_url_that_works(running):
    """A model the server does not serve is an outage to a station (it may still be loading): the
    message names a URL that works with `hgad-edge serve`'s own config (its model-repository API is
    closed to clients, so no curl of /v2/repository/index), and following it connects."""
    with pytest.raises(BackendUnavailableError) as info:
        Detector(f"{running.url}/hgad_trt_fp16")
    message = str(info.value)
    assert "repository/index" not in message and "still loading" in message, message
    hinted = [url for url in re.findall(r"grpc://[^\s,;'()`]+", message) if not url.endswith("/hgad_trt_fp16")]
    assert hinted, message
    with Detector(hinted[0]) as det:
        assert det.backend == "triton"


def _calibrate(bundle: Path, images: Path, quantile: float) -> None:
    done = _cli("calibrate", str(bundle), "--normal", str(images), "--quantile", str(quantile), "--class", "dots")
    assert done.returncode == 0, done.stderr


@needs_server
def test_a_recalibrated_bundle_is_reloaded_and_a_damaged_one_is_not(running, served_bundle, tiny_data, frames):
    """`hgad-edge calibrate` on the served bundle: the running server reloads it within seconds (sha256
    checked as on load) and a station already streaming decides with the new thresholds from then on;
    a metadata.json whose model no longer matches is not loaded, the server says why and keeps serving
    the calibrated bundle."""
    meta = served_bundle / "metadata.json"
    before = json.loads(meta.read_text())
    dots = before["classes"].index("dots")
    frame = frames[0]
    with Detector(running.url, max_batch=1) as det:
        first = det.infer(frame, "dots")
        _calibrate(served_bundle, tiny_data / "dots" / "train" / "good", 0.5)
        calibrated = json.loads(meta.read_text())
        assert calibrated["thresholds"][dots] != before["thresholds"][dots]
        with Detector(served_bundle, backend="onnxruntime") as here:
            want = here.infer(frame, "dots")
        deadline = time.monotonic() + 60
        while True:
            got = det.infer(frame, "dots")
            if abs(float(got.score_normalized[0]) - float(want.score_normalized[0])) < 1e-5:
                break
            assert time.monotonic() < deadline, running.tail()
            assert abs(float(got.score_normalized[0]) - float(first.score_normalized[0])) < 1e-5  # old, or new
            time.sleep(0.1)
        assert np.array_equal(got.anomalous, want.anomalous) and got.score[0] == pytest.approx(want.score[0], abs=1e-5)
        assert "reloaded" in running.tail()
        damaged = dict(calibrated, models={k: dict(v, sha256="0" * 64) for k, v in calibrated["models"].items()})
        atomic_write_text(meta, json.dumps(damaged))
        deadline = time.monotonic() + 60
        while "changed but is not loaded" not in running.tail():
            assert time.monotonic() < deadline, running.tail()
            time.sleep(0.2)
        assert "does not match the sha256" in running.tail()
        still = det.infer(frame, "dots")  # served, with the calibrated thresholds
        assert float(still.score_normalized[0]) == pytest.approx(float(want.score_normalized[0]), abs=1e-5)
    atomic_write_text(meta, json.dumps(calibrated))
