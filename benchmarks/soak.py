#!/usr/bin/env python
"""Soak benchmark: can the local runtime and `hgad-edge serve` be left running? Four streams each, for a
number of frames or minutes, while the memory (RSS), open file descriptors and threads of the processes
doing the work and the p50/p99 latency are sampled over time; the least-squares slope per hour of RSS
and of p99 says whether they grow.

    python benchmarks/soak.py BUNDLE --images DIR (--frames N | --minutes M) [--streams 4] [--sample-s 10]
        [--max-batch 16] [--phases local,server] [--out benchmarks/results/soak]

Two phases, one after the other, each in a fresh process of its own (so that one phase's memory is not
the next one's baseline), on the same frames (the images under DIR at their own size, so resizing on
the client is in every figure):

  local   `streams` threads of this process, each with its own Detector (ONNX Runtime), closed loop
          (the next frame as soon as the answer is back); sampled: this process.
  server  `hgad-edge serve BUNDLE` as a child process on loopback ports, and `streams` client threads
          here, each a Detector on its grpc:// URL; sampled: the server's processes together (serve,
          tritonserver, one Python-backend stub per model instance) and, apart, this client process.

Each sample covers the frames answered since the one before: their count, p50 and p99 latency, and
RSS (MB), open fds and threads at its end. The first WARMUP_FRACTION of a phase's samples is left out
of the slopes (allocators, caches and the batcher settle), and so is a last, shorter one that sees
the streams end. Errors are counted, never fatal; the report
says how many, and for the server whether its own count of inferences equals the frames answered.
--frames N ends a phase when every stream has done N frames, --minutes M after M minutes. A slope
from minutes of samples is noisy: what leaks shows as a slope that stays when the run is longer.
report.json and report.md are written atomically to --out.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ itself, also when loaded by path
from _bootstrap import bootstrap_package as _bootstrap_package  # noqa: E402
from serve_bench import load_frames, machine_name, server_stats  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WARMUP_FRACTION = 0.1  # of a phase's samples, left out of the slopes
PHASES = ("local", "server")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("bundle", type=Path, help="bundle folder (hgad-edge export --out)")
    p.add_argument("--images", type=Path, required=True, help="folder with real images (searched recursively)")
    p.add_argument("--max-images", type=int, default=64, help="distinct frames to cycle through")
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--frames", type=int, help="frames per stream and phase")
    length.add_argument("--minutes", type=float, help="minutes per phase")
    p.add_argument("--streams", type=int, default=4, help="streams per phase")
    p.add_argument("--sample-s", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--max-batch", type=int, default=16, help="server --max-batch (largest dynamic batch)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"which of {','.join(PHASES)} to run")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "soak", help="report folder")
    args = p.parse_args(argv)
    args.phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    if not args.phases or not set(args.phases) <= set(PHASES):
        p.error(f"--phases takes {', '.join(PHASES)}, got {args.phases}")
    if (args.frames is not None and args.frames < 1) or (args.minutes is not None and args.minutes <= 0):
        p.error("--frames must be >= 1 and --minutes > 0")
    if args.streams < 1 or args.sample_s <= 0 or args.max_batch < 1:
        p.error("--streams and --max-batch need values >= 1, --sample-s > 0")
    if not (args.bundle / "metadata.json").is_file():
        p.error(f"{args.bundle} is not a bundle (no metadata.json); create one with hgad-edge export")
    if not args.images.is_dir():
        p.error(f"--images {args.images} is not a folder")
    return args


# ---- what a process holds, from /proc ------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # ended meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    kids, tree, todo = _children(), [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(kids.get(current, []))
    return tree


def usage(pids: list[int]) -> dict[str, Any]:
    """RSS (MB), open fds and threads summed over `pids` (processes that ended are skipped), and the RSS
    of each by name (`by_process`)."""
    rss_kb = fds = threads = 0
    by_process: dict[str, float] = {}
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status if ":" in line)
        kb = int(fields.get("VmRSS", "0 kB").split()[0])
        rss_kb += kb
        threads += int(fields.get("Threads", "0").split()[0])
        name = fields.get("Name", "?").strip()
        by_process[name] = round(by_process.get(name, 0.0) + kb / 1024, 1)
    return {"rss_mb": rss_kb / 1024, "fds": fds, "threads": threads, "processes": len(pids), "by_process": by_process}


def slope_per_hour(times_s: list[float], values: list[float]) -> float | None:
    """Least-squares slope of values over time, per hour (None with fewer than 3 samples)."""
    if len(times_s) < 3:
        return None
    return float(np.polyfit(np.asarray(times_s) / 3600.0, np.asarray(values, np.float64), 1)[0])


# ---- one phase -----------------------------------------------------------------------------------
class Streams:
    """`n` closed-loop streams, one Detector and thread each, and the latencies they record."""

    def __init__(self, detectors: list[Any], frames: list[np.ndarray], per_stream: int | None) -> None:
        self.detectors, self.frames, self.per_stream = detectors, frames, per_stream
        self.lock = threading.Lock()
        self.latencies: list[float] = []  # of frames answered since the last take()
        self.done = [0] * len(detectors)
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(len(detectors))]

    def _run(self, k: int) -> None:
        det, i = self.detectors[k], 0
        while not self.stop.is_set() and (self.per_stream is None or self.done[k] < self.per_stream):
            frame = self.frames[(k * 7 + i) % len(self.frames)]
            i += 1
            t0 = time.perf_counter()
            try:
                det.infer(frame)
            except Exception as err:  # counted; the stream goes on
                with self.lock:
                    self.errors.append(f"stream {k}: {type(err).__name__}: {str(err)[:200]}")
                time.sleep(0.05)
                continue
            ms = (time.perf_counter() - t0) * 1e3
            with self.lock:
                self.latencies.append(ms)
                self.done[k] += 1

    def take(self) -> list[float]:
        with self.lock:
            taken, self.latencies = self.latencies, []
        return taken

    def running(self) -> bool:
        return any(t.is_alive() for t in self.threads)


def run_phase(
    name: str,
    detectors: list[Any],
    frames: list[np.ndarray],
    args: argparse.Namespace,
    watched: dict[str, Any],
) -> dict[str, Any]:
    """Stream until the length is reached, sampling every --sample-s: {samples, slopes, totals}.

    watched: {label: callable() -> list of pids} of the processes whose usage is sampled."""
    streams = Streams(detectors, frames, args.frames)
    start = time.monotonic()
    deadline = None if args.minutes is None else start + args.minutes * 60
    samples: list[dict[str, Any]] = []
    for t in streams.threads:
        t.start()
    next_sample = start + args.sample_s
    while True:
        now = time.monotonic()
        finished = not streams.running() or (deadline is not None and now >= deadline)
        if now >= next_sample or finished:
            latencies = streams.take()
            window = now - (next_sample - args.sample_s)
            # the last window may be short and see streams ending: in the table, not in the slopes
            full = not finished or window >= args.sample_s
            row: dict[str, Any] = {"t_s": round(now - start, 2), "frames": len(latencies), "full": full}
            if latencies:
                row["p50_ms"] = float(np.percentile(latencies, 50))
                row["p99_ms"] = float(np.percentile(latencies, 99))
            for label, pids in watched.items():
                row[label] = usage(pids())
            samples.append(row)
            p99 = row.get("p99_ms", float("nan"))
            held = "  ".join(f"{label} {row[label]['rss_mb']:.0f} MB" for label in watched)
            print(f"[{name}] {row['t_s']:7.1f} s  {row['frames']:5d} frames  p99 {p99:7.2f} ms  {held}", flush=True)
            next_sample += args.sample_s
        if finished:
            break
        time.sleep(min(0.2, max(0.0, next_sample - time.monotonic())))
    streams.stop.set()
    for t in streams.threads:
        t.join(60)
    wall = time.monotonic() - start
    return {
        "phase": name,
        "n_images": len(frames),
        "streams": len(detectors),
        "seconds": round(wall, 1),
        "frames": sum(streams.done),
        "fps": sum(streams.done) / wall if wall > 0 else 0.0,
        "errors": len(streams.errors),
        "first_errors": streams.errors[:5],
        "samples": samples,
        "slopes": slopes(samples, list(watched)),
    }


def slopes(samples: list[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    """Per hour, over the samples after the warm-up: p99 (ms/h) and, per watched label, RSS (MB/h), fds, threads."""
    kept = [s for s in samples[int(len(samples) * WARMUP_FRACTION) :] if s["frames"] and s["full"]]
    times = [s["t_s"] for s in kept]
    out: dict[str, Any] = {
        "samples_used": len(kept),
        "p99_ms_per_h": slope_per_hour(times, [s["p99_ms"] for s in kept]),
    }
    for label in labels:
        for key in ("rss_mb", "fds", "threads"):
            out[f"{label}_{key}_per_h"] = slope_per_hour(times, [s[label][key] for s in kept])
    return out


# ---- the report ----------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"


def to_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Soak benchmark ({report['machine']})",
        "",
        f"`{report['command']}`",
        "",
        f"Bundle `{report['bundle']}` ({', '.join(report['classes'])}; input "
        f"{report['input_size'][0]}x{report['input_size'][1]}), {report['n_images']} real frames cycled, "
        f"{report['streams']} streams per phase, a sample every {report['sample_s']:g} s; load average at start "
        f"{report['load_at_start']}. Slopes: least squares per hour over the samples after the first "
        f"{int(WARMUP_FRACTION * 100)} %.",
        "",
        "| phase | processes | frames | frames/s | errors | RSS first -> last (MB) | RSS slope (MB/h) "
        "| fds first -> last | threads first -> last | p99 first -> last (ms) | p99 slope (ms/h) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for phase in report["phases"]:
        samples, s = phase["samples"], phase["slopes"]
        full = [x for x in samples if x["full"]] or samples  # the last, shorter sample sees streams ending
        first, last = full[0], full[-1]
        with_p99 = [x for x in full if x["frames"]]
        p99 = f"{with_p99[0]['p99_ms']:.1f} -> {with_p99[-1]['p99_ms']:.1f}" if with_p99 else "n/a"
        for label in phase["watched"]:
            lines.append(
                f"| {phase['phase']} | {label} ({last[label]['processes']}) | {phase['frames']} | {phase['fps']:.1f} | "
                f"{phase['errors']} | {first[label]['rss_mb']:.0f} -> {last[label]['rss_mb']:.0f} | "
                f"{_fmt(s[f'{label}_rss_mb_per_h'])} | {first[label]['fds']} -> {last[label]['fds']} | "
                f"{first[label]['threads']} -> {last[label]['threads']} | {p99} | {_fmt(s['p99_ms_per_h'])} |"
            )
    for phase in report["phases"]:
        for label in phase["watched"]:
            parts = phase["samples"][-1][label]["by_process"]
            if len(parts) > 1:
                shown = ", ".join(f"{name} {mb:.0f} MB" for name, mb in sorted(parts.items(), key=lambda x: -x[1]))
                lines += ["", f"{phase['phase']}, {label} at the end: {shown}."]
        if "server_inferences" in phase:
            same = "equals" if phase["server_inferences"] == phase["frames"] else "DIFFERS FROM"
            lines += [
                "",
                f"Server: {phase['server_inferences']} inferences counted by Triton {same} the "
                f"{phase['frames']} frames answered; {phase['server_executions']} executions (mean batch "
                f"{phase['server_inferences'] / max(phase['server_executions'], 1):.2f}).",
            ]
        if phase["errors"]:
            lines += ["", f"{phase['phase']} errors: " + "; ".join(phase["first_errors"])]
    lines += ["", "## Samples", ""]
    for phase in report["phases"]:
        labels = phase["watched"]
        lines += [
            f"### {phase['phase']}",
            "",
            "| t (s) | frames | p50 ms | p99 ms | "
            + " | ".join(f"{x} RSS MB | {x} fds | {x} threads" for x in labels)
            + " |",
            "|---" * (4 + 3 * len(labels)) + "|",
        ]
        for x in phase["samples"]:
            usage_cells = " | ".join(
                f"{x[label]['rss_mb']:.1f} | {x[label]['fds']} | {x[label]['threads']}" for label in labels
            )
            p50, p99 = (f"{x['p50_ms']:.1f}", f"{x['p99_ms']:.1f}") if x["frames"] else ("-", "-")
            lines.append(f"| {x['t_s']:.0f} | {x['frames']} | {p50} | {p99} | {usage_cells} |")
        lines.append("")
    if report["busy"]:
        lines += [
            f"Warning: the machine was busy (load average {report['load_at_start']} on {os.cpu_count()} cores): "
            "latencies are pessimistic and noisy.",
            "",
        ]
    return "\n".join(lines)


def run_apart(args: argparse.Namespace, argv: list[str]) -> list[dict[str, Any]]:
    """Each phase in a fresh process of its own (`--phases NAME`), so that one phase's memory is not
    the next one's baseline; their reports, in order."""
    import json
    import subprocess

    phases = []
    with tempfile.TemporaryDirectory(prefix="soak_phases_") as tmp:
        for name in args.phases:
            rest, skip = [], False
            for arg in argv:  # the same command without --phases / --out
                if skip:
                    skip = False
                elif arg in ("--phases", "--out"):
                    skip = True
                elif not arg.startswith(("--phases=", "--out=")):
                    rest.append(arg)
            out = Path(tmp) / name
            subprocess.run([sys.executable, __file__, *rest, "--phases", name, "--out", str(out)], check=True)
            phases += json.loads((out / "report.json").read_text())["phases"]
    return phases


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    _bootstrap_package()
    from hgad_edge.core.bundle import load_bundle
    from hgad_edge.runtime import Detector
    from hgad_edge.runtime.triton.server import ServeProcess

    bundle = load_bundle(args.bundle)
    load = os.getloadavg()[0]
    command = sys.argv[1:] if argv is None else argv
    if len(args.phases) > 1:
        return _write(args, bundle, load, command, run_apart(args, command))
    frames = load_frames(args.images, args.max_images)
    me = os.getpid()
    phases = []
    if "local" in args.phases:
        detectors = [Detector(args.bundle, backend="onnxruntime", max_batch=1) for _ in range(args.streams)]
        try:
            phase = run_phase("local", detectors, frames, args, {"this process": lambda: [me]})
        finally:
            for det in detectors:
                det.close()
        phase["watched"] = ["this process"]
        phases.append(phase)
    if "server" in args.phases:
        with tempfile.TemporaryDirectory(prefix="soak_") as logs:
            server = ServeProcess(args.bundle, logs, max_batch=args.max_batch)
            try:
                server.start()
                assert server.proc is not None
                url = server.url + "/hgad"
                detectors = [Detector(url, backend="triton", max_batch=1) for _ in range(args.streams)]
                before = server_stats(url)
                watched = {"server": lambda: process_tree(server.proc.pid), "clients": lambda: [me]}
                try:
                    phase = run_phase("server", detectors, frames, args, watched)
                finally:
                    for det in detectors:
                        det.close()
                after = server_stats(url)
                phase["server_inferences"] = after[0] - before[0]
                phase["server_executions"] = after[1] - before[1]
                phase["watched"] = list(watched)
                phases.append(phase)
            finally:
                server.stop()
    return _write(args, bundle, load, command, phases)


def _write(args: argparse.Namespace, bundle: Any, load: float, command: list[str], phases: list[dict]) -> Path:
    from hgad_edge.core.files import atomic_write_json, atomic_write_text

    report = {
        "machine": machine_name(),
        "command": "python benchmarks/soak.py " + " ".join(command),
        "bundle": str(args.bundle),
        "classes": list(bundle.classes),
        "input_size": list(bundle.input_size),
        "n_images": phases[0]["n_images"],
        "streams": args.streams,
        "sample_s": args.sample_s,
        "load_at_start": round(load, 2),
        "busy": load > 0.5 * (os.cpu_count() or 1),
        "phases": phases,
    }
    atomic_write_json(args.out / "report.json", report)
    atomic_write_text(args.out / "report.md", to_markdown(report))
    print(f"report: {args.out / 'report.md'}")
    return args.out


if __name__ == "__main__":
    main()
