"""Writing files so that no reader (or a run killed midway) ever sees half of one, and hashing them.

Every file the project publishes goes through `atomic_path`: written under a hidden temporary name
beside its destination, flushed to disk, renamed over the destination (atomic on POSIX), and the
folder's entry flushed too. A write that fails or is killed leaves the previous file untouched.
Standard library only (the GPU-bundle tools use it on a bare machine).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "fsync_path", "hash_into", "sha256_file", "write_json", "write_text"]

BLOCK = 1 << 22  # 4 MiB reads: sources and .beton files can be GBs


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A temporary path to write `path`'s new contents to; published by rename when the block succeeds.

    The temporary name keeps the destination's suffix (`.tmp-<pid>-model.json`), so writers that infer
    a format from it (matplotlib) still work; it is removed if the block raises.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: Path | str, data: object) -> None:
    """JSON with 2-space indents (values it cannot encode written as str), atomically."""
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def hash_into(digest: hashlib._Hash, path: Path | str) -> None:
    """Feed a file's bytes to `digest` in blocks (for hashes over several files)."""
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            digest.update(block)


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    hash_into(digest, path)
    return digest.hexdigest()
