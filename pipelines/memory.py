"""Data already in memory (the Python API's): arrays, tensors or torchvision-style datasets -> `Split`s that the
tensor backend holds on the device, with no .beton written.

Every form becomes what a converted dataset holds: uint8 (N, H, W, C) images and int64 labels, the training
split's per-channel mean/std and, on request, a stratified seeded val split carved out of train, each computed
by the converter's own functions, so a run on in-memory data sees what it would see after `beton-convert`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from beton_trainer.common.errors import UserError
from beton_trainer.format.dataset import Split, load_manifest, open_split
from beton_trainer.format.splits import SplitData, carve_val, channel_stats

__all__ = ["MEMORY", "as_images", "data_splits", "folder_splits"]

MEMORY = Path("<memory>")  # the data path an in-memory run records
CHANNELS = (1, 3)
SPLITS = ("train", "val", "test")
LAYOUT_HINT = "pass uint8 (N, H, W, C) or float (N, C, H, W) in [0, 1] with C = 1 or 3"


def as_images(images: Any, what: str) -> np.ndarray:
    """uint8 (N, H, W, C) from uint8 NHWC/NCHW or float NCHW/NHWC in [0, 1] (arrays or tensors; (N, H, W) is
    one channel). Floats are rounded to the nearest of 256 levels, exactly what ToTensor made of uint8 pixels."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu()
        images = (images.float() if images.is_floating_point() else images).numpy()
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or len(x) == 0 or not (x.shape[3] in CHANNELS or x.shape[1] in CHANNELS):
        raise UserError(f"{what} images have shape {list(x.shape)}; {LAYOUT_HINT}")
    if x.dtype != np.uint8 and x.dtype.kind != "f":
        raise UserError(f"{what} images are {x.dtype}; {LAYOUT_HINT}")
    channels_last = x.shape[3] in CHANNELS and (x.dtype == np.uint8 or x.shape[1] not in CHANNELS)
    if not channels_last:
        x = x.transpose(0, 2, 3, 1)
    if x.dtype == np.uint8:
        return np.require(x, requirements=["C", "W"])  # a copy only if it is read-only or strided
    lo, hi = float(x.min()), float(x.max())
    if not (lo >= 0 and hi <= 1):  # NaN fails too
        raise UserError(f"{what} images are floats in [{lo:.3g}, {hi:.3g}]; pass them in [0, 1] as ToTensor gives "
                        "them (before any Normalize: the loader normalizes with the training split's mean and std) "
                        "or as uint8")
    return np.ascontiguousarray(np.rint(x * 255).astype(np.uint8))


def as_labels(labels: Any, count: int, what: str) -> np.ndarray:
    """int64 (N,) class indices."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.shape != (count,) or y.dtype.kind not in "iu" or (count and y.min() < 0):
        raise UserError(f"{what} labels are {y.dtype}{list(y.shape)}; pass {count} class indices 0..K-1, one per "
                        "image")
    return y.astype(np.int64)


def _sample(image: Any) -> np.ndarray:
    """One dataset image as an array: PIL as (H, W[, C]), tensors in their own (C, H, W) layout."""
    if isinstance(image, Image.Image):
        return np.asarray(image if image.mode in ("L", "RGB") else image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        return (image.float() if image.is_floating_point() else image).numpy()
    return np.asarray(image)


def from_dataset(dataset: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Every (image, label) of a torchvision-style dataset (len() and [i]), read once."""
    images, labels = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise UserError(f"{what}[{i}] is a {type(item).__name__}, not an (image, label) pair; pass a dataset "
                            "whose items are (PIL image or tensor, class index)")
        images.append(_sample(item[0]))
        labels.append(int(item[1]))
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise UserError(f"{what} holds images of {len(shapes)} shapes (e.g. {sorted(shapes)[:2]}); give the dataset "
                        "a transform that makes one size (e.g. Resize((32, 32))), or convert the folder with "
                        "`beton-convert imagefolder` and pass that")
    stacked = np.stack(images) if images else np.zeros((0,), np.uint8)
    return as_images(stacked, what), np.asarray(labels, dtype=np.int64)


def split_arrays(value: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """An (images, labels) pair or a torchvision-style dataset -> uint8 NHWC images, int64 labels."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        images = as_images(value[0], what)
        return images, as_labels(value[1], len(images), what)
    if hasattr(value, "__len__") and hasattr(value, "__getitem__"):
        return from_dataset(value, what)
    raise UserError(f"data['{what}'] is a {type(value).__name__}; pass (images, labels) or a torchvision-style "
                    "dataset of (image, label) items")


def _digest(images: np.ndarray, labels: np.ndarray) -> str:
    return hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()


def memory_splits(parts: dict[str, tuple[np.ndarray, np.ndarray]], classes: Sequence[str] | None,
                  val_fraction: float, seed: int) -> dict[str, Split]:
    """Checked `Split`s sharing one manifest (classes, mean/std of train, shape, per-split count and sha256)."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction and "val" in parts:
        raise UserError("the data has a val split and val_fraction is set; pass one of them")
    if val_fraction:
        num_classes = len(classes) if classes else int(parts["train"][1].max()) + 1
        train, val = carve_val(SplitData(*parts["train"]), val_fraction, seed, num_classes)
        parts = {**parts, "train": (train.images, train.labels), "val": (val.images, val.labels)}
    shapes = {name: images.shape[1:] for name, (images, _) in parts.items()}
    if len(set(shapes.values())) > 1:
        raise UserError(f"the splits' images differ in shape ({', '.join(f'{k} {list(v)}' for k, v in shapes.items())}"
                        "); pass images of one size (H, W, C)")
    top = max(int(labels.max()) for _, labels in parts.values() if len(labels))
    classes = list(classes) if classes is not None else [str(c) for c in range(top + 1)]
    if top >= len(classes):
        raise UserError(f"labels go up to {top} but there are {len(classes)} class names; pass one name per class")
    mean, std = channel_stats(parts["train"][0])
    manifest = {"name": "in-memory", "classes": classes, "mean": mean, "std": std,
                "image_shape": list(shapes["train"]),
                "splits": {name: {"count": len(labels), "sha256": _digest(images, labels)}
                           for name, (images, labels) in parts.items()}}
    return {name: Split(name, images, labels, manifest, MEMORY) for name, (images, labels) in parts.items()}


def data_splits(data: dict, val_fraction: float, seed: int) -> dict[str, Split]:
    """The API's dict form: {"train": ..., "test": ..., optional "val": ..., optional "classes": [...]}."""
    unknown = set(data) - {*SPLITS, "classes"}
    missing = {"train", "test"} - set(data)
    if unknown or missing:
        raise UserError(f"data has keys {sorted(map(str, data))}; give 'train' and 'test' (and optionally 'val' and "
                        "'classes'), each split as (images, labels) or a torchvision-style dataset")
    parts = {name: split_arrays(data[name], name) for name in SPLITS if name in data}
    classes = data.get("classes") or getattr(data["train"], "classes", None)
    return memory_splits(parts, classes, val_fraction, seed)


def folder_splits(data_dir: str | Path, val_fraction: float, seed: int) -> dict[str, Split]:
    """A converted dataset read into memory, to carve a val split from its train split."""
    manifest = load_manifest(data_dir)
    if manifest.get("image_shape") is None:
        raise UserError(f"{data_dir} holds images of varied sizes, which cannot be held in memory as one array; "
                        "convert it with --val-fraction instead of passing val_fraction")
    parts = {}
    for name in manifest["splits"]:
        split = open_split(data_dir, name)
        parts[name] = (split.images, split.labels)
    return memory_splits(parts, manifest["classes"], val_fraction, seed)
