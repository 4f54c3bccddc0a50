"""File helpers both sides use (training, export, runtime): checksums and atomic writes. Torch-free.

Models, bundles and reports are written aside and renamed into place, so a crash, a full disk or a
Ctrl-C mid-write leaves the previous file (or folder) intact instead of a truncated one. A write goes
to what the path is: through a symlink to its target (the link stays a link), while a device, FIFO
or socket is refused (`TargetKindError`) rather than replaced by a regular file: renaming over it is
what an atomic write does, and there is nothing to write aside for a device. Results get the umask's
mode. Temporary names carry the writer's process id (`.NAME.PID-xxxxxxxx.tmp`, `.NAME.PID-xxxxxxxx.staging`),
so `remove_orphans` can tell what a killed writer left from what a live one is still writing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "ORPHAN_AGE_S",
    "TargetKindError",
    "atomic_dir",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "describe_kind",
    "remove_orphans",
    "replace_target",
    "sha256_file",
    "temp_beside",
]

ORPHAN_AGE_S = 3600.0  # a temporary name without a process id (older versions) is an orphan after this long


class TargetKindError(OSError):
    """A path an atomic write must not replace: a device, FIFO or socket, or a file where a folder
    belongs (and the reverse). An OSError, so callers that report unwritable paths report it too."""


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed so that large models do not sit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: setting it is process-wide, so never mid-run


def _umask() -> int:
    return _UMASK


def describe_kind(mode: int) -> str:
    """'a regular file', 'a folder', 'a character device', ... for messages about a path's st_mode."""
    kinds = (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "a special file")


def replace_target(path: Path | str, folder: bool = False) -> Path:
    """The path an atomic write renames over: `path`, or the file (folder) its symlinks lead to.

    TargetKindError when that exists and is not a regular file (folder=True: not a folder). A missing
    path (a dangling link: its target) is returned as it is, to be created.
    """
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return path
    if (stat.S_ISDIR if folder else stat.S_ISREG)(mode):
        return path
    wanted = "a folder" if folder else "a regular file"
    msg = (
        f"refusing to replace {path}: it is {describe_kind(mode)}, not {wanted} "
        f"(an atomic write renames a new {'folder' if folder else 'file'} over it); pass a path to {wanted}"
    )
    raise TargetKindError(msg)


def temp_beside(path: Path) -> Path:
    """A new empty file `.NAME.PID-xxxxxxxx.tmp` beside `path`, with the umask's mode (not mkstemp's
    0600), for a write that is renamed over `path` once complete. The caller removes or renames it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())
    return tmp


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path` (its symlink's target); on success it replaces it in one rename.

    On an exception the temporary file is removed and `path` keeps its old content. A device, FIFO
    or socket at `path` is refused before anything is written (TargetKindError).
    """
    target = replace_target(path)
    tmp = temp_beside(target)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


@contextlib.contextmanager
def atomic_dir(path: Path | str, keep_old: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder beside `path` (its symlink's target); on success it takes that place.

    The swap is two renames (old aside, new in), so a reader sees the old folder or the new one,
    never a half-written mix. On an exception the staging folder is removed and `path` is
    untouched. keep_old=True leaves the previous folder as `<path>.previous` (one level of undo).
    Something other than a folder at `path` is refused (TargetKindError).
    """
    path = replace_target(path, folder=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".staging", dir=path.parent))
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = path.with_name(path.name + ".previous")
    if previous.exists():
        shutil.rmtree(previous)
    if path.exists():
        os.replace(path, previous)
    os.replace(staging, path)
    if not keep_old:
        shutil.rmtree(previous, ignore_errors=True)


_TEMP_MIDDLE = re.compile(r"(?:(?P<pid>\d+)-)?[a-z0-9_]{8}")  # tempfile's 8 random characters, after our pid


def _writer_gone(middle: str, entry: Path) -> bool:
    """Whether the writer of a temporary name (`PID-random`, or an older name without a pid) is gone;
    False for names tempfile does not make."""
    match = _TEMP_MIDDLE.fullmatch(middle)
    if match is None:
        return False
    if match["pid"] is None:  # a name from before the pid was in it: judged by its age
        return time.time() - entry.lstat().st_mtime > ORPHAN_AGE_S
    pid = int(match["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (or no such pid at all)
        return True
    except OSError:  # PermissionError: the process exists (another user's)
        return False
    return False


def remove_orphans(path: Path | str) -> list[Path]:
    """Remove what killed writers of `path` left beside it (`.NAME.*.tmp` files of `atomic_path`,
    `.NAME.*.staging` folders of `atomic_dir`) and return them. A name whose process still runs on
    this machine is a write in progress and stays; one without a process id (an older version's)
    goes once it is ORPHAN_AGE_S old."""
    path = Path(path)
    prefix, removed = f".{path.name}.", []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        suffix = ".tmp" if name.endswith(".tmp") else ".staging" if name.endswith(".staging") else None
        if suffix is None or not name.startswith(prefix) or len(name) <= len(prefix) + len(suffix):
            continue
        try:
            if not _writer_gone(name[len(prefix) : -len(suffix)], entry):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:
            continue  # another cleaner was faster
        removed.append(entry)
    return removed
