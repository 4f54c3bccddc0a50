"""Where the results of `hgad-edge run` go: one record per scored frame, written as it is scored.

Every kind of result output has the interface of `ResultSink`: `open_output` checks and opens it,
`write(record)` sends one frame's record, `flush()` makes what was sent durable, `close()` finishes
it. Every failure is an `OutputError` whose one-line message names the output and the fix;
`check_output` refuses what cannot work before the model loads. The app ends a run at the first
failed write, prints its summary and exits non-zero.

`JsonLines` (`--output`) writes one JSON line per frame to what the path is:
  - `-`: stdout (the app then prints its summary on stderr);
  - a regular file (also through a symlink, to its target): appended to; with overwrite=True it is
    replaced at the end, written aside and renamed only if a line was written, so a failed run never
    truncates earlier results (a new file is written the same way);
  - a character device (/dev/null, a serial port, a terminal) or a FIFO: written through, line by
    line (a FIFO without a reader is waited for, with a message); never replaced by a regular file;
  - a folder, a block device or a socket: refused.
Files get the umask's mode. Each line goes out in its own write, unbuffered, so a full disk or a
reader that closed its pipe fails the frame it happened on, and nothing is left to fail at exit.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import stat
import sys
from pathlib import Path
from typing import Any, Protocol

from hgad_edge.core.files import TargetKindError, describe_kind, replace_target, temp_beside

__all__ = ["JsonLines", "OutputError", "ResultSink", "check_output", "open_output", "writable_folder"]

log = logging.getLogger("hgad_edge.runtime")


class OutputError(RuntimeError):
    """A result output cannot be opened or written; the message names it and the fix."""


class ResultSink(Protocol):
    """A destination for the per-frame records of a run (a file today; MQTT, webhooks beside it)."""

    name: str  # how messages name it
    to_stdout: bool  # True: the app prints its summary on stderr instead

    def write(self, record: dict[str, Any]) -> None:
        """Send one frame's record; OutputError when it cannot be delivered."""

    def flush(self) -> None:
        """Make what was sent durable (the end of a run); OutputError on failure."""

    def close(self) -> None:
        """Finish (e.g. rename a replaced file into place); idempotent; OutputError on failure."""


def writable_folder(path: Path) -> bool:
    """Whether `path` (a folder, existing or to be created) can receive files."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)


def _is_stdout(spec: str | Path) -> bool:
    return str(spec) == "-"


def _kind(path: Path) -> tuple[str, Path]:
    """("new" | "file" | "stream", the path to open): what `path` is, through symlinks; OutputError
    for a folder, block device or socket."""
    try:
        mode = os.stat(path).st_mode  # follows symlinks, /dev/stdout's /proc links included
    except FileNotFoundError:
        mode = None
    except OSError as err:
        raise OutputError(f"cannot use --output {path}: {err.strerror or err}; pick a writable path") from err
    if mode is not None and (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
        return "stream", path
    if mode is not None and stat.S_ISDIR(mode):
        raise OutputError(f"--output {path} is a folder; give a file name, e.g. {path / 'results.jsonl'}")
    try:
        target = replace_target(path)
    except TargetKindError:
        what = describe_kind(mode) if mode is not None else "not a regular file"
        msg = f"--output {path} is {what}; give a file, a FIFO, a character device (/dev/null) or - for stdout"
        raise OutputError(msg) from None
    return ("new" if mode is None else "file"), target


def check_output(spec: str | Path, overwrite: bool = False) -> None:
    """Refuse an unusable --output before the model loads; nothing is created or opened here."""
    if _is_stdout(spec):
        return
    path = Path(spec)
    kind, target = _kind(path)
    if kind == "stream" and not os.access(path, os.W_OK):
        raise OutputError(f"cannot write JSON lines to {path} (not writable); pick a writable path")
    replaced_in_folder = kind == "new" or (kind == "file" and overwrite)
    if (replaced_in_folder and not writable_folder(target.parent)) or (
        kind == "file" and not os.access(target, os.W_OK)
    ):
        raise OutputError(f"cannot write JSON lines to {path} (not writable); pick a writable path")


def open_output(spec: str | Path, overwrite: bool = False) -> ResultSink:
    """The result output for --output SPEC (`-` or a path): see the module docstring."""
    return JsonLines(spec, overwrite)


class JsonLines:
    """One JSON line per frame to stdout, a file, a character device or a FIFO (module docstring)."""

    def __init__(self, spec: str | Path, overwrite: bool = False) -> None:
        self.to_stdout = _is_stdout(spec)
        self.name = "stdout" if self.to_stdout else str(spec)
        self.lines = 0
        self._fd: int | None = None
        self._tmp: Path | None = None  # written aside, renamed over _target on close
        self._target: Path | None = None
        self._regular = False
        self._failed = False
        self._closed = False
        self._text: Any = None  # a stdout without a file descriptor (captured by a test or notebook)
        if self.to_stdout:
            sys.stdout.flush()  # whatever was printed before comes first
            try:
                self._fd = sys.stdout.fileno()
            except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation: a captured stdout
                self._text = sys.stdout
            return
        path = Path(spec)
        kind, target = _kind(path)
        try:
            if kind == "stream":
                self._fd = _open_stream(path)
            elif kind == "file" and not overwrite:
                self._fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                self._regular = True
            else:
                self._tmp, self._target, self._regular = temp_beside(target), target, True
                self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as err:
            if self._tmp is not None:
                self._tmp.unlink(missing_ok=True)
            raise OutputError(
                f"cannot write JSON lines to {path}: {err.strerror or err}; pick a writable path"
            ) from err

    def write(self, record: dict[str, Any]) -> None:
        if self._failed or self._closed:
            raise OutputError(f"results to {self.name} can no longer be written (an earlier write failed)")
        line = json.dumps(record) + "\n"
        try:
            if self._text is not None:
                self._text.write(line)
                self._text.flush()
            data = memoryview(line.encode("utf-8")) if self._fd is not None else memoryview(b"")
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError as err:
            self._fail(err, f"the result of frame {record.get('frame', '?')}")
        self.lines += 1

    def flush(self) -> None:
        """fsync a regular file (lines already went out one write each); pipes and devices have nothing to sync."""
        if self._fd is None or self._failed or not self._regular:
            return
        try:
            os.fsync(self._fd)
        except OSError as err:
            self._fail(err, "the results")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        fd, self._fd = self._fd, None
        if fd is not None and not self.to_stdout:
            try:
                os.close(fd)
            except OSError as err:  # NFS and some devices report a failed write only here
                if not self._failed:
                    self._fail(err, "the results", closing=True)
        if self._tmp is None:
            return
        try:
            if self.lines and not self._failed:
                os.replace(self._tmp, self._target)
        except OSError as err:
            msg = f"could not move the results into {self.name}: {err.strerror or err}; they were not saved"
            raise OutputError(msg) from err
        finally:
            self._tmp.unlink(missing_ok=True)

    def _fail(self, err: OSError, what: str, closing: bool = False) -> None:
        self._failed = True
        if self.to_stdout:
            _silence_stdout()
        if err.errno == errno.EPIPE:
            reason = "the reader closed the pipe"
        elif err.errno == errno.ENOSPC:
            reason = "no space left on the device"
        else:
            reason = err.strerror or str(err)
        kept = ""
        if self._tmp is not None:
            before = "; the file there before is unchanged" if self._target.exists() else ""
            kept = f" (nothing of this run was saved there{before})"
        fix = "keep the reader open" if err.errno == errno.EPIPE else "free space or pick another --output"
        msg = f"could not write {what} to {self.name}: {reason}{kept}; {fix}"
        if closing:
            raise OutputError(msg) from err
        raise OutputError(msg) from None


def _open_stream(path: Path) -> int:
    """Open a character device or FIFO for writing; a FIFO without a reader is waited for, saying so."""
    flags = os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_NONBLOCK)
    except OSError as err:
        if err.errno != errno.ENXIO:  # ENXIO: a FIFO nobody reads yet
            raise
        log.warning("waiting for a reader to open the FIFO %s (Ctrl-C to give up)", path)
        fd = os.open(path, flags)
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)  # writes wait, never EAGAIN
    return fd


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null once stdout failed, so the interpreter's final flush cannot fail again
    (the pattern the Python docs give for SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
