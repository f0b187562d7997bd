"""The textbook loader, as a reference point: a Dataset of PIL images, torchvision transforms per sample in
DataLoader workers, MixUp/CutMix per batch in the collate function.

Benchmarks compare the device backends with it, and tests check that the device ops agree with its
statistics. It follows the same spec and the same order (`rank_indices`), with two documented
differences that come from torchvision itself: MixUp/CutMix draw one lambda per batch (torchvision v2)
where the device op draws one per sample (timm's 'elem' mode), and augmentation draws come from each
worker's global RNG, so a mid-epoch resume repeats the sample order but not the augmentations.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision import transforms as T
from torchvision.transforms import v2

from beton_trainer.pipelines.augment import AugmentSpec, MixSpec
from beton_trainer.pipelines.base import LoaderOptions, num_batches, rank_indices

PREFETCH_FACTOR = 2  # DataLoader's default: batches each worker keeps ready


class ArrayImageDataset(Dataset):
    """uint8 (N, H, W, C) arrays as PIL images with int labels, the torchvision.datasets way."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: T.Compose):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.images[i]
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        return self.transform(pil), int(self.labels[i])


def sample_transform(spec: AugmentSpec, mean: Sequence[float], std: Sequence[float],
                     shape: tuple[int, int, int]) -> T.Compose:
    """The spec's per-sample stages as torchvision transforms, in the spec's order, for (H, W, C) images."""
    h, w, channels = shape
    rgb = channels == 3
    stages = []
    if spec.crop.active:
        stages.append(T.RandomCrop((h, w), padding=spec.crop.padding, fill=spec.crop.fill,
                                   padding_mode=spec.crop.padding_mode))
    if spec.flip.active:
        stages.append(T.RandomHorizontalFlip(spec.flip.p))
    if spec.affine.active:
        a = spec.affine
        stages.append(T.RandomAffine(a.degrees, translate=(a.translate, a.translate), scale=a.scale,
                                     shear=(-a.shear, a.shear), interpolation=T.InterpolationMode.BILINEAR))
    if spec.jitter.active:
        j = spec.jitter
        stages.append(T.ColorJitter(j.brightness, j.contrast, j.saturation if rgb else 0, j.hue if rgb else 0))
    stages += [T.ToTensor(), T.Normalize(mean, std)]
    if spec.erase.active:
        e = spec.erase
        stages.append(T.RandomErasing(e.p, scale=e.scale, ratio=e.ratio, value=e.value))
    return T.Compose(stages)


class MixCollate:
    """default_collate, then with probability `prob` MixUp or CutMix on the batch (v2, one lambda per batch);
    targets are soft and label-smoothed either way, as with the device op."""

    def __init__(self, spec: MixSpec, num_classes: int, label_smoothing: float):
        mixers, weights = [], []
        if spec.mixup_alpha > 0:
            mixers.append(v2.MixUp(alpha=spec.mixup_alpha, num_classes=num_classes))
            weights.append(1 - spec.switch_prob if spec.cutmix_alpha > 0 else 1.0)
        if spec.cutmix_alpha > 0:
            mixers.append(v2.CutMix(alpha=spec.cutmix_alpha, num_classes=num_classes))
            weights.append(spec.switch_prob if spec.mixup_alpha > 0 else 1.0)
        self.mix = v2.RandomChoice(mixers, p=weights)
        self.prob, self.num_classes, self.smoothing = spec.prob, num_classes, label_smoothing

    def __call__(self, samples: list) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = default_collate(samples)
        if random.random() < self.prob:
            images, targets = self.mix(images, labels)
        else:
            targets = torch.nn.functional.one_hot(labels, self.num_classes).float()
        return images, targets * (1 - self.smoothing) + self.smoothing / self.num_classes


class _EpochOrder(Sampler):
    """This rank's `rank_indices` for the current epoch, from `start` samples in."""

    def __init__(self, options: LoaderOptions, n: int):
        self.options, self.n, self.epoch, self.start = options, n, 0, 0

    def __iter__(self) -> Iterator[int]:
        o = self.options
        order = rank_indices(self.n, epoch=self.epoch, seed=o.seed, rank=o.rank, world_size=o.world_size,
                             train=o.train, batch_size=o.batch_size)
        start, self.start = self.start, 0
        return iter(order[start:].tolist())

    def __len__(self) -> int:
        o = self.options
        if o.train:
            return num_batches(self.n, train=True, rank=o.rank, world_size=o.world_size,
                               batch_size=o.batch_size) * o.batch_size - self.start
        return len(range(o.rank, self.n, o.world_size)) - self.start


class TorchvisionLoader:
    """The baseline behind the `pipelines.base.Loader` interface: batches moved to `options.device`."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, mean: Sequence[float], std: Sequence[float],
                 num_classes: int, options: LoaderOptions):
        spec = options.spec if options.train else AugmentSpec()
        dataset = ArrayImageDataset(images, labels, sample_transform(spec, mean, std, images.shape[1:]))
        self.options = options
        self.order = _EpochOrder(options, len(images))
        self._len = num_batches(len(images), train=options.train, rank=options.rank,
                                world_size=options.world_size, batch_size=options.batch_size)
        collate = MixCollate(spec.mix, num_classes, options.label_smoothing) if spec.mix.active else None
        cuda = options.device.type == "cuda"
        workers = options.num_workers
        self.loader = DataLoader(dataset, batch_size=options.batch_size, sampler=self.order,
                                 num_workers=workers, collate_fn=collate, pin_memory=cuda,
                                 persistent_workers=workers > 0, drop_last=options.train,
                                 prefetch_factor=PREFETCH_FACTOR if workers else None,
                                 generator=torch.Generator().manual_seed(options.seed * 1000 + options.rank))
        self.prefetched_batches = workers * PREFETCH_FACTOR  # ready before the consumer asks (benchmarks say so)

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch's order; the next iteration starts at `start_batch` (later ones at 0)."""
        self.order.epoch, self.order.start = epoch, start_batch * self.options.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        o = self.options
        fmt = torch.channels_last if o.channels_last else torch.contiguous_format
        for images, targets in self.loader:
            yield (images.to(o.device, non_blocking=True, memory_format=fmt),
                   targets.to(o.device, non_blocking=True))


def build_torchvision_loader(options: LoaderOptions) -> TorchvisionLoader:
    """The baseline loader for one converted split (read through the same reading layer as the backends)."""
    from beton_trainer.format.dataset import open_split

    split = open_split(options.data_dir, options.split)
    return TorchvisionLoader(split.images, split.labels, mean=split.mean, std=split.std,
                             num_classes=split.num_classes, options=options)
