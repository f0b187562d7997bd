"""Write one split to a .beton with ffcv's DatasetWriter, and check that it reads back as the source.

Verification goes through `pipelines.dataset.BetonFile`, the same reader every loader uses, so a file
that passes here is exactly what training will see.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.errors import UserError
from convert.sources import SplitData
from pipelines.dataset import BetonFile

VERIFY_SAMPLES = 256


ENCODINGS = ("raw", "jpg", "mix")  # mix: a seeded fraction JPEG, the rest raw (ffcv-imagenet's 'proportion')


class _Records:
    """The indexable view DatasetWriter reads: (image, label[, coarse_label]) per sample.

    DatasetWriter's workers encode each record right after reading it, in the same process, so the image
    field's write mode is set here, record by record, from the seeded `jpeg` plan (ffcv's own 'proportion'
    mode draws from each worker's unseeded RNG). `verify_beton` checks every sampled record's mode.
    """

    def __init__(self, split: SplitData, image_field: object, jpeg: np.ndarray):
        self.split, self.image_field, self.jpeg = split, image_field, jpeg

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple:
        if self.image_field is not None:
            self.image_field.write_mode = "jpg" if self.jpeg[i] else "raw"
        record = (self.split.images[i], int(self.split.labels[i]))
        if self.split.coarse_labels is not None:
            record += (int(self.split.coarse_labels[i]),)
        return record


def storage_for(split: SplitData, encode: str) -> str:
    """'ndarray' for single-channel images, else the RGB encoding ('raw', 'jpg' or 'mix')."""
    return "ndarray" if split.images[0].shape[-1] == 1 else encode


def jpeg_plan(n: int, encode: str, compress_probability: float, seed: list[int]) -> np.ndarray:
    """Which of n records to store as JPEG: all (jpg), none (raw), or a seeded random fraction (mix)."""
    if encode == "mix":
        return np.random.default_rng(seed).random(n) < compress_probability
    return np.full(n, encode == "jpg")


def write_beton(path: Path, split: SplitData, *, jpeg: np.ndarray, quality: int = 90, workers: int = 1) -> None:
    """Write `split` to `path` (overwriting it); fields image, label and, when present, coarse_label.

    RGB images are stored raw or as JPEG of `quality` as `jpeg` says, record by record; single-channel
    ones as a fixed-shape array.
    """
    from ffcv.fields import IntField, NDArrayField, RGBImageField
    from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter

    shape = split.images[0].shape
    if shape[-1] == 1:
        image_field, rgb_field = NDArrayField(np.dtype("uint8"), tuple(shape)), None
    else:
        image_field = rgb_field = RGBImageField(write_mode="raw", jpeg_quality=quality)
    fields = {"image": image_field, "label": IntField()}
    if split.coarse_labels is not None:
        fields["coarse_label"] = IntField()
    # A sample must fit in one page, and a worker that fails makes DatasetWriter wait forever:
    # size pages for the largest image (raw bytes plus room for a JPEG that came out bigger).
    largest = max(im.nbytes for im in split.images) if isinstance(split.images, list) else split.images[0].nbytes
    page_size = max(MIN_PAGE_SIZE, 1 << int(largest + (1 << 16)).bit_length())
    writers = max(1, min(workers, 8, len(split) // 1000 + 1))
    writer = DatasetWriter(str(path), fields, page_size=page_size, num_workers=writers)
    writer.from_indexed_dataset(_Records(split, rgb_field, jpeg), chunksize=256)


def verify_beton(path: Path, split: SplitData, *, jpeg: np.ndarray, quality: int = 90, seed: int = 0) -> None:
    """Reopen `path` and compare it with the source: count, every label, and a sample of images.

    Raw and ndarray records must match pixel for pixel; JPEG ones (variable sizes included) must have the
    source's shape and be byte for byte the JPEG that ffcv's encoder makes of the source pixels, so they
    decode exactly as a fresh encoding would, within JPEG's tolerance of the source.
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
        same = (np.array_equal(beton.stored_bytes(i), encode_jpeg(want, quality)) if jpeg[i]
                else np.array_equal(got, want))
        if not same:
            raise UserError(f"{fail}: record {i} differs from the source image; {hint}")
