"""hgad_edge.core.files: checksums and writes that never leave a half-written file or folder."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from hgad_edge.core.files import (
    ORPHAN_AGE_S,
    TargetKindError,
    atomic_dir,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    remove_orphans,
    sha256_file,
)


def test_sha256_file_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 5000  # > one 1 MiB chunk boundary is not needed; several reads are
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(path, chunk=7) == hashlib.sha256(data).hexdigest()


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "meta.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_text(path.with_name("x.txt"), "hello")
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["meta.json", "x.txt"]
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600: others may read a bundle


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_atomic_dir_swaps_whole_folders_and_keeps_undo(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "metadata.json").write_text("v1")
    with pytest.raises(ValueError), atomic_dir(bundle) as staging:
        (staging / "metadata.json").write_text("broken")
        raise ValueError("graph check failed")
    assert (bundle / "metadata.json").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    with atomic_dir(bundle, keep_old=True) as staging:
        (staging / "metadata.json").write_text("v2")
    assert (bundle / "metadata.json").read_text() == "v2"
    assert (tmp_path / "bundle.previous" / "metadata.json").read_text() == "v1"


# ---- writes go to what the path is (issue 26) ----------------------------------------------------------
def test_a_symlinked_file_is_written_through_and_stays_a_link(tmp_path):
    target = tmp_path / "real" / "report.md"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "report.md"
    link.symlink_to(target)
    atomic_write_text(link, "new")
    assert link.is_symlink() and link.resolve() == target and target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["real", "report.md"]
    assert [p.name for p in target.parent.iterdir()] == ["report.md"]  # the temp file was beside the target
    dangling = tmp_path / "later.json"
    dangling.symlink_to(tmp_path / "made" / "later.json")
    atomic_write_json(dangling, {"b": 2})
    assert dangling.is_symlink() and json.loads((tmp_path / "made" / "later.json").read_text()) == {"b": 2}


@pytest.mark.parametrize("kind", ["fifo", "char_device_link", "socket"])
def test_a_device_fifo_or_socket_is_refused_never_replaced(tmp_path, kind):
    path = tmp_path / kind
    server = None
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "char_device_link":
        path.symlink_to(os.devnull)
    else:
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
    try:
        before = os.stat(path).st_mode
        with pytest.raises(TargetKindError, match="refusing to replace .* it is a (FIFO|character device|socket)"):
            atomic_write_text(path, "x")
        assert os.stat(path).st_mode == before and path.is_symlink() == (kind == "char_device_link")
        assert [p.name for p in tmp_path.iterdir()] == [kind]  # nothing written aside either
    finally:
        if server is not None:
            server.close()


def test_atomic_dir_writes_through_a_symlinked_folder_and_refuses_a_file(tmp_path):
    real = tmp_path / "bundles" / "v1"
    real.mkdir(parents=True)
    (real / "metadata.json").write_text("v1")
    link = tmp_path / "bundle"
    link.symlink_to(real)
    with atomic_dir(link) as staging:
        (staging / "metadata.json").write_text("v2")
    assert link.is_symlink() and (real / "metadata.json").read_text() == "v2"
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("keep")
    with pytest.raises(TargetKindError, match="it is a regular file, not a folder"), atomic_dir(a_file):
        pass
    assert a_file.read_text() == "keep"


def test_temp_files_carry_the_writers_pid_and_orphans_of_dead_writers_go(tmp_path):
    path = tmp_path / "metadata.json"
    with atomic_path(path) as tmp:
        assert tmp.name.startswith(f".metadata.json.{os.getpid()}-") and tmp.name.endswith(".tmp")
        tmp.write_text("{}")
        assert remove_orphans(path) == []  # this process is alive: its write in progress stays
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = tmp_path / f".metadata.json.{dead.pid}-abcd1234.tmp"
    staging = tmp_path / f".metadata.json.{dead.pid}-efgh5678.staging"
    old_style, young_style = tmp_path / ".metadata.json.k2j4h5g6.tmp", tmp_path / ".metadata.json.p9o8i7u6.tmp"
    mine = tmp_path / f".metadata.json.{os.getpid()}-zzzz9999.tmp"
    other = tmp_path / ".other.json.abcdefgh.tmp"
    unrelated = tmp_path / ".metadata.json.my notes.tmp"  # not a name tempfile makes
    for p in (killed, old_style, young_style, mine, other, unrelated):
        p.write_text("x")
    staging.mkdir()
    (staging / "half.onnx").write_text("x")
    hour_ago = time.time() - ORPHAN_AGE_S - 60
    for p in (old_style, other, unrelated):
        os.utime(p, (hour_ago, hour_ago))
    removed = remove_orphans(path)
    assert sorted(p.name for p in removed) == sorted([killed.name, staging.name, old_style.name])
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["metadata.json", young_style.name, mine.name, other.name, unrelated.name])


def test_results_get_the_umasks_mode_whatever_it_is(tmp_path):
    code = f"""
import os
os.umask(0o027)
from hgad_edge.core.files import atomic_dir, atomic_write_text
atomic_write_text({str(tmp_path / "f.txt")!r}, "x")
with atomic_dir({str(tmp_path / "d")!r}):
    pass
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o750
