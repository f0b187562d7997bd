"""The one way every loader backend reads a converted dataset: manifest.json plus `<split>.beton` files.

The `.beton` records come through `pipelines.beton.BetonFile` (numpy only: opening a split needs neither
FFCV nor numba). The checks here (a manifest against its schema, a file against its manifest: size, record
count, labels within the classes) turn silent corruption into one-line errors before any training starts,
whichever backend reads the file.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np

from beton_trainer.common.errors import UserError
from beton_trainer.format.beton import CONVERT_HINT, BetonFile
from beton_trainer.format.integrity import check_integrity

__all__ = ["MANIFEST", "Split", "dataset_identity", "load_manifest", "open_beton", "open_split"]

MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    """One split, decoded: all images in memory as one uint8 array, labels as int64."""

    name: str  # "train" | "val" | "test"
    images: np.ndarray  # uint8, (N, H, W, C), C in {1, 3}
    labels: np.ndarray  # int64, (N,)
    manifest: dict
    path: Path  # the .beton
    coarse_labels: np.ndarray | None = None  # CIFAR-100 superclasses, else None

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.manifest["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.manifest["std"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @classmethod
    def in_memory(cls, images: np.ndarray, labels: np.ndarray, *, mean: Sequence[float], std: Sequence[float],
                  num_classes: int, name: str = "train") -> Split:
        """A split from arrays already in memory (tests, benchmarks), without a .beton behind it."""
        manifest = {"classes": [str(i) for i in range(num_classes)], "mean": list(mean), "std": list(std)}
        return cls(name, images, np.asarray(labels, dtype=np.int64), manifest, Path("<memory>"))


def load_manifest(data_dir: str | Path) -> dict:
    """The dataset's manifest.json, checked against `check_manifest`, or a UserError that says how to create it."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    if not path.is_file():
        nested = sorted(p.parent.name for p in data_dir.glob(f"*/{MANIFEST}")) if data_dir.is_dir() else []
        hint = f" (did you mean {data_dir / nested[0]}?)" if len(nested) == 1 else ""
        raise UserError(f"no converted dataset at {data_dir}: {MANIFEST} is missing{hint}; {CONVERT_HINT}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UserError(f"{path} is unreadable ({exc}); convert the dataset again with --force") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != 1 or "splits" not in manifest:
        raise UserError(f"{path} is not a format_version 1 manifest; convert the dataset again with --force")
    check_manifest(path, manifest)
    return manifest


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_manifest(path: Path, manifest: dict) -> None:
    """The one schema of what the loaders read from a manifest: splits (count >= 1, bytes, page_sha256 when
    present), classes (names), mean and std (finite, one per channel, std > 0), image_shape (positive (H, W, C),
    or null for varied sizes; present either way). A manifest that breaks it is refused here, with one line
    naming the key at fault, not mid-training."""
    def refuse(what: str) -> NoReturn:
        raise UserError(f"{path} is damaged: {what}; convert the dataset again with --force")

    splits = manifest["splits"]
    if not isinstance(splits, dict) or not splits:
        refuse(f"'splits' must be a table of splits, got {splits!r:.60}")
    for name, entry in splits.items():
        if name not in SPLITS:
            refuse(f"unknown split '{name:.40}' (splits are {', '.join(SPLITS)})")
        if not isinstance(entry, dict):
            refuse(f"splits.{name} must be a table, got {entry!r:.60}")
        for key, least in (("count", 1), ("bytes", 0)):
            if not _is_int(entry.get(key)) or entry[key] < least:
                refuse(f"splits.{name}.{key} must be an integer of at least {least}, got {entry.get(key)!r:.60}")
        pages = entry.get("page_sha256")
        if pages is not None and not (isinstance(pages, list) and all(isinstance(p, str) and len(p) == 64
                                                                      for p in pages)):
            refuse(f"splits.{name}.page_sha256 must be a list of sha256 digests, got {pages!r:.60}")
    classes = manifest.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        refuse(f"'classes' must be a list of class names, got {classes!r:.60}")
    stats = {key: manifest.get(key) for key in ("mean", "std")}
    for key, values in stats.items():
        if not isinstance(values, list) or len(values) not in (1, 3) or not all(_is_real(v) for v in values):
            refuse(f"'{key}' must be a list of 1 or 3 finite numbers, got {values!r:.60}")
    if "image_shape" not in manifest:
        refuse("'image_shape' is missing (it is (height, width, channels), or null for images of varied sizes)")
    shape = manifest["image_shape"]
    if shape is not None and not (isinstance(shape, list) and len(shape) == 3 and all(_is_int(v) and v > 0
                                                                                      for v in shape)):
        refuse(f"'image_shape' must be (height, width, channels) or null, got {shape!r:.60}")
    if shape is None and manifest.get("storage") == "ndarray":
        refuse("'image_shape' is null (images of varied sizes) but 'storage' is 'ndarray' (arrays of one shape)")
    if shape is not None:  # the images' channels say which of mean and std is wrong
        for key, values in stats.items():
            if len(values) != shape[2]:
                refuse(f"'{key}' has {len(values)} values but 'image_shape' has {shape[2]} channels")
    elif len(stats["mean"]) != len(stats["std"]):
        refuse(f"'mean' has {len(stats['mean'])} values and 'std' {len(stats['std'])}: each needs one per channel")
    if min(stats["std"]) <= 0:
        refuse(f"'std' must be positive, one per channel like 'mean', got {stats['std']!r:.60}")


def open_beton(data_dir: str | Path, split: str, manifest: dict | None = None, *, verify: str = "pages") -> BetonFile:
    """One split's .beton, checked against its manifest before any backend reads it: the file's size, its
    record count, its pages' checksums as `verify` says (`format.integrity`; here for every record: a loader
    that reads fewer passes "off" and checks its own), its JPEG records' headers, its image channels and shape
    and its labels (within the manifest's classes)."""
    data_dir = Path(data_dir)
    manifest = manifest or load_manifest(data_dir)
    splits = manifest["splits"]
    if split not in splits:
        extra = " (convert with --val-fraction F to make a val split)" if split == "val" else ""
        raise UserError(f"{data_dir} has no '{split}' split{extra}; present: {', '.join(sorted(splits))}")
    path = data_dir / f"{split}.beton"
    entry = splits[split]
    if path.is_file() and path.stat().st_size != entry["bytes"]:
        raise UserError(f"{path} is {path.stat().st_size} bytes but the manifest says {entry['bytes']} "
                        "(truncated or replaced); convert the dataset again with --force")
    beton = BetonFile(path)
    if len(beton) != entry["count"]:
        raise UserError(f"{path} holds {len(beton)} records but the manifest says {entry['count']}; "
                        "convert the dataset again with --force")
    check_integrity(beton, manifest, split, verify)
    beton.check_jpeg_headers()
    channels = beton.shape[2] if beton.storage == "ndarray" else 3
    if channels != len(manifest["mean"]):
        raise UserError(f"{path} holds {channels}-channel images but the manifest's mean has "
                        f"{len(manifest['mean'])} values; convert the dataset again with --force")
    _check_image_shape(beton, manifest["image_shape"])
    num_classes = len(manifest["classes"])
    for field, count in (("label", num_classes), ("coarse_label", len(manifest.get("coarse_classes") or []))):
        if not beton.has_field(field):
            continue
        labels = beton.labels(field)
        if len(labels) and (labels.min() < 0 or labels.max() >= count):
            raise UserError(f"{path} has {field}s from {labels.min()} to {labels.max()}, but the manifest names "
                            f"{count} classes; convert the dataset again with --force")
    return beton


def _check_image_shape(beton: BetonFile, shape: list[int] | None) -> None:
    """Every record is the manifest's image_shape; null (varied sizes) only for RGB records, the one kind a
    converter stores in several sizes. The loaders size their output and the model by it."""
    if shape is None:
        if beton.storage == "ndarray":
            raise UserError(f"{beton.path} holds {'x'.join(map(str, beton.shape))} arrays but the manifest's "
                            "image_shape is null (images of varied sizes); convert the dataset again with --force")
        return
    sizes = beton.sizes()
    wrong = np.any(sizes != shape[:2], axis=1)
    if np.any(wrong) or (beton.storage == "ndarray" and list(beton.shape) != shape):
        i = int(np.argmax(wrong))
        found = "x".join(map(str, beton.shape)) if beton.storage == "ndarray" else f"{sizes[i][0]}x{sizes[i][1]}x3"
        raise UserError(f"{beton.path}: record {i} is {found} but the manifest's image_shape is "
                        f"{'x'.join(map(str, shape))}; convert the dataset again with --force")


def open_split(data_dir: str | Path, split: str, verify: str = "pages") -> Split:
    """Open one split, checked by `open_beton`, with every image decoded into memory."""
    manifest = load_manifest(data_dir)
    beton = open_beton(data_dir, split, manifest, verify=verify)
    coarse = beton.labels("coarse_label") if beton.has_field("coarse_label") else None
    return Split(name=split, images=beton.images(), labels=beton.labels(), manifest=manifest, path=beton.path,
                 coarse_labels=coarse)


def dataset_identity(data_dir: str | Path, manifest: dict | None = None) -> str:
    """A sha256 over what the loaders read from a converted dataset, to tell two copies apart.

    Hashed: the manifest's classes, mean and std, then every split in name order: its record count and
    each record's image as stored (pixels with their shape; JPEG bytes for `--encode jpg`), then its
    labels. Not the file bytes: this project's writer is deterministic (a file's sha256, in the manifest, names
    it too), but FFCV's own parallel writer lays identical records out differently, and a dataset written by
    it must still be recognised. The converter records it in the manifest as `identity` (passing the manifest
    it is about to write).
    """
    manifest = manifest or load_manifest(data_dir)
    digest = hashlib.sha256(json.dumps([manifest.get(k) for k in ("classes", "mean", "std")]).encode())
    for split in sorted(manifest["splits"]):
        beton = BetonFile(Path(data_dir) / f"{split}.beton")
        digest.update(f"{split}:{len(beton)}".encode())
        raw = beton.storage != "jpg"
        for i in range(len(beton)):
            if raw:
                digest.update(np.asarray(beton.image(i).shape, dtype=np.int64).tobytes())
            digest.update(beton.stored_bytes(i))
        for field in ("label", "coarse_label"):
            if beton.has_field(field):
                digest.update(beton.labels(field).tobytes())
    return digest.hexdigest()
