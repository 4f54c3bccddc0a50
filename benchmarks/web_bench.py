#!/usr/bin/env python
"""What the live page (`hgad-edge run --web`) costs a run: frames/s with and without it.

    python benchmarks/web_bench.py BUNDLE --images DIR [--frames 300] [--repeats 5] \
        [--out benchmarks/results/web-<machine>]

Runs `run_app` headless over a folder of DIR's images (searched recursively, cycled through symlinks
up to --frames frames; ground-truth masks left out), exactly as `hgad-edge run BUNDLE FOLDER
--headless [--web 127.0.0.1:0]` does, in three modes:

    off      no page
    page     the page served, nobody looking
    watched  the page served with one browser's load on it, from another process (a browser is not
             in the station's process): the MJPEG stream read as fast as it comes, /api/state polled
             every 0.5 s as the page does, and /metrics scraped every second

The modes take turns within each repeat (the order rotating), so a machine that other work slows
down slows all of them alike; the figure per mode is the median of its repeats, the cost is
1 - median(mode) / median(off). Where other work shares the cores, frames/s wander by more than 5 %
from run to run, so CPU time is measured too, which other work disturbs far less: the run's process
(user + system, getrusage) per frame scored, from the first frame's record to the run's end (model
loading left out), and its cost median(mode) / median(off) - 1; the page's own thread (the server,
its event loop and the drawing; /proc/self/task/TID/stat) as a share of one core over the run; and
the viewer process's share of one core (what a browser on the station itself would take).
Writes report.md and report.json (atomically) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ itself, also when loaded by path
from _bootstrap import bootstrap_package as _bootstrap_package  # noqa: E402
from serve_bench import image_paths, machine_name  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODES = ("off", "page", "watched")
TARGET = 0.05  # the page may cost at most 5 % of the run's frames/s


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("bundle", type=Path, help="bundle folder (hgad-edge export --out)")
    p.add_argument("--images", type=Path, required=True, help="folder of frames (searched recursively)")
    p.add_argument("--frames", type=int, default=300, help="frames per run")
    p.add_argument("--repeats", type=int, default=5, help="runs per mode")
    p.add_argument("--backend", default="onnxruntime", help="runtime backend (default onnxruntime)")
    p.add_argument("--out", type=Path, help=f"report folder (default {REPO}/benchmarks/results/web-<machine>)")
    args = p.parse_args(argv)
    if args.frames < 10 or args.repeats < 1:
        p.error("--frames needs >= 10 and --repeats >= 1")
    if not (args.bundle / "metadata.json").is_file():
        p.error(f"{args.bundle} is not a bundle (no metadata.json); create one with hgad-edge export")
    if not args.images.is_dir():
        p.error(f"--images {args.images} is not a folder")
    return args


def frames_folder(images: Path, n: int, into: Path) -> Path:
    """n frames as symlinks 00000.png ... cycling through the images (spread over classes)."""
    paths = image_paths(images, n)
    for i in range(n):
        source = paths[i % len(paths)].resolve()
        (into / f"{i:05d}{source.suffix.lower()}").symlink_to(source)
    return into


class Viewer:
    """One browser's load on the page, in a child process (`web_bench.py viewer URL`): the MJPEG stream,
    /api/state every 0.5 s, /metrics every second; `close` returns what it read."""

    def __init__(self, url: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "viewer", url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.started = time.perf_counter()
        self.children_cpu = children_cpu_s()

    def close(self) -> dict[str, float]:
        """What it read, and its CPU as a share of one core over its life (it is reaped here)."""
        out, _ = self.process.communicate("stop\n", timeout=30)
        share = (children_cpu_s() - self.children_cpu) / (time.perf_counter() - self.started)
        return {**json.loads(out.strip().splitlines()[-1]), "viewer_core_share": share}


def children_cpu_s() -> float:
    """User + system CPU seconds of this process's reaped children so far (the viewers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CpuPerFrame:
    """The run's on_record hook: the process's CPU seconds (user + system) per frame, counted from
    the first frame's record, so the model's loading and the first inference's set-up are left out."""

    def __init__(self) -> None:
        self.frames, self.start = 0, 0.0

    def __call__(self, record: dict[str, Any]) -> None:
        if self.frames == 0:
            self.start = process_cpu_s()
        self.frames += 1

    def value(self) -> float:
        return (process_cpu_s() - self.start) / max(self.frames - 1, 1)


def process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def view(url: str) -> None:
    """The viewer process: reads until a line arrives on stdin, then prints {"stream_bytes", "polls"}."""
    stop, counts = threading.Event(), {"stream_bytes": 0, "polls": 0}

    def stream() -> None:
        while not stop.is_set():
            try:
                with urllib.request.urlopen(url + "stream.mjpg", timeout=5) as response:
                    while not stop.is_set():
                        counts["stream_bytes"] += len(response.read1(65536))
            except OSError:
                time.sleep(0.1)

    def poll() -> None:
        since, tick = 0, 0
        while not stop.wait(0.5):
            try:
                with urllib.request.urlopen(f"{url}api/state?since={since}", timeout=5) as response:
                    since = json.loads(response.read())["seq"]
                if tick % 2 == 0:
                    urllib.request.urlopen(url + "metrics", timeout=5).read()
                counts["polls"] += 1
            except OSError:
                pass
            tick += 1

    threads = [threading.Thread(target=t, daemon=True) for t in (stream, poll)]
    for thread in threads:
        thread.start()
    sys.stdin.readline()
    stop.set()
    for thread in threads:
        thread.join(6)
    print(json.dumps(counts), flush=True)


def thread_cpu_s(name: str) -> float:
    """User + system CPU seconds of this process's thread called `name` so far (Linux)."""
    thread = next(t for t in threading.enumerate() if t.name == name)
    fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(bundle: Path, folder: Path, mode: str, backend: str) -> dict[str, Any]:
    from hgad_edge.runtime import RuntimeOptions
    from hgad_edge.runtime.app import run_app
    from hgad_edge.runtime.web import LivePage, WebOptions

    options, meter = RuntimeOptions(backend), CpuPerFrame()
    run = {"headless": True, "options": options, "print_summary": False, "on_record": meter}
    if mode == "off":
        summary = run_app(bundle, folder, **run)
        return {"fps": summary["fps"], "frames": summary["frames"], "cpu_s_per_frame": meter.value()}
    with LivePage(WebOptions(port=0)).start(announce=lambda line: None) as page:
        viewer = Viewer(page.url) if mode == "watched" else None
        cpu = thread_cpu_s("hgad-edge web")
        try:
            summary = run_app(bundle, folder, web=page, **run)
            per_frame = meter.value()
        finally:
            cpu = thread_cpu_s("hgad-edge web") - cpu
            load = viewer.close() if viewer is not None else {}
    share = cpu / summary["elapsed_s"] if summary["elapsed_s"] else 0.0
    return {
        "fps": summary["fps"],
        "frames": summary["frames"],
        "cpu_s_per_frame": per_frame,
        "page_core_share": share,
        **load,
    }


def to_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# The live page's cost: {report['machine']}",
        "",
        f"`{report['command']}`",
        "",
        f"Bundle `{report['bundle']}` ({report['backend']}), {report['frames']} frames per run from "
        f"`{report['images']}`, {report['repeats']} runs per mode taking turns; {report['cpus']} CPUs, load average "
        f"{report['load_average'][0]:.1f} at the start and {report['load_average'][1]:.1f} at the end (other work).",
        "",
        "| mode | median frames/s | min | max | cost vs off (frames/s) | process CPU ms/frame (median) "
        "| cost vs off (CPU/frame) | page thread: share of one core | viewer: share of one core |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        m = report["modes"][mode]
        cost = "" if mode == "off" else f"{100 * m['cost']:+.1f} %"
        cpu_cost = "" if mode == "off" else f"{100 * m['cpu_cost']:+.1f} %"
        core, viewer = (f"{100 * m[k]:.2f} %" if k in m else "" for k in ("page_core_share", "viewer_core_share"))
        lines.append(
            f"| {mode} | {m['median_fps']:.2f} | {min(m['fps']):.2f} | {max(m['fps']):.2f} | {cost} "
            f"| {1e3 * m['median_cpu_s_per_frame']:.1f} | {cpu_cost} | {core} | {viewer} |"
        )
    watched = report["modes"]["watched"]
    costs = [report["modes"][m]["cost"] for m in MODES[1:]]
    cpu_costs = [report["modes"][m]["cpu_cost"] for m in MODES[1:]]
    lines += [
        "",
        f"watched: the viewer read {watched['stream_bytes'] / 1e6:.1f} MB of MJPEG and polled the page "
        f"{watched['polls']} times per run (median). Target: cost < {100 * TARGET:.0f} % of the frames/s: "
        + ("met" if max(costs) < TARGET else "NOT met")
        + f" by the medians of frames/s; by the CPU time per frame the page costs {100 * max(cpu_costs):+.1f} % at "
        f"most (the viewer's own CPU, in its process, not counted there); the page's thread took "
        f"{100 * watched['page_core_share']:.2f} % of one core of the {report['cpus']} while watched.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["viewer"]:
        view(argv[1])
        return 0
    args = parse_args(argv)
    _bootstrap_package()
    from hgad_edge.core.files import atomic_write_json, atomic_write_text

    out = args.out or REPO / "benchmarks" / "results" / f"web-{machine_name()}"
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = frames_folder(args.images, args.frames, Path(tmp))
        one_run(args.bundle, folder, "off", args.backend)  # warm-up: file cache, ONNX Runtime's first session
        for repeat in range(args.repeats):
            order = MODES[repeat % 3 :] + MODES[: repeat % 3]
            for mode in order:
                result = one_run(args.bundle, folder, mode, args.backend)
                runs[mode].append(result)
                what = f"{result['fps']:.2f} frames/s, {1e3 * result['cpu_s_per_frame']:.1f} ms CPU/frame"
                print(f"repeat {repeat + 1}/{args.repeats} {mode:8s} {what}", flush=True)
    base = statistics.median(r["fps"] for r in runs["off"])
    base_cpu = statistics.median(r["cpu_s_per_frame"] for r in runs["off"])
    modes = {}
    for mode, results in runs.items():
        fps, cpu = [r["fps"] for r in results], [r["cpu_s_per_frame"] for r in results]
        modes[mode] = {
            "fps": fps,
            "median_fps": statistics.median(fps),
            "cost": 1 - statistics.median(fps) / base,
            "cpu_s_per_frame": cpu,
            "median_cpu_s_per_frame": statistics.median(cpu),
            "cpu_cost": statistics.median(cpu) / base_cpu - 1,
        }
        for key in ("stream_bytes", "polls", "page_core_share", "viewer_core_share"):
            if key in results[0]:
                modes[mode][key] = statistics.median(r[key] for r in results)
    report = {
        "machine": machine_name(),
        "cpus": os.cpu_count(),
        "command": "python benchmarks/web_bench.py " + " ".join(argv),
        "bundle": str(args.bundle),
        "backend": args.backend,
        "images": str(args.images),
        "frames": args.frames,
        "repeats": args.repeats,
        "modes": modes,
        "load_average": [load_before, os.getloadavg()[0]],
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", to_markdown(report))
    print(to_markdown(report))
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
