"""ImageFolder trees, a folder or a tarball: `<root>/train/<class>/*` with `val/` or `test/` (or both) beside it.

The evaluation folder of a train/val tree (ImageNet's layout) becomes the `test` split, so every split name
downstream stays the same; the manifest records which folder each split came from. Files that are not
images are skipped and listed (or refused under --strict); hidden files (.DS_Store, ._photo.jpg) are
ignored and listed. GIFs are skipped, as torchvision's ImageFolder does: they are mostly animations or
placeholders. Decoding runs on a pool of workers; samples are ordered by (class, path), so the output does
not depend on the number of workers, and a folder and its tarball give identical files.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from beton_trainer.common.errors import UserError
from beton_trainer.convert.archive import Member, walk
from beton_trainer.convert.images import decode_in_order, image_signature
from beton_trainer.convert.sources import ReadOptions, SkipList, SourceData
from beton_trainer.convert.spill import ImageSpill, SpilledImages
from beton_trainer.format.splits import SplitData

__all__ = ["GIF_POLICY", "IMAGE_SUFFIXES", "read_imagefolder"]

SPLIT_FOLDERS = ("train", "val", "test")
# torchvision's IMG_EXTENSIONS without .gif; compared in lower case, so .JPG and .JPEG count
IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
GIF_POLICY = ("skipped and listed in skipped_files, as torchvision's ImageFolder ignores .gif "
              "(animations and placeholders); convert a GIF to .png to include it")
LAYOUT = "expected <root>/train/<class>/*.jpg and <root>/val/<class>/*.jpg or test/ (optionally under one folder)"

Key = tuple[str, str, str]  # (split folder, class, path in the source)


def read_imagefolder(src: Path, options: ReadOptions, spill: ImageSpill) -> SourceData:
    """Read an ImageFolder tree, its decoded images into `spill`; UserError for a wrong layout, and files that
    cannot be used are listed."""
    if not src.exists():
        raise UserError(f"source {src} does not exist; pass --src with the folder or tarball of images")
    skipped = SkipList(src, options.strict)
    ignored: list[str] = []
    seen: set[str] = set()  # split folders present, even empty ones
    classes: dict[str, set[str]] = {folder: set() for folder in SPLIT_FOLDERS}
    samples: dict[str, dict[str, list[tuple[str, int]]]] = {folder: {} for folder in SPLIT_FOLDERS}  # path, spill id

    def files() -> Iterator[tuple[Key, bytes | str]]:
        with tqdm(walk(src, skipped, options.limits), desc=f"reading {src.name}", unit=" files") as entries:
            for parts, read in entries:
                key = _in_split(parts)
                path = "/".join(parts)
                if key is None:
                    continue  # outside the split folders (a README, a LICENSE)
                if any(part.startswith(".") for part in key):  # .DS_Store, ._photo.jpg, .ipynb_checkpoints/
                    if read is not None:
                        ignored.append(path)
                    continue
                seen.add(key[0])
                if len(key) >= 2 and (read is None or len(key) >= 3):
                    classes[key[0]].add(key[1])
                if read is None:
                    continue
                suffix = PurePosixPath(path).suffix.lower()
                if len(key) < 3:
                    skipped(path, "not inside a class folder")
                elif suffix == ".gif":
                    skipped(path, "a .gif (not read, as in torchvision's ImageFolder)")
                elif suffix not in IMAGE_SUFFIXES:
                    skipped(path, f"not an image file ({' '.join(IMAGE_SUFFIXES)})")
                else:  # one judged from its first bytes is listed when decoding would have listed it
                    yield (key[0], key[1], path), _unlikely_image(read, options.decode.max_pixels) or read()

    for (folder, cls, path), image in decode_in_order(files(), options.decode, options.workers):
        if isinstance(image, str):
            skipped(path, image)
        else:
            samples[folder].setdefault(cls, []).append((path, spill.append(image)))
    if skipped.files:
        warnings.warn(f"skipped {len(skipped.files)} file(s) that are not usable images in {src} (e.g. "
                      f"{next(iter(skipped.files))}); they are listed in the manifest (use --strict to fail instead)",
                      stacklevel=2)
    folders = _layout(src, seen)
    names = _check_classes(src, classes, samples, folders)
    splits = {split: _split(samples[folder], names, spill) for split, folder in folders.items()}
    return SourceData("imagefolder", names, splits, skipped_files=skipped.files, ignored_files=ignored,
                      split_folders=folders)


SLACK_BYTES = 16 << 20  # metadata beyond the pixels: EXIF, ICC profiles, XMP, embedded previews


def max_image_bytes(max_pixels: int) -> int:
    """The most bytes a file of at most `max_pixels` pixels needs: uncompressed 16-bit RGBA, plus metadata."""
    return 8 * max_pixels + SLACK_BYTES


def _unlikely_image(member: Member, max_pixels: int) -> str | None:
    """Why a file is not read at all (judged from its size and first bytes), or None: a non-image named .jpg,
    or one larger than any image of --max-pixels pixels, would otherwise be read whole into memory first."""
    if member.size > max_image_bytes(max_pixels):
        return (f"{member.size:,} bytes, more than any image of --max-pixels {max_pixels:,} pixels needs "
                f"({max_image_bytes(max_pixels):,}; not read)")
    if member.size and not image_signature(member.head(16)):
        return "not an image PIL can read"  # as decoding it would have said, but from 16 bytes
    return None


def _in_split(parts: tuple[str, ...]) -> tuple[str, ...] | None:
    """The path from its split folder on (`train/ants/1.jpg`), with or without one top-level folder above."""
    if parts[0] in SPLIT_FOLDERS:
        return parts
    if len(parts) > 1 and parts[1] in SPLIT_FOLDERS:
        return parts[1:]
    return None


def _layout(src: Path, seen: set[str]) -> dict[str, str]:
    """Split name -> the folder it is read from: train, and val/ or test/ as the evaluation split."""
    if "train" not in seen:
        raise UserError(f"{src} has no 'train' folder; {LAYOUT}")
    if "val" in seen and "test" in seen:
        return {"train": "train", "val": "val", "test": "test"}
    if "val" in seen or "test" in seen:
        return {"train": "train", "test": "val" if "val" in seen else "test"}
    raise UserError(f"{src} has a 'train' folder but no 'val' or 'test' folder to evaluate on; {LAYOUT}")


def _check_classes(src: Path, classes: dict[str, set[str]], samples: dict[str, dict[str, list]],
                   folders: dict[str, str]) -> list[str]:
    """The sorted class names of train, after checking every used folder has the same, none of them empty."""
    names = classes["train"]
    for folder in folders.values():
        if not classes[folder]:
            raise UserError(f"{src}: split folder '{folder}' has no class folders; {LAYOUT}")
        empty = sorted(c for c in classes[folder] if not samples[folder].get(c))
        if empty:
            raise UserError(f"{src}: class folder {folder}/{empty[0]} has no usable images; add images or remove "
                            "the folder (from every split folder)")
        if classes[folder] != names:
            raise UserError(f"{src}: train and {folder} have different classes (only in train: "
                            f"{sorted(names - classes[folder])}, only in {folder}: {sorted(classes[folder] - names)}); "
                            "every split folder needs the same class folders")
    return sorted(names)


def _split(by_class: dict[str, list[tuple[str, int]]], names: list[str], spill: ImageSpill) -> SplitData:
    """Samples ordered by (class, path), so a folder and its tarball give identical files."""
    ids, labels = [], []
    for label, cls in enumerate(names):
        for _, k in sorted(by_class[cls], key=lambda item: item[0]):
            ids.append(k)
            labels.append(label)
    return SplitData(SpilledImages(spill, ids), np.asarray(labels, dtype=np.int64))
