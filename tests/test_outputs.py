"""Where `hgad-edge run` writes its results (hgad_edge.runtime.outputs): through to what the path is
(a character device, a FIFO, a symlink's target) and never replacing it by a regular file; results with
the umask's mode; a write that fails (full device, closed pipe, file-size limit) ends the run with one
clear line, the summary and a non-zero exit, and never truncates the results that were there."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from hgad_edge.runtime.app import run_app
from hgad_edge.runtime.outputs import JsonLines, OutputError, check_output
from tests.helpers import REPO, make_bundle

FRAMES = 3


def _shots(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(FRAMES):
        cv2.imwrite(str(folder / f"{i}.png"), np.full((40, 50, 3), 80 + i * 80, np.uint8))
    return folder


@pytest.fixture
def station(tmp_path) -> tuple[Path, Path]:
    return make_bundle(tmp_path / "b"), _shots(tmp_path / "shots")


def _cli(*args: str, umask: int | None = None, rlimit_fsize: int | None = None, **popen) -> subprocess.Popen:
    """`hgad-edge run` in a process of its own (real stdout/stderr, real exit code, real interpreter exit)."""
    code = "import os, sys\n"
    if umask is not None:
        code += f"os.umask({umask})\n"
    if rlimit_fsize is not None:  # files may not grow past this: writes fail with EFBIG (not SIGXFSZ)
        code += "import resource, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        code += f"resource.setrlimit(resource.RLIMIT_FSIZE, ({rlimit_fsize}, {rlimit_fsize}))\n"
    code += "from hgad_edge.cli import main\nmain(sys.argv[1:])\n"
    cmd = [sys.executable, "-c", code, "run", *args, "--headless", "--backend", "onnxruntime"]
    popen.setdefault("stdout", subprocess.PIPE)
    return subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=REPO, **popen)


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out or "", err


def _clean_failure(rc: int, out: str, err: str, words: str) -> None:
    """Exit 1, the summary line, one error line naming the cause, and no traceback of any kind."""
    assert rc == 1, (rc, out, err)
    assert "hgad-edge run: " in out + err and words in err, (out, err)
    assert "Traceback" not in err and "Exception ignored" not in err, err


# ---- character devices, FIFOs and symlinks are written through -------------------------------------------
def _char_device(tmp_path: Path, how: str, name: str) -> Path:
    """/dev/<name> reached through a symlink, or a device node of its own made with mknod (root only)."""
    real = Path("/dev") / name
    if not real.exists():
        pytest.skip(f"{real} is not here")
    path = tmp_path / f"{how}-{name}"
    if how == "symlink":
        path.symlink_to(real)
    else:
        if os.geteuid() != 0:
            pytest.skip("mknod of a device node needs root")
        os.mknod(path, stat.S_IFCHR | 0o666, os.stat(real).st_rdev)
        try:
            with open(path, "wb"):
                pass
        except OSError as err:  # a file system mounted nodev
            pytest.skip(f"device nodes cannot be opened under {tmp_path}: {err}")
    return path


@pytest.mark.parametrize("how", ["symlink", "mknod"])
def test_overwrite_writes_through_a_character_device_and_keeps_it(station, tmp_path, how):
    bundle, shots = station
    out = _char_device(tmp_path, how, "null")
    rc, stdout, err = _finish(_cli(str(bundle), str(shots), "--output", str(out), "--overwrite"))
    assert rc == 0, err
    assert f"hgad-edge run: {FRAMES} frames" in stdout
    assert out.is_symlink() == (how == "symlink")  # the link is still a link ...
    assert stat.S_ISCHR(os.stat(out).st_mode)  # ... and the device a device, not a regular file
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("how, overwrite", [("direct", False), ("symlink", True), ("mknod", True)])
def test_a_full_device_ends_the_run_with_its_summary_and_one_line(station, tmp_path, how, overwrite):
    """/dev/full: the first result cannot be written; no chained traceback, the summary, exit 1."""
    bundle, shots = station
    out = Path("/dev/full") if how == "direct" else _char_device(tmp_path, how, "full")
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    args = ["--output", str(out)] + (["--overwrite"] if overwrite else [])
    rc, stdout, err = _finish(_cli(str(bundle), str(shots), *args))
    _clean_failure(rc, stdout, err, "no space left on the device")
    assert "hgad-edge run: 1 frames" in stdout and "result of frame 0" in err
    assert stat.S_ISCHR(os.stat(out).st_mode)


def test_a_fifo_is_written_through_to_its_reader(station, tmp_path):
    bundle, shots = station
    fifo = tmp_path / "results.fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []

    def read() -> None:
        with open(fifo, "rb") as fh:  # blocks until the run opens the FIFO for writing
            received.append(fh.read())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    summary = run_app(bundle, str(shots), headless=True, output_jsonl=fifo, overwrite=True, print_summary=False)
    reader.join(timeout=10)
    assert summary["frames"] == FRAMES and not reader.is_alive()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # still the FIFO
    assert [json.loads(line)["frame"] for line in received[0].decode().splitlines()] == list(range(FRAMES))


def test_a_fifo_without_a_reader_is_waited_for_with_a_message(station, tmp_path, caplog):
    bundle, shots = station
    fifo = tmp_path / "late.fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []

    def read_later() -> None:
        for _ in range(250):  # at most 5 s, so that a run that never says so cannot hang the test
            if "waiting for a reader" in caplog.text:
                break
            threading.Event().wait(0.02)
        with open(fifo, "rb") as fh:
            received.append(fh.read())

    reader = threading.Thread(target=read_later, daemon=True)
    reader.start()
    summary = run_app(bundle, str(shots), headless=True, output_jsonl=fifo, print_summary=False)
    reader.join(timeout=10)
    assert "waiting for a reader to open the FIFO" in caplog.text
    assert summary["frames"] == FRAMES and len(received[0].decode().splitlines()) == FRAMES


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_symlinked_output_writes_its_target_and_stays_a_link(station, tmp_path, overwrite):
    bundle, shots = station
    target = tmp_path / "data" / "results.jsonl"
    target.parent.mkdir()
    target.write_text('{"earlier": 1}\n')
    link = tmp_path / "results.jsonl"
    link.symlink_to(target)
    run_app(bundle, str(shots), headless=True, output_jsonl=link, overwrite=overwrite, print_summary=False)
    assert link.is_symlink() and link.resolve() == target
    lines = target.read_text().splitlines()
    assert len(lines) == FRAMES + (0 if overwrite else 1) and ("earlier" in lines[0]) != overwrite
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.jsonl"]  # no temp file left


def test_a_dangling_symlink_creates_its_target(station, tmp_path):
    bundle, shots = station
    link = tmp_path / "results.jsonl"
    link.symlink_to(tmp_path / "made" / "r.jsonl")
    run_app(bundle, str(shots), headless=True, output_jsonl=link, print_summary=False)
    assert link.is_symlink() and len((tmp_path / "made" / "r.jsonl").read_text().splitlines()) == FRAMES


def test_a_socket_folder_or_unwritable_output_is_refused_before_the_model_loads(tmp_path):
    shots = _shots(tmp_path / "shots")
    missing = tmp_path / "no-bundle"  # were the model loaded first, its error would come instead
    sock = tmp_path / "s.sock"
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(sock))
        with pytest.raises(OutputError, match="is a socket; give a file, a FIFO"):
            run_app(missing, str(shots), headless=True, output_jsonl=sock)
    finally:
        server.close()
    with pytest.raises(OutputError, match="is a folder; give a file name"):
        run_app(missing, str(shots), headless=True, output_jsonl=tmp_path)
    link = tmp_path / "link-to-folder"
    link.symlink_to(shots)
    with pytest.raises(OutputError, match="is a folder"):
        check_output(link)


# ---- the file's mode -------------------------------------------------------------------------------------
@pytest.mark.parametrize("exists", [False, True])
def test_results_get_the_umasks_mode(station, tmp_path, exists):
    bundle, shots = station
    out = tmp_path / "results.jsonl"
    if exists:
        out.write_text("old\n")
    rc, _, err = _finish(_cli(str(bundle), str(shots), "--output", str(out), "--overwrite", umask=0o027))
    assert rc == 0, err
    assert stat.S_IMODE(out.stat().st_mode) == 0o640  # not mkstemp's 0600
    assert len(out.read_text().splitlines()) == FRAMES


# ---- failed writes ---------------------------------------------------------------------------------------
def test_a_closed_pipe_on_stdout_ends_the_run_cleanly(station):
    """`hgad-edge run ... --output - | head -c0`: the reader is gone before the first line."""
    bundle, shots = station
    proc = _cli(str(bundle), str(shots), "--output", "-")
    proc.stdout.close()  # the reader closes its end at once, like head -c0
    err = proc.stderr.read()
    rc = proc.wait(timeout=120)
    _clean_failure(rc, "", err, "the reader closed the pipe")
    assert "hgad-edge run: 1 frames" in err  # the summary goes to stderr when results go to stdout


def test_stdout_onto_a_full_device_ends_the_run_cleanly(station):
    """`hgad-edge run ... --output - > /dev/full`: used to exit 0 with every line lost."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    bundle, shots = station
    with open("/dev/full", "wb") as full:
        rc, _, err = _finish(_cli(str(bundle), str(shots), "--output", "-", stdout=full))
    _clean_failure(rc, "", err, "no space left on the device")
    assert "could not write the result of frame 0 to stdout" in err and "hgad-edge run: 1 frames" in err


def test_stdout_into_head_through_a_shell(station):
    bundle, shots = station
    run = f"{sys.executable} -m hgad_edge.cli run {bundle} {shots} --headless --backend onnxruntime --output -"
    done = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {run} | head -c0"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    _clean_failure(done.returncode, "", done.stderr, "the reader closed the pipe")


def test_a_failed_overwrite_keeps_the_earlier_results_and_no_temp_file(station, tmp_path):
    """A file-size limit (as a full disk would) stops the second line; the earlier file stays as it was."""
    bundle, shots = station
    out = tmp_path / "results.jsonl"
    out.write_text('{"earlier": 1}\n')
    rc, stdout, err = _finish(_cli(str(bundle), str(shots), "--output", str(out), "--overwrite", rlimit_fsize=300))
    _clean_failure(rc, stdout, err, "could not write the result of frame 1")
    assert "the file there before is unchanged" in err and "hgad-edge run: 2 frames" in stdout
    assert out.read_text() == '{"earlier": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "results.jsonl", "shots"]


def test_an_appended_file_keeps_every_complete_line_before_the_failure(station, tmp_path):
    bundle, shots = station
    out = tmp_path / "results.jsonl"
    out.write_text('{"earlier": 1}\n')
    rc, stdout, err = _finish(_cli(str(bundle), str(shots), "--output", str(out), rlimit_fsize=300))
    _clean_failure(rc, stdout, err, "File too large")
    lines = out.read_text().splitlines()
    assert json.loads(lines[0]) == {"earlier": 1} and json.loads(lines[1])["frame"] == 0


def test_the_sink_refuses_writes_after_a_failure_and_closes_quietly(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    sink = JsonLines("/dev/full")
    with pytest.raises(OutputError, match="no space left"):
        sink.write({"frame": 0})
    with pytest.raises(OutputError, match="an earlier write failed"):
        sink.write({"frame": 1})
    sink.flush()
    sink.close()
    sink.close()
    assert sink.lines == 0
