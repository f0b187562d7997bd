"""Whether a split's `.beton` is still the file that was converted, checked when a loader opens it.

Flipping every label of a train.beton (the manifest left as it was) trained silently on all three loaders, and a
JPEG record with damaged entropy data trained with no message on FFCV. The manifest records the file's size and
sha256, but the sha256 of the whole file is one pass over all of it at every start. So the converter also records
the sha256 of each page (`page_sha256`): the file cut into blocks of its page size from byte 0, the blocks FFCV
reads records by (record i lies in page ptr // page_size). The first pages hold the header and each record's
metadata (labels, sizes, pointers), the last the allocation table; a loader reads all of those, and of the data
pages only those holding the records it reads. `data.verify` chooses:

- "pages" (the default): those pages, hashed when the loader opens the split, so the check reads once what the
  loader reads anyway. The tensor loader reads every record; FFCV and DALI every record of a training split over
  its epochs, and of an evaluation split (a stratified subset, a rank's shard) only the records they evaluate.
- "full": every page, whatever the loader reads.
- "off": only the file's size against the manifest's.

A file converted before page checksums existed is checked by its size under "pages" (said once per file), and by
its whole sha256 under "full". A page that differs stops the run with one line naming the file, the page, what it
holds and the command that converts the dataset again.

Why sha256 per page, measured on this machine (2 shared cores with SHA-NI, 8 MiB pages from memory): sha256
1.17 GB/s, blake2b 0.97, crc32 (zlib) 2.25. The cryptographic hash costs under twice a CRC's, a CRC can be made to
match by a crafted page while a sha256 cannot, and it is the hash the manifest already uses for whole files.
Pages are hashed on several threads (hashlib releases the GIL), read in chunks: memory stays a few MiB.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from beton_trainer.common.errors import UserError
from beton_trainer.common.files import sha256_file
from beton_trainer.format.beton import CONVERT_AGAIN, BetonFile

__all__ = ["VERIFY_MODES", "check_integrity", "page_checksums"]

VERIFY_MODES = ("pages", "full", "off")
CHUNK = 8 << 20  # bytes read at a time within a page
MAX_THREADS = 8
_noted: set[Path] = set()  # files already said to have no page checksums (once per process)


def page_checksums(path: str | Path, page_size: int, pages: Sequence[int] | None = None) -> list[str]:
    """The sha256 (hex) of pages `pages` of the file (all when None): page k is bytes [k * page_size,
    (k + 1) * page_size), the last one shorter."""
    size = Path(path).stat().st_size
    if pages is None:
        pages = range(-(-size // page_size))
    fd = os.open(path, os.O_RDONLY)
    try:
        def digest(page: int) -> str:
            start, end = page * page_size, min((page + 1) * page_size, size)
            h, buffer = hashlib.sha256(), memoryview(bytearray(min(CHUNK, max(end - start, 1))))
            while start < end:
                got = os.preadv(fd, [buffer[:min(len(buffer), end - start)]], start)
                if not got:
                    break
                h.update(buffer[:got])
                start += got
            return h.hexdigest()

        with ThreadPoolExecutor(max(1, min(len(pages), os.cpu_count() or 1, MAX_THREADS))) as pool:
            return list(pool.map(digest, pages))
    finally:
        os.close(fd)


def check_integrity(beton: BetonFile, manifest: dict, split: str, verify: str = "pages",
                    records: np.ndarray | None = None) -> None:
    """Refuse, with one line, a split whose file differs from what was converted (see the module docstring).
    `records`: the records the loader will read (None: all of them)."""
    if verify not in VERIFY_MODES:
        raise UserError(f"data.verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
    if verify == "off":
        return
    entry, path = manifest["splits"][split], beton.path
    again = _convert_again(path.parent, manifest)
    expected = entry.get("page_sha256")
    if expected is None:
        _check_whole(beton, entry, verify, again)
        return
    page_size = beton.page_size
    count = -(-path.stat().st_size // page_size)
    if len(expected) != count:
        raise UserError(f"{path} has {count:,} pages of {page_size:,} bytes but its manifest holds checksums for "
                        f"{len(expected):,}; the file changed since it was converted: {again}")
    record_page = beton.pointers() // page_size
    if verify == "full" or records is None:
        pages = np.arange(count)
    else:  # the pages holding no record (header, metadata, allocation table) and those of `records`
        held = np.zeros(count, dtype=bool)
        held[record_page] = True
        pages = np.union1d(np.flatnonzero(~held), np.unique(record_page[records]))
    for page, found in zip(pages.tolist(), page_checksums(path, page_size, pages.tolist())):
        if found != expected[page]:
            raise UserError(f"{path}: page {page} of {count} ({_holds(record_page, page)}; bytes "
                            f"{page * page_size:,} to {min((page + 1) * page_size, path.stat().st_size) - 1:,}) "
                            f"is not the page that was converted (its sha256 differs from the manifest's): the file "
                            f"changed since; {again}")


def _holds(record_page: np.ndarray, page: int) -> str:
    """What page `page` holds, in words."""
    inside = np.flatnonzero(record_page == page)
    if len(inside):
        return f"records {int(inside[0]):,} to {int(inside[-1]):,}"
    if not len(record_page) or page < int(record_page.min()):
        return "the header and each record's label, size and place"
    return "the allocation table"


def _check_whole(beton: BetonFile, entry: dict, verify: str, again: str) -> None:
    """A file converted without page checksums: its size was checked; under "full", its sha256 too."""
    path = beton.path
    if verify == "full" and isinstance(entry.get("sha256"), str):
        if sha256_file(path) != entry["sha256"]:
            raise UserError(f"{path} is not the file that was converted (its sha256 differs from the manifest's): "
                            f"it changed since; {again}")
        return
    if path in _noted:
        return
    _noted.add(path)
    checked = "its size alone is checked" if verify == "pages" else "it has no sha256 either: only its size is checked"
    warnings.warn(f"{path} was converted without page checksums, so {checked} when training starts; "
                  f"data.verify = \"full\" checks its sha256, or {again} to get them", UserWarning, stacklevel=3)


def _convert_again(data_dir: Path, manifest: dict) -> str:
    """What to run: the conversion command with --force, from what the manifest says it was converted from."""
    dataset, source = manifest.get("dataset"), manifest.get("source")
    src = source.get("path") if isinstance(source, dict) else None
    if not (isinstance(dataset, str) and isinstance(src, str)):
        return CONVERT_AGAIN
    return (f"{CONVERT_AGAIN} (beton-convert {dataset} --src {src} --out {data_dir.parent} --name {data_dir.name} "
            "--force, with the options its manifest lists)")
