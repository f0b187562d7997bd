"""Helpers the loader-backend tests share: loader options on the test device, identity checks, and
position-coded images from which crop offsets and flips can be read back off a loader's output (checked
on the CPU, wherever the loader ran)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.loader_checks import (  # noqa: F401 - re-exported for the tests
    SIZE,
    UNIT,
    as_pixels,
    check_uniform_offsets,
    crop_flip_draws,
    erased_fractions,
    five_sigma,
    installed,
    position_images,
)
from beton_trainer.common.schema import from_dict
from beton_trainer.pipelines.augment import AugmentSpec
from beton_trainer.pipelines.base import LoaderOptions


def options(data_dir: Path, split: str, device: torch.device, *, train: bool, spec: dict | None = None,
            batch_size: int = 64, **kw) -> LoaderOptions:
    return LoaderOptions(data_dir=data_dir, split=split, batch_size=batch_size, train=train,
                         spec=from_dict(AugmentSpec, spec or {}), device=device, **kw)


def require(module: str) -> None:
    """Skip the calling test module when an optional backend is missing; fail instead under
    REQUIRE_BACKENDS=1 (CI installs every backend, so a missing one there is a broken set-up)."""
    if installed(module):
        return
    message = f"{module} is not installed (pip install .[dali-cu13] / ffcv)"
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


