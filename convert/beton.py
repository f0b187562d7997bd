"""Write one split to a .beton with ffcv's DatasetWriter, and check that it reads back as the source.

Verification goes through `pipelines.dataset.BetonFile`, the same reader every loader uses, so a file
that passes here is exactly what training will see.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from common.errors import UserError
from convert.sources import SplitData
from pipelines.dataset import BetonFile

VERIFY_SAMPLES = 256


class _Records:
    """The indexable view DatasetWriter reads: (image, label[, coarse_label]) per sample."""

    def __init__(self, split: SplitData):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple:
        record = (self.split.images[i], int(self.split.labels[i]))
        if self.split.coarse_labels is not None:
            record += (int(self.split.coarse_labels[i]),)
        return record


def storage_for(split: SplitData, encode: str) -> str:
    """'ndarray' for single-channel images, else the RGB write mode ('raw' or 'jpg')."""
    return "ndarray" if split.images[0].shape[-1] == 1 else encode


def write_beton(path: Path, split: SplitData, *, encode: str = "raw", quality: int = 90,
                num_workers: int | None = None) -> None:
    """Write `split` to `path` (overwriting it); fields image, label and, when present, coarse_label."""
    from ffcv.fields import IntField, NDArrayField, RGBImageField
    from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter

    shape = split.images[0].shape
    if storage_for(split, encode) == "ndarray":
        image_field = NDArrayField(np.dtype("uint8"), tuple(shape))
    else:
        image_field = RGBImageField(write_mode=encode, jpeg_quality=quality)
    fields = {"image": image_field, "label": IntField()}
    if split.coarse_labels is not None:
        fields["coarse_label"] = IntField()
    # A sample must fit in one page, and a worker that fails makes DatasetWriter wait forever:
    # size pages for the largest image (raw bytes plus room for a JPEG that came out bigger).
    largest = max(im.nbytes for im in split.images) if isinstance(split.images, list) else split.images[0].nbytes
    page_size = max(MIN_PAGE_SIZE, 1 << int(largest + (1 << 16)).bit_length())
    workers = num_workers or max(1, min(os.cpu_count() or 1, 8, len(split) // 1000 + 1))
    writer = DatasetWriter(str(path), fields, page_size=page_size, num_workers=workers)
    writer.from_indexed_dataset(_Records(split), chunksize=256)


def verify_beton(path: Path, split: SplitData, *, quality: int = 90, seed: int = 0) -> None:
    """Reopen `path` and compare it with the source: count, every label, and a sample of images.

    Raw and ndarray images must match pixel for pixel; JPEG ones must decode to the source's shape and be
    byte for byte the JPEG that ffcv's encoder makes of the source pixels.
    """
    from ffcv.fields.rgb_image import encode_jpeg

    beton = BetonFile(path)
    fail = f"verification of {path.name} failed"
    hint = "nothing was written; check free disk space and convert again"
    if len(beton) != len(split):
        raise UserError(f"{fail}: {len(beton)} records instead of {len(split)}; {hint}")
    if not np.array_equal(beton.labels(), split.labels):
        raise UserError(f"{fail}: labels differ from the source; {hint}")
    if split.coarse_labels is not None and not np.array_equal(beton.labels("coarse_label"), split.coarse_labels):
        raise UserError(f"{fail}: coarse labels differ from the source; {hint}")
    n = len(split)
    picks = np.random.default_rng(seed).choice(n, size=min(VERIFY_SAMPLES, n), replace=False)
    for i in sorted({0, n - 1, *picks.tolist()}):
        got, want = beton.image(i), split.images[i]
        if got.shape != want.shape:
            raise UserError(f"{fail}: record {i} has shape {got.shape}, source {want.shape}; {hint}")
        same = (np.array_equal(beton.stored_bytes(i), encode_jpeg(want, quality)) if beton.storage == "jpg"
                else np.array_equal(got, want))
        if not same:
            raise UserError(f"{fail}: record {i} differs from the source image; {hint}")
