"""hgad_edge.core.files: checksums and writes that never leave a half-written file or folder."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from hgad_edge.core.files import atomic_dir, atomic_path, atomic_write_json, atomic_write_text, sha256_file


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
