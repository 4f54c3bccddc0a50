#!/usr/bin/env python
"""Do the line's sinks slow inference? frames/s of `hgad-edge run` (run_app, headless, image folder)
without sinks, with every sink up, and with the network sinks down.

    python benchmarks/sink_bench.py BUNDLE --images DIR [--frames 60] [--repeats 3] \
        [--out benchmarks/results/sinks-<machine>]

Configurations, each run `--repeats` times in turn (A B C A B C ...) so that a busy machine slows them
alike, on the same frames (the first --frames images under DIR, any size):

    none   no sink, no history
    up     MQTT to a real Mosquitto started here on a loopback port (skipped without the binary), a
           webhook to an http.server receiver in this process, a JSON-lines file, the SQLite history
    down   the same MQTT and webhook URLs on ports nobody listens on (every message waits in the disk
           queue; flush=0), the JSON-lines file and the SQLite history

frames/s is the run summary's (frames / wall time of the loop): the model load and the final flush of
the queues are outside it, and reported together as "load + flush". The median of the repeats is reported,
with the spread. Writes report.md and report.json (atomically) to --out.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ itself, also when loaded by path
from _bootstrap import bootstrap_package as _bootstrap_package  # noqa: E402
from serve_bench import machine_name  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mosquitto(folder: Path) -> tuple[subprocess.Popen | None, int]:
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if exe is None:
        return None, 0
    port = free_port()
    conf = folder / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.05)
    proc.kill()
    return None, 0


def start_receiver() -> tuple[http.server.ThreadingHTTPServer, int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def image_subset(images: Path, frames: int, folder: Path) -> Path:
    """The first `frames` images under `images`, linked into one folder (a source for run_app)."""
    from hgad_edge.core.imaging import IMAGE_EXTENSIONS

    found = sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[:frames]
    if not found:
        raise SystemExit(f"no images under {images}")
    folder.mkdir(parents=True)
    for i, path in enumerate(found):
        (folder / f"{i:05d}{path.suffix.lower()}").symlink_to(path.resolve())
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("bundle", type=Path)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / f"sinks-{machine_name()}")
    args = p.parse_args(argv)
    _bootstrap_package()
    from hgad_edge.core.files import atomic_write_json, atomic_write_text
    from hgad_edge.runtime.app import run_app

    work = Path(tempfile.mkdtemp(prefix="hgad-sink-bench-"))
    broker, mqtt_port = start_mosquitto(work)
    receiver, http_port = start_receiver()
    dead = free_port()
    try:
        shots = image_subset(args.images, args.frames, work / "shots")
        up = [f"http://127.0.0.1:{http_port}/hook", f"jsonl:{work / 'up.jsonl'}"]
        if broker is not None:
            up.insert(0, f"mqtt://127.0.0.1:{mqtt_port}/bench/line1")
        down = [f"mqtt://127.0.0.1:{dead}/bench/line1?flush=0", f"http://127.0.0.1:{dead}/hook?flush=0"]
        down.append(f"jsonl:{work / 'down.jsonl'}")
        configs = {"none": {}, "up": {"sinks": up}, "down": {"sinks": down}}
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
        run_app(args.bundle, str(shots), headless=True, print_summary=False, max_frames=3)  # warm caches
        for repeat in range(args.repeats):
            for name, extra in configs.items():
                kwargs = dict(extra)
                if name != "none":
                    kwargs.update(history=work / f"{name}-{repeat}.db", spool=work / f"spool-{name}-{repeat}")
                start = time.perf_counter()
                summary = run_app(args.bundle, str(shots), headless=True, print_summary=False, **kwargs)
                total = time.perf_counter() - start
                close_s = total - summary["elapsed_s"]
                sinks = summary.get("sinks") or {}
                results[name].append({"fps": summary["fps"], "elapsed_s": summary["elapsed_s"], "close_s": close_s,
                                      "sinks": sinks, "history": summary.get("history")})  # fmt: skip
                print(f"{name:5s} repeat {repeat}: {summary['fps']:.1f} fps, load + flush {close_s:.2f} s", flush=True)
    finally:
        receiver.shutdown()
        if broker is not None:
            broker.terminate()
            broker.wait(10)
        shutil.rmtree(work, ignore_errors=True)

    base = statistics.median(r["fps"] for r in results["none"])
    rows = []
    for name, runs in results.items():
        fps = [r["fps"] for r in runs]
        median = statistics.median(fps)
        rows.append({"config": name, "fps_median": median, "fps_min": min(fps), "fps_max": max(fps),
                     "vs_none_pct": 100.0 * (median / base - 1.0), "close_s_median": statistics.median(
                         r["close_s"] for r in runs), "last": runs[-1]})  # fmt: skip
    report = {
        "machine": machine_name(),
        "bundle": str(args.bundle),
        "frames": args.frames,
        "repeats": args.repeats,
        "mqtt": "mosquitto" if broker is not None else "absent (no MQTT sink in 'up')",
        "configs": {name: configs[name].get("sinks", []) for name in configs},
        "rows": rows,
    }
    lines = [
        f"# Sinks and inference speed ({machine_name()})",
        "",
        f"`python benchmarks/sink_bench.py {args.bundle} --images {args.images} --frames {args.frames} "
        f"--repeats {args.repeats}`",
        "",
        "| config | frames/s (median) | min | max | vs none | load + flush (s) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['config']} | {row['fps_median']:.2f} | {row['fps_min']:.2f} | {row['fps_max']:.2f} | "
            f"{row['vs_none_pct']:+.1f} % | {row['close_s_median']:.2f} |"
        )
    lines += ["", "Delivery counts of the last repeat:", ""]
    for row in rows:
        for sink, counts in (row["last"]["sinks"] or {}).items():
            lines.append(f"- {row['config']}: {sink}: {json.dumps(counts)}")
        if row["last"]["history"]:
            lines.append(f"- {row['config']}: history: {json.dumps(row['last']['history'])}")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "report.json", report)
    atomic_write_text(args.out / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
