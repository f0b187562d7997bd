"""Write one split to a .beton with the project's own writer, and check that it reads back as the source.

Writing goes through `pipelines.beton.write_beton_file` (deterministic: the same source and options give the
same bytes for any --workers) and verification through `pipelines.beton.BetonFile`, the same reader every
loader uses, so a file that passes here is exactly what training will see.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from beton_trainer.common.errors import UserError
from beton_trainer.convert.spill import image_shapes
from beton_trainer.format.beton import BetonFile, encode_jpeg, page_size_for, write_beton_file
from beton_trainer.format.splits import SplitData

__all__ = ["ENCODINGS", "jpeg_plan", "storage_for", "verify_beton", "write_beton"]

VERIFY_SAMPLES = 256
JPEG_MARGIN = 1 << 16  # room in a page for a JPEG that came out bigger than its raw pixels


ENCODINGS = ("raw", "jpg", "mix")  # mix: a seeded fraction JPEG, the rest raw (ffcv-imagenet's 'proportion')


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
    ones as a fixed-shape array. Pages are sized for the largest image (raw bytes plus room for a JPEG
    that came out bigger).
    """
    name = path.name.lstrip(".").split(".")[0]  # train, val or test (written to .<name>.beton.partial)
    if not len(split):
        raise UserError(f"the {name} split is empty: no images to write; check the source")
    int_fields = {"label": split.labels}
    if split.coarse_labels is not None:
        int_fields["coarse_label"] = split.coarse_labels
    largest = int(image_shapes(split.images).prod(axis=1).max())
    with tqdm(total=len(split), desc=f"writing {name}",
              unit=" images", leave=False) as bar:
        write_beton_file(path, split.images, int_fields, jpeg=jpeg, quality=quality, workers=workers,
                         page_size=page_size_for(largest + JPEG_MARGIN), progress=bar.update)


def verify_beton(path: Path, split: SplitData, *, jpeg: np.ndarray, quality: int = 90, seed: int = 0) -> None:
    """Reopen `path` and compare it with the source: count, every label, and a sample of images.

    Raw and ndarray records must match pixel for pixel; JPEG ones (variable sizes included) must have the
    source's shape and be byte for byte the JPEG that `encode_jpeg` makes of the source pixels, so they
    decode exactly as a fresh encoding would, within JPEG's tolerance of the source.
    """
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
        same = (beton.stored_bytes(i).tobytes() == encode_jpeg(want, quality) if jpeg[i]
                else np.array_equal(got, want))
        if not same:
            raise UserError(f"{fail}: record {i} differs from the source image; {hint}")
