"""The torchvision baseline: the loader output contract, and its crop/flip/erase statistics agree with the
device ops of `pipelines.augment`. Also home of the helpers the backend tests share (position-coded
images and the decoding of crop offsets and flips from a loader's output)."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import UserError
from common.schema import from_dict
from pipelines.augment import AugmentSpec
from pipelines.base import LoaderOptions
from pipelines.dataset import open_split
from pipelines.tensor_loader import TensorLoader
from pipelines.torchvision_baseline import TorchvisionLoader, build_torchvision_loader

SIZE = 16  # position-coded images: every pixel names its row and column
UNIT = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # normalize is then just / 255


def options(data_dir: Path, split: str, *, train: bool, spec: dict | None = None, batch_size: int = 64,
            **kw) -> LoaderOptions:
    return LoaderOptions(data_dir=data_dir, split=split, batch_size=batch_size, train=train,
                         spec=from_dict(AugmentSpec, spec or {}), device=torch.device("cpu"), **kw)


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


def check_identity(loader, split, expected_order: np.ndarray) -> None:
    """The loader yields exactly the stored pixels and labels of `expected_order`, in batches."""
    images, labels = zip(*loader)
    assert all(x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last) for x in images)
    assert all(y.dtype == torch.int64 and y.dim() == 1 for y in labels)
    pixels = np.concatenate([as_pixels(x, split.mean, split.std) for x in images])
    assert len(pixels) == len(expected_order)
    np.testing.assert_array_equal(pixels, split.images[expected_order])
    np.testing.assert_array_equal(torch.cat(labels).numpy(), split.labels[expected_order])


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


def run_arrays(loader_cls, images: np.ndarray, spec: dict, *, seed: int = 0, **kw) -> list:
    """One train epoch of `loader_cls.from_arrays`-style construction over in-memory arrays."""
    opts = options(Path("."), "train", train=True, spec=spec, batch_size=500, seed=seed, **kw)
    build = getattr(loader_cls, "from_arrays", loader_cls)
    labels = np.arange(len(images)) % 10
    return list(build(images, labels, **UNIT, num_classes=10, options=opts))


# ---------------------------------------------------------------- the baseline itself


def test_output_contract_on_converted_data(tiny_rgb_data):
    spec = {"crop": {"padding": 4}, "flip": {"p": 0.5}, "jitter": {"brightness": 0.2, "hue": 0.05},
            "erase": {"p": 0.5}, "mix": {"mixup_alpha": 0.2, "cutmix_alpha": 1.0}}
    loader = build_torchvision_loader(options(tiny_rgb_data, "train", train=True, spec=spec, num_workers=2))
    batches = list(loader)
    assert len(batches) == len(loader) == 640 // 64
    for x, y in batches:
        assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert y.shape == (64, 10) and torch.allclose(y.sum(1), torch.ones(64))

    split = open_split(tiny_rgb_data, "test")
    eval_loader = build_torchvision_loader(options(tiny_rgb_data, "test", train=False, world_size=2, rank=1))
    assert len(eval_loader) == 2  # 100 samples on rank 1, batches of 64
    check_identity(eval_loader, split, np.arange(1, 200, 2))


def test_crop_and_flip_statistics_agree_with_device_ops():
    images, padding, p = position_images(2000), 4, 0.3
    spec = {"crop": {"padding": padding}, "flip": {"p": p}}
    draws = {}
    for name, cls in (("baseline", TorchvisionLoader), ("device", TensorLoader)):
        pixels = np.concatenate([as_pixels(x, **UNIT) for x, _ in run_arrays(cls, images, spec, num_workers=0)])
        draws[name] = crop_flip_draws(pixels, padding)
    for dy, dx, flipped in draws.values():
        check_uniform_offsets(dy, padding)
        check_uniform_offsets(dx, padding)
        assert abs(flipped.mean() - p) < five_sigma(len(flipped), p)
    assert abs(draws["baseline"][2].mean() - draws["device"][2].mean()) < 2 * five_sigma(2000, p)


def erased_fractions(batches: list, value: float) -> np.ndarray:
    """Per sample, the fraction of pixels set to the erase `value`."""
    return np.concatenate([(x == value).all(dim=1).float().mean(dim=(1, 2)).numpy() for x, _ in batches])


def test_erase_statistics_agree_with_device_ops():
    images = position_images(2000)
    spec = {"erase": {"p": 0.5, "scale": [0.05, 0.25], "value": 7.0}}  # 7 is no pixel / 255
    fractions = {name: erased_fractions(run_arrays(cls, images, spec, num_workers=0), 7.0)
                 for name, cls in (("baseline", TorchvisionLoader), ("device", TensorLoader))}
    for f in fractions.values():
        erased = f[f > 0]
        assert abs(len(erased) / len(f) - 0.5) < five_sigma(len(f), 0.5)
        assert erased.min() > 0.05 * 0.7 and erased.max() < 0.25 * 1.3  # box sides are rounded to pixels
    means = [f[f > 0].mean() for f in fractions.values()]
    sd = max(f[f > 0].std() for f in fractions.values())
    assert abs(means[0] - means[1]) < 5 * sd * math.sqrt(2 / 900) + 0.01


# ---------------------------------------------------------------- the benchmark built on it


def test_benchmark_smoke_run_writes_csv_and_markdown(tiny_rgb_data, tmp_path):
    from benchmarks.loaders import ALL_BACKENDS, BASELINE, CHAINS, main

    out = tmp_path / "bench.csv"
    assert main(["--smoke", "--device", "cpu", "--data", str(tiny_rgb_data), "--out", str(out)]) == 0
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    ran = [b for b in ALL_BACKENDS if b != "dali" or installed("nvidia.dali")]
    assert {(r["backend"], r["chain"]) for r in rows} == {(b, c) for b in ran for c in CHAINS}
    assert all(float(r["images_per_s"]) > 0 for r in rows)
    assert all(float(r["ratio_vs_torchvision"]) == 1.0 for r in rows if r["backend"] == BASELINE)
    table = out.with_suffix(".md").read_text()
    assert "| chain | torchvision | tensor | ffcv | dali |" in table
    assert "command: python -m benchmarks.loaders --smoke" in table and "torch " in table


def test_benchmark_without_data_names_the_convert_command(tmp_path):
    from benchmarks.loaders import main

    with pytest.raises(UserError, match="python -m convert imagefolder --src"):
        main(["--data", str(tmp_path / "cifar10-jpeg")])
