"""The augmentation spec and its batched ops: statistics match the spec, single stages match
torchvision / timm, same seed gives the same batch, and the per-batch path has no per-sample loop
or host sync; the ops run on the test device (`--device` / TEST_DEVICE, tests/conftest.py), their inputs
are drawn on the CPU."""

from __future__ import annotations

import colorsys
import gzip
import math
from collections import Counter

import pytest
import torch
import torchvision.transforms.functional as TF
from timm.data.mixup import mixup_target
from torch.utils._python_dispatch import TorchDispatchMode

from beton_trainer.common.errors import UserError
from beton_trainer.common.schema import from_dict
from beton_trainer.pipelines.augment import (
    AffineSpec,
    AugmentSpec,
    EraseSpec,
    EvalTransform,
    JitterSpec,
    MixSpec,
    Normalize,
    TrainTransform,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    affine,
    color_jitter,
    crop_at,
    random_affine,
    random_crop,
    random_erase,
    random_flip,
    select_samples,
    soft_targets,
)


def gen(seed: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    """A seeded generator on `device`: the ops draw on their images' device."""
    return torch.Generator(device).manual_seed(seed)


def five_sigma_binomial(n: int, p: float) -> float:
    return 5 * math.sqrt(p * (1 - p) / n)


def mnist_digits(root, n: int) -> torch.Tensor:
    """The first n real MNIST test digits as uint8 (n, 1, 28, 28)."""
    with gzip.open(root / "mnist" / "t10k-images-idx3-ubyte.gz") as f:
        data = f.read(16 + n * 784)
    return torch.frombuffer(bytearray(data[16:]), dtype=torch.uint8).view(n, 1, 28, 28)


# ---------------------------------------------------------------- spec


def test_spec_from_recipe_tables():
    spec = from_dict(AugmentSpec, {"crop": {"padding": 4, "padding_mode": "reflect"}, "flip": {"p": 0.5},
                                   "erase": {"p": 0.25, "value": "random"}, "mix": {"cutmix_alpha": 1}})
    assert spec.crop.padding == 4 and spec.erase.value == "random" and spec.mix.cutmix_alpha == 1.0
    assert spec.enabled() == ["crop", "flip", "erase", "mix"]
    assert AugmentSpec().enabled() == []
    assert from_dict(AugmentSpec, {"mix": {"mixup_alpha": 0.2, "prob": 0}}).enabled() == []


@pytest.mark.parametrize("table, words", [
    ({"flip": {"p": 1.5}}, ["'flip.p'", "<= 1"]),
    ({"crop": {"padding": -1}}, ["'crop.padding'", ">= 0"]),
    ({"crop": {"padding_mode": "reflct"}}, ["'crop.padding_mode'", "did you mean 'reflect'"]),
    ({"erase": {"scale": [0.5, 0.2]}}, ["'erase.scale'", "low <= high"]),
    ({"erase": {"scale": [0.0, 0.3]}}, ["'erase.scale'", "> 0"]),
    ({"erase": {"scale": [0.1, 1.5]}}, ["'erase.scale'", "<= 1"]),
    ({"erase": {"value": "noise"}}, ["'erase.value'", "noise"]),
    ({"jitter": {"hue": 0.6}}, ["'jitter.hue'", "<= 0.5"]),
    ({"jitter": {"brightness": -0.1}}, ["'jitter.brightness'"]),
    ({"affine": {"scale": [1.2, 0.8]}}, ["'affine.scale'"]),
    ({"mix": {"mixup_alpha": -1}}, ["'mix.mixup_alpha'", ">= 0"]),
    ({"mix": {"switch_prob": 2}}, ["'mix.switch_prob'"]),
    ({"erase": {"scael": [0.1, 0.2]}}, ["'erase.scael'", "did you mean 'scale'"]),
])
def test_bad_values_raise_user_error_naming_the_key(table, words):
    with pytest.raises(UserError) as info:
        from_dict(AugmentSpec, table)
    for word in words:
        assert word in str(info.value)


# ---------------------------------------------------------------- uint8 stages


def position_images(n: int, h: int, w: int) -> torch.Tensor:
    """Channel 0 holds row + 1 and channel 1 col + 1, so every pixel names where it came from."""
    rows = torch.arange(1, h + 1, dtype=torch.uint8)[:, None].expand(h, w)
    cols = torch.arange(1, w + 1, dtype=torch.uint8)[None, :].expand(h, w)
    return torch.stack([rows, cols])[None].expand(n, 2, h, w).contiguous()


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_crop_offsets_uniform_and_equal_to_torchvision(mode, device):
    n, h, w, pad = 3500, 16, 12, 3
    x = position_images(n, h, w).to(device)
    out = random_crop(x, pad, mode, 9, gen(1, device))
    assert out.device.type == device.type
    # the centre pixel is never padding (pad < size / 2): it tells each sample's offset
    dy = out[:, 0, h // 2, w // 2].long() - 1 - h // 2 + pad
    dx = out[:, 1, h // 2, w // 2].long() - 1 - w // 2 + pad
    for offsets in (dy, dx):
        counts = Counter(offsets.tolist())
        assert sorted(counts) == list(range(2 * pad + 1))
        p = 1 / (2 * pad + 1)
        for c in counts.values():
            assert abs(c / n - p) < five_sigma_binomial(n, p)
    assert not torch.equal(dy, dx)  # the two axes are drawn independently
    for i in range(40):
        ref = TF.crop(TF.pad(x[i], pad, fill=9, padding_mode=mode), int(dy[i]), int(dx[i]), h, w)
        assert torch.equal(out[i], ref)


def test_crop_rejects_reflect_padding_larger_than_image(device):
    x = torch.zeros(2, 1, 4, 4, dtype=torch.uint8, device=device)
    zeros = torch.zeros(2, dtype=torch.long, device=device)
    with pytest.raises(UserError, match="padding"):
        crop_at(x, zeros, zeros, 4, "reflect")


@pytest.mark.parametrize("layout", ["odd bytes", "contiguous", "channels-last view"])
def test_flip_rate_and_equal_to_torchvision(layout, device):
    """Per layout: 90-byte samples take torch.where, the others select whole samples as int64 words."""
    n, p = 4000, 0.3
    shape = {"odd bytes": (n, 3, 6, 5), "contiguous": (n, 3, 8, 6), "channels-last view": (n, 8, 6, 3)}[layout]
    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen(2)).to(device)
    if layout == "channels-last view":  # as FFCV's NHWC batches arrive
        x = x.permute(0, 3, 1, 2)
    out = random_flip(x, p, gen(3, device))
    assert out.shape == x.shape and out.stride() == x.flip(3).stride()
    flipped = (out == TF.hflip(x)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert torch.all(flipped ^ kept)
    assert abs(flipped.float().mean().item() - p) < five_sigma_binomial(n, p)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("shape, order", [((5, 3, 8, 8), (0, 1, 2, 3)), ((5, 8, 8, 3), (0, 3, 1, 2)),
                                          ((5, 3, 7, 7), (0, 1, 2, 3)), ((5, 7, 7, 3), (0, 3, 1, 2))])
def test_select_samples_equals_torch_where(dtype, shape, order, device):
    a = torch.randint(0, 256, shape, generator=gen(5)).to(device, dtype).permute(order)
    b = torch.randint(0, 256, shape, generator=gen(6)).to(device, dtype).permute(order)
    mask = torch.tensor([True, False, False, True, True], device=device)
    out = select_samples(mask, a, b)
    assert torch.equal(out, torch.where(mask[:, None, None, None], a, b)) and out.dtype == dtype
    assert torch.equal(select_samples(mask, a.contiguous(), b), torch.where(mask[:, None, None, None], a, b))


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("order", [(0, 1, 2, 3), (0, 3, 1, 2)])
def test_normalize_from_uint8_equals_the_float_formula(channels_last, order, device):
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    x = torch.randint(0, 256, (4, 3, 10, 12) if order == (0, 1, 2, 3) else (4, 10, 12, 3), dtype=torch.uint8,
                      generator=gen(7)).to(device).permute(order)
    normalize = Normalize(mean, std)
    out = normalize.from_uint8(x, channels_last)
    want = (x.cpu().float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(out.cpu(), want, atol=1e-5, rtol=0)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.equal(normalize.from_uint8(x[:, :, :, :5], channels_last), out[:, :, :, :5])  # another width


# ---------------------------------------------------------------- float stages


@pytest.mark.parametrize("ours, theirs, factors", [
    (adjust_brightness, TF.adjust_brightness, (0.0, 0.6, 1.0, 1.7)),
    (adjust_contrast, TF.adjust_contrast, (0.0, 0.6, 1.0, 1.7)),
    (adjust_saturation, TF.adjust_saturation, (0.0, 0.6, 1.0, 1.7)),
    (adjust_hue, TF.adjust_hue, (-0.5, -0.2, 0.0, 0.35)),
])
def test_color_ops_equal_torchvision_for_fixed_factors(ours, theirs, factors, device):
    x = torch.rand(len(factors), 3, 9, 7, generator=gen(4)).to(device)
    out = ours(x, torch.tensor(factors, device=device))
    for i, f in enumerate(factors):
        torch.testing.assert_close(out[i], theirs(x[i], f), atol=2e-6, rtol=0)


def test_jitter_factors_within_ranges(device):
    n = 2000
    spec = JitterSpec(brightness=0.4)
    x = torch.full((n, 3, 4, 4), 0.25, device=device)
    b = color_jitter(x, spec, gen(5, device))[:, 0, 0, 0] / 0.25
    assert 0.6 - 1e-5 <= b.min() < 0.61 and 1.39 < b.max() <= 1.4 + 1e-5
    assert abs(b.mean().item() - 1) < 5 * 0.8 / math.sqrt(12 * n)

    # contrast: pixels 0.3 / 0.5 around mean 0.4 move apart by the factor
    x = torch.full((n, 3, 4, 4), 0.3, device=device)
    x[:, :, :2] = 0.5
    c = color_jitter(x, JitterSpec(contrast=0.5), gen(6, device))
    c = (c[:, 0, 0, 0] - c[:, 0, 3, 0]) / 0.2
    assert 0.5 - 1e-5 <= c.min() < 0.51 and 1.49 < c.max() <= 1.5 + 1e-5

    # hue: a pure colour keeps saturation/value and its hue moves by at most `hue`
    x = torch.tensor([0.8, 0.4, 0.2], device=device)[None, :, None, None].expand(n, 3, 2, 2)
    out = color_jitter(x, JitterSpec(hue=0.1), gen(7, device)).cpu()
    h0 = colorsys.rgb_to_hsv(0.8, 0.4, 0.2)[0]
    shifts = [(colorsys.rgb_to_hsv(*out[i, :, 0, 0].tolist())[0] - h0 + 0.5) % 1 - 0.5 for i in range(n)]
    assert max(map(abs, shifts)) <= 0.1 + 1e-5 and max(shifts) > 0.099 and min(shifts) < -0.099


def test_jitter_on_one_channel_uses_brightness_and_contrast_only(device):
    x = torch.rand(64, 1, 8, 8, generator=gen(8)).to(device)
    assert torch.equal(color_jitter(x, JitterSpec(saturation=0.9, hue=0.4), gen(9, device)), x)
    out = color_jitter(x, JitterSpec(brightness=0.5, contrast=0.5, saturation=0.9, hue=0.4), gen(9, device))
    assert out.shape == x.shape and not torch.equal(out, x)


def test_affine_equals_torchvision_on_real_digits(real_data_root, device):
    x = mnist_digits(real_data_root, 8).to(device).float() / 255
    angle = torch.linspace(-40, 40, 8)
    tx, ty = torch.tensor([0, 3, -2, 1, 0, -4, 2, 0.0]), torch.tensor([1, 0, 2, -3, 0, 1, 0, -1.0])
    scale, shear = torch.linspace(0.8, 1.2, 8), torch.linspace(-20, 20, 8)
    out = affine(x, *(t.to(device) for t in (angle, tx, ty, scale, shear)))
    for i in range(8):
        ref = TF.affine(x[i], float(angle[i]), [int(tx[i]), int(ty[i])], float(scale[i]), [float(shear[i]), 0.0],
                        interpolation=TF.InterpolationMode.BILINEAR)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_affine_rotation_within_degrees_and_uniform(device):
    n, size, degrees = 2000, 33, 30.0
    x = torch.zeros(n, 1, size, size, device=device)
    x[:, :, 15:18, 25:28] = 1  # a blob 10 px right of the centre
    out = random_affine(x, AffineSpec(degrees=degrees), gen(10, device))[:, 0].cpu()
    coords = torch.arange(size, dtype=torch.float32) - size // 2
    mass = out.sum(dim=(1, 2))
    cy = (out.sum(2) * coords).sum(1) / mass
    cx = (out.sum(1) * coords).sum(1) / mass
    angle = torch.rad2deg(torch.atan2(-cy, cx))
    assert angle.abs().max() <= degrees + 1 and angle.abs().max() > degrees - 1
    inner = (angle.abs() < degrees / 2).float().mean().item()
    assert abs(inner - 0.5) < five_sigma_binomial(n, 0.5)


# ---------------------------------------------------------------- erase


def test_erase_rate_area_and_aspect(device):
    n, h, w, p = 4000, 32, 32, 0.5
    spec = EraseSpec(p=p, scale=(0.05, 0.3), ratio=(0.5, 2.0))
    x = torch.ones(n, 3, h, w, device=device)
    mask = (random_erase(x, spec, gen(11, device)) == 0).cpu()
    assert torch.equal(mask[:, :1].expand_as(mask), mask)  # all channels erased together
    mask = mask[:, 0]
    erased = mask.flatten(1).any(1)
    assert abs(erased.float().mean().item() - p) < five_sigma_binomial(n, p)
    m = mask[erased]
    box_h, box_w = m.any(2).sum(1), m.any(1).sum(1)
    assert torch.equal(box_h * box_w, m.flatten(1).sum(1))  # one solid rectangle each
    frac = (box_h * box_w).float() / (h * w)
    rounding = (box_h + box_w + 1).float() / (2 * h * w)  # h, w are rounded to whole pixels
    assert torch.all(frac >= 0.05 - rounding) and torch.all(frac <= 0.3 + rounding)
    assert abs(frac.mean().item() - 0.175) < 5 * 0.25 / math.sqrt(12 * len(frac)) + 0.003
    aspect = box_h.float() / box_w
    assert aspect.min() >= 0.5 * 0.8 and aspect.max() <= 2.0 * 1.25


def test_erase_random_value_is_standard_normal(device):
    x = torch.full((500, 3, 16, 16), 100.0, device=device)
    out = random_erase(x, EraseSpec(p=1.0, value="random"), gen(12, device))
    noise = out[out != 100.0]
    assert noise.numel() > 10_000
    assert abs(noise.mean().item()) < 5 / math.sqrt(noise.numel()) and abs(noise.std().item() - 1) < 0.02


# ---------------------------------------------------------------- mix


def two_class_batch(n: int, device: torch.device, h: int = 8, w: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0 images are all 1.0, class 1 all -1.0; first half class 0, so partners differ."""
    labels = (torch.arange(n, device=device) >= n // 2).long()
    images = (1 - 2 * labels.float())[:, None, None, None].expand(n, 3, h, w).contiguous()
    return images, labels


def mixer(spec: MixSpec, smoothing: float = 0.0) -> TrainTransform:
    return TrainTransform(AugmentSpec(mix=spec), mean=(0.0,), std=(1.0,), num_classes=2,
                          label_smoothing=smoothing, channels_last=False)


@pytest.mark.parametrize("alpha", [0.2, 1.0, 2.0])
def test_mixup_lambda_is_beta(alpha, device):
    n = 4000
    x, y = two_class_batch(n, device)
    out, targets = mixer(MixSpec(mixup_alpha=alpha)).mix(x, y, gen(13, device))
    lam = targets[torch.arange(n, device=device), y]
    torch.testing.assert_close(out, lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * x.flip(0))
    # Beta(a, a): mean 1/2, variance 1/(4(2a+1)), excess kurtosis -6/(2a+3)
    var = 1 / (4 * (2 * alpha + 1))
    fourth = var ** 2 * (3 - 6 / (2 * alpha + 3))
    # the halves pair up (i with n-1-i), so only n/2 draws are independent
    assert abs(lam.mean().item() - 0.5) < 5 * math.sqrt(var / n)
    assert abs(lam.var().item() - var) < 5 * math.sqrt((fourth - var ** 2) / n)


def test_cutmix_box_area_matches_lambda(device):
    n, h, w = 2000, 16, 12
    x, y = two_class_batch(n, device, h, w)
    out, targets = mixer(MixSpec(cutmix_alpha=1.0)).mix(x, y, gen(14, device))
    from_partner = (out[:, 0] == x.flip(0)[:, 0])
    assert torch.all((out == x) | (out == x.flip(0)))  # pasted, never blended
    area = from_partner.flatten(1).sum(1)
    box_h, box_w = from_partner.any(2).sum(1), from_partner.any(1).sum(1)
    assert torch.equal(box_h * box_w, area)
    torch.testing.assert_close(targets[torch.arange(n, device=device), y], 1 - area.float() / (h * w))
    assert area.max() > 0.8 * h * w and (area == 0).float().mean() < 0.1  # Beta(1, 1): boxes of every size


def test_mix_prob_and_switch_prob_rates(device):
    n, prob, switch = 4000, 0.6, 0.3
    x, y = two_class_batch(n, device)
    spec = MixSpec(mixup_alpha=1.0, cutmix_alpha=1.0, prob=prob, switch_prob=switch)
    out, targets = mixer(spec).mix(x, y, gen(15, device))
    lam = targets[torch.arange(n, device=device), y]
    mixed = lam < 1
    assert abs(mixed.float().mean().item() - prob) < five_sigma_binomial(n, prob)
    pasted = ((out == 1) | (out == -1)).flatten(1).all(1) & mixed
    rate = pasted.sum().item() / mixed.sum().item()
    assert abs(rate - switch) < five_sigma_binomial(int(mixed.sum()), switch)
    assert torch.equal(out[~mixed], x[~mixed])


def test_soft_targets_match_timm_with_label_smoothing(device):
    n, classes, smoothing = 64, 10, 0.1
    labels = torch.randint(0, classes, (n,), generator=gen(16)).to(device)
    lam = torch.rand(n, generator=gen(17)).to(device)
    ours = soft_targets(labels, labels.flip(0), lam, classes, smoothing)
    torch.testing.assert_close(ours, mixup_target(labels, classes, lam[:, None], smoothing))
    torch.testing.assert_close(ours.sum(1), torch.ones(n, device=device))
    x, y = two_class_batch(n, device)
    _, targets = mixer(MixSpec(mixup_alpha=0.4), smoothing=smoothing).mix(x, y, gen(18, device))
    torch.testing.assert_close(targets.sum(1), torch.ones(n, device=device))
    assert targets.min() >= smoothing / 2 - 1e-6 and targets.max() <= 1 - smoothing / 2 + 1e-6


# ---------------------------------------------------------------- whole transforms

FULL = {"crop": {"padding": 2, "padding_mode": "reflect"}, "flip": {"p": 0.5},
        "affine": {"degrees": 10, "translate": 0.1, "scale": [0.9, 1.1], "shear": 5},
        "jitter": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.05},
        "erase": {"p": 0.5, "value": "random"}, "mix": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}}
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def full_transform(**kwargs) -> TrainTransform:
    return TrainTransform(from_dict(AugmentSpec, FULL), mean=MEAN, std=STD, num_classes=10, **kwargs)


def batch(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(19)
    return (torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g).to(device),
            torch.randint(0, 10, (n,), generator=g).to(device))


def test_same_seed_same_batch_different_seed_different(device):
    t = full_transform()
    x, y = batch(32, device)
    a, ta = t(x, y, gen(20, device))
    b, tb = t(x, y, gen(20, device))
    c, _ = t(x, y, gen(21, device))
    assert torch.equal(a, b) and torch.equal(ta, tb)
    assert not torch.equal(a, c)


def test_output_layout_dtype_and_targets(device):
    x, y = batch(8, device)
    images, targets = full_transform()(x, y, gen(22, device))
    assert images.device.type == targets.device.type == device.type
    assert images.dtype == torch.float32 and images.is_contiguous(memory_format=torch.channels_last)
    assert targets.shape == (8, 10) and targets.dtype == torch.float32
    plain = TrainTransform(AugmentSpec(), mean=MEAN, std=STD, num_classes=10)
    images, targets = plain(x, y, gen(22, device))
    assert images.is_contiguous(memory_format=torch.channels_last) and torch.equal(targets, y)
    ref = torch.stack([TF.normalize(x[i].float() / 255, MEAN, STD) for i in range(8)])
    torch.testing.assert_close(images, ref)
    images, labels = EvalTransform(mean=MEAN, std=STD)(x, y)
    torch.testing.assert_close(images, ref)
    assert images.is_contiguous(memory_format=torch.channels_last) and torch.equal(labels, y)
    images, _ = EvalTransform(mean=MEAN, std=STD, channels_last=False)(x, y)
    assert images.is_contiguous()
    nhwc = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # FFCV's decoded batches, viewed as NCHW
    images, _ = EvalTransform(mean=MEAN, std=STD, channels_last=False)(nhwc, y)
    assert images.is_contiguous()
    torch.testing.assert_close(images, ref)


class OpLog(TorchDispatchMode):
    """Records every aten op the code under test dispatches."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_per_batch_path_has_no_per_sample_loop_and_no_host_sync(device):
    t = full_transform()
    t(*batch(2, device), gen(23, device))  # the first call caches the normalize constants on the device
    logs = []
    for n in (4, 48):
        x, y = batch(n, device)
        with OpLog() as log:
            t(x, y, gen(23, device))
        logs.append(log.ops)
    assert logs[0] == logs[1]  # the same ops whatever the batch size: nothing loops over samples
    syncing = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.item"}
    assert not syncing & set(logs[0])
