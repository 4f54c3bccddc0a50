"""The live page (`hgad-edge run --web`): a real run of the tiny bundle streaming a folder, the real
Starlette/uvicorn server on a free loopback port, and the page itself in a real headless Chromium
(Debian `chromium` + `chromium-driver`, which `.ci/run` installs) driven by Selenium.

Access: changes need the token, looking needs it off loopback, a foreign Host is refused. Thresholds:
"apply" changes the run's next decisions, "save" lands in metadata.json through the calibration code
and is undone by the page and by `hgad-edge calibrate --undo`. /metrics is parsed by prometheus-client.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from hgad_edge import threshold_calibration as calibration
from hgad_edge.cli import main
from hgad_edge.runtime.app import run_app
from hgad_edge.runtime.web import LivePage, ThresholdStore, WebError, WebOptions
from hgad_edge.runtime.web.state import LiveState
from tests.helpers import THRESHOLDS, image_folder, make_bundle, read_jsonl

pytest.importorskip("starlette", reason="the live page needs the web extra: pip install -e '.[web]'")
TOKEN = "test-operator-token-0123456789"


# ---- helpers ------------------------------------------------------------------------------------
def http(url: str, method: str = "GET", body: dict | None = None, token: str | None = None, headers=None):
    """(status, headers, body bytes) of one request; errors are answers too."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def wait_for(check, seconds: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {seconds} s")


def store_for(bundle: Path) -> ThresholdStore:
    """What `hgad-edge run --web` hands the page: the calibration module's own functions."""
    return ThresholdStore(
        partial(calibration.set_threshold, bundle, how="test"),
        partial(calibration.undo_target, bundle),
        partial(calibration.read_bundle_metadata, bundle),
    )


class PacedRun:
    """run_app over `source` in a thread, paced like a camera by its on_record hook (`fps`), stopped like
    Ctrl-C when `stop()` is called; its summary lands in `summary`."""

    def __init__(self, bundle: Path, source: Path, page: LivePage, fps: float, out: Path) -> None:
        self.halt, self.summary, self.error = threading.Event(), None, None
        self.out = out

        def pace(record: dict) -> None:
            if self.halt.is_set():
                raise KeyboardInterrupt  # how Ctrl-C ends a run: with its summary
            time.sleep(1.0 / fps)

        def target() -> None:
            try:
                self.summary = run_app(
                    bundle, source, "a", headless=True, output_jsonl=out, web=page, on_record=pace, print_summary=False
                )
            except BaseException as err:  # surfaced by the test
                self.error = err

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.halt.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the run did not stop"
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def live_run(tmp_path: Path, frames: Path, fps: float = 200.0, **options):
    """A started page and a paced run on it; both always stop."""
    bundle = make_bundle(tmp_path / "steel-plates", display_range=[0.15, 0.7])
    page = LivePage(WebOptions(port=0, token=TOKEN, **options), store_for(bundle)).start(announce=lambda line: None)
    try:
        run = PacedRun(bundle, frames, page, fps, tmp_path / "results.jsonl")
        try:
            yield page, run, bundle
        finally:
            run.stop()
    finally:
        page.close()


def metrics_of(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def part_frame(i: int, rng: np.random.Generator) -> np.ndarray:
    """A brushed steel plate on a dark belt (RGB 360 x 540): every 4th one has a bright scratch or chip (the
    tiny model FAILs it: its score is the brightest spot), every 7th a soft glare just under the threshold."""
    h, w = 360, 540
    img = np.full((h, w), 16, np.float32) + rng.normal(0, 2, (h, w))
    plate = np.zeros((h, w), np.uint8)
    x0, y0 = 70 + int(rng.integers(-6, 7)), 50 + int(rng.integers(-6, 7))
    cv2.rectangle(plate, (x0, y0), (x0 + 400, y0 + 260), 1, -1)
    plate = cv2.GaussianBlur(plate.astype(np.float32), (0, 0), 2.0)
    streaks = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), sigmaX=25, sigmaY=0.8)
    img = img * (1 - plate) + (52 + rng.uniform(0, 14) + 90 * streaks) * plate
    for cx in (x0 + 60, x0 + 340):
        cv2.circle(img, (cx, y0 + 130), 26, 10, -1)
    cx, cy = int(x0 + rng.integers(110, 290)), int(y0 + rng.integers(50, 210))
    if i % 4 == 1 and (i // 4) % 2:
        a = rng.uniform(0, np.pi)
        dx, dy = int(60 * np.cos(a)), int(60 * np.sin(a))
        cv2.line(img, (cx - dx, cy - dy), (cx + dx, cy + dy), float(rng.uniform(150, 235)), 5, cv2.LINE_AA)
    elif i % 4 == 1:
        cv2.circle(img, (cx, cy), int(rng.integers(8, 16)), float(rng.uniform(130, 220)), -1, cv2.LINE_AA)
    elif i % 7 == 3:
        glare = np.zeros((h, w), np.float32)
        cv2.circle(glare, (cx, cy), 30, 1.0, -1)
        img = img + cv2.GaussianBlur(glare, (0, 0), 12) * rng.uniform(25, 60)
    img = np.clip(img, 0, 255)
    return np.dstack([img * 0.96, img, img * 1.06 + 4]).clip(0, 255).astype(np.uint8)


def parts_folder(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    for i in range(n):
        cv2.imwrite(str(folder / f"{i:04d}.png"), cv2.cvtColor(part_frame(i, rng), cv2.COLOR_RGB2BGR))
    return folder


# ---- options and the state, without a server ----------------------------------------------------
def test_web_options_bind_and_token():
    local = WebOptions.parse("8080")
    assert (local.host, local.port, local.open_reads, local.token_generated) == ("127.0.0.1", 8080, True, True)
    assert len(local.token) >= 30
    wide = WebOptions.parse("0.0.0.0:9000", TOKEN)
    assert (wide.host, wide.port, wide.open_reads, wide.token, wide.token_generated) == (
        "0.0.0.0",
        9000,
        False,
        TOKEN,
        False,
    )
    assert WebOptions.parse("[::1]:81").host == "::1" and WebOptions.parse("[::1]:81").open_reads
    for bad in ("", "host:", "a:b:c", "127.0.0.1:70000", "http://x:80"):
        with pytest.raises(WebError, match="--web"):
            WebOptions.parse(bad)
    with pytest.raises(WebError, match="at least 16"):
        WebOptions.parse("8080", "short")


def test_state_keeps_the_latest_frame_and_the_last_fails():
    """The run's side is a slot, not a queue: 500 frames leave one latest frame, the newest FAILs, all counts."""
    state = LiveState(recent=100, gallery=5)
    state.begin({"classes": ["a", "b"]})
    image, amap = np.zeros((4, 6, 3), np.uint8), np.zeros((4, 6), np.float32)
    for i in range(500):
        record = {
            "frame": i,
            "source": "rtsp://user:secret@cam/x",
            "class": "a" if i % 3 else "b",
            "score": i / 500,
            "score_normalized": 0.5,
            "anomalous": i % 2 == 0,
            "latency_ms": 3.0,
        }
        state.add(image, amap, record)
    assert state.latest()[0] == 500 and state.latest()[3]["frame"] == 499
    snap = state.snapshot(since=450)
    assert [r["frame"] for r in snap["recent"]] == list(range(450, 500))
    assert len(state.snapshot()["recent"]) == 100
    assert [g["frame"] for g in snap["gallery"]] == [498, 496, 494, 492, 490]
    assert snap["classes"]["a"]["frames"] + snap["classes"]["b"]["frames"] == 500
    assert snap["classes"]["a"]["fails"] == sum(1 for i in range(500) if i % 3 and i % 2 == 0)
    assert "secret" not in json.dumps(snap)  # a stream's password never reaches the page
    state.mark(snap["gallery"][1]["id"], "defect")  # frames 496 and 494: class a
    state.mark(snap["gallery"][2]["id"], "defect")
    state.mark(snap["gallery"][1]["id"], "good")  # changed mind: counted once, as good
    a = state.snapshot()["classes"]["a"]
    assert a["marks"] == {"good": 1, "defect": 1}
    assert a["false_reject_rate"] == pytest.approx(a["fails"] / a["frames"] * 0.5)
    with pytest.raises(KeyError):
        state.mark(1, "good")  # long gone from the gallery
    with pytest.raises(ValueError, match="mark must be"):
        state.mark(snap["gallery"][0]["id"], "maybe")
    counts, total = state.latency()
    assert sum(counts) == 500 and total == pytest.approx(1.5)


def test_set_thresholds_decides_the_next_call_and_checks_like_create(tmp_path):
    """What "Apply to this run" uses: the C-style set_thresholds and Detector.set_thresholds."""
    from hgad_edge.runtime import Detector, Status, api

    frame = np.full((64, 96, 3), 120, np.uint8)  # score 120/255 = 0.47: FAIL at 0.41
    with Detector(make_bundle(tmp_path / "bundle"), backend="onnxruntime") as det:
        assert det.infer(frame, "a").anomalous[0]
        det.set_thresholds({"a": 0.5})
        assert not det.infer(frame, "a").anomalous[0] and det.info["thresholds"] == [0.5, THRESHOLDS[1]]
        assert det.info["bundle_thresholds"] == list(THRESHOLDS)  # the bundle is not changed
        det.set_thresholds(None)
        assert det.infer(frame, "a").anomalous[0]
        handle = det._handle
        assert api.set_thresholds(handle, {"zz": 1.0}) == Status.INVALID_ARGUMENT
        assert "unknown class 'zz'" in api.last_error(handle)
        assert api.set_thresholds(handle, {"a": float("nan")}) == Status.INVALID_ARGUMENT
        assert api.set_thresholds(handle, [("a", 1.0)]) == Status.INVALID_ARGUMENT
        assert api.info(handle)[1]["thresholds"] == list(THRESHOLDS)  # a refused change changes nothing
    assert api.set_thresholds(handle, {"a": 1.0}) == Status.INVALID_HANDLE


# ---- the server with a real run -----------------------------------------------------------------
def test_page_follows_the_run_and_metrics_count_it(tmp_path):
    frames = image_folder(tmp_path / "frames", 40)  # the tiny model FAILs the even ones
    with live_run(tmp_path, frames) as (page, run, bundle):
        wait_for(lambda: run.thread.is_alive() is False or page.state.seq >= 40, what="40 frames")
        run.thread.join(20)
        summary = run.summary
        status, headers, body = http(page.url + "api/state")
        assert status == 200 and "no-store" in headers["cache-control"]
        state = json.loads(body)
        assert state["run"]["state"] == "ended" and state["seq"] == summary["frames"] == 40
        assert state["classes"]["a"]["frames"] == 40 and state["classes"]["a"]["fails"] == summary["anomalies"] == 20
        assert [r["frame"] for r in state["recent"]] == list(range(40))
        assert state["thresholds"]["run"] == {"a": THRESHOLDS[0], "b": THRESHOLDS[1]}
        assert state["live"]["dropped_frames"] == 0 and state["live"]["queue_depths"] == {}
        gallery = state["gallery"]
        assert [g["frame"] for g in gallery] == [38, 36, 34, 32, 30, 28, 26, 24, 22, 20, 18, 16]  # newest 12 FAILs

        def drawn():
            status, headers, body = http(page.url + f"gallery/{gallery[0]['id']}.jpg")
            return status == 200 and body[:2] == b"\xff\xd8" and body

        wait_for(drawn, what="the newest FAIL's thumbnail")
        status, headers, jpeg = http(page.url + "frame.jpg")
        assert status == 200 and headers["content-type"] == "image/jpeg"
        assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape[:2] == (64, 96)

        status, headers, text = http(page.url + "metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain")
        m = metrics_of(text.decode())
        assert m[("hgad_edge_frames_total", (("class", "a"),))] == 40
        assert m[("hgad_edge_fails_total", (("class", "a"),))] == 20
        assert m[("hgad_edge_latency_seconds_count", ())] == 40
        for name in ("dropped_frames", "corrupt_frames", "lost_frames"):
            assert m[(f"hgad_edge_{name}_total", ())] == 0
        assert m[("hgad_edge_reconnects_total", (("to", "source"),))] == 0
        assert m[("hgad_edge_threshold", (("class", "a"),))] == THRESHOLDS[0]

        status, headers, html = http(page.url)
        assert status == 200 and TOKEN.encode() not in html
        assert "default-src 'self'" in headers["content-security-policy"]
        assert b"https://" not in html and b"http://" not in html  # every asset from the station itself
        for name in ("app.js", "style.css", "favicon.svg"):
            status, _, asset = http(page.url + "static/" + name)
            assert status == 200 and b"https://" not in asset and TOKEN.encode() not in asset
        assert http(page.url + "static/../access.py")[0] == 404


def test_apply_changes_the_runs_next_decisions_and_changes_need_the_token(tmp_path):
    frames = image_folder(tmp_path / "frames", 300)
    with live_run(tmp_path, frames, fps=100) as (page, run, bundle):
        wait_for(lambda: page.state.seq >= 20, what="20 frames")
        url = page.url + "api/threshold"
        change = {"class": "a", "threshold": 2.0, "action": "apply"}
        assert http(url, "POST", change)[0] == 401
        assert http(url, "POST", change, token="wrong-token-0123456789")[0] == 401
        assert http(url, "POST", change, headers={"Cookie": "hgad_edge_session=guess"})[0] == 401
        status, _, body = http(url, "POST", {**change, "threshold": "high"}, token=TOKEN)
        assert status == 400 and "finite number" in json.loads(body)["error"]
        status, _, body = http(url, "POST", {**change, "class": "zz"}, token=TOKEN)
        assert status == 400 and "unknown class" in json.loads(body)["error"]
        status, _, body = http(url, "POST", change, token=TOKEN)
        assert status == 200 and json.loads(body)["run"]["a"] == 2.0
        applied_at = page.state.seq
        wait_for(lambda: page.state.seq >= applied_at + 20, what="20 more frames")
        run.stop()
    records = read_jsonl(tmp_path / "results.jsonl")
    assert any(r["anomalous"] for r in records[:applied_at])
    assert not any(r["anomalous"] for r in records[applied_at + 1 :])  # 2.0 is above every score: all PASS
    meta = json.loads((bundle / "metadata.json").read_text())
    assert meta["thresholds"] == list(THRESHOLDS) and "calibration" not in meta  # this run only


def test_save_and_undo_go_through_calibrate(tmp_path):
    frames = image_folder(tmp_path / "frames", 20)
    with live_run(tmp_path, frames) as (page, run, bundle):
        run.thread.join(20)
        status, _, body = http(page.url + "api/threshold", "POST", {"class": "b", "threshold": 0.55, "action": "save"})
        assert status == 401
        status, _, body = http(
            page.url + "api/threshold", "POST", {"class": "b", "threshold": 0.55, "action": "save"}, token=TOKEN
        )
        assert status == 200, body
        view = json.loads(body)
        assert view["bundle"]["b"] == 0.55 and view["calibration"]["policy"] == "manual"
        meta = json.loads((bundle / "metadata.json").read_text())
        assert meta["thresholds"] == [THRESHOLDS[0], 0.55]
        assert meta["calibration"]["previous"]["thresholds"] == list(THRESHOLDS)
        assert http(page.url + "api/undo", "POST", {})[0] == 401
        status, _, body = http(page.url + "api/undo", "POST", {}, token=TOKEN)
        assert status == 200 and json.loads(body)["bundle"]["b"] == THRESHOLDS[1]
        assert json.loads((bundle / "metadata.json").read_text())["thresholds"] == list(THRESHOLDS)
        status, _, body = http(page.url + "api/undo", "POST", {}, token=TOKEN)
        assert status == 400 and "no calibration to undo" in json.loads(body)["error"]
        http(page.url + "api/threshold", "POST", {"class": "a", "threshold": 0.6, "action": "save"}, token=TOKEN)
    res = CliRunner().invoke(main, ["calibrate", str(bundle), "--undo"])  # the calibrate verb undoes the page's save
    assert res.exit_code == 0, res.output
    assert json.loads((bundle / "metadata.json").read_text())["thresholds"] == list(THRESHOLDS)


def test_reads_need_the_token_off_loopback_and_foreign_hosts_are_refused(tmp_path):
    frames = image_folder(tmp_path / "frames", 10)
    with live_run(tmp_path, frames, open_reads=False) as (page, run, bundle):
        run.thread.join(20)
        for path in ("api/state", "metrics", "frame.jpg", "stream.mjpg"):
            assert http(page.url + path)[0] == 401, path
        assert http(page.url)[0] == 200  # the page holds no data: it asks for the token
        assert http(page.url + "metrics", token=TOKEN)[0] == 200  # what Prometheus sends
        status, headers, _ = http(page.url + "api/session", "POST", {}, token=TOKEN)
        cookie = headers["set-cookie"]
        assert status == 200 and "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
        assert TOKEN not in cookie
        session = cookie.split(";")[0]
        assert http(page.url + "api/state", headers={"Cookie": session})[0] == 200
        change = {"class": "a", "threshold": 0.5, "action": "save"}
        assert http(page.url + "api/threshold", "POST", change, headers={"Cookie": session})[0] == 401  # no CSRF
        assert http(page.url + "api/state", token=TOKEN, headers={"Host": "evil.example:80"})[0] == 403


def test_stream_sends_the_newest_frames_as_mjpeg(tmp_path):
    frames = image_folder(tmp_path / "frames", 400)
    with live_run(tmp_path, frames, fps=100) as (page, run, bundle):
        wait_for(lambda: page.state.seq >= 5, what="5 frames")
        with urllib.request.urlopen(page.url + "stream.mjpg", timeout=10) as response:
            assert response.headers["content-type"].startswith("multipart/x-mixed-replace")
            data = b""
            while data.count(b"--frame") < 4:
                data += response.read1(65536)
        parts = [p for p in data.split(b"--frame\r\n") if p]
        jpegs = [p.split(b"\r\n\r\n", 1)[1] for p in parts[:3]]
        assert all(j.startswith(b"\xff\xd8") for j in jpegs) and len({j for j in jpegs}) == 3  # new frames


def test_live_frames_are_drawn_only_while_watched_and_paced_by_their_cost(tmp_path):
    """Nobody watching, the page draws the gallery's thumbnails (they free the FAILs' frames) and no live
    frame; a viewer gets frames at once; the live frame's pace is max_fps, or slower when drawing one
    would take more than LIVE_CPU_SHARE of a core at that rate."""
    from hgad_edge.runtime.web.server import LIVE_CPU_SHARE

    frames = image_folder(tmp_path / "frames", 400)
    with live_run(tmp_path, frames, fps=100) as (page, run, bundle):
        web = page._server
        wait_for(lambda: any(g["ready"] for g in page.state.snapshot()["gallery"]), what="a FAIL's thumbnail")
        assert web.live_jpeg is None and web.draw_s == 0.0  # no live frame drawn for nobody
        with urllib.request.urlopen(page.url + "stream.mjpg", timeout=10) as response:
            data = b""
            while data.count(b"--frame") < 2:
                data += response.read1(65536)
        assert web.live_jpeg is not None and web.draw_s > 0.0
        wait_for(lambda: web.viewers == 0, what="the viewer gone")
        max_fps = page.options.max_fps
        web.draw_s = 0.2 * LIVE_CPU_SHARE / max_fps  # a frame drawn in a fifth of the budget: max_fps
        assert web.live_period() == pytest.approx(1 / max_fps)
        web.draw_s = 0.1  # a frame that takes 100 ms to draw: one every 0.1 / LIVE_CPU_SHARE s (5 s at 2 %)
        assert web.live_period() == pytest.approx(0.1 / LIVE_CPU_SHARE)


def test_cli_refuses_a_taken_port_before_the_model_loads(tmp_path):
    bundle, frames = make_bundle(tmp_path / "bundle"), image_folder(tmp_path / "frames", 4)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        res = CliRunner().invoke(main, ["run", str(bundle), str(frames), "--headless", "--web", f"127.0.0.1:{port}"])
    assert res.exit_code == 1 and "in use" in res.output and "frames" not in res.output
    res = CliRunner().invoke(main, ["run", str(bundle), str(frames), "--headless", "--web", "nonsense"])
    assert res.exit_code == 1 and "give PORT, HOST:PORT" in res.output


def test_cli_run_with_web_prints_where_and_a_generated_token(tmp_path):
    bundle, frames = make_bundle(tmp_path / "bundle"), image_folder(tmp_path / "frames", 6)
    res = CliRunner().invoke(main, ["run", str(bundle), str(frames), "--headless", "--web", "127.0.0.1:0"])
    assert res.exit_code == 0, res.output
    assert "live page: http://127.0.0.1:" in res.output and "#token=" in res.output
    res = CliRunner(env={"HGAD_EDGE_WEB_TOKEN": TOKEN}).invoke(
        main, ["run", str(bundle), str(frames), "--headless", "--web", "127.0.0.1:0"]
    )
    assert res.exit_code == 0 and TOKEN not in res.output and "#token=" not in res.output


# ---- the page in a real browser ----------------------------------------------------------------
def chrome():
    """Selenium on the Debian chromium + chromedriver (never a download); a skip where they are not installed,
    a failure in CI, which installs them (.ci/run)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (binary and driver):
        if os.environ.get("CI"):
            pytest.fail("chromium / chromium-driver missing: .ci/run installs them with apt-get")
        pytest.skip("needs Debian chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1600,1250", "--hide-scrollbars"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


@pytest.mark.slow
def test_the_page_in_chromium(tmp_path, monkeypatch):
    """Load the page while a run streams a folder: the frame updates, a FAIL shows in the gallery, the
    slider changes the FAIL count shown, a saved threshold lands in the bundle, a request without the
    token is refused; the screenshot is the README's (HGAD_EDGE_WEB_SCREENSHOT=docs/img/web.png keeps it)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.chdir(tmp_path)  # short names in the page's header, as an operator would type them
    frames = parts_folder(Path("line-3-camera-2"), 600)
    browser = chrome()
    try:
        with live_run(Path("."), frames, fps=12) as (page, run, bundle):
            wait = WebDriverWait(browser, 30, poll_frequency=0.1)
            browser.get(page.url)
            text = lambda element_id: browser.find_element(By.ID, element_id).text  # noqa: E731

            # the live frame updates: its frame number moves on and the picture itself changes
            wait.until(lambda b: text("run-state") == "LIVE")
            wait.until(lambda b: b.execute_script("return document.getElementById('live-frame').naturalWidth") > 0)
            img = browser.find_element(By.ID, "live-frame")
            first, shot = text("frame-no"), img.screenshot_as_png
            wait.until(lambda b: text("frame-no") != first and img.screenshot_as_png != shot)

            # a request without the token is refused, from the page's own origin
            refused = browser.execute_async_script(
                "fetch('/api/threshold', {method: 'POST', body: '{}'}).then(r => arguments[arguments.length - 1]"
                "(r.status))"
            )
            assert refused == 401
            assert browser.find_element(By.ID, "btn-save").get_attribute("disabled") is not None

            # the operator gives the token: the buttons come alive
            browser.find_element(By.ID, "btn-token").click()
            browser.find_element(By.ID, "token-input").send_keys(TOKEN + Keys.ENTER)
            wait.until(lambda b: b.find_element(By.ID, "btn-save").get_attribute("disabled") is None)

            # a FAIL in the gallery, with its heatmap
            wait.until(
                lambda b: (
                    b.execute_script(
                        "return [...document.querySelectorAll('#gallery .shot img')].filter(i => i.naturalWidth).length"
                    )
                    >= 6
                )
            )
            ids = [e.get_attribute("data-id") for e in browser.find_elements(By.CSS_SELECTOR, "#gallery .shot")][:3]
            for kind, shot in zip(("defect", "defect", "good"), ids):  # the operator's word on three FAILs
                browser.find_element(By.CSS_SELECTOR, f'#gallery .shot[data-id="{shot}"] .mark-{kind}').click()
            wait.until(lambda b: "1 / 2" in text("counts-body"))

            # the slider changes the FAIL count shown: all recent frames at its low end, none at its high end
            slider = browser.find_element(By.ID, "thr-slider")
            slider.send_keys(Keys.HOME)
            wait.until(lambda b: text("would-fail-count") == text("would-fail-of"))
            assert int(text("would-fail-count")) > 0
            slider.send_keys(Keys.END)
            wait.until(lambda b: text("would-fail-count") == "0")
            slider.send_keys(Keys.HOME)
            for _ in range(200):  # up from the low end until (about) only the scratched and chipped plates FAIL
                if int(text("would-fail-count")) < 0.3 * int(text("would-fail-of")):
                    break
                slider.send_keys(Keys.PAGE_UP)
            value = float(slider.get_property("value"))
            shown = int(text("would-fail-count"))
            assert 0 < shown < int(text("would-fail-of"))

            # saved: it lands in the bundle's metadata.json, recorded as calibrate records
            browser.find_element(By.ID, "btn-save").click()
            wait.until(lambda b: "saved to the bundle" in text("toast"))
            meta = json.loads((bundle / "metadata.json").read_text())
            assert meta["thresholds"][0] == value and meta["calibration"]["policy"] == "manual"
            assert meta["calibration"]["previous"]["thresholds"] == list(THRESHOLDS)
            wait.until(
                lambda b: abs(float(text("thr-bundle")) - value) < 1e-4 and abs(float(text("thr-run")) - value) < 1e-4
            )

            time.sleep(2.5)  # a few more frames decided at the new threshold for the trend and the counts
            browser.execute_script("document.getElementById('toast').className = 'toast'")
            time.sleep(0.4)
            browser.save_screenshot(str(tmp_path / "web.png"))
            logs = browser.page_source
            assert TOKEN not in logs  # the token is never written into the page
    finally:
        browser.quit()
    keep = os.environ.get("HGAD_EDGE_WEB_SCREENSHOT")
    if keep:
        shutil.copyfile(tmp_path / "web.png", keep)
