"""Frame sources named as in jetson-inference, read on a capture thread.

    0 / "0" / "--camera 0"     USB/V4L2 camera index          v4l2:///dev/video0   V4L2 device
    csi://0                    MIPI CSI camera (GStreamer nvarguscamerasrc, Jetson)
    rtsp://... http://...      network stream (FFmpeg)        file.mp4             video file
    images/                    image folder (sub-folders too, sorted)   "images/*.png"   glob pattern

Capture runs on its own thread so that grabbing the next frame overlaps inference. Live sources
(cameras, streams) keep a small queue and drop the OLDEST frame when inference is slower, so the
app always scores a recent frame; files and folders never drop (they block instead). Cameras and
streams reconnect with exponential backoff, a bounded number of times. Broken frames, corrupt or
oversized image files (over the imaging pixel cap) and the incomplete last frame of a truncated
video are skipped and counted, never fatal. Frames are delivered as RGB uint8. Credentials in
stream URLs never leave this module: names, URIs and messages carry the redacted form.
"""

from __future__ import annotations

import glob
import logging
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from hgad_edge.core.imaging import IMAGE_EXTENSIONS, find_images, load_image
from hgad_edge.core.redact import redact_text, redact_url

__all__ = [
    "Frame",
    "FrameSource",
    "SourceError",
    "SourceSpec",
    "SourceStats",
    "check_supported",
    "open_source",
    "parse_source",
]

log = logging.getLogger("hgad_edge.runtime")

STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "rtp://")
SOURCE_FORMS = (
    "a camera index (0), csi://0, v4l2:///dev/video0, rtsp://host/path, a video file, an image folder or a glob pattern"
)
MAX_BAD_FRAMES = 50  # consecutive unusable frames before a live source counts as dropped

_HINTS = {
    "camera": (
        "check the cable, that no other program holds the camera, "
        "and permissions (sudo usermod -aG video $USER, then log in again)"
    ),
    "csi": (
        "check the ribbon cable and sensor-id, and restart the camera daemon (sudo systemctl restart nvargus-daemon)"
    ),
    "stream": "check the URL, credentials and network (open it with ffplay or VLC to compare)",
    "video": "check that the file is a complete video OpenCV's FFmpeg can decode",
}


class SourceError(RuntimeError):
    """A source cannot be opened or was lost for good; the message names it and the fix."""


@dataclass(frozen=True)
class SourceSpec:
    """What to open: `kind` in camera/csi/stream/video/images, plus the cv2 target or file list."""

    kind: str
    name: str  # what the user passed, for messages
    uri: str  # normalised form, e.g. v4l2:///dev/video0
    target: int | str | None = None
    api: int = cv2.CAP_ANY
    paths: tuple[Path, ...] = ()
    root: Path | None = None  # image folder: frames are named by their path relative to it

    @property
    def live(self) -> bool:
        return self.kind in ("camera", "csi", "stream")

    @property
    def label(self) -> str:
        return f"camera {self.target}" if self.kind == "camera" and isinstance(self.target, int) else self.name


@dataclass
class SourceStats:
    """Counters of a source; read them after (or during) iteration."""

    frames: int = 0  # frames delivered to the queue
    dropped: int = 0  # live frames discarded because inference was slower
    skipped_corrupt: int = 0  # empty / broken frames and unreadable image files
    reconnects: int = 0  # successful reopenings after a drop
    errors: list[str] = field(default_factory=list)


@dataclass
class Frame:
    """One captured frame: RGB uint8 image, capture sequence index, where it came from, when."""

    index: int
    image: np.ndarray
    source: str
    timestamp: float


# ---- parsing ------------------------------------------------------------------------------------
def _camera_spec(index: int, name: str) -> SourceSpec:
    api = cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY
    return SourceSpec("camera", name, f"v4l2:///dev/video{index}", index, api)


def _v4l2_spec(device: str, name: str) -> SourceSpec:
    """/dev/videoN (or a by-id link to it) -> index N, which every OpenCV V4L2 build accepts."""
    if device.isdigit():
        return _camera_spec(int(device), name)
    match = re.fullmatch(r"/dev/video(\d+)", os.path.realpath(device))
    if match:
        return _camera_spec(int(match.group(1)), name)
    return SourceSpec("camera", name, f"v4l2://{device}", device, cv2.CAP_ANY)


def csi_pipeline(sensor_id: int, width: int = 1280, height: int = 720, fps: int = 30) -> str:
    """GStreamer pipeline for a Jetson CSI camera that ends in BGR frames for OpenCV."""
    return (
        f"nvarguscamerasrc sensor-id={sensor_id} ! "
        f"video/x-raw(memory:NVMM), width={width}, height={height}, framerate={fps}/1, format=NV12 ! "
        "nvvidconv ! video/x-raw, format=BGRx ! videoconvert ! video/x-raw, format=BGR ! "
        "appsink drop=true max-buffers=1 sync=false"
    )


def _files_spec(paths: list[Path], name: str, what: str, root: Path | None = None) -> SourceSpec:
    images = sorted(
        p for p in paths if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")
    )
    if not images:
        where = " or its sub-folders" if root is not None else ""
        raise SourceError(f"{what} {name}{where} holds no images ({', '.join(IMAGE_EXTENSIONS)}); pass {SOURCE_FORMS}")
    return SourceSpec("images", name, name, None, cv2.CAP_ANY, tuple(images), root)


def parse_source(source: int | str | Path) -> SourceSpec:
    """Turn a jetson-inference style source name into a SourceSpec (raises SourceError if unknown)."""
    if isinstance(source, (int, np.integer)) and not isinstance(source, bool):
        return _camera_spec(int(source), str(source))
    name = str(source).strip()
    text = re.sub(r"^--camera[= ]\s*", "", name)
    if text.isdigit():
        return _camera_spec(int(text), name)
    if text.startswith("csi://"):
        sensor = text[len("csi://") :] or "0"
        if not sensor.isdigit():
            raise SourceError(f"bad CSI source {name!r}: use csi://<sensor-id>, e.g. csi://0")
        return SourceSpec("csi", name, text, csi_pipeline(int(sensor)), cv2.CAP_GSTREAMER)
    if text.startswith("v4l2://"):
        return _v4l2_spec(text[len("v4l2://") :], name)
    if text.startswith("/dev/video") or text.startswith("/dev/v4l/"):
        return _v4l2_spec(text, name)
    if text.lower().startswith(STREAM_SCHEMES):
        shown = redact_url(text)
        return SourceSpec("stream", shown, shown, text, cv2.CAP_FFMPEG)
    return _path_spec(text[len("file://") :] if text.startswith("file://") else text, redact_url(name))


def _path_spec(text: str, name: str) -> SourceSpec:
    path = Path(text).expanduser()
    if path.is_dir():
        return _files_spec(find_images(path), name, "folder", path)  # sub-folders too (an MVTec test/)
    if path.is_file():
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            return _files_spec([path], name, "file")
        return SourceSpec("video", name, str(path), str(path), cv2.CAP_ANY)
    if glob.has_magic(text):
        return _files_spec([Path(p) for p in glob.glob(os.path.expanduser(text))], name, "pattern")
    raise SourceError(f"source {name!r} not found; expected {SOURCE_FORMS}")


# ---- capture ------------------------------------------------------------------------------------
def _gstreamer_available() -> bool:
    info = cv2.getBuildInformation()
    return bool(re.search(r"GStreamer:\s*YES", info))


def check_supported(spec: SourceSpec) -> None:
    """Fail at once (not after the model loaded) when this OpenCV cannot read the source at all."""
    if spec.kind == "csi" and not _gstreamer_available():
        msg = (
            f"cannot open {spec.name}: this OpenCV has no GStreamer support (pip's opencv-python wheels have "
            "none); on Jetson use JetPack's OpenCV (sudo apt install python3-opencv) in a venv created with "
            "--system-site-packages"
        )
        raise SourceError(msg)


def to_rgb(image: Any) -> np.ndarray | None:
    """OpenCV frame (BGR, grey or BGRA) -> RGB uint8; None if it is empty or malformed."""
    if not isinstance(image, np.ndarray) or image.size == 0 or image.dtype != np.uint8:
        return None
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return None


class FrameSource:
    """Iterate `Frame`s from a SourceSpec; capture runs on a daemon thread (see module doc).

    reconnect_attempts: reopen tries after a failed open or a mid-stream drop (live only).
    backoff_s / backoff_max_s: first wait between tries and its cap (doubles each try).
    capture_factory: `cv2.VideoCapture`-like callable (target, api) -> capture, for tests.
    """

    def __init__(
        self,
        spec: SourceSpec,
        queue_size: int = 4,
        reconnect_attempts: int = 5,
        backoff_s: float = 0.5,
        backoff_max_s: float = 10.0,
        capture_factory: Callable[..., Any] | None = None,
        drop_oldest: bool | None = None,
    ) -> None:
        if queue_size < 1 or reconnect_attempts < 0 or backoff_s < 0:
            raise ValueError("queue_size must be >= 1, reconnect_attempts >= 0 and backoff_s >= 0")
        check_supported(spec)
        self.spec = spec
        self.stats = SourceStats()
        self.reconnect_attempts = int(reconnect_attempts)
        self.backoff_s = float(backoff_s)
        self.backoff_max_s = float(backoff_max_s)
        self.capture_factory = capture_factory or cv2.VideoCapture
        self.drop_oldest = spec.live if drop_oldest is None else drop_oldest
        self._queue: queue.Queue[Frame] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._index = 0

    # -- lifecycle --
    def start(self) -> FrameSource:
        if self._thread is None:
            target = self._read_images if self.spec.kind == "images" else self._read_capture
            self._thread = threading.Thread(
                target=self._guard, args=(target,), name=f"capture {self.spec.label}", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Ask the capture thread to end and wait briefly (a stalled stream read may outlive it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> FrameSource:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __iter__(self) -> Iterator[Frame]:
        self.start()
        while True:
            try:
                yield self._queue.get(timeout=0.05)
                continue
            except queue.Empty:
                pass
            if self._thread.is_alive() or not self._queue.empty():
                continue
            if self._error is not None:
                raise self._error
            return

    def _guard(self, target: Callable[[], None]) -> None:
        try:
            target()
        except SourceError as err:
            self._error = err
        except Exception as err:  # never let the thread die silently
            self._error = SourceError(f"capture from {self.spec.label} failed: {type(err).__name__}: {err}")

    # -- queue --
    def _put(self, image: np.ndarray, source: str) -> None:
        frame = Frame(self._index, image, source, time.time())
        self._index += 1
        while not self._stop.is_set():
            try:
                self._queue.put(frame, timeout=0.0 if self.drop_oldest else 0.05)
                self.stats.frames += 1
                return
            except queue.Full:
                if self.drop_oldest:
                    self._drop_one()

    def _drop_one(self) -> None:
        try:
            self._queue.get_nowait()
            self.stats.dropped += 1
        except queue.Empty:
            pass

    # -- image files --
    def _read_images(self) -> None:
        for path in self.spec.paths:
            if self._stop.is_set():
                return
            try:
                image = load_image(path)
            except Exception as err:  # DataError for broken or oversized files, OSError for vanished ones
                self._skip(f"skipping {path}: {err}")
                continue
            self._put(image, path.relative_to(self.spec.root).as_posix() if self.spec.root else str(path))

    def _skip(self, message: str) -> None:
        self.stats.skipped_corrupt += 1
        log.warning("%s", message)

    # -- cv2.VideoCapture sources --
    def _open_once(self) -> Any | None:
        kwargs = self._open_params()
        try:
            cap = self.capture_factory(self.spec.target, self.spec.api, *kwargs)
        except Exception as err:  # cv2.error on bad backends / pipelines
            log.warning("opening %s raised %s", self.spec.label, redact_text(str(err)))
            return None
        if cap is not None and cap.isOpened():
            if self.spec.live:
                cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # keep latency low; ignored where unsupported
            return cap
        if cap is not None:
            cap.release()
        return None

    def _open_params(self) -> tuple:
        """Open/read timeouts for network streams so that a dead camera cannot block forever."""
        if self.spec.kind != "stream" or not hasattr(cv2, "CAP_PROP_OPEN_TIMEOUT_MSEC"):
            return ()
        return ([cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 5000, cv2.CAP_PROP_READ_TIMEOUT_MSEC, 5000],)

    def _describe_failure(self, tries: int, lost: bool) -> str:
        what = self.spec.label + (f" ({self.spec.uri})" if self.spec.uri != self.spec.label else "")
        verb = f"lost {what} and could not reconnect" if lost else f"cannot open {what}"
        return f"{verb} after {tries} attempt{'s' if tries != 1 else ''}: {_HINTS[self.spec.kind]}"

    def _open_with_retry(self, lost: bool = False) -> Any | None:
        """Open the capture, retrying live sources with doubling waits; raise SourceError at the end."""
        attempts = self.reconnect_attempts if self.spec.live else 0
        delay = self.backoff_s
        for attempt in range(attempts + 1):
            if self._stop.is_set():
                return None
            cap = self._open_once()
            if cap is not None:
                return cap
            if attempt < attempts:
                log.warning(
                    "cannot open %s (try %d/%d); retrying in %.2fs", self.spec.label, attempt + 1, attempts + 1, delay
                )
                self._stop.wait(delay)
                delay = min(delay * 2, self.backoff_max_s)
        raise SourceError(self._describe_failure(attempts + 1, lost))

    def _read_capture(self) -> None:
        cap = self._open_with_retry()
        empty_in_row = 0  # reconnections that opened but delivered nothing: back off, then give up
        try:
            while cap is not None and not self._stop.is_set():
                ended, delivered = self._read_until_drop(cap)
                if ended:
                    return  # end of a video file, or stop()
                cap.release()
                cap = None
                empty_in_row = 0 if delivered else empty_in_row + 1
                self._check_not_dead(empty_in_row)
                log.warning("lost %s; reconnecting", self.spec.label)
                cap = self._open_with_retry(lost=True)
                if cap is not None:
                    self.stats.reconnects += 1
        finally:
            if cap is not None:
                cap.release()

    def _check_not_dead(self, empty_in_row: int) -> None:
        """A source that opens but never delivers a frame must not spin in a reconnect loop."""
        if empty_in_row > self.reconnect_attempts:
            msg = (
                f"{self.spec.label} ({self.spec.uri}) opens but delivers no frames ({empty_in_row} tries): "
                f"{_HINTS[self.spec.kind]}"
            )
            raise SourceError(msg)
        if empty_in_row:
            self._stop.wait(min(self.backoff_s * 2 ** (empty_in_row - 1), self.backoff_max_s))

    def _read_until_drop(self, cap: Any) -> tuple[bool, int]:
        """Read until the source ends or drops: (True, n) at the end of a file or on stop(),
        (False, n) when a live source drops; n = frames delivered.

        A video file's frame is delivered only once the next read succeeds, so that the last one
        can be checked by `_last_video_frame` (a truncated file ends in a half-decoded frame)."""
        bad = delivered = reads = 0
        pending: np.ndarray | None = None
        while not self._stop.is_set():
            try:
                ok, image = cap.read()
            except Exception as err:
                log.warning("reading %s raised %s", self.spec.label, redact_text(str(err)))
                ok, image = False, None
            rgb = to_rgb(image) if ok else None
            reads += int(bool(ok))
            if ok and rgb is None:
                self._skip(f"skipping an empty or malformed frame from {self.spec.label}")
                bad += 1
            if not ok or bad >= MAX_BAD_FRAMES:
                if pending is not None:
                    delivered += self._last_video_frame(cap, pending, reads)
                return not self.spec.live, delivered
            if rgb is None:
                continue
            bad = 0
            if self.spec.kind == "video":
                rgb, pending = pending, rgb
                if rgb is None:
                    continue
            delivered += 1
            self._put(rgb, self.spec.uri)
        return True, delivered

    def _last_video_frame(self, cap: Any, frame: np.ndarray, reads: int) -> int:
        """Deliver a video's last frame unless the file ended before the frame count its header
        promises (truncated copy): that frame is incomplete and is skipped. -> frames delivered."""
        try:
            expected = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if hasattr(cap, "get") else 0
        except Exception:  # a capture that cannot tell its length: trust the frame
            expected = 0
        if 0 < reads < expected:
            self._skip(
                f"{self.spec.label} ends after {reads} of the {expected} frames its header announces (truncated "
                "file?): its last frame is incomplete and was skipped; copy the video again"
            )
            return 0
        self._put(frame, self.spec.uri)
        return 1


def open_source(source: int | str | Path | SourceSpec, **kwargs: Any) -> FrameSource:
    """Parse `source` and return an unstarted FrameSource (start it, or just iterate it)."""
    spec = source if isinstance(source, SourceSpec) else parse_source(source)
    return FrameSource(spec, **kwargs)
