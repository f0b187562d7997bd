"""Decoded images kept in a file, not in memory, so that a photo tree of any size converts in bounded RAM.

An ImageFolder tree must be written in (class, path) order, which a tarball does not read in, and a val split
is carved only once every sample is known; so its decoded pixels wait somewhere between decoding and writing.
Here they wait in one unnamed temporary file beside the output (deleted as soon as it is created: it goes
away with the process, whatever happens), appended to while decoding and read back image by image. Memory
then holds only each image's offset and shape; the page cache holds what the kernel chooses.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import overload

import numpy as np

from beton_trainer.common.errors import UserError

__all__ = ["ImageSpill", "SpilledImages", "image_shapes"]


class ImageSpill:
    """The file: `append` while decoding, then read image k back with `read` (a copy, in any order)."""

    def __init__(self, near: Path) -> None:
        """The file goes in `near`'s nearest existing folder (the output's disk; nothing is created there)."""
        folder = next(p for p in (near.absolute(), *near.absolute().parents) if p.is_dir())
        self._folder = folder
        fd, name = tempfile.mkstemp(prefix=".decoded-", suffix=".spill", dir=folder)
        os.unlink(name)
        self._file = os.fdopen(fd, "w+b")
        self._offsets: list[int] = []
        self._shapes: list[tuple[int, ...]] = []
        self._end = 0
        self._dirty = False  # appended to since the last flush

    def append(self, image: np.ndarray) -> int:
        """Store `image` (uint8); its number, for `read`."""
        self._dirty = True
        try:
            self._file.write(np.ascontiguousarray(image, dtype=np.uint8).data)
        except OSError as exc:  # ENOSPC above all
            raise UserError(f"could not keep the decoded images in {self._folder} ({exc.strerror}): converting a photo "
                            "tree needs free disk of its decoded size there; free some, or use a smaller "
                            "--max-side") from None
        self._offsets.append(self._end)
        self._shapes.append(image.shape)
        self._end += image.size
        return len(self._offsets) - 1

    def read(self, k: int) -> np.ndarray:
        """Positional reads (safe from several threads), not a memory map: mapped pages would count in the
        process's memory while they stay resident."""
        if self._dirty:
            self._file.flush()
            self._dirty = False
        shape = self._shapes[k]
        image = np.empty(shape, dtype=np.uint8)
        if image.size and os.preadv(self._file.fileno(), [image.reshape(-1)], self._offsets[k]) != image.size:
            raise UserError(f"the decoded images kept in {self._folder} came back short (image {k}); check that "
                            "disk, then convert again")
        return image

    def shape(self, k: int) -> tuple[int, ...]:
        return self._shapes[k]

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ImageSpill:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


class SpilledImages(Sequence[np.ndarray]):
    """Some of a spill's images in a given order, read as a list of (H, W, C) arrays would be. Indexing with
    a slice or an index array gives another such view (no pixels read); `shapes` needs no reading either."""

    def __init__(self, spill: ImageSpill, ids: Sequence[int] | np.ndarray) -> None:
        self.spill = spill
        self.ids = np.asarray(ids, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, index: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, index: slice | np.ndarray) -> SpilledImages: ...

    def __getitem__(self, index: int | slice | np.ndarray) -> np.ndarray | SpilledImages:
        if isinstance(index, (slice, np.ndarray, list)):
            return SpilledImages(self.spill, self.ids[index])
        return self.spill.read(int(self.ids[index]))

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self.spill.read(int(k)) for k in self.ids)

    @property
    def shapes(self) -> np.ndarray:
        """(n, 3): each image's height, width and channels."""
        return np.array([self.spill.shape(int(k)) for k in self.ids], dtype=np.int64).reshape(len(self), -1)


def image_shapes(images: np.ndarray | SpilledImages) -> np.ndarray:
    """(n, 3) shapes of a split's images, stacked or spilled, without reading spilled pixels."""
    if isinstance(images, SpilledImages):
        return images.shapes
    return np.tile(images.shape[1:], (len(images), 1))
