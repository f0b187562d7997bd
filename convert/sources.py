"""Read the source formats users have on disk into plain uint8 arrays, validating as we go.

CIFAR pickles (folder or .tar.gz) and MNIST-style IDX files (gzipped or not) become a `SourceData` here,
ImageFolder trees in `convert.imagefolder`: a bad source fails with one line, before anything is written.
"""

from __future__ import annotations

import gzip
import io
import math
import reprlib
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from beton_trainer.common.errors import UserError
from beton_trainer.convert.archive import MAX_FILE_BYTES, Limits, bomb_error, expansion_limit, walk
from beton_trainer.convert.images import DecodeOptions, default_workers
from beton_trainer.convert.unpickle import load_cifar_pickle
from beton_trainer.format.splits import SplitData

__all__ = ["DATASETS", "ReadOptions", "SkipList", "SourceData", "download", "read_source", "source_stem"]

DATASETS = ("cifar10", "cifar100", "mnist", "fashion-mnist", "imagefolder")
SPLITS = ("train", "test")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2")
MNIST_CLASSES = [str(d) for d in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR_FILES = {
    "cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"], "meta": "batches.meta"},
    "cifar100": {"train": ["train"], "test": ["test"], "meta": "meta"},
}
# the most images one file holds: CIFAR-10's six batches 10,000 each, CIFAR-100's train 50,000 and test 10,000
CIFAR_MAX_ROWS = {**{name: 10_000 for name in [*CIFAR_FILES["cifar10"]["train"], *CIFAR_FILES["cifar10"]["test"]]},
                  "train": 50_000, "test": 10_000}
CIFAR_MAX_FILE_BYTES = 256 << 20  # CIFAR-100's train pickle, the largest, is 155 MB
CIFAR_CLASSES = {"label_names": 10, "fine_label_names": 100, "coarse_label_names": 20}  # names each meta key holds
MAX_CLASS_NAME = 200  # characters; CIFAR's longest is 29 ('large_man-made_outdoor_things')
IDX_FILES = {"train": ("train-images", "train-labels"), "test": ("t10k-images", "t10k-labels")}
# torchvision class name and the folder its download leaves the raw files in
TORCHVISION = {"cifar10": ("CIFAR10", "cifar-10-batches-py"), "cifar100": ("CIFAR100", "cifar-100-python"),
               "mnist": ("MNIST", "MNIST/raw"), "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw")}


@dataclass
class SourceData:
    """A whole source dataset, read and validated."""

    dataset: str
    classes: list[str]
    splits: dict[str, SplitData]  # "train", "test" and, from an ImageFolder with val/ and test/, "val"
    coarse_classes: list[str] | None = None
    skipped_files: dict[str, str] = field(default_factory=dict)  # path -> why it was not used
    ignored_files: list[str] = field(default_factory=list)  # hidden files (.DS_Store, ._photo.jpg)
    split_folders: dict[str, str] | None = None  # ImageFolder: split -> the folder it was read from


@dataclass(frozen=True)
class ReadOptions:
    """How to read a source: what to do with bad files, image decoding, workers, archive limits."""

    strict: bool = False
    decode: DecodeOptions = DecodeOptions()
    workers: int = field(default_factory=default_workers)
    limits: Limits = Limits()


class SkipList:
    """Files left out and why; under --strict the first one is an error instead."""

    def __init__(self, src: Path, strict: bool):
        self.src, self.strict, self.files = src, strict, {}

    def __call__(self, path: str, reason: str) -> None:
        if self.strict:
            raise UserError(f"{self.src}: {path} is {reason}; remove it, or drop --strict to skip such files")
        self.files[path] = reason


def read_source(dataset: str, src: Path, options: ReadOptions) -> SourceData:
    """Read `src` as CIFAR or MNIST-style `dataset`; UserError for anything missing, corrupt or of the wrong kind."""
    if not src.exists():
        raise UserError(f"source {src} does not exist; pass --src with the downloaded files (or use --download)")
    skipped = SkipList(src, options.strict)
    if dataset in CIFAR_FILES:
        data = _read_cifar(dataset, src, skipped, options.limits)
    else:
        data = _read_idx_dataset(dataset, src, skipped, options.limits)
    for split, part in data.splits.items():
        if not len(part):
            raise UserError(f"{src}: the {split} split holds no images; pass a source with images in every split")
    data.skipped_files = skipped.files
    return data


def source_stem(src: Path) -> str:
    """`cifar10-jpeg` for `cifar10-jpeg.tar.xz`: the name a dataset gets by default."""
    for suffix in TAR_SUFFIXES:
        if src.name.endswith(suffix):
            return src.name[: -len(suffix)]
    return src.name


def download(dataset: str, root: Path) -> Path:
    """Fetch the dataset with torchvision into `root`; the folder holding its raw files."""
    if dataset not in TORCHVISION:
        raise UserError(f"--download is not available for {dataset}; pass --src with your files")
    import torchvision.datasets

    class_name, folder = TORCHVISION[dataset]
    try:
        getattr(torchvision.datasets, class_name)(str(root), train=True, download=True)
    except (OSError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not download {dataset} ({reason}); fetch the files by hand and pass "
                        "--src PATH (see `beton-convert --help`)") from None
    return root / folder


def _read_files(src: Path, wanted: set[str], skip: SkipList, limits: Limits,
                max_bytes: int) -> tuple[dict[str, bytes], list[str]]:
    """The files named in `wanted` (by base name) from a tarball, or from a folder or its first subfolder
    that has any (torchvision's root layout), and the names seen (for telling what else `src` might be).
    A wanted file over `max_bytes` (more than the format's largest) stops with one line before it is read."""
    def too_big(name: str, size: int) -> UserError:
        return UserError(f"{src}: {name} is {size:,} bytes, more than any such file holds ({max_bytes:,} at most); "
                         "download the dataset again")

    if src.is_file():
        found, seen = {}, []
        for parts, member in walk(src, skip, limits):
            if member is not None:
                seen.append(parts[-1])
                if parts[-1] in wanted and parts[-1] not in found:
                    if member.size > max_bytes:
                        raise too_big(parts[-1], member.size)
                    found[parts[-1]] = member()
        return found, seen
    folders = [src, *sorted(p for p in src.iterdir() if p.is_dir())]
    listing = {folder: {p.name: p for p in folder.iterdir() if p.is_file()} for folder in folders}
    seen = [name for names in listing.values() for name in names]
    for folder in folders:
        if wanted & set(listing[folder]):
            files = {n: p for n, p in listing[folder].items() if n in wanted}
            for name, path in files.items():
                if path.stat().st_size > max_bytes:
                    raise too_big(name, path.stat().st_size)
            return {n: p.read_bytes() for n, p in files.items()}, seen
    return {}, seen


def _wrong_kind(dataset: str, src: Path, missing: str, seen: list[str]) -> UserError:
    """The error for a source that lacks `missing`, naming the dataset it looks like when we can tell."""
    names = set(seen)
    if "data_batch_1" in names or "batches.meta" in names:
        guess = "cifar10"
    elif {"train", "test", "meta"} <= names:
        guess = "cifar100"
    elif any("idx3-ubyte" in n for n in names):
        guess = "mnist (or fashion-mnist)"
    else:
        guess = None
    hint = (f"it looks like {guess} data: run `beton-convert {guess.split()[0]} --src {src} ...`" if guess
            else f"point --src at the folder or archive that holds the {dataset} files")
    return UserError(f"{src} has no {missing}, so it is not a {dataset} source; {hint}")


def _cifar_split(batches: list[tuple[str, dict]], label_keys: list[str], num_classes: list[int]) -> SplitData:
    """Concatenate CIFAR batches: rows of 3072 bytes, R, G, B planes of 32x32, into (N, 32, 32, 3)."""
    images, labels = [], [[] for _ in label_keys]
    for name, batch in batches:
        data = batch.get("data")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise UserError(f"{name}: 'data' is not an N x 3072 uint8 array; download the dataset again")
        if len(data) > CIFAR_MAX_ROWS[name]:
            raise UserError(f"{name}: 'data' holds {len(data):,} images, more than the {CIFAR_MAX_ROWS[name]:,} "
                            "this CIFAR file holds; download the dataset again")
        for key, n, out in zip(label_keys, num_classes, labels):
            out.append(_cifar_labels(batch, key, name, n, len(data)))
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    label_arrays = [np.concatenate(parts) for parts in labels]
    coarse = label_arrays[1] if len(label_arrays) > 1 else None
    return SplitData(np.ascontiguousarray(np.concatenate(images)), label_arrays[0], coarse)


def _shown(value: object) -> str:
    """A value from a pickle, shortened to a few dozen characters at a cost that does not grow with it."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    return reprlib.repr(value)


def _cifar_labels(batch: dict, key: str, name: str, num_classes: int, count: int) -> np.ndarray:
    """A batch's labels as int64: a list (or integer array) of `count` integers in [0, num_classes), else one line
    naming the file and the first bad label. Nothing is converted before it is checked: numpy would truncate 0.9
    to class 0, and raise on 2**70, 'a' or None."""
    if key not in batch:
        raise UserError(f"{name} has no '{key}'; download the dataset again")
    values = batch[key]
    if isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype.kind in "iu":
        values = values.tolist()
    if not isinstance(values, list):
        raise UserError(f"{name}: '{key}' is {_shown(values)}, not a list of labels; download the dataset again")
    if len(values) != count:
        raise UserError(f"{name}: '{key}' has {len(values)} labels in [0, {num_classes}) expected for "
                        f"{count} images; download the dataset again")
    for i, value in enumerate(values):
        if type(value) is not int or not 0 <= value < num_classes:  # not bool, float or str
            raise UserError(f"{name}: '{key}'[{i}] is {_shown(value)}, not a class index in "
                            f"[0, {num_classes}); download the dataset again")
    return np.array(values, dtype=np.int64)


def _class_names(meta: dict, key: str, name: str) -> list[str]:
    """The class names of a CIFAR meta file: exactly as many as the dataset has, each a short string."""
    names, count = meta.get(key), CIFAR_CLASSES[key]
    if not isinstance(names, list) or len(names) != count:
        found = f"{len(names)} names" if isinstance(names, list) else "no list"
        raise UserError(f"{name}: '{key}' holds {found}, not the {count} class names of this dataset; download "
                        "the dataset again")
    for i, label in enumerate(names):
        if not isinstance(label, str) or not 0 < len(label) <= MAX_CLASS_NAME:
            raise UserError(f"{name}: '{key}'[{i}] is {_shown(label)}, not a class name of 1 to "
                            f"{MAX_CLASS_NAME} characters; download the dataset again")
    return names


def _read_cifar(dataset: str, src: Path, skip: SkipList, limits: Limits) -> SourceData:
    layout = CIFAR_FILES[dataset]
    names = [*layout["train"], *layout["test"], layout["meta"]]
    found, seen = _read_files(src, set(names), skip, limits, CIFAR_MAX_FILE_BYTES)
    missing = [n for n in names if n not in found]
    if missing:
        raise _wrong_kind(dataset, src, ", ".join(missing), seen)
    meta = load_cifar_pickle(found[layout["meta"]], layout["meta"])
    name_keys = ["label_names"] if dataset == "cifar10" else ["fine_label_names", "coarse_label_names"]
    label_keys = ["labels"] if dataset == "cifar10" else ["fine_labels", "coarse_labels"]
    class_lists = [_class_names(meta, key, layout["meta"]) for key in name_keys]
    splits = {}
    for split in SPLITS:
        with tqdm(layout[split], desc=f"reading {split}") as names:  # `with`: errors start on a fresh line
            batches = [(n, load_cifar_pickle(found[n], n)) for n in names]
        splits[split] = _cifar_split(batches, label_keys, [len(c) for c in class_lists])
    return SourceData(dataset, class_lists[0], splits, coarse_classes=class_lists[1] if dataset == "cifar100" else None)


def _parse_idx(data: bytes, name: str, ndim: int, limits: Limits) -> np.ndarray:
    """An IDX file of unsigned bytes (magic 0x0000 08 ndim, big-endian dims), checked against its size.

    A gzipped file is decompressed as a stream, only as far as its header's size and never past
    --max-expansion, so a small .gz that expands to gigabytes stops with one line instead of filling memory.
    """
    header_bytes = 4 + 4 * ndim
    stream = gzip.GzipFile(fileobj=io.BytesIO(data)) if data[:2] == b"\x1f\x8b" else None

    def read(size: int) -> bytes:
        try:
            return stream.read(size)
        except (OSError, EOFError, zlib.error):
            raise UserError(f"{name} is a damaged gzip file; download it again") from None

    header = read(header_bytes) if stream else data[:header_bytes]
    if len(header) < header_bytes or header[:3] != b"\x00\x00\x08" or header[3] != ndim:
        raise UserError(f"{name} does not start with the IDX magic for {ndim}-d unsigned bytes "
                        f"(got {header[:4].hex()}); pass the original MNIST-format files")
    dims = struct.unpack(f">{ndim}I", header[4:])
    if 0 in dims:
        raise UserError(f"{name}: its header says {' x '.join(map(str, dims))}, no data; pass a file that holds "
                        "items (download it again)")
    expected = header_bytes + math.prod(dims)  # Python integers: no overflow
    if stream is None:
        body, size = memoryview(data)[header_bytes:], str(len(data))  # a view: no copy
    else:
        if expected > expansion_limit(len(data), limits):
            raise bomb_error(f"{name} (its header claims {dims[0]:,} items)", len(data), limits)
        body = read(expected - header_bytes + 1)  # one byte more: data past the header's size shows
        size = f"{header_bytes + len(body)}" if len(body) < expected - header_bytes + 1 else "more"
    if header_bytes + len(body) != expected:
        raise UserError(f"{name}: header says {dims[0]} items ({expected} bytes) but the file has {size} "
                        "bytes (truncated or damaged); download it again")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _read_idx_dataset(dataset: str, src: Path, skip: SkipList, limits: Limits) -> SourceData:
    variants = {stem: [f"{stem}{sep}idx{nd}-ubyte{gz}" for sep in "-." for gz in ("", ".gz")]
                for stems in IDX_FILES.values() for stem, nd in zip(stems, (3, 1))}
    found, seen = _read_files(src, {v for names in variants.values() for v in names}, skip, limits, MAX_FILE_BYTES)
    splits = {}
    for split, (image_stem, label_stem) in IDX_FILES.items():
        arrays = []
        for stem, ndim in ((image_stem, 3), (label_stem, 1)):
            name = next((v for v in variants[stem] if v in found), None)
            if name is None:
                raise _wrong_kind(dataset, src, f"{variants[stem][0]}[.gz]", seen)
            arrays.append(_parse_idx(found[name], name, ndim, limits))
        images, labels = arrays
        if len(images) != len(labels):
            raise UserError(f"{src}: {split} has {len(images)} images but {len(labels)} labels; "
                            "the images and labels files must come from the same download")
        if labels.max(initial=0) >= 10:
            raise UserError(f"{src}: {split} labels go up to {labels.max()}, expected 0-9; not {dataset} data")
        splits[split] = SplitData(images[..., None], labels.astype(np.int64))
    classes = MNIST_CLASSES if dataset == "mnist" else FASHION_CLASSES
    return SourceData(dataset, list(classes), splits)
