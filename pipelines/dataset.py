"""The one way every loader backend reads a converted dataset: manifest.json plus `<split>.beton` files.

Records are read straight from the file (header and tables through `ffcv.reader.Reader`, data through
`np.memmap`) so opening a split needs no numba JIT, and the checks here (missing file, truncation,
manifest mismatch) turn silent corruption into one-line errors before any training starts.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from common.errors import UserError

MANIFEST = "manifest.json"
CONVERT_HINT = "create it with `python -m convert <dataset> --src PATH --out DIR`"
JPG_MODE = 0  # ffcv's IMAGE_MODES['jpg']; 'raw' is 1


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


class BetonFile:
    """Random access to the records of one .beton written by `convert` (image, label[, coarse_label]).

    Raises UserError when the file is missing, truncated or not a .beton.
    """

    def __init__(self, path: str | Path):
        from ffcv.fields import NDArrayField, RGBImageField
        from ffcv.reader import Reader
        from ffcv.types import ALLOC_TABLE_TYPE

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"dataset file {self.path} is missing; {CONVERT_HINT}")
        size = self.path.stat().st_size
        corrupt = f"{self.path} is truncated or not a .beton file; convert the dataset again with --force"
        try:
            reader = Reader(str(self.path))
        except Exception:  # numpy/ffcv raise IndexError, ValueError, AssertionError... on garbage
            raise UserError(corrupt) from None
        table_ptr = int(reader.header["alloc_table_ptr"])
        table_bytes = size - table_ptr
        if (table_ptr == 0 or table_bytes < 0 or table_bytes % ALLOC_TABLE_TYPE.itemsize
                or len(reader.metadata) != reader.num_samples):
            raise UserError(corrupt)
        if "image" not in reader.handlers or "label" not in reader.handlers:
            raise UserError(f"{self.path} has fields {reader.field_names}, not image and label; {CONVERT_HINT}")

        self._field = reader.handlers["image"]
        self._meta = reader.metadata
        self._names = reader.field_names
        self.num_samples = int(reader.num_samples)
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        if isinstance(self._field, NDArrayField):
            self.storage = "ndarray"
            self._ptrs = self._column("image").astype(np.int64)
            self._sizes = np.full(self.num_samples, self._field.element_size, dtype=np.int64)
        elif isinstance(self._field, RGBImageField):
            image = self._column("image")
            self._jpg = image["mode"] == JPG_MODE
            self.storage = "jpg" if self._jpg.any() else "raw"
            self._ptrs = image["data_ptr"].astype(np.int64)
            self._hw = np.stack([image["height"], image["width"]], axis=1).astype(np.int64)
            self._sizes = self._allocated_sizes(reader.alloc_table, corrupt)
        else:
            raise UserError(f"{self.path}: unsupported image field {type(self._field).__name__}; {CONVERT_HINT}")
        if self.num_samples and int((self._ptrs + self._sizes).max()) > table_ptr:
            raise UserError(corrupt)

    def _column(self, name: str) -> np.ndarray:
        return self._meta[f"f{self._names.index(name)}"]

    def _allocated_sizes(self, table: np.ndarray, corrupt: str) -> np.ndarray:
        """Each image's byte count, looked up in the allocation table by its data pointer."""
        order = np.argsort(table["ptr"])
        ptrs, sizes = table["ptr"][order].astype(np.int64), table["size"][order].astype(np.int64)
        where = np.searchsorted(ptrs, self._ptrs)
        if np.any(where >= len(ptrs)) or np.any(ptrs[np.minimum(where, len(ptrs) - 1)] != self._ptrs):
            raise UserError(corrupt)
        return sizes[where]

    def __len__(self) -> int:
        return self.num_samples

    def labels(self, name: str = "label") -> np.ndarray:
        """An integer field (label, coarse_label) as an int64 array."""
        return np.asarray(self._column(name), dtype=np.int64).copy()

    def has_field(self, name: str) -> bool:
        return name in self._names

    def stored_bytes(self, i: int) -> np.ndarray:
        """Sample i's image exactly as stored (pixels, or JPEG bytes): a read-only view into the file."""
        return self._data[self._ptrs[i]:self._ptrs[i] + self._sizes[i]]

    def is_jpeg(self, i: int) -> bool:
        """Whether sample i is stored as JPEG bytes (else as pixels; a mixed-mode file holds both)."""
        return self.storage != "ndarray" and bool(self._jpg[i])

    def image(self, i: int) -> np.ndarray:
        """Sample i as uint8 (H, W, C); a read-only view into the file for raw and ndarray storage."""
        buf = self.stored_bytes(i)
        if self.storage == "ndarray":
            return buf.reshape(self._field.shape)
        h, w = self._hw[i]
        if self._jpg[i]:
            with Image.open(io.BytesIO(buf.tobytes())) as img:
                return np.asarray(img.convert("RGB"))
        return buf.reshape(h, w, 3)

    def images(self) -> np.ndarray:
        """All samples stacked into one (N, H, W, C) array; they must share one shape."""
        if self.storage == "ndarray":
            shape = tuple(self._field.shape)
        else:
            if self.num_samples and np.any(self._hw != self._hw[0]):
                sizes = np.unique(self._hw, axis=0)
                raise UserError(f"{self.path} holds images of {len(sizes)} sizes (e.g. {sizes[0][0]}x{sizes[0][1]} and "
                                f"{sizes[-1][0]}x{sizes[-1][1]}), but the tensor loader needs one image size; convert "
                                "again with --max-side N (--force) if they share an aspect ratio, else resize them "
                                "to one size first, or use the ffcv loader")
            shape = (*self._hw[0], 3) if self.num_samples else (0, 0, 3)
        out = np.empty((self.num_samples, *shape), dtype=np.uint8)
        for i in range(self.num_samples):
            out[i] = self.image(i).reshape(shape)
        return out


def load_manifest(data_dir: str | Path) -> dict:
    """The dataset's manifest.json, or a UserError that says how to create it."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    if not path.is_file():
        nested = sorted(p.parent.name for p in data_dir.glob(f"*/{MANIFEST}")) if data_dir.is_dir() else []
        hint = f" (did you mean {data_dir / nested[0]}?)" if len(nested) == 1 else ""
        raise UserError(f"no converted dataset at {data_dir}: {MANIFEST} is missing{hint}; {CONVERT_HINT}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is unreadable ({exc}); convert the dataset again with --force") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != 1 or "splits" not in manifest:
        raise UserError(f"{path} is not a format_version 1 manifest; convert the dataset again with --force")
    return manifest


def open_split(data_dir: str | Path, split: str) -> Split:
    """Open one split, checking the file against the manifest (size and record count; no hashing)."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
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
    coarse = beton.labels("coarse_label") if beton.has_field("coarse_label") else None
    return Split(name=split, images=beton.images(), labels=beton.labels(), manifest=manifest, path=path,
                 coarse_labels=coarse)


def dataset_identity(data_dir: str | Path, manifest: dict | None = None) -> str:
    """A sha256 over what the loaders read from a converted dataset, to tell two copies apart.

    Hashed: the manifest's classes, mean and std, then every split in name order: its record count and
    each record's image as stored (pixels with their shape; JPEG bytes for `--encode jpg`), then its
    labels. Not the file bytes: FFCV's parallel writer lays identical records out differently, so two
    conversions of the same source can differ as files while every record is equal. The converter records it
    in the manifest as `identity` (passing the manifest it is about to write).
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
