"""Photos of varied sizes through the ffcv, dali and photo backends: random-resized crops at the requested side with
the crop statistics of torchvision's RandomResizedCrop, evaluation centre crops equal to a PIL reference,
progressive resizing between epochs, the device ops after decoding, and the tensor backend's refusal.

The synthetic photos encode each pixel's position in its colour (R = column, G = row, both as a fraction of
the image), so every crop's position, size and flip can be read back off the loader's output. They are
stored as FFCV's mixed mode writes them (some JPEG, some raw pixels), in the converter's layout
(train/test .beton + manifest.json with no image_shape). All tests share one process, so FFCV's numba JIT
is paid once.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageFilter

from beton_trainer.common.errors import UserError
from beton_trainer.format import BetonFile, load_manifest
from beton_trainer.pipelines import build_loader
from beton_trainer.pipelines.base import CENTER_CROP_RATIO, RRC_RATIO, RRC_SCALE, ResolutionSchedule, rank_indices
from tests.loader_helpers import five_sigma, options, require

require("ffcv")

BACKENDS = ["ffcv", "dali", "photo"]
SIZES = [(240, 320), (320, 240), (200, 200), (180, 400), (400, 180), (256, 300), (300, 256), (224, 224)]  # (H, W)
UNIT = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}  # normalize is then / 255: outputs read back as pixels


def coded_photo(h: int, w: int) -> np.ndarray:
    """R and G: the pixel's column and row as fractions of the width and height; B: a smooth texture, so
    that a crop misplaced by a few pixels shows."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r, g = 255 * (x + 0.5) / w, 255 * (y + 0.5) / h
    b = 128 + 60 * np.sin(2 * np.pi * x / 61) * np.sin(2 * np.pi * y / 47)
    return np.stack([r, g, b], axis=-1).round().clip(0, 255).astype(np.uint8)


def write_photo_dataset(folder: Path, counts: dict[str, int]) -> Path:
    """Variable-size photos in the converter's layout, half JPEG (quality 95) and half raw pixels."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    splits = {}
    for s, (split, n) in enumerate(counts.items()):
        records = [(coded_photo(*SIZES[(i + 3 * s) % len(SIZES)]), i % 2) for i in range(n)]
        path = folder / f"{split}.beton"
        image = RGBImageField(write_mode="proportion", compress_probability=0.5, jpeg_quality=95)
        DatasetWriter(str(path), {"image": image, "label": IntField()}, page_size=1 << 21,
                      num_workers=1).from_indexed_dataset(records)
        splits[split] = {"count": n, "bytes": path.stat().st_size}
    manifest = {"format_version": 1, "name": folder.name, "classes": ["a", "b"], "splits": splits,
                "image_shape": None, "storage": "jpg", **UNIT}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = write_photo_dataset(tmp_path_factory.mktemp("photos"), {"train": 48, "test": 16})
    modes = {BetonFile(folder / "train.beton").is_jpeg(i) for i in range(48)}
    assert modes == {True, False}, "the fixture must hold both JPEG and raw records"
    return folder


def photo_options(data: Path, split: str, *, train: bool, resolution: ResolutionSchedule, batch_size: int = 16,
                  spec: dict | None = None):
    # on the CPU whatever the test device: the photo decoders' device paths are not yet under TEST_DEVICE
    cpu = torch.device("cpu")
    return replace(options(data, split, cpu, train=train, spec=spec, batch_size=batch_size), resolution=resolution)


def backend_loader(backend: str, opts):
    if backend == "dali":
        require("nvidia.dali")
    return build_loader(backend, opts)


def to_pixels(images: torch.Tensor, mean, std) -> np.ndarray:
    """Normalized float (B, C, H, W) -> uint8 (B, H, W, C)."""
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return ((images * s + m) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def read_crop(pixels: np.ndarray) -> tuple[float, float, float, float, bool]:
    """From one output crop of a coded photo: (left, top) as fractions of the photo, the crop's width and
    height as fractions, and whether it was flipped. Straight lines fitted to R across the columns and to
    G down the rows; a flip makes R fall."""
    side = pixels.shape[0]
    centres = np.arange(side) + 0.5
    slope_x, at0_x = np.polyfit(centres, pixels[..., 0].mean(axis=0), 1)
    slope_y, at0_y = np.polyfit(centres, pixels[..., 1].mean(axis=1), 1)
    flipped = slope_x < 0
    fw, fh = abs(slope_x) * side / 255, slope_y * side / 255
    left = (at0_x + slope_x * side) / 255 if flipped else at0_x / 255
    return left, at0_y / 255, fw, fh, bool(flipped)


def reference_area_fractions(n: int, seed: int = 0) -> np.ndarray:
    """Area fractions of torchvision's RandomResizedCrop on the same photo sizes (the baseline's sampler)."""
    torch.manual_seed(seed)
    out = []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        _, _, ch, cw = torchvision.transforms.RandomResizedCrop.get_params(torch.empty(3, h, w), RRC_SCALE,
                                                                           RRC_RATIO)
        out.append(ch * cw / (h * w))
    return np.array(out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_crops_are_random_resized_crops(backend, photos):
    side = 64
    loader = backend_loader(backend, photo_options(photos, "train", train=True, spec={"flip": {"p": 0.5}},
                                                   resolution=ResolutionSchedule(train=side)))
    sizes = BetonFile(photos / "train.beton")
    draws = []
    for epoch in range(6):
        loader.set_epoch(epoch)
        order = rank_indices(48, epoch=epoch, seed=0, rank=0, world_size=1, train=True, batch_size=16)
        batches = list(loader)
        assert len(batches) == 3
        for x, y in batches:
            assert x.shape == (16, 3, side, side) and x.dtype == torch.float32
            assert x.is_contiguous(memory_format=torch.channels_last) and y.dtype == torch.int64
        images = torch.cat([x for x, _ in batches])
        assert torch.equal(torch.cat([y for _, y in batches]), torch.from_numpy(order % 2))  # labels follow
        for pixels, i in zip(to_pixels(images, **UNIT), order, strict=True):
            h, w = sizes.image(int(i)).shape[:2]
            draws.append((*read_crop(pixels), w / h))
    left, top, fw, fh, flipped, photo_aspect = map(np.array, zip(*draws))
    area, aspect = fw * fh, fw / fh * photo_aspect
    n = len(area)
    # every crop lies inside its photo, with an area fraction and aspect ratio within the ranges
    assert left.min() > -0.02 and top.min() > -0.02 and (left + fw).max() < 1.02 and (top + fh).max() < 1.02
    assert area.min() > RRC_SCALE[0] * 0.9 and area.max() < 1.02
    assert aspect.min() > RRC_RATIO[0] * 0.96 and aspect.max() < RRC_RATIO[1] * 1.04
    # and they spread over those ranges as torchvision's sampler does
    assert area.min() < 0.15 and area.max() > 0.85 and aspect.min() < 0.8 and aspect.max() > 1.25
    ref = reference_area_fractions(20_000)
    assert abs(area.mean() - ref.mean()) < 5 * ref.std() / math.sqrt(n) + 0.01
    assert abs(np.log(aspect).mean()) < 5 * np.log(aspect).std() / math.sqrt(n)
    assert abs(flipped.mean() - 0.5) < five_sigma(n, 0.5)


def pil_centre_crop(image: np.ndarray, side: int) -> np.ndarray:
    """torchvision's eval transform in PIL: Resize(side / (224/256)) on the shorter side, CenterCrop(side)."""
    img = Image.fromarray(image)
    w, h = img.size
    short = round(side / CENTER_CROP_RATIO)
    size = (short, round(h * short / w)) if w <= h else (round(w * short / h), short)
    img = img.resize(size, Image.BILINEAR)
    left, top = round((size[0] - side) / 2), round((size[1] - side) / 2)
    return np.asarray(img.crop((left, top, left + side, top + side)))


def smooth(image: np.ndarray) -> np.ndarray:
    """A 5x5 box blur: FFCV resizes with OpenCV's INTER_AREA, PIL and DALI with an antialiased bilinear filter,
    and on textured photos the kernels disagree at the finest detail; a misplaced crop still shows."""
    return np.asarray(Image.fromarray(image).filter(ImageFilter.BoxBlur(2)), dtype=np.float64)


def centre_crop_error(got: np.ndarray, want: np.ndarray, shift: int = 0) -> float:
    """Mean absolute difference in uint8 levels of the smoothed crops, at the best of the 9 alignments within
    one pixel (libraries round the half-pixel of the centre differently), after moving `got` by `shift`."""
    g, w = smooth(got), smooth(want)
    n = got.shape[0] - 2 - shift
    inner = g[1 + shift:1 + shift + n, 1 + shift:1 + shift + n]
    return min(np.abs(inner - w[1 + dy:1 + dy + n, 1 + dx:1 + dx + n]).mean() for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def check_centre_crops(backend: str, data: Path, split: str, side: int, limit: int | None = None) -> None:
    manifest = load_manifest(data)
    loader = backend_loader(backend, photo_options(data, split, train=False, batch_size=16,
                                                   resolution=ResolutionSchedule(eval=side)))
    beton = BetonFile(data / f"{split}.beton")
    count = 0
    for b, (x, y) in enumerate(loader):
        assert x.shape[1:] == (3, side, side)
        np.testing.assert_array_equal(y.numpy(), beton.labels()[b * 16:b * 16 + len(y)])
        for k, got in enumerate(to_pixels(x, manifest["mean"], manifest["std"])):
            want = pil_centre_crop(beton.image(b * 16 + k), side)
            error = centre_crop_error(got, want)
            assert error < 4, f"sample {b * 16 + k}: mean difference {error:.2f} from the PIL reference"
            assert centre_crop_error(got, want, shift=4) > 2 * error, "a crop 4 pixels off must show"
            count += 1
        if limit and count >= limit:
            break
    assert count == (limit or len(beton))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side", [64, 160])
def test_eval_centre_crops_equal_a_pil_reference(backend, side, photos):
    check_centre_crops(backend, photos, "test", side)


@pytest.mark.parametrize("backend", BACKENDS)
def test_progressive_resizing_changes_the_side_between_epochs(backend, photos):
    ramp = ResolutionSchedule(eval=48, min_res=32, max_res=96, start_ramp=0, end_ramp=2)  # 32, 64, 96, 96
    train = backend_loader(backend, photo_options(photos, "train", train=True, resolution=ramp))
    test = backend_loader(backend, photo_options(photos, "test", train=False, resolution=ramp))
    for epoch, side in enumerate([32, 64, 96, 96]):
        train.set_epoch(epoch)
        assert {tuple(x.shape) for x, _ in train} == {(16, 3, side, side)}
        test.set_epoch(epoch)
        assert {tuple(x.shape[1:]) for x, _ in test} == {(3, 48, 48)}
    train.set_epoch(1, start_batch=1)  # a mid-epoch resume decodes at that epoch's side
    assert [tuple(x.shape) for x, _ in train] == [(16, 3, 64, 64)] * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_device_ops_run_after_decoding(backend, photos):
    """Erasing, and MixUp/CutMix, from the spec apply to the decoded crops."""
    res = ResolutionSchedule(train=48)
    erase = backend_loader(backend, photo_options(photos, "train", train=True, resolution=res,
                                                  spec={"jitter": {"brightness": 0.2},
                                                        "erase": {"p": 1.0, "value": 5.0}}))
    fractions = torch.cat([(x == 5.0).all(dim=1).float().mean(dim=(1, 2)) for x, _ in erase])  # 5.0: no pixel
    assert len(fractions) == 48 and fractions.min() > 0 and fractions.max() < 0.4
    mix = backend_loader(backend, photo_options(photos, "train", train=True, resolution=res,
                                                spec={"mix": {"mixup_alpha": 0.4, "cutmix_alpha": 1.0}}))
    for x, y in mix:
        assert x.shape == (16, 3, 48, 48) and y.shape == (16, 2)
        torch.testing.assert_close(y.sum(1), torch.ones(16))
        assert ((y > 0.01) & (y < 0.99)).any(), "MixUp/CutMix mixes labels"


def test_tensor_backend_refuses_varied_sizes_in_one_line(photos):
    with pytest.raises(UserError) as info:
        build_loader("tensor", photo_options(photos, "train", train=True, resolution=ResolutionSchedule()))
    message = str(info.value)
    assert "\n" not in message and "varied sizes" in message and "ffcv" in message and "dali" in message
    assert "photo" in message


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_photos_centre_crops_and_training_crops(backend, hymenoptera_data):
    check_centre_crops(backend, hymenoptera_data, "test", 224, limit=32)
    loader = backend_loader(backend, photo_options(hymenoptera_data, "train", train=True, batch_size=32,
                                                   spec={"flip": {"p": 0.5}}, resolution=ResolutionSchedule()))
    x, y = next(iter(loader))
    assert x.shape == (32, 3, 224, 224) and torch.isfinite(x).all() and x.std() > 0.3
    assert y.shape == (32,) and set(y.tolist()) == {0, 1}
