"""The DALI backend on CPU-only DALI: exact pixels with an identity spec (RGB and grey), each augmentation's
statistics against the spec, padding semantics equal to the device ops, and seeded, resumable epochs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from beton_trainer.format.dataset import open_split
from beton_trainer.pipelines import build_loader
from beton_trainer.pipelines.augment import crop_at
from beton_trainer.pipelines.base import rank_indices
from tests.loader_helpers import (
    UNIT,
    as_pixels,
    check_identity,
    check_uniform_offsets,
    crop_flip_draws,
    erased_fractions,
    five_sigma,
    options,
    position_images,
    require,
    run_arrays,
)

require("nvidia.dali")
from beton_trainer.pipelines.dali_loader import DaliLoader  # noqa: E402

FULL_CHAIN = {"crop": {"padding": 2, "padding_mode": "reflect"}, "flip": {"p": 0.5},
              "affine": {"degrees": 10, "translate": 0.1, "scale": [0.9, 1.1], "shear": 5},
              "jitter": {"brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.05},
              "erase": {"p": 0.5, "value": "random"}, "mix": {"mixup_alpha": 0.4, "cutmix_alpha": 1.0}}


def test_identity_rgb_eval_and_train(tiny_rgb_data, device):
    split = open_split(tiny_rgb_data, "test")
    check_identity(build_loader("dali", options(tiny_rgb_data, "test", device, train=False)), split, np.arange(200))

    loader = build_loader("dali", options(tiny_rgb_data, "test", device, train=True, seed=5, world_size=2, rank=1))
    assert len(loader) == 1
    for epoch in range(2):
        loader.set_epoch(epoch)
        order = rank_indices(200, epoch=epoch, seed=5, rank=1, world_size=2, train=True, batch_size=64)
        check_identity(loader, split, order)


def test_identity_grey_mnist(mnist_data, device):
    split = open_split(mnist_data, "test")
    opts = options(mnist_data, "test", device, train=False, batch_size=1000, world_size=3, rank=2)
    loader = build_loader("dali", opts)
    check_identity(loader, split, np.arange(2, len(split.labels), 3))


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_crop_and_flip_follow_the_spec(mode, device):
    images, padding, p = position_images(2000), 4, 0.3
    batches = run_arrays(DaliLoader, images, {"crop": {"padding": padding, "padding_mode": mode, "fill": 0},
                                              "flip": {"p": p}}, device)
    pixels = np.concatenate([as_pixels(x, **UNIT) for x, _ in batches])
    dy, dx, flipped = crop_flip_draws(pixels, padding)
    check_uniform_offsets(dy, padding)
    check_uniform_offsets(dx, padding)
    assert abs(flipped.mean() - p) < five_sigma(len(flipped), p)
    # the whole window, border included, is what the device op gives for the same offsets
    source = torch.from_numpy(images).permute(0, 3, 1, 2)
    expected = crop_at(source, torch.from_numpy(dy), torch.from_numpy(dx), padding, mode, 0)
    expected = torch.where(torch.from_numpy(flipped)[:, None, None, None], expected.flip(3), expected)
    np.testing.assert_array_equal(pixels, expected.permute(0, 2, 3, 1).numpy())


def test_erase_rate_area_and_shape(device):
    spec = {"erase": {"p": 0.4, "scale": [0.05, 0.25], "value": 7.0}}
    batches = run_arrays(DaliLoader, position_images(2000), spec, device)
    f = erased_fractions(batches, 7.0)
    erased = f[f > 0]
    assert abs(len(erased) / len(f) - 0.4) < five_sigma(len(f), 0.4)
    assert erased.min() > 0.05 * 0.7 and erased.max() < 0.25 * 1.3  # box sides are rounded to pixels
    assert abs(erased.mean() - 0.15) < 5 * erased.std() / np.sqrt(len(erased)) + 0.01
    x = torch.cat([x for x, _ in batches])
    for mask in (x == 7.0).all(dim=1)[torch.from_numpy(f > 0)][:200]:  # each erased region is one box
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        assert mask.sum() == len(rows) * len(cols) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)


def test_erase_with_random_values_is_standard_noise(device):
    images = position_images(1000)
    batches = run_arrays(DaliLoader, images, {"erase": {"p": 1.0, "value": "random"}}, device)
    x = torch.cat([x for x, _ in batches])
    changed = (x - torch.from_numpy(images).permute(0, 3, 1, 2) / 255).abs() > 1e-4
    noise = x[changed]
    assert changed.float().mean() > 0.05
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02


def test_brightness_factors_span_the_range(device):
    grey = np.full((2000, 8, 8, 3), 100, dtype=np.uint8)
    batches = run_arrays(DaliLoader, grey, {"jitter": {"brightness": 0.4}}, device)
    factors = np.concatenate([as_pixels(x, **UNIT)[:, 0, 0, 0] for x, _ in batches]) / 100
    assert np.all((factors > 0.6 - 0.006) & (factors < 1.4 + 0.006))  # uint8 rounding
    assert factors.min() < 0.62 and factors.max() > 1.38
    assert abs(factors.mean() - 1) < 5 * (0.8 / np.sqrt(12)) / np.sqrt(2000)  # uniform on [0.6, 1.4]
    per_image = torch.cat([x for x, _ in batches]).flatten(1)
    assert torch.equal(per_image.amin(1), per_image.amax(1))  # one factor per image, all pixels alike


def test_mixup_lambda_is_beta_through_the_shared_stage(device):
    alpha = 0.4
    images = position_images(2000)
    batches = run_arrays(DaliLoader, images, {"mix": {"mixup_alpha": alpha}}, device)
    lam = []
    for _, y in batches:
        assert y.shape == (500, 10) and torch.allclose(y.sum(1), torch.ones(500))
        top2 = y.topk(2, dim=1).values  # a sample whose partner has its own class reads as unmixed
        lam.append(torch.where(top2[:, 1] > 0, top2[:, 0], torch.ones(500)))
    lam = torch.cat(lam).numpy()
    mixed = lam[lam < 1]
    # the larger weight is max(lam, 1 - lam) for lam ~ Beta(alpha, alpha): compare with a large sample
    reference = np.random.default_rng(0).beta(alpha, alpha, 200_000)
    reference = np.maximum(reference, 1 - reference)
    assert abs(mixed.mean() - reference.mean()) < 5 * reference.std() / np.sqrt(len(mixed))
    assert abs(np.mean(mixed > 0.9) - np.mean(reference > 0.9)) < five_sigma(len(mixed), np.mean(reference > 0.9))


def test_same_seed_same_batches_and_resume(tiny_rgb_data, device):
    opts = options(tiny_rgb_data, "train", device, train=True, spec=FULL_CHAIN, seed=7, label_smoothing=0.1)
    first, second = build_loader("dali", opts), build_loader("dali", opts)
    assert len(first) == 10
    first.set_epoch(1)
    second.set_epoch(1)
    epoch = list(first)
    for (x, y), (x2, y2) in zip(epoch, second, strict=True):
        assert x.shape == (64, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
        assert y.shape == (64, 10) and torch.isfinite(x).all()
        assert torch.equal(x, x2) and torch.equal(y, y2)
    first.set_epoch(2)
    assert not torch.equal(next(iter(first))[0], epoch[0][0])
    second.set_epoch(1, start_batch=6)
    resumed = list(second)
    assert len(resumed) == 4
    for (x, y), (x_ref, y_ref) in zip(resumed, epoch[6:], strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_full_chain_on_grey_images(device):
    digits = np.random.default_rng(0).integers(0, 256, (600, 28, 28, 1), dtype=np.uint8)
    opts = options(Path("."), "train", device, train=True, spec=FULL_CHAIN, batch_size=200)
    loader = DaliLoader.from_arrays(digits, np.arange(600) % 10, mean=[0.5], std=[0.25], num_classes=10,
                                    options=opts)
    batches = list(loader)
    assert len(batches) == 3
    assert all(x.shape == (200, 1, 28, 28) and torch.isfinite(x).all() for x, _ in batches)
