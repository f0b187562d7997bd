"""common.files: what every file the project writes goes through (atomic publication) and its file hash."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from beton_trainer.common.files import atomic_path, sha256_file, write_json, write_text


def test_a_write_that_fails_midway_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    write_json(target, {"test_accuracy": 0.9})
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text('{"test_acc')  # killed half-way through the new contents
        raise KeyboardInterrupt
    assert json.loads(target.read_text()) == {"test_accuracy": 0.9}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_the_data_is_flushed_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", f"{src} -> {dst}"))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_text(tmp_path / "config.toml", "seed = 1\n")
    tmp = tmp_path / f".tmp-{os.getpid()}-config.toml"
    assert events == [("fsync", str(tmp)), ("replace", f"{tmp} -> {tmp_path / 'config.toml'}"),
                      ("fsync", str(tmp_path))]
    assert (tmp_path / "config.toml").read_text() == "seed = 1\n"


def test_the_temporary_name_keeps_the_suffix(tmp_path):
    with atomic_path(tmp_path / "confusion_matrix.png") as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp.name.startswith(".")
        tmp.write_bytes(b"png")
    assert (tmp_path / "confusion_matrix.png").read_bytes() == b"png"


def test_sha256_file_hashes_the_whole_file(tmp_path):
    data = os.urandom(9 * 2**20 + 17)  # more than two read blocks
    (tmp_path / "blob").write_bytes(data)
    assert sha256_file(tmp_path / "blob") == hashlib.sha256(data).hexdigest()
