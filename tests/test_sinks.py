"""Decisions reach the line: every sink kind against a real receiver started here on a loopback port (a
Mosquitto broker, an asyncua OPC UA server, an http.server webhook receiver), killed and restarted
mid-run; the bounded disk queue (overflow drops the oldest and counts them, SIGTERM persists it and
the next run sends it first); secrets masked everywhere; bad sinks refused before any work.

"Arrives exactly as the JSON lines say": the receiver's messages, repeats of an id removed (delivery
is at-least-once), are the run's --output lines, in order, field for field.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from hgad_edge.cli import main
from hgad_edge.runtime.app import run_app
from hgad_edge.runtime.sinks import SINKS, DiskQueue, Publisher, SinkError, parse_sink
from tests.helpers import REPO, free_port, image_folder, make_bundle, read_jsonl, rng_frames

N = 30  # frames per run


# ---- receivers ----------------------------------------------------------------------------------
def _mosquitto() -> str | None:
    return shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if os.path.exists(p)), None)


def _wait_port(port: int, up: bool, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            listening = sock.connect_ex(("127.0.0.1", port)) == 0
        if listening == up:
            return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} still {'closed' if up else 'open'} after {seconds} s")


class Mosquitto:
    """A real Mosquitto broker on a loopback port, with persistence so a restart keeps the queued
    QoS 1 messages of a persistent subscriber. Mosquitto started as root drops to user `mosquitto`, so
    its persistence folder must belong to that user (a pytest tmp_path lies under a 0700 folder)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.folder = Path(tempfile.mkdtemp(prefix="hgad-mosquitto-"))
        os.chmod(self.folder, 0o755)
        (self.folder / "data").mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.folder / "data", "mosquitto")
        self.conf = self.folder / "mosquitto.conf"
        self.conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {self.folder / 'data'}/\n"
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.folder / "broker.log", "a")  # noqa: SIM115 - the broker's for its life
        self.proc = subprocess.Popen([_mosquitto(), "-c", str(self.conf)], stdout=log, stderr=log)
        log.close()
        _wait_port(self.port, up=True)

    def stop(self) -> None:
        """SIGTERM: Mosquitto saves its persistence file and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None
        _wait_port(self.port, up=False)


class Subscriber:
    """mosquitto_sub with a persistent session (-c -i ID, QoS 1): it reconnects after a broker restart
    and gets what the broker kept for it."""

    def __init__(self, broker: Mosquitto, topic: str) -> None:
        self.out = broker.folder / f"sub-{topic.replace('/', '_')}.txt"
        self.topic, self.broker = topic, broker
        args = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-c", "-i", f"sub-{os.getpid()}"]
        with open(self.out, "w") as fh:
            self.proc = subprocess.Popen([*args, "-q", "1", "-t", topic, "-t", f"{topic}/status", "-v"], stdout=fh)
        deadline = time.monotonic() + 10  # subscribed once a probe comes back
        while "probe" not in self.out.read_text():
            assert time.monotonic() < deadline, "mosquitto_sub did not subscribe"
            subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-t", topic, "-m", "probe"], check=True)
            time.sleep(0.2)

    def lines(self) -> list[tuple[str, str]]:
        pairs = [line.split(" ", 1) for line in self.out.read_text().splitlines() if " " in line]
        return [(topic, payload) for topic, payload in pairs if payload != "probe"]

    def messages(self, wanted: int, seconds: float = 30.0) -> list[dict]:
        deadline = time.monotonic() + seconds
        while True:
            found = [json.loads(p) for t, p in self.lines() if t == self.topic]
            if len({m["id"] for m in found}) >= wanted or time.monotonic() > deadline:
                return found
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def broker():
    if _mosquitto() is None or shutil.which("mosquitto_sub") is None:
        pytest.skip("needs Mosquitto (Debian: apt-get install mosquitto mosquitto-clients; .ci/run installs it)")
    server = Mosquitto(free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.folder, ignore_errors=True)


@pytest.fixture
def subscriber(broker):
    sub = Subscriber(broker, "plant/line1")
    try:
        yield sub
    finally:
        sub.stop()


class Receiver:
    """A real HTTP receiver (http.server in a thread) that keeps every POST; `refuse` maps a frame
    number to the status it answers for it; stop() and start() again on the same port."""

    def __init__(self) -> None:
        self.port, self.posts, self.refuse = free_port(), [], {}
        self.server: http.server.ThreadingHTTPServer | None = None

    def start(self) -> None:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = receiver.refuse.get(body["frame"], 200)
                if status == 200:
                    receiver.posts.append((dict(self.headers), body, self.path))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@pytest.fixture
def receiver():
    server = Receiver()
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ---- helpers ------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def spool(tmp_path, monkeypatch):
    """The default disk-queue folder of every run here (never the user's ~/.local/state)."""
    monkeypatch.setenv("HGAD_EDGE_SPOOL", str(tmp_path / "default-spool"))
    return tmp_path / "default-spool"


@pytest.fixture
def bundle(tmp_path):
    return make_bundle(tmp_path / "bundle")


@pytest.fixture
def shots(tmp_path):
    return image_folder(tmp_path / "shots", N)


def first_of_each(messages: list[dict]) -> list[dict]:
    """The messages with repeats of an id removed (at-least-once delivery), in arrival order."""
    seen, out = set(), []
    for message in messages:
        if message["id"] not in seen:
            seen.add(message["id"])
            out.append(message)
    return out


def assert_as_json_lines(messages: list[dict], lines: list[dict]) -> None:
    """Every decision, in order, exactly as the run's JSON lines say."""
    got = first_of_each(messages)
    assert [m["frame"] for m in got] == [line["frame"] for line in lines]
    for message, line in zip(got, lines):
        assert message["source"] == line["source"] and message["class"] == line["class"]
        assert message["score"] == line["score"] and message["score_normalized"] == line["score_normalized"]
        assert message["decision"] == ("FAIL" if line["anomalous"] else "PASS")
        assert message["timestamp"] == line["timestamp"] and message["class_id"] == line["class_id"]


def restart_at(stop_frame: int, start_frame: int, stop, start, pause_s: float = 1.0):
    """on_record hook: the receiver goes away at one frame and comes back at a later one; the pause
    before it comes back lets the sender find it away (frames of the tiny model take a millisecond)."""

    def on_record(record: dict) -> None:
        if record["frame"] == stop_frame:
            stop()
        if record["frame"] == start_frame:
            time.sleep(pause_s)
            start()

    return on_record


# ---- the registry, URLs, secrets ----------------------------------------------------------------
EXAMPLES = {
    "jsonl": "jsonl:///tmp/decisions.jsonl",
    "mqtt": "mqtt://user:s3cr@t@broker:1883/plant/line1?qos=1",
    "mqtts": "mqtts://broker/line1",
    "opc.tcp": "opc.tcp://plc:4840/Station1?ns=3",
    "http": "http://user:s3cr@t@mes:8080/hook",
    "https": "https://mes.plant/api/inspections?token=s3cr@t&timeout=2",
}


def test_every_registered_scheme_has_an_example():
    assert set(EXAMPLES) == set(SINKS)


@pytest.mark.parametrize("scheme", sorted(SINKS))
def test_each_sink_kind_parses_its_url_and_masks_its_secrets(scheme):
    sink = parse_sink(EXAMPLES[scheme])
    assert isinstance(sink, SINKS[scheme])
    assert "s3cr" not in sink.name and "s3cr" not in sink.key
    assert "/" not in sink.key and sink.key == parse_sink(EXAMPLES[scheme]).key  # one queue file per receiver


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("ftp://host/x", "unknown sink"),
        ("mqtt://broker", "topic"),
        ("mqtt://broker/a/#", "wildcards"),
        ("mqtt://broker/t?qos=3", "qos"),
        ("mqtt://broker/t?qoss=1", "unknown option qoss"),
        ("mqtt://broker/t?ca=/nonexistent.pem", "not a readable file"),
        ("opc.tcp://plc:4840/S?ns=x", "ns="),
        ("http:///hook", "names no host"),
        ("https://mes/h?timeout=-1", "timeout"),
        ("mqtt://broker/t?queue=0", "queue"),
    ],
)
def test_bad_sinks_are_refused_before_the_model_loads(bundle, shots, tmp_path, url, words):
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(
        main, ["run", str(bundle), str(shots), "--headless", "--output", str(out), "--sink", url]
    )
    assert result.exit_code == 1 and words in result.output, result.output
    assert "Traceback" not in result.output and not out.exists()


def test_passwords_never_reach_a_log_line_or_the_summary(bundle, shots, tmp_path, caplog, capsys, monkeypatch):
    port = free_port()  # nobody listens: the sink is down the whole run
    monkeypatch.setenv("HGAD_EDGE_WEBHOOK_TOKEN", "t0ken-s3cr@t")
    sinks = [f"mqtt://line:pa55:w@rd@127.0.0.1:{port}/t?flush=0", f"http://127.0.0.1:{port}/h?token=abc123&flush=0"]
    with caplog.at_level(logging.DEBUG, logger="hgad_edge"):
        summary = run_app(bundle, str(shots), headless=True, sinks=sinks, spool=tmp_path / "spool", max_frames=3)
    printed = capsys.readouterr()
    everything = caplog.text + printed.out + printed.err + json.dumps(summary)
    assert "is down" in caplog.text and "3 queued" in printed.out
    for secret in ("pa55", "w@rd", "abc123", "t0ken"):
        assert secret not in everything


# ---- the disk queue ------------------------------------------------------------------------------
def test_queue_keeps_order_drops_the_oldest_beyond_its_bound_and_counts(tmp_path):
    queue = DiskQueue(tmp_path / "q.queue", max_messages=5)
    assert queue.put_many([f"m{i}" for i in range(3)]) == 0
    assert queue.put_many([f"m{i}" for i in range(3, 8)]) == 3 and queue.dropped == 3
    assert [body for _, body in queue.peek(10)] == ["m3", "m4", "m5", "m6", "m7"] and len(queue) == 5
    queue.ack(queue.peek(2)[-1][0], 2)
    assert [body for _, body in queue.peek(10)] == ["m5", "m6", "m7"]
    with pytest.raises(SinkError, match="in use by another hgad-edge run"):
        DiskQueue(tmp_path / "q.queue", max_messages=5)
    queue.close()
    again = DiskQueue(tmp_path / "q.queue", max_messages=5)  # the next run finds what was left
    assert again.backlog == 3 and [body for _, body in again.peek(10)] == ["m5", "m6", "m7"]
    again.close()


def test_overflow_while_the_broker_is_down_drops_the_oldest_and_the_next_run_sends_the_rest_first(
    bundle, shots, tmp_path, broker, subscriber
):
    spool, out = tmp_path / "spool", tmp_path / "out.jsonl"
    url = f"mqtt://127.0.0.1:{broker.port}/plant/line1?queue=10&flush=0"
    broker.stop()
    first = run_app(bundle, str(shots), headless=True, output_jsonl=out, sinks=[url], spool=spool)
    counts = first["sinks"][url]
    assert (counts["sent"], counts["queued"], counts["dropped"]) == (0, 10, N - 10)
    broker.start()
    second = run_app(
        bundle,
        str(shots),
        headless=True,
        output_jsonl=out,
        sinks=[url.replace("flush=0", "flush=10")],
        spool=spool,
        max_frames=5,
    )
    counts = next(iter(second["sinks"].values()))
    assert (counts["backlog"], counts["sent"], counts["queued"], counts["dropped"]) == (10, 15, 0, 0)
    lines = read_jsonl(out)
    assert_as_json_lines(subscriber.messages(15), lines[N - 10 : N] + lines[N:])


# ---- MQTT -------------------------------------------------------------------------------------
def test_mqtt_broker_killed_and_restarted_mid_run_every_decision_arrives_in_order(
    bundle, shots, tmp_path, broker, subscriber
):
    out = tmp_path / "out.jsonl"
    url = f"mqtt://127.0.0.1:{broker.port}/plant/line1?timeout=0.5&flush=20"  # unacknowledged for 0.5 s: down
    summary = run_app(
        bundle,
        str(shots),
        headless=True,
        output_jsonl=out,
        sinks=[url],
        spool=tmp_path / "spool",
        history=tmp_path / "h.db",
        on_record=restart_at(10, 20, broker.stop, broker.start),
    )
    counts = summary["sinks"][url]
    assert counts["sent"] >= N and counts["queued"] == 0 and counts["dropped"] == 0 and counts["outages"] >= 1
    messages = subscriber.messages(N)
    assert_as_json_lines(messages, read_jsonl(out))
    status = [payload for topic, payload in subscriber.lines() if topic.endswith("/status")]
    assert status[0] == "online" and status[-1] == "offline"  # retained status; the clean close says goodbye


def test_cli_run_with_the_broker_down_then_up_sends_everything_and_keeps_the_history(
    bundle, shots, tmp_path, broker, subscriber
):
    """issue 22's check: `hgad-edge run BUNDLE shots/ --sink mqtt://... --history h.db`, the broker away."""
    out, db = tmp_path / "out.jsonl", tmp_path / "h.db"
    args = ["run", str(bundle), str(shots), "--headless", "--output", str(out), "--history", str(db)]
    args += ["--sink", f"mqtt://127.0.0.1:{broker.port}/plant/line1", "--spool", str(tmp_path / "spool")]
    broker.stop()
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0 and f"0 sent, {N} queued, 0 dropped" in first.output, first.output
    broker.start()
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0 and f"{2 * N} sent, 0 queued" in second.output, second.output
    lines = read_jsonl(out)
    assert_as_json_lines(subscriber.messages(2 * N), lines)
    listed = CliRunner().invoke(main, ["history", str(db), "--csv", "-"])
    rows = listed.output.strip().splitlines()[1:]
    assert listed.exit_code == 0 and len(rows) == len(lines) == 2 * N


@pytest.mark.slow  # a second interpreter starts (imports ONNX Runtime and OpenCV)
def test_sigterm_persists_the_queue_and_the_next_run_sends_it_first(bundle, tmp_path, broker, subscriber):
    """The run writes its JSON lines into a FIFO this test reads, so the test sets the pace: it reads 20
    lines, sends SIGTERM while the run waits on the pipe, and reads the rest."""
    shots = image_folder(tmp_path / "many", 600)
    fifo, spool = tmp_path / "results.fifo", tmp_path / "spool"
    os.mkfifo(fifo)
    url = f"mqtt://127.0.0.1:{broker.port}/plant/line1"
    broker.stop()
    cmd = [sys.executable, "-m", "hgad_edge.cli", "run", str(bundle), str(shots), "--headless", "--output", str(fifo)]
    proc = subprocess.Popen([*cmd, "--sink", url, "--spool", str(spool)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        with open(fifo) as pipe:
            lines = [json.loads(pipe.readline()) for _ in range(20)]
            proc.send_signal(signal.SIGTERM)
            lines += [json.loads(line) for line in pipe]
        printed, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "(interrupted)" in printed, printed
    assert f"0 sent, {len(lines)} queued, 0 dropped" in printed and len(lines) < 600, printed
    broker.start()
    out = tmp_path / "out.jsonl"
    summary = run_app(bundle, str(shots), headless=True, output_jsonl=out, sinks=[url], spool=spool, max_frames=5)
    assert summary["sinks"][url]["backlog"] == len(lines) and summary["sinks"][url]["queued"] == 0
    assert_as_json_lines(subscriber.messages(len(lines) + 5), lines + read_jsonl(out))


# ---- webhooks ---------------------------------------------------------------------------------
def test_webhook_receiver_stopped_and_restarted_mid_run_gets_every_decision_in_order(
    bundle, shots, tmp_path, receiver, monkeypatch
):
    monkeypatch.setenv("HGAD_EDGE_WEBHOOK_TOKEN", "tok")
    out = tmp_path / "out.jsonl"
    url = f"http://127.0.0.1:{receiver.port}/hook?site=7&timeout=2&flush=20"
    summary = run_app(
        bundle,
        str(shots),
        headless=True,
        output_jsonl=out,
        sinks=[url],
        spool=tmp_path / "spool",
        on_record=restart_at(10, 20, receiver.stop, receiver.start),
    )
    counts = summary["sinks"][next(iter(summary["sinks"]))]
    assert counts["sent"] == N and counts["queued"] == 0 and counts["outages"] >= 1
    assert_as_json_lines([body for _, body, _ in receiver.posts], read_jsonl(out))
    headers, body, path = receiver.posts[0]
    assert path == "/hook?site=7"  # the receiver's own parameter stays, ours (timeout, flush) do not
    assert headers["Authorization"] == "Bearer tok" and headers["Idempotency-Key"] == body["id"]


def test_webhook_message_refused_for_good_is_dropped_after_its_retries_and_counted(bundle, shots, tmp_path, receiver):
    receiver.refuse = {3: 422, 4: 503}  # frame 3: refused for good; frame 4: the receiver is busy until frame 20

    def busy_until_20(record: dict) -> None:
        if record["frame"] == 20:
            time.sleep(0.5)  # the sender meets the 503 (an outage) before it ends
            receiver.refuse.pop(4)

    out = tmp_path / "out.jsonl"
    url = f"http://127.0.0.1:{receiver.port}/hook?retries=2&flush=20"
    summary = run_app(
        bundle,
        str(shots),
        headless=True,
        output_jsonl=out,
        sinks=[url],
        spool=tmp_path / "spool",
        on_record=busy_until_20,
    )
    counts = next(iter(summary["sinks"].values()))
    assert (counts["sent"], counts["rejected"], counts["queued"]) == (N - 1, 1, 0)
    lines = [line for line in read_jsonl(out) if line["frame"] != 3]
    assert_as_json_lines([body for _, body, _ in receiver.posts], lines)


# ---- OPC UA -------------------------------------------------------------------------------------
class OpcServer:
    """A real asyncua server with the station's variables; every write it accepts is kept, in order."""

    def __init__(self, port: int, names=("Decision", "Fail", "Score", "ScoreNormalized", "Class", "Message")) -> None:
        self.port, self.names, self.writes = port, names, []  # (server start number, variable, value)
        self.server, self.starts = None, 0

    def start(self) -> None:
        from asyncua import ua
        from asyncua.common.callback import CallbackType
        from asyncua.sync import Server

        self.starts += 1
        start = self.starts
        server = Server()
        server.set_endpoint(f"opc.tcp://127.0.0.1:{self.port}/")
        ns = server.register_namespace("urn:hgad-edge:test")
        assert ns == 2
        station = server.nodes.objects.add_object(f"ns={ns};s=hgad", "hgad")
        kinds = {"Fail": (False, ua.VariantType.Boolean), "Score": (0.0, ua.VariantType.Double)}
        kinds |= {"ScoreNormalized": (0.0, ua.VariantType.Float), "Counter": (0, ua.VariantType.UInt32)}
        for name in (*self.names, "Counter"):
            value, kind = kinds.get(name, ("", ua.VariantType.String))
            station.add_variable(f"ns={ns};s=hgad.{name}", name, value, kind).set_writable()

        def written(event, dispatcher) -> None:
            for item in event.request_params.NodesToWrite:  # the server's own writes have numeric ids
                if isinstance(item.NodeId.Identifier, str) and item.NodeId.Identifier.startswith("hgad."):
                    self.writes.append((start, item.NodeId.Identifier.split(".", 1)[1], item.Value.Value.Value))

        server.aio_obj.subscribe_server_callback(CallbackType.PostWrite, written)
        server.start()
        self.server = server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def messages(self) -> list[dict]:
        return [json.loads(value) for _, name, value in self.writes if name == "Message"]

    def values(self, variable: str, start: int | None = None) -> list:
        return [value for s, name, value in self.writes if name == variable and start in (None, s)]


@pytest.fixture
def opc_server():
    pytest.importorskip("asyncua", reason="needs asyncua (pip install 'hgad-edge[line]')")
    server = OpcServer(free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow  # two asyncua servers start (~12 s on two loaded cores)
def test_opcua_station_writes_each_decision_and_a_counter_across_a_server_restart(bundle, shots, tmp_path, opc_server):
    out = tmp_path / "out.jsonl"
    url = f"opc.tcp://127.0.0.1:{opc_server.port}/hgad?flush=30"
    summary = run_app(
        bundle,
        str(shots),
        headless=True,
        output_jsonl=out,
        sinks=[url],
        spool=tmp_path / "spool",
        on_record=restart_at(10, 20, opc_server.stop, opc_server.start),
    )
    counts = summary["sinks"][url]
    assert counts["queued"] == 0 and counts["sent"] >= N
    lines = read_jsonl(out)
    assert_as_json_lines(opc_server.messages(), lines)
    assert opc_server.starts == 2
    for start in (1, 2):  # the counter goes on from the server's value: a restarted test server holds 0 again
        counters = opc_server.values("Counter", start)
        assert counters == list(range(1, len(counters) + 1))
    assert len(opc_server.values("Counter")) >= N
    last = lines[-1]
    assert opc_server.values("Decision")[-1] == ("FAIL" if last["anomalous"] else "PASS")
    assert opc_server.values("Fail")[-1] is last["anomalous"] and opc_server.values("Class")[-1] == last["class"]
    assert opc_server.values("Score")[-1] == last["score"]  # Double on the server
    assert opc_server.values("ScoreNormalized")[-1] == pytest.approx(last["score_normalized"], rel=1e-6)  # Float


def test_opcua_server_without_the_counter_is_refused_before_work(bundle, shots, tmp_path):
    pytest.importorskip("asyncua", reason="needs asyncua (pip install 'hgad-edge[line]')")
    server = OpcServer(free_port(), names=("Decision",))
    server.start()
    try:
        server_names = server.names
        url = f"opc.tcp://127.0.0.1:{server.port}/other"
        out = tmp_path / "out.jsonl"
        args = ["run", str(bundle), str(shots), "--headless", "--output", str(out), "--sink", url]
        result = CliRunner().invoke(main, [*args, "--spool", str(tmp_path / "spool")])
    finally:
        server.stop()
    assert server_names == ("Decision",)
    assert result.exit_code == 1 and "ns=2;s=other.Counter" in result.output, result.output
    assert not out.exists() or not out.read_text()


# ---- the Python API -------------------------------------------------------------------------------
def test_publisher_around_a_detector_sends_what_it_is_given(bundle, tmp_path, receiver):
    from hgad_edge.runtime import Detector

    frames = rng_frames(4)
    url = f"http://127.0.0.1:{receiver.port}/hook"
    with (
        Detector(bundle) as det,
        Publisher([url], history=tmp_path / "h.db", spool=tmp_path / "s").open_for(det) as line,
    ):
        sent = [line.publish_result(det.infer(frame), frame=i, source="cam0") for i, frame in enumerate(frames)]
    assert line.counts["sinks"][url]["sent"] == 4 and line.counts["history"]["written"] == 4
    assert [body for _, body, _ in receiver.posts] == sent
    assert all(
        m["model_sha256"] == json.loads((bundle / "metadata.json").read_text())["models"]["fp32"]["sha256"]
        for m in sent
    )


def test_messages_follow_a_threshold_changed_mid_run(bundle, tmp_path):
    """A threshold applied mid-run (the live page's slider) is the one the next messages name."""
    from hgad_edge.runtime import Detector

    messages = tmp_path / "messages.jsonl"
    with Detector(bundle) as det, Publisher([str(messages)], spool=tmp_path / "s").open_for(det) as line:
        name = det.classes[0]
        first = line.publish_result(det.infer(rng_frames(1)[0], name), frame=0)
        det.set_thresholds({name: 123.0})
        second = line.publish_result(det.infer(rng_frames(1)[0], name), frame=1)
    assert first["threshold"] != 123.0 and second["threshold"] == 123.0
    assert first["thresholds_version"] != second["thresholds_version"]
    assert [m["threshold"] for m in read_jsonl(messages)] == [first["threshold"], 123.0]


def test_jsonl_sink_writes_the_messages(bundle, shots, tmp_path):
    out, messages = tmp_path / "out.jsonl", tmp_path / "messages.jsonl"
    summary = run_app(
        bundle, str(shots), headless=True, output_jsonl=out, sinks=[str(messages)], save_anomalies=tmp_path / "fails"
    )
    assert summary["sinks"][f"jsonl:{messages}"]["sent"] == N
    written = read_jsonl(messages)
    assert_as_json_lines(written, read_jsonl(out))
    for message in written:  # a FAIL names its saved overlay; a PASS has none
        assert (message["evidence"] is not None) == (message["decision"] == "FAIL")
        assert message["evidence"] is None or Path(message["evidence"]).is_file()
