"""`hgad-edge serve` and the triton client backend against a real Triton server (PyTriton's binary)
started by the test on loopback ports: parity with local ONNX Runtime, concurrent clients batched
by the server, a server killed mid-stream and started again, SIGTERM with requests in flight.

One server process serves the whole module (it starts in seconds, not milliseconds); the last two
tests kill and restart it, so they run last. Teardown stops whatever is still running."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sysconfig
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from hgad_edge.runtime import BackendUnavailableError, BundleError, Detector, RuntimeOptions
from hgad_edge.runtime.app import run_app
from hgad_edge.runtime.triton.server import ServeError, ServeOptions, ServeProcess, python_library_env, start_server
from hgad_edge.training.data import load_image, open_roots
from tests.helpers import load_benchmark

try:
    import pytriton.triton  # noqa: F401
    import tritonclient.grpc as grpcclient
except ImportError as err:  # the only reason to skip: the wheel does not install on this platform
    pytest.skip(
        f"nvidia-pytriton / tritonclient cannot be imported ({err}); pip install '.[serve]'", allow_module_level=True
    )

pytestmark = pytest.mark.slow  # starts a real Triton server (about 100 s for the module)


def _children(pid: int) -> set[int]:
    kids = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids.update(int(c) for c in (task / "children").read_text().split())
    return kids


def kill_triton(server: ServeProcess) -> None:
    """SIGKILL the tritonserver process and its Python-backend stubs (a crash of the server itself);
    `serve` notices, cleans up and exits."""
    triton = [
        c
        for c in _children(server.proc.pid)
        if b"tritonserver" in Path(f"/proc/{c}/cmdline").read_bytes().split(b"\0")[0]
    ]
    assert len(triton) == 1, f"expected one tritonserver child of {server.proc.pid}, found {triton}"
    stubs = _children(triton[0])
    for pid in (triton[0], *stubs):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    proc = ServeProcess(tiny_bundle.bundle, tmp_path_factory.mktemp("serve"), max_batch=8)
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def frames(tiny_data):
    """The tiny dataset's real test images (both classes, good and defective)."""
    return [load_image(s.path) for s in open_roots([tiny_data]).samples("test")]


@pytest.fixture(scope="module")
def local(tiny_bundle):
    with Detector(tiny_bundle.bundle, backend="onnxruntime", max_batch=16) as det:
        yield det


def assert_same(remote, local_result):
    np.testing.assert_allclose(remote.score, local_result.score, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(remote.anomaly_map, local_result.anomaly_map, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(remote.class_pred, local_result.class_pred)
    np.testing.assert_array_equal(remote.anomalous, local_result.anomalous)
    np.testing.assert_allclose(remote.score_normalized, local_result.score_normalized, rtol=1e-6, atol=1e-6)
    assert remote.class_names == local_result.class_names


def test_served_model_describes_the_bundle(server, tiny_bundle):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    config = client.get_model_config("hgad", as_json=True)["config"]
    params = {k: v["string_value"] for k, v in config["parameters"].items()}
    assert json.loads(params["hgad_edge.metadata"]) == json.loads((tiny_bundle.bundle / "metadata.json").read_text())
    assert int(config["max_batch_size"]) == 8 and "dynamic_batching" in config
    dims = {t["name"]: [int(d) for d in t["dims"]] for t in config["input"] + config["output"]}
    assert dims["images"] == [*tiny_bundle.metadata["input_size"], 3] and dims["class_id"] == [1]
    client.close()
    base = f"http://127.0.0.1:{server.http_port}"
    assert urllib.request.urlopen(f"{base}/v2/health/ready", timeout=5).status == 200
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    assert "nv_inference_request_success" in metrics


def test_parity_with_local_onnxruntime(server, local, frames):
    with Detector(server.url, backend="triton") as remote:
        assert remote.backend == "triton" and remote.classes == local.classes and remote.input_size == local.input_size
        for batch in (
            frames[:1],
            frames[:5],
            [cv2.resize(frames[7], (150, 90))],
        ):  # any frame size: resized on the client
            assert_same(remote.infer(batch), local.infer(batch))
        for class_id in ("auto", local.classes[1]):
            assert_same(remote.infer(frames[3], class_id), local.infer(frames[3], class_id))


def test_run_scores_a_folder_through_the_server(server, tiny_bundle, frames, tmp_path):
    folder = tmp_path / "shots"
    folder.mkdir()
    for i, frame in enumerate(frames[:6]):
        cv2.imwrite(str(folder / f"{i:02d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    remote = run_app(server.url, folder, headless=True, output_jsonl=tmp_path / "remote.jsonl", print_summary=False)
    here = run_app(
        tiny_bundle.bundle,
        folder,
        options=RuntimeOptions(backend="onnxruntime"),
        headless=True,
        output_jsonl=tmp_path / "local.jsonl",
        print_summary=False,
    )
    assert remote["backend"] == "triton" and remote["frames"] == here["frames"] == 6 and remote["lost_to_server"] == 0
    lines = [[json.loads(x) for x in (tmp_path / f"{n}.jsonl").read_text().splitlines()] for n in ("remote", "local")]
    for r, h in zip(*lines, strict=True):
        assert r["class"] == h["class"] and r["anomalous"] == h["anomalous"]
        assert abs(r["score"] - h["score"]) < 1e-6


def _batch_stats(server) -> tuple[int, int, dict[int, int]]:
    """The server's counts once they hold still (Triton counts a request just after its answer left)."""
    bench = load_benchmark("serve_bench.py")
    return bench.server_stats(server.url + "/hgad")


def test_concurrent_clients_are_batched_and_answered_once(server, local, frames):
    clients, per_client = 8, 12
    # every (client, i) frame is distinct: a real image shifted by its own offset
    work = {
        (c, i): np.roll(frames[(c * per_client + i) % len(frames)], c * per_client + i, axis=1)
        for c in range(clients)
        for i in range(per_client)
    }
    expected = {key: local.infer(frame) for key, frame in work.items()}
    answers: dict[tuple[int, int], list] = {key: [] for key in work}
    errors = []
    before = _batch_stats(server)
    barrier = threading.Barrier(clients)

    def stream(c: int) -> None:
        try:
            with Detector(server.url, backend="triton", max_batch=1) as det:
                barrier.wait()
                for i in range(per_client):
                    answers[(c, i)].append(det.infer(work[(c, i)]))
        except Exception as err:  # reported below, with the client number
            errors.append((c, repr(err)))

    threads = [threading.Thread(target=stream, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    for key, results in answers.items():
        assert len(results) == 1, key  # answered exactly once
        assert_same(results[0], expected[key])  # and with its own frame's result
    after = _batch_stats(server)
    inferences, executions = after[0] - before[0], after[1] - before[1]
    merged = {
        size: n - before[2].get(size, 0) for size, n in after[2].items() if size > 1 and n > before[2].get(size, 0)
    }
    assert inferences == clients * per_client
    assert merged and executions < inferences, (
        f"no request was batched with another: {after}"
    )  # every request was of 1 frame


def test_serve_bench_reports_streams_beside_local(server, tiny_bundle, tiny_data, tmp_path):
    bench = load_benchmark("serve_bench.py")
    out = bench.main(
        [
            str(tiny_bundle.bundle),
            "--images",
            str(tiny_data),
            "--streams",
            "1,4",
            "--frames",
            "6",
            "--warmup",
            "1",
            "--max-batch",
            "8",
            "--server",
            server.url,
            "--out",
            str(tmp_path / "report"),
        ]
    )
    report = json.loads((out / "report.json").read_text())
    rows = {(r["mode"], r["streams"]): r for r in report["rows"]}
    assert set(rows) == {("local batch 1", 1), ("local batch 8", 1), ("server", 1), ("server", 4)}
    for streams in (1, 4):
        row = rows[("server", streams)]
        assert row["frames"] == row["server_inferences"] == 6 * streams and not row["errors"]
        assert row["fps"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0
    assert report["overhead"]["p50_ms"] == rows[("server", 1)]["p50_ms"] - rows[("local batch 1", 1)]["p50_ms"]
    assert "Per-frame overhead of the server path" in (out / "report.md").read_text()


def test_a_server_back_with_another_model_is_an_error(server):
    from hgad_edge.core.bundle import OUTPUT_NAMES
    from hgad_edge.runtime.backends import input_specs
    from hgad_edge.runtime.triton.client import connect

    bundle, runner = connect(server.url, input_specs, list(OUTPUT_NAMES), max_batch=1)
    try:
        runner.infer(1)
        swapped = dataclasses.replace(bundle.schema, classes=tuple(reversed(bundle.classes)))
        runner.bundle = dataclasses.replace(bundle, schema=swapped)  # what this client started with
        runner.failures, runner.retry_at = 1, 0.0  # as after an outage: the next answer is a reconnect
        with pytest.raises(BundleError, match="serves another model"):
            runner.infer(1)
    finally:
        runner.deactivate()


def test_python_library_env_leads_with_this_interpreter():
    libdir = sysconfig.get_config_var("LIBDIR")
    env = python_library_env({"LD_LIBRARY_PATH": f"/opt/x:{libdir}"})
    assert env["LD_LIBRARY_PATH"] == f"{libdir}:/opt/x"
    assert python_library_env({})["LD_LIBRARY_PATH"] == libdir


def test_serve_options_hold_one_runtime_options(tmp_path):
    """The server's runtime part is a RuntimeOptions (its max_batch is also the batcher's, 16 by default);
    threshold overrides belong to the stations and are refused before anything starts."""
    assert ServeOptions().runtime == RuntimeOptions(max_batch=16)
    with pytest.raises(ServeError, match="stations"):
        start_server(tmp_path / "no-bundle", ServeOptions(runtime=RuntimeOptions(thresholds={"a": 1.0})))


class ReplayCamera:
    """A camera stand-in (cv2.VideoCapture interface) replaying real images at a fixed frame rate."""

    def __init__(self, frames, fps: float) -> None:
        self.frames, self.period, self.i = [cv2.cvtColor(f, cv2.COLOR_RGB2BGR) for f in frames], 1.0 / fps, 0

    def isOpened(self):
        return True

    def read(self):
        time.sleep(self.period)
        self.i += 1
        return True, self.frames[self.i % len(self.frames)]

    def set(self, prop, value):
        return True

    def release(self):
        pass


def _count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_server_killed_mid_stream_client_reconnects(server, frames, tmp_path):
    out = tmp_path / "live.jsonl"
    summary: dict = {}
    failures: list[str] = []
    camera = ReplayCamera(frames, fps=25)

    def camera_station() -> None:
        try:
            summary.update(
                run_app(
                    server.url,
                    0,
                    headless=True,
                    output_jsonl=out,
                    max_frames=60,
                    reconnect_attempts=0,
                    capture_factory=lambda *a: camera,
                    print_summary=False,
                )
            )
        except Exception as err:  # the station must never crash: reported below
            failures.append(repr(err))

    station = threading.Thread(target=camera_station, daemon=True)  # a failed test must not hang the run
    station.start()
    deadline = time.monotonic() + 60
    while camera.i < 10 and time.monotonic() < deadline and station.is_alive():  # ~10 frames scored
        time.sleep(0.05)
    assert camera.i >= 10 and station.is_alive(), failures
    kill_triton(server)
    assert server.wait(60) != 0  # serve reports the dead server and exits
    assert not list(Path("/dev/shm").glob(f"hgad-edge-serve-{server.proc.pid}-*"))  # and removed its regions
    captured_before_restart = camera.i
    server.start()  # same ports
    station.join(90)
    assert not station.is_alive() and not failures, failures
    assert summary["frames"] == 60 and _count_lines(out) == 60
    assert summary["server_outages"] == 1 and summary["server_reconnects"] == 1
    assert summary["lost_to_server"] > 0  # frames captured while the server was away are counted as lost
    assert captured_before_restart < camera.i  # the same camera went on capturing across the outage


def test_sigterm_answers_requests_in_flight(server, frames):
    outcomes: list[tuple[float, float, str]] = []
    stop = threading.Event()

    def stream() -> None:
        with Detector(server.url, backend="triton", max_batch=1) as det:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    det.infer(frames[0])
                    outcomes.append((sent, time.monotonic(), "ok"))
                except BackendUnavailableError:
                    outcomes.append((sent, time.monotonic(), "unavailable"))
                    time.sleep(0.05)
                except Exception as err:  # anything else is a failed answer
                    outcomes.append((sent, time.monotonic(), repr(err)))

    station = Detector(server.url, backend="triton", max_batch=1)  # scores a folder after the server is gone
    threads = [threading.Thread(target=stream, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while sum(o[2] == "ok" for o in outcomes) < 20 and time.monotonic() < deadline:
        time.sleep(0.02)
    signalled = time.monotonic()
    server.signal(signal.SIGTERM)
    code = server.wait(60)
    stop.set()
    for t in threads:
        t.join(30)
    assert code == 0, server.tail()
    assert "hgad-edge serve: stopped" in server.tail()
    bad = [o for o in outcomes if o[2] not in ("ok", "unavailable")]
    assert not bad, bad[:3]  # requests were answered or refused as unavailable, never broken
    assert all(o[2] == "ok" for o in outcomes if o[0] < signalled - 0.005)  # sent before the signal: answered
    # the server gone, a request is BackendUnavailableError: what `run` waits out for a file/folder frame
    # (bounded retries, then a clear error) and counts as lost for a live one
    # (test_runtime.py: test_app_waits_for_a_lost_server_on_files_and_counts_lost_live_frames)
    with pytest.raises(BackendUnavailableError):
        station.infer(frames[0])
    station.close()
