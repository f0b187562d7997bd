"""Small synthetic sources in the exact on-disk layouts users have: CIFAR pickles, IDX files, ImageFolder trees.

Each writer returns the pixels it wrote as (N, H, W, C) uint8 arrays, so tests compare converted data
against what was generated, not against the converter's own reading of the files.
"""

from __future__ import annotations

import gzip
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def structured_images(labels: np.ndarray, shape: tuple[int, int, int] = (32, 32, 3), seed: int = 0,
                      noise: float = 20.0) -> np.ndarray:
    """Class-dependent stripes and brightness plus Gaussian noise: learnable, with non-trivial mean and std."""
    h, w, c = shape
    k = np.asarray(labels)[:, None, None, None]
    y, x = np.meshgrid(np.arange(h) / h, np.arange(w) / w, indexing="ij")
    phase = (k % 5 + 1) * x[None, :, :, None] + (k // 5 % 4) * y[None, :, :, None] + np.arange(c) / c
    noise = np.random.default_rng(seed).normal(0, noise, (len(labels), h, w, c))
    pixels = 120 + 6 * (k % 10) + 70 * np.sin(2 * np.pi * phase) + noise
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def balanced_labels(n: int, num_classes: int, seed: int) -> np.ndarray:
    """n labels covering every class about equally, in random order."""
    return np.random.default_rng(seed).permutation(np.arange(n) % num_classes).astype(np.int64)


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) -> the pickles' (N, 3072) rows: R, G, B planes of 32x32 each."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def write_cifar10(root: Path, *, batch_size: int = 20, n_test: int = 20, seed: int = 0) -> dict:
    """`root/cifar-10-batches-py/` with data_batch_1..5, test_batch, batches.meta; returns
    {'folder': Path, 'train': (images, labels), 'test': (images, labels)}."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    result = {"folder": folder}
    for split, n, names in (("train", 5 * batch_size, [f"data_batch_{i}" for i in range(1, 6)]),
                            ("test", n_test, ["test_batch"])):
        labels = balanced_labels(n, 10, seed + len(split))
        images = structured_images(labels, seed=seed + len(split))
        per = n // len(names)
        for b, name in enumerate(names):
            rows = slice(b * per, (b + 1) * per)
            _dump(folder / name, {"batch_label": f"{name} of {len(names)}", "labels": labels[rows].tolist(),
                                  "data": _cifar_rows(images[rows]),
                                  "filenames": [f"img_{i}.png" for i in range(rows.start, rows.stop)]})
        result[split] = (images, labels)
    _dump(folder / "batches.meta", {"num_cases_per_batch": batch_size, "label_names": CIFAR10_CLASSES,
                                    "num_vis": 3072})
    return result


def write_cifar100(root: Path, *, n_train: int = 60, n_test: int = 20, seed: int = 0) -> dict:
    """`root/cifar-100-python/` with train, test, meta; returns {'folder', 'train'/'test': (images, fine, coarse)}."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    result = {"folder": folder}
    for split, n in (("train", n_train), ("test", n_test)):
        fine = balanced_labels(n, 100, seed + len(split))
        coarse = fine // 5  # any fixed fine -> coarse map will do
        images = structured_images(fine, seed=seed + len(split))
        _dump(folder / split, {"filenames": [f"img_{i}.png" for i in range(n)], "batch_label": f"{split} batch",
                               "fine_labels": fine.tolist(), "coarse_labels": coarse.tolist(),
                               "data": _cifar_rows(images)})
        result[split] = (images, fine, coarse)
    _dump(folder / "meta", {"fine_label_names": [f"fine_{i:02d}" for i in range(100)],
                            "coarse_label_names": [f"coarse_{i:02d}" for i in range(20)]})
    return result


def tar_folder(folder: Path, archive: Path) -> Path:
    """Pack `folder` (as its own top-level entry) into `archive`; compression follows the suffix."""
    mode = {".gz": "w:gz", ".xz": "w:xz", ".tar": "w"}[archive.suffix]
    with tarfile.open(archive, mode) as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def write_idx(path: Path, array: np.ndarray, *, magic: bytes | None = None,
              dims: tuple[int, ...] | None = None) -> Path:
    """An IDX file of unsigned bytes (gzipped when `path` ends in .gz); magic/dims override the header."""
    header = (magic or bytes([0, 0, 8, array.ndim])) + struct.pack(f">{array.ndim}I", *(dims or array.shape))
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_mnist(folder: Path, *, n_train: int = 30, n_test: int = 10, gz: bool = True, seed: int = 0) -> dict:
    """The four MNIST IDX files with synthetic 28x28 digits; returns {'train'/'test': (images, labels)}."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    result = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        labels = balanced_labels(n, 10, seed + n)
        images = structured_images(labels, (28, 28, 1), seed + n)[..., 0]
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels.astype(np.uint8))
        result[split] = (images, labels)
    return result


def write_imagefolder(root: Path, *, classes: tuple[str, ...] = ("cat", "dog", "frog"),
                      counts: dict[str, int] | None = None, shape: tuple[int, int, int] = (20, 24, 3),
                      seed: int = 0, noise: float = 20.0) -> dict:
    """`root/{train,test}/<class>/NNNN.png` (lossless); returns {split: (images, labels)} in (class, file) order."""
    counts = counts or {"train": 8, "test": 3}
    result = {}
    for split, per_class in counts.items():
        labels = np.repeat(np.arange(len(classes)), per_class)
        images = structured_images(labels, shape, seed + per_class, noise)
        for i, (image, label) in enumerate(zip(images, labels)):
            path = root / split / classes[label] / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
        result[split] = (images, labels)
    return result


def mnist_subset(root: Path, n_train: int, n_test: int) -> dict:
    """Real MNIST read from its IDX files under `root`: the first training and test images, uint8 NHWC, as the
    Python API takes data ({"train": (images, labels), "test": ..., "classes": names})."""
    from beton_trainer.convert.sources import ReadOptions, read_source

    source = read_source("mnist", root / "mnist", ReadOptions())
    train, test = source.splits["train"], source.splits["test"]
    return {"train": (train.images[:n_train], train.labels[:n_train]),
            "test": (test.images[:n_test], test.labels[:n_test]), "classes": source.classes}
