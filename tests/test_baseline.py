"""The torchvision baseline: the loader output contract, and its crop/flip/erase statistics agree with the
device ops of `pipelines.augment`."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from benchmarks.torchvision_baseline import TorchvisionLoader, build_torchvision_loader
from beton_trainer.common.errors import UserError
from beton_trainer.format.dataset import open_split
from beton_trainer.pipelines.tensor_loader import TensorLoader
from tests.loader_helpers import (
    UNIT,
    as_pixels,
    check_identity,
    check_uniform_offsets,
    crop_flip_draws,
    erased_fractions,
    five_sigma,
    installed,
    options,
    position_images,
    run_arrays,
)

# ---------------------------------------------------------------- the baseline itself

CPU = torch.device("cpu")  # the torchvision baseline is a host-side DataLoader


def test_output_contract_on_converted_data(tiny_rgb_data):
    spec = {"crop": {"padding": 4}, "flip": {"p": 0.5}, "jitter": {"brightness": 0.2, "hue": 0.05},
            "erase": {"p": 0.5}, "mix": {"mixup_alpha": 0.2, "cutmix_alpha": 1.0}}
    loader = build_torchvision_loader(options(tiny_rgb_data, "train", CPU, train=True, spec=spec, num_workers=2))
    batches = list(loader)
    assert len(batches) == len(loader) == 640 // 64
    for x, y in batches:
        assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert y.shape == (64, 10) and torch.allclose(y.sum(1), torch.ones(64))

    split = open_split(tiny_rgb_data, "test")
    eval_loader = build_torchvision_loader(options(tiny_rgb_data, "test", CPU, train=False, world_size=2, rank=1))
    assert len(eval_loader) == 2  # 100 samples on rank 1, batches of 64
    check_identity(eval_loader, split, np.arange(1, 200, 2))


def test_crop_and_flip_statistics_agree_with_device_ops():
    images, padding, p = position_images(2000), 4, 0.3
    spec = {"crop": {"padding": padding}, "flip": {"p": p}}
    draws = {}
    for name, cls in (("baseline", TorchvisionLoader), ("device", TensorLoader)):
        pixels = np.concatenate([as_pixels(x, **UNIT) for x, _ in run_arrays(cls, images, spec, CPU, num_workers=0)])
        draws[name] = crop_flip_draws(pixels, padding)
    for dy, dx, flipped in draws.values():
        check_uniform_offsets(dy, padding)
        check_uniform_offsets(dx, padding)
        assert abs(flipped.mean() - p) < five_sigma(len(flipped), p)
    assert abs(draws["baseline"][2].mean() - draws["device"][2].mean()) < 2 * five_sigma(2000, p)


def test_erase_statistics_agree_with_device_ops():
    images = position_images(2000)
    spec = {"erase": {"p": 0.5, "scale": [0.05, 0.25], "value": 7.0}}  # 7 is no pixel / 255
    fractions = {name: erased_fractions(run_arrays(cls, images, spec, CPU, num_workers=0), 7.0)
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
    assert all(float(r["images_per_s"]) > 0 and r["epochs"] == "2" for r in rows)  # two whole epochs timed
    assert all(float(r["ratio_vs_torchvision"]) == 1.0 for r in rows if r["backend"] == BASELINE)
    table = out.with_suffix(".md").read_text()
    assert "| chain | torchvision | tensor | ffcv | dali |" in table
    assert "command: python -m benchmarks.loaders --smoke" in table and "torch " in table


def test_benchmark_without_data_names_the_convert_command(tmp_path):
    from benchmarks.loaders import main

    with pytest.raises(UserError, match="python -m convert imagefolder --src"):
        main(["--data", str(tmp_path / "cifar10-jpeg")])
