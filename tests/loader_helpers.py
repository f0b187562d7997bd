"""Helpers the loader-backend tests and the CUDA check (`benchmarks/device/check_cuda.py`) share: loader options on
the test device, identity checks, undoing normalization, position-coded images from which crop offsets and flips
can be read back off a loader's output (checked on the CPU, wherever the loader ran), and five-sigma bounds for
the augmentation statistics."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from beton_trainer.common.schema import from_dict
from beton_trainer.pipelines.augment import AugmentSpec
from beton_trainer.pipelines.base import LoaderOptions
from beton_trainer.pipelines.crop_library import available

SIZE = 16  # position-coded images: every pixel names its row and column
UNIT = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # normalize is then just / 255


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False


def five_sigma(n: int, p: float) -> float:
    return 5 * math.sqrt(p * (1 - p) / n)


def as_pixels(images: torch.Tensor, mean, std) -> np.ndarray:
    """Undo normalize: float (B, C, H, W) -> the uint8 (B, H, W, C) pixels they came from."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    pixels = (images * s + m) * 255
    assert (pixels - pixels.round()).abs().max() < 1e-3, "not an exact normalize of uint8 pixels"
    return pixels.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def position_images(n: int) -> np.ndarray:
    """uint8 (n, SIZE, SIZE, 3): R = 10 * row + 5, G = 10 * col + 5, B = 200 (never 0, the crop's fill)."""
    rows, cols = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    image = np.stack([10 * rows + 5, 10 * cols + 5, np.full_like(rows, 200)], axis=-1).astype(np.uint8)
    return np.repeat(image[None], n, axis=0)


def crop_flip_draws(pixels: np.ndarray, padding: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sample: crop offsets (dy, dx) in [0, 2 * padding] into the padded image, and whether it was
    flipped, read from the centre pixels of position-coded images."""
    c = SIZE // 2
    row = (pixels[:, c, c, 0].astype(int) - 5) // 10
    col = (pixels[:, c, c, 1].astype(int) - 5) // 10
    flipped = pixels[:, c, c + 1, 1] < pixels[:, c, c, 1]
    src_col = np.where(flipped, SIZE - 1 - c, c)  # the crop's column that landed in the centre
    return row - c + padding, col - src_col + padding, flipped


def check_uniform_offsets(offsets: np.ndarray, padding: int) -> None:
    values, counts = np.unique(offsets, return_counts=True)
    assert values.tolist() == list(range(2 * padding + 1))
    p = 1 / (2 * padding + 1)
    assert np.all(np.abs(counts / len(offsets) - p) < five_sigma(len(offsets), p))


def erased_fractions(batches: list, value: float) -> np.ndarray:
    """Per sample, the fraction of pixels set to the erase `value`."""
    return np.concatenate([(x == value).all(dim=1).float().mean(dim=(1, 2)).numpy() for x, _ in batches])


def options(data_dir: Path, split: str, device: torch.device, *, train: bool, spec: dict | None = None,
            batch_size: int = 64, **kw) -> LoaderOptions:
    return LoaderOptions(data_dir=data_dir, split=split, batch_size=batch_size, train=train,
                         spec=from_dict(AugmentSpec, spec or {}), device=device, **kw)


def require(module: str) -> None:
    """Skip the calling test module when an optional backend is missing; fail instead under
    REQUIRE_BACKENDS=1 (CI installs every backend, so a missing one there is a broken set-up)."""
    if not installed(module):
        skip_or_fail(f"{module} is not installed (pip install .[dali-cu13] / ffcv)")


def require_crop_library() -> None:
    """Skip the calling test when the compiled crop decoder is not built; fail instead under REQUIRE_BACKENDS=1."""
    if not available():
        skip_or_fail("the compiled crop decoder is not built (pip install . with a C compiler and libjpeg headers)")


def skip_or_fail(message: str) -> None:
    if os.environ.get("REQUIRE_BACKENDS") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)


def check_identity(loader, split, expected_order: np.ndarray) -> None:
    """The loader yields exactly the stored pixels and labels of `expected_order`, in batches."""
    images, labels = zip(*loader)
    assert all(x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last) for x in images)
    assert all(y.dtype == torch.int64 and y.dim() == 1 for y in labels)
    images, labels = [x.cpu() for x in images], [y.cpu() for y in labels]
    pixels = np.concatenate([as_pixels(x, split.mean, split.std) for x in images])
    assert len(pixels) == len(expected_order)
    np.testing.assert_array_equal(pixels, split.images[expected_order])
    np.testing.assert_array_equal(torch.cat(labels).numpy(), split.labels[expected_order])


def run_arrays(loader_cls, images: np.ndarray, spec: dict, device: torch.device, *, seed: int = 0, **kw) -> list:
    """One train epoch of `loader_cls.from_arrays`-style construction over in-memory arrays, on `device`;
    the batches come back on the CPU."""
    opts = options(Path("."), "train", device, train=True, spec=spec, batch_size=500, seed=seed, **kw)
    build = getattr(loader_cls, "from_arrays", loader_cls)
    labels = np.arange(len(images)) % 10
    batches = list(build(images, labels, **UNIT, num_classes=10, options=opts))
    assert all(x.device.type == y.device.type == device.type for x, y in batches)
    return [(x.cpu(), y.cpu()) for x, y in batches]


