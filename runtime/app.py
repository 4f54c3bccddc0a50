"""The camera app behind `hgad-edge run`: score a live source, show/record PASS/FAIL, summarise.

Capture runs on the source's thread while this thread infers, so grabbing overlaps scoring; with
a slow model, live sources drop their oldest frames (counted) instead of lagging behind.
Ctrl-C (SIGINT) or SIGTERM ends the loop cleanly and the summary is still printed and returned.
Outputs never lose what was there: `--output` (hgad_edge.runtime.outputs: where results are written,
and how a device, FIFO or symlink is written through) is opened only once bundle, source and class are
checked; a failed write ends the run with its summary; saved anomalies carry the run id in their
names. `run_problems` says which summaries must end in a non-zero exit (nothing scored, every frame
corrupt, evidence not saved).
Scoring on an inference server (BUNDLE = grpc://...) survives the server going away: a live frame
that cannot be scored is lost and counted, a file or folder frame waits for the server
(--reconnect-attempts with backoff), and the summary says how many frames were lost.
A tiled bundle (metadata `tiling`) scores each frame as a batch of tiles of up to options.max_batch
(`hgad-edge run --max-batch`); its stitched map has the frame's resolution, so the overlay and the
saved anomalies are drawn at full resolution through the same `heatmap_overlay` path that scales a
model-sized map onto the frame for untiled bundles.
The click command only maps flags onto `run_app`; everything testable lives here.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from hgad_edge.core.bundle_schema import METADATA_FILE
from hgad_edge.core.errors import BackendUnavailableError, Status
from hgad_edge.core.files import atomic_path
from hgad_edge.core.overlay import heatmap_overlay, shrink
from hgad_edge.runtime.detector import Detector
from hgad_edge.runtime.options import RuntimeOptions
from hgad_edge.runtime.outputs import OutputError, ResultSink, check_output, open_output, writable_folder
from hgad_edge.runtime.sinks.publisher import Publisher, delivery_summary
from hgad_edge.runtime.sources import Frame, FrameSource, SourceError, check_supported, parse_source
from hgad_edge.runtime.triton.client import is_server_url, require_client

__all__ = ["AppError", "format_summary", "run_app", "run_problems"]

log = logging.getLogger("hgad_edge.runtime")

DISPLAY_MAX_SIDE = 1280  # overlays for the window are drawn at most this large (full size when saved)


class AppError(RuntimeError):
    """A problem with how the app was started (no GUI, unwritable output); the message says the fix."""


class ServerLostError(AppError):
    """The inference server stayed away longer than --reconnect-attempts allow for a file frame."""


# ---- setup ---------------------------------------------------------------------------------------
def check_gui(window_name: str) -> None:
    """Fail before loading the model if no window can be shown, naming --headless as the fix."""
    if re.search(r"GUI:\s*NONE", cv2.getBuildInformation()):
        msg = (
            "this OpenCV build has no GUI support (opencv-python-headless), so no window can be shown: "
            "pass --headless, or replace it: pip uninstall opencv-python-headless && pip install opencv-python"
        )
        raise AppError(msg)
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise AppError(
            "no display (DISPLAY is not set): pass --headless, or run on the device's desktop or over ssh -X"
        )
    try:
        cv2.namedWindow(window_name, cv2.WINDOW_NORMAL)
    except cv2.error as err:
        raise AppError(f"cannot open a window ({err}); pass --headless") from err


def _check_outputs(output: str | Path | None, overwrite: bool, anomalies: str | Path | None) -> None:
    """Refuse unusable output paths before the model loads; nothing is created or opened here."""
    if output is not None:
        check_output(output, overwrite)
    if anomalies is not None:
        path = Path(anomalies)
        if path.exists() and not path.is_dir():
            raise AppError(f"--save-anomalies {path} is a file; pass a folder")
        if not writable_folder(path):
            raise AppError(f"cannot write anomalous frames to {path} (not writable); pick a writable folder")


def _prepare_dir(path: str | Path | None) -> Path | None:
    if path is None:
        return None
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AppError(
            f"cannot create {path} for anomalous frames: {err.strerror or err}; pick a writable folder"
        ) from err
    return path


_RUNS = itertools.count(1)


def run_id() -> str:
    """Names this run's saved files: local time to the second, process id and run number in the process."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{next(_RUNS)}"


class _SigtermAsInterrupt:
    """Ctrl-C and SIGTERM (systemd stop, docker stop) both end the run with its summary.

    SIGINT gets an explicit handler too: a process started in the background by a non-interactive
    shell inherits SIGINT as *ignored*, and Python then never raises KeyboardInterrupt.
    Inside `deferred()` (one frame's outputs) the first signal waits for the block's end, so a frame's
    JSON line, sink message and evidence go out together or not at all; a second one does not wait.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> _SigtermAsInterrupt:
        self.previous: dict[int, Any] = {}
        self.deferring = self.pending = False
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self._raise)
        return self

    def _raise(self, signum: int, frame: Any) -> None:
        if self.deferring and not self.pending:
            self.pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.pending:
            raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def frame_batch(bundle: str | Path, options: RuntimeOptions) -> int:
    """max_batch for scoring one frame per call: 1 row, or for a tiled bundle up to options.max_batch tiles.

    A server's tiling is known only once connected, so a server URL gets options.max_batch (client-side
    buffers only). metadata.json is only peeked at here; loading the bundle verifies it.
    """
    if is_server_url(bundle):
        return options.max_batch
    path = Path(bundle)
    try:
        meta = json.loads((path if path.is_file() else path / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return 1  # load_bundle says what is wrong
    return options.max_batch if isinstance(meta, dict) and meta.get("tiling") else 1


def open_detector(bundle: str | Path, options: RuntimeOptions, attempts: int, backoff_s: float) -> Detector:
    """The Detector. A server that is not up yet, or up without its model (still loading), is waited for
    like a server lost mid-run, whatever the source: `attempts` more tries with doubling backoff (the
    source is opened only once the model answers, so no frame is lost meanwhile)."""
    if is_server_url(bundle):
        require_client()
    for failures in itertools.count():
        try:
            return Detector.from_options(bundle, options)
        except BackendUnavailableError as err:
            if not is_server_url(bundle) or err.status != Status.BACKEND_UNAVAILABLE or failures >= attempts:
                raise
            delay = backoff_s * 2**failures
            log.warning("%s; trying again in %.1f s (%d/%d)", err, delay, failures + 1, attempts)
            time.sleep(delay)


# ---- per frame -----------------------------------------------------------------------------------
def _record(frame: Frame, result: Any) -> dict[str, Any]:
    class_id = int(result.class_pred[0])
    return {
        "frame": frame.index,
        "source": frame.source,
        "timestamp": round(frame.timestamp, 6),
        "class": result.class_names[0],
        "class_id": class_id,
        "score": float(result.score[0]),
        "score_normalized": float(result.score_normalized[0]),
        "anomalous": bool(result.anomalous[0]),
        "latency_ms": round(float(result.latency_ms["total"]), 3),
    }


def _overlay(
    image: np.ndarray, amap: np.ndarray, record: dict[str, Any], vrange: tuple[float, float], fps: float | None
) -> np.ndarray:
    verdict = "FAIL" if record["anomalous"] else "PASS"
    label = f"{verdict} {record['score_normalized']:.2f} {record['class']}"
    if fps is not None:
        label += f" | {fps:.1f} fps"
    return heatmap_overlay(image, amap, vrange[0], vrange[1], alpha=0.5, label=label)


def _shrink(image: np.ndarray) -> np.ndarray:
    """An image (or map) no larger than the window's DISPLAY_MAX_SIDE (core.overlay.shrink)."""
    return shrink(image, DISPLAY_MAX_SIDE)


def _save_anomaly(
    folder: Path, run: str, frame: Frame, amap: np.ndarray, record: dict[str, Any], vrange: tuple[float, float]
) -> Path | None:
    """Overlay + raw frame as <run id>_<frame>[_<file stem>]_{overlay,raw}.png; the overlay's path (the
    decision's evidence), None if a write failed."""
    stem = f"{run}_{frame.index:06d}"
    if Path(frame.source).suffix:
        stem += f"_{Path(frame.source).stem}"
    overlay = _overlay(frame.image, amap, record, vrange, None)
    saved = True
    for suffix, image in (("overlay", overlay), ("raw", frame.image)):
        path = folder / f"{stem}_{suffix}.png"
        try:
            ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            if not ok:
                raise OSError("PNG encoding failed")
            with atomic_path(path) as tmp:
                tmp.write_bytes(data.tobytes())
        except (OSError, cv2.error) as err:
            reason = getattr(err, "strerror", None) or err
            log.warning("could not write %s (%s): disk full or not writable?", path, reason)
            saved = False
    return folder / f"{stem}_overlay.png" if saved else None


class _Window:
    """cv2 window showing overlays; `show` returns False when the user pressed q / Esc or closed it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def show(self, overlay_rgb: np.ndarray) -> bool:
        cv2.imshow(self.name, cv2.cvtColor(_shrink(overlay_rgb), cv2.COLOR_RGB2BGR))
        key = cv2.waitKey(1) & 0xFF
        if key in (27, ord("q")):
            return False
        return cv2.getWindowProperty(self.name, cv2.WND_PROP_VISIBLE) >= 1

    def close(self) -> None:
        try:
            cv2.destroyWindow(self.name)
        except cv2.error:
            pass


# ---- summary -------------------------------------------------------------------------------------
def format_summary(summary: dict[str, Any]) -> str:
    """One human line for the end of a run."""
    return (
        f"hgad-edge run: {summary['frames']} frames, {summary['anomalies']} anomalous, {summary['fps']:.1f} fps, "
        f"{summary['dropped_frames']} dropped, {summary['skipped_corrupt']} corrupt skipped, "
        f"{summary['reconnects']} reconnects, backend {summary['backend']}"
        + (f", {summary['save_failures']} anomalies NOT saved" if summary["save_failures"] else "")
        + (
            f", server away {summary['server_outages']}x: {summary['lost_to_server']} frames lost, "
            f"{summary['server_reconnects']} reconnects"
            if summary["server_outages"]
            else ""
        )
        + delivery_summary(summary)
        + (" (interrupted)" if summary["interrupted"] else "")
    )


def run_problems(summary: dict[str, Any]) -> list[str]:
    """Why a finished run must exit non-zero (empty when it did its job); each names the fix."""
    problems = []
    if summary["frames"] == 0 and not summary["interrupted"]:
        corrupt = summary["skipped_corrupt"]
        detail = "the source delivered no frame"
        if corrupt:
            detail = f"all {corrupt} frames/files were corrupt or unusable (see the warnings above)"
        if summary.get("lost_to_server"):
            detail = f"all {summary['lost_to_server']} frames were lost: the inference server was unreachable"
        problems.append(f"no frame was scored: {detail}; check the source {summary['source']}")
    if summary["save_failures"]:
        problems.append(
            f"{summary['save_failures']} anomalous frames could not be saved to {summary['anomaly_dir']} "
            "(disk full or not writable?); free space or pick another --save-anomalies folder"
        )
    return problems


class _Counters:
    def __init__(self) -> None:
        self.frames = 0
        self.anomalies = 0
        self.save_failures = 0
        self.latency_ms = 0.0
        self.fps: float | None = None
        self.started = time.perf_counter()
        self.last = self.started
        self.lost_to_server = 0  # live frames not scored because the inference server was away
        self.server_outages = 0
        self.server_reconnects = 0
        self.server_down = False

    def server_failed(self, err: Exception) -> None:
        if not self.server_down:
            self.server_down, self.server_outages = True, self.server_outages + 1
            log.warning("%s", err)

    def server_answered(self) -> None:
        if self.server_down:
            self.server_down, self.server_reconnects = False, self.server_reconnects + 1

    def tick(self, record: dict[str, Any]) -> None:
        now = time.perf_counter()
        instant = 1.0 / max(now - self.last, 1e-6)
        self.fps = instant if self.fps is None else 0.9 * self.fps + 0.1 * instant
        self.last = now
        self.frames += 1
        self.anomalies += int(record["anomalous"])
        self.latency_ms += record["latency_ms"]


def _summary(
    counters: _Counters, source: FrameSource, backend: str, interrupted: bool, anomaly_dir: Path | None
) -> dict[str, Any]:
    elapsed = time.perf_counter() - counters.started
    stats = source.stats
    return {
        "frames": counters.frames,
        "anomalies": counters.anomalies,
        "fps": counters.frames / elapsed if elapsed > 0 else 0.0,
        "elapsed_s": round(elapsed, 3),
        "mean_latency_ms": counters.latency_ms / counters.frames if counters.frames else 0.0,
        "dropped_frames": stats.dropped,
        "skipped_corrupt": stats.skipped_corrupt,
        "reconnects": stats.reconnects,
        "save_failures": counters.save_failures,
        "lost_to_server": counters.lost_to_server,
        "server_outages": counters.server_outages,
        "server_reconnects": counters.server_reconnects,
        "anomaly_dir": None if anomaly_dir is None else str(anomaly_dir),
        "interrupted": interrupted,
        "backend": backend,
        "source": source.spec.name,
    }


# ---- entry point ---------------------------------------------------------------------------------
def run_app(
    bundle: str | Path,
    source: Any,
    class_name: str = "auto",
    headless: bool = False,
    output_jsonl: str | Path | None = None,
    save_anomalies: str | Path | None = None,
    max_frames: int | None = None,
    reconnect_attempts: int = 5,
    *,
    options: RuntimeOptions | None = None,
    overwrite: bool = False,
    backoff_s: float = 0.5,
    queue_size: int = 4,
    window_name: str = "hgad-edge",
    capture_factory: Callable[..., Any] | None = None,
    print_summary: bool = True,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    sinks: tuple[str, ...] | list[str] = (),
    history: str | Path | None = None,
    spool: str | Path | None = None,
    web: Any = None,
) -> dict[str, Any]:
    """Score `source` until it ends, `max_frames`, q/Esc in the window, or Ctrl-C; return the summary.

    `on_record` gets each frame's JSON-line record as it is scored (a progress bar, a tally).
    `sinks` (URLs: mqtt://, opc.tcp://, http(s)://, jsonl:) and `history` (a SQLite file or a
    postgresql:// URL) get each decision from their own threads (hgad_edge.runtime.sinks; disk queues
    in `spool`); SinkError when one is unusable; the summary's "sinks"/"history" hold their counts.
    `web`: a started LivePage (hgad_edge.runtime.web, `--web`) that shows the run; it outlives the run.

    Raises HgadRuntimeError (bundle/backend problems), SourceError (source cannot be opened or was
    lost for good), AppError (no GUI, unwritable anomaly folder) or OutputError (an --output that
    cannot be opened, or a result that could not be written: the run ends there, after its summary);
    each message names the fix. A summary can still describe a failed run: see `run_problems`.
    options: backend, precision, device, trusted engines and {class name: score threshold} overrides
    (for this run only) as one RuntimeOptions (default: all "auto"); frames are scored one at a time,
    so its max_batch is 1 here, except for a tiled bundle: the most tiles per engine call (`frame_batch`).
    """
    spec = parse_source(source)  # a typo in the source fails before the model loads
    check_supported(spec)
    if not headless:
        check_gui(window_name)
    _check_outputs(output_jsonl, overwrite, save_anomalies)
    line = Publisher(sinks, history, spool) if sinks or history is not None else None  # checked before the model
    options = options or RuntimeOptions()
    options = replace(options, max_batch=frame_batch(bundle, options))
    with open_detector(bundle, options, reconnect_attempts, backoff_s) as detector:
        class_id = detector.class_id(class_name)
        frames = FrameSource(spec, queue_size, reconnect_attempts, backoff_s, capture_factory=capture_factory)
        anomaly_dir = _prepare_dir(save_anomalies)
        window = None if headless else _Window(window_name)
        jsonl = None if output_jsonl is None else open_output(output_jsonl, overwrite)  # opened last: nothing truncated
        try:
            retry = (0 if frames.spec.live else reconnect_attempts, backoff_s)
            return _run_loop(
                detector,
                frames,
                class_id,
                jsonl,
                anomaly_dir,
                window,
                max_frames,
                print_summary,
                on_record,
                retry,
                line,
                web,
            )
        finally:
            if line is not None:
                line.close()  # flushed and counted by _run_loop already, unless it failed before
            if jsonl is not None:
                jsonl.close()


def _run_loop(
    detector: Detector,
    frames: FrameSource,
    class_id: int,
    jsonl: ResultSink | None,
    anomaly_dir: Path | None,
    window: _Window | None,
    max_frames: int | None,
    print_summary: bool,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    retry: tuple[int, float] = (0, 0.5),
    line: Publisher | None = None,
    page: Any = None,
) -> dict[str, Any]:
    counters, interrupted, error = _Counters(), False, None
    vrange = tuple(detector.info["display_range"])
    run = run_id()
    saver = None if anomaly_dir is None else (anomaly_dir, run)
    if line is not None:
        line.open_for(detector, run, frames.spec.name)
    if page is not None:

        def live() -> dict[str, Any]:  # the counts so far, read on the page's thread when polled or scraped
            depths = line.queue_depths() if line is not None else {}
            return {**_summary(counters, frames, detector.backend, False, anomaly_dir), "queue_depths": depths}

        page.open_for(detector, run, frames.spec.name, live)
    try:
        with _SigtermAsInterrupt() as signals, frames:
            for frame in frames:
                result = _score(detector, frame, class_id, counters, *retry)
                if result is None:
                    continue
                with signals.deferred():
                    keep_going = _process(result, frame, jsonl, saver, window, counters, vrange, on_record, line, page)
                if not keep_going:
                    break
                if max_frames is not None and counters.frames >= max_frames:
                    break
    except KeyboardInterrupt:
        interrupted = True
    except (SourceError, ServerLostError, OutputError) as err:
        error = err
    finally:
        if window is not None:
            window.close()
        if page is not None:
            page.finish()
    if jsonl is not None:
        try:
            jsonl.flush()
        except OutputError as err:
            error = error or err
    summary = _summary(counters, frames, detector.backend, interrupted, anomaly_dir)
    if line is not None:
        summary.update(line.close())  # flushed, or persisted for the next run: {"sinks": ..., "history": ...}
    if error is not None and counters.frames == 0:
        raise error
    if print_summary:
        to_stdout = jsonl is not None and jsonl.to_stdout
        print(format_summary(summary), file=sys.stderr if to_stdout else sys.stdout, flush=True)
    if error is not None:
        raise error
    return summary


def _score(
    detector: Detector, frame: Frame, class_id: int, counters: _Counters, attempts: int, backoff_s: float
) -> Any:
    """The frame's Result; None when it is lost because the inference server is away (live sources).

    Local backends never raise BackendUnavailableError once created; the triton backend does while
    its server is unreachable. Frames of files and folders are not perishable: they wait.
    """
    for failures in itertools.count():
        try:
            result = detector.infer(frame.image, class_id)
        except BackendUnavailableError as err:
            counters.server_failed(err)
            if attempts == 0:
                counters.lost_to_server += 1
                return None
            if failures >= attempts:
                msg = f"{err}; gave up on frame {frame.index} after {attempts} retries (raise --reconnect-attempts)"
                raise ServerLostError(msg) from err
            time.sleep(backoff_s * 2**failures)
            continue
        counters.server_answered()
        return result


def _process(
    result: Any,
    frame: Frame,
    jsonl: ResultSink | None,
    saver: tuple[Path, str] | None,
    window: _Window | None,
    counters: _Counters,
    vrange: tuple[float, float],
    on_record: Callable[[dict[str, Any]], None] | None = None,
    line: Publisher | None = None,
    page: Any = None,
) -> bool:
    """Emit one scored frame's outputs; False when the user asked to quit."""
    record = _record(frame, result)
    counters.tick(record)
    if jsonl is not None:
        jsonl.write(record)
    if on_record is not None:
        on_record(record)
    amap = result.anomaly_map[0]
    evidence = None
    if saver is not None and record["anomalous"]:
        evidence = _save_anomaly(saver[0], saver[1], frame, amap, record, vrange)
        counters.save_failures += evidence is None
    if line is not None:
        line.publish(record, evidence)  # a hand-over to the sinks' threads: never waits for a receiver
    if page is not None:
        page.publish(frame.image, amap, record)  # the page's latest-frame slot: drawn on its thread, or dropped
    if window is not None:
        # a stitched (frame-sized) map shrinks with the frame, by area: linear sampling could skip a small hot spot
        return window.show(_overlay(_shrink(frame.image), _shrink(amap), record, vrange, counters.fps))
    return True
