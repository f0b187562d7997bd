"""The files of a folder or tar archive, read without trusting the archive.

Archive members are streamed and read into memory, never extracted to disk by name, so a member called
`../../.bashrc` or `/etc/passwd` cannot land anywhere. Members that are links, devices or have absolute or
`..` paths are skipped and reported (the caller lists them, or refuses them under --strict). A small
archive that decompresses to far more than a tree of images could (a decompression bomb), or holds an
absurd number of members, stops with one line instead of filling memory; a single file over
MAX_FILE_BYTES is skipped unread.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from beton_trainer.common.errors import UserError

__all__ = ["Limits", "MAX_FILE_BYTES", "Member", "bomb_error", "expansion_limit", "walk"]

MAX_FILE_BYTES = 1 << 30  # no image or dataset file is near 1 GiB (CIFAR-100's largest pickle: 155 MB)
MIN_EXPANSION_BYTES = 1 << 30  # small archives may expand by any ratio up to this
Skip = Callable[[str, str], None]  # skip(path, reason): list the file, or raise under --strict


@dataclass(frozen=True)
class Member:
    """One file of a folder or archive: its size and first bytes known before its contents are read, so a
    caller can refuse a file that is not what it wants without holding all of it in memory. Calling it reads
    the contents (once, for an archive member: the archive is a stream)."""

    size: int
    head: Callable[[int], bytes]  # head(n): the first n bytes, the rest unread
    read: Callable[[], bytes]

    def __call__(self) -> bytes:
        return self.read()


Entry = tuple[tuple[str, ...], Member | None]  # (path parts, member); None for a folder


@dataclass(frozen=True)
class Limits:
    """How far an archive may go before it is treated as hostile (`--max-files`, `--max-expansion`)."""

    max_files: int = 10_000_000  # members; ImageNet-21k has 14M images in 21k tars, ImageNet-1k 1.3M
    max_expansion: float = 100.0  # decompressed bytes / archive bytes; photos barely compress (about 1.0x)


def walk(src: Path, skip: Skip, limits: Limits = Limits()) -> Iterator[Entry]:
    """(path parts, reader) for every file of a folder or tarball, in order, and (parts, None) for folders.

    Tarballs are streamed, so a reader must be called before the next item is taken. In a folder (the
    user's own disk) links to files are followed; only regular files are read.
    """
    if src.is_dir():
        yield from _walk_folder(src, skip)
    else:
        yield from _walk_tar(src, skip, limits)


def _walk_folder(src: Path, skip: Skip) -> Iterator[Entry]:
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        rel = Path(dirpath).relative_to(src).parts
        if rel:
            yield rel, None
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not path.is_file():
                skip("/".join((*rel, name)), "not a regular file (a FIFO, device or broken link)")
            elif path.stat().st_size > MAX_FILE_BYTES:
                skip("/".join((*rel, name)), _too_big(path.stat().st_size))
            else:
                yield (*rel, name), Member(path.stat().st_size, _file_head(path), path.read_bytes)


def _file_head(path: Path) -> Callable[[int], bytes]:
    def head(n: int) -> bytes:
        with open(path, "rb") as fh:
            return fh.read(n)
    return head


def _too_big(size: int) -> str:
    return f"{size / 2**30:.1f} GiB, larger than any image or dataset file ({MAX_FILE_BYTES >> 30} GiB at most)"


def _unsafe(member: tarfile.TarInfo) -> str | None:
    """Why a member must not be read, or None."""
    if member.issym() or member.islnk():
        return "a link (links inside archives are never followed)"
    if not (member.isfile() or member.isdir()):
        return "a device, FIFO or other special file"
    if PurePosixPath(member.name).is_absolute():
        return "an absolute path"
    if ".." in PurePosixPath(member.name).parts:
        return "a path with '..'"
    return None


class _Metered:
    """A decompressed stream that stops reading past `limit` bytes (a decompression bomb, or a tar header
    claiming gigabytes of path name, would otherwise be read into memory)."""

    def __init__(self, stream: BinaryIO, limit: int, fail: Callable[[], UserError]):
        self.stream, self.limit, self.fail, self.count = stream, limit, fail, 0

    def read(self, size: int = -1) -> bytes:
        if size < 0 or self.count + size > self.limit:
            size = self.limit - self.count + 1  # one byte more than allowed: a bomb fails below
        data = self.stream.read(size)
        self.count += len(data)
        if self.count > self.limit:
            raise self.fail()
        return data


def _decompressed(raw: BinaryIO) -> BinaryIO:
    """The file's bytes, gunzipped / unxz'd / bunzipped as its magic number says."""
    magic = raw.read(6)
    raw.seek(0)
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw)
    if magic == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(raw)
    if magic[:3] == b"BZh":
        return bz2.BZ2File(raw)
    return raw


def expansion_limit(compressed_bytes: int, limits: Limits) -> int:
    """The most a compressed source of this many bytes may expand to: --max-expansion times, or 1 GiB."""
    return max(MIN_EXPANSION_BYTES, int(limits.max_expansion * compressed_bytes))


def bomb_error(name: object, compressed_bytes: int, limits: Limits) -> UserError:
    """The one line for a compressed source that expands past `expansion_limit`."""
    limit = expansion_limit(compressed_bytes, limits)
    return UserError(f"{name} expands to more than {limit:,} bytes ({limit / max(compressed_bytes, 1):.0f}x its size), "
                     "far more than a dataset's files: a decompression bomb or not a dataset; if it is genuine, "
                     f"raise --max-expansion (now {limits.max_expansion:g})")


def _walk_tar(src: Path, skip: Skip, limits: Limits) -> Iterator[Entry]:
    errors = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)
    size = src.stat().st_size
    limit = expansion_limit(size, limits)

    def broken(exc: Exception) -> UserError:
        return UserError(f"{src} is not a readable folder or tar archive ({exc}); "
                         "pass a folder or a complete .tar/.tar.gz/.tar.xz")

    def bomb() -> UserError:
        return bomb_error(src, size, limits)

    def reader(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Member:
        file, start = tar.extractfile(member), bytearray()  # the stream only goes forward: keep what head read

        def head(n: int) -> bytes:
            try:
                start.extend(file.read(max(n - len(start), 0)))
            except errors as exc:
                raise broken(exc) from None
            return bytes(start[:n])

        def read() -> bytes:
            try:
                return bytes(start) + file.read()
            except errors as exc:
                raise broken(exc) from None
        return Member(member.size, head, read)

    try:
        with open(src, "rb") as raw, tarfile.open(fileobj=_Metered(_decompressed(raw), limit, bomb), mode="r|") as tar:
            count = 0
            while (member := tar.next()) is not None:
                tar.members.clear()  # tarfile keeps every header it has read; we stream, so keep none
                count += 1
                if count > limits.max_files:
                    raise UserError(f"{src} holds more than {limits.max_files:,} members, far more than a dataset's "
                                    "files: not an image dataset; if it is genuine, raise --max-files")
                path, parts = member.name.rstrip("/"), PurePosixPath(member.name).parts
                if (why := _unsafe(member)) is not None:
                    skip(path, why)
                elif member.size > MAX_FILE_BYTES:
                    skip(path, _too_big(member.size))
                elif parts:  # not the archive's own "./"
                    yield parts, None if member.isdir() else reader(tar, member)
    except errors as exc:
        raise broken(exc) from None
