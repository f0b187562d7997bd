"""What every loader backend shares: the options it is built from, the per-rank index plan, and
per-batch random generators.

Every backend (tensor, ffcv, dali) yields `(images, targets)` already on the training device:
images float, normalized, channels-last for 4-D; targets int64 labels, or float soft targets
(N, num_classes) when MixUp/CutMix is on. Randomness is keyed by (seed, epoch, batch, rank), so a
run resumed in the middle of an epoch sees exactly the same batches as one that never stopped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from common.errors import UserError
from pipelines.augment import AugmentSpec, EvalTransform, TrainTransform
from pipelines.dataset import BetonFile, Split, open_split

MIN_RESOLUTION = 8  # the smallest crop side a photo loader makes
RRC_SCALE = (0.08, 1.0)  # RandomResizedCrop: area fraction of the source image
RRC_RATIO = (3 / 4, 4 / 3)  # and aspect ratio (width / height) of the crop
CENTER_CROP_RATIO = 224 / 256  # evaluation: crop side / shorter image side, the ImageNet convention


@dataclass(frozen=True)
class ResolutionSchedule:
    """Crop sides for photos of varied sizes: `train` for training, `eval` for evaluation, and progressive
    resizing as in ffcv-imagenet when max_res > 0 (min_res up to epoch start_ramp, max_res from end_ramp
    on, linear in between rounded to a multiple of 32). Fixed-size data keeps its stored size."""

    train: int = 224
    eval: int = 224
    min_res: int = 0
    max_res: int = 0
    start_ramp: int = 0
    end_ramp: int = 0

    def for_epoch(self, epoch: int) -> int:
        """The training crop side in epoch `epoch` (counted from 0 over all phases)."""
        if not self.max_res:
            return self.train
        if epoch <= self.start_ramp:
            return self.min_res
        if epoch >= self.end_ramp:
            return self.max_res
        frac = (epoch - self.start_ramp) / (self.end_ramp - self.start_ramp)
        return int(np.round((self.min_res + frac * (self.max_res - self.min_res)) / 32)) * 32


@dataclass(frozen=True)
class LoaderOptions:
    """Everything a backend needs to build one split's loader."""

    data_dir: Path
    split: str  # "train" | "val" | "test"
    batch_size: int
    train: bool  # train: shuffle, augment, drop_last; eval: fixed order, normalize only, every sample once
    spec: AugmentSpec
    device: torch.device
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 2
    label_smoothing: float = 0.0  # folded into soft targets when MixUp/CutMix is on
    channels_last: bool = True
    resolution: ResolutionSchedule = ResolutionSchedule()  # photos of varied sizes only
    max_batches: int = 0  # eval: a fixed, seeded, stratified subset of this many batches per rank; 0 = every sample


def varied_sizes(manifest: dict) -> bool:
    """Whether a dataset's images come in more than one size (the converter then records no image_shape)."""
    return manifest.get("image_shape") is None


def model_image_shape(manifest: dict, resolution: ResolutionSchedule) -> tuple[int, int, int]:
    """The (H, W, C) a model is built for: the stored size, or for photos of varied sizes the evaluation crop
    (the model sees other training sides too: every registered CNN pools globally)."""
    if varied_sizes(manifest):
        return (resolution.eval, resolution.eval, 3)
    return tuple(manifest["image_shape"])


class Loader(Protocol):
    """The interface the training loop sees."""

    def __len__(self) -> int:
        """Exact number of batches this rank yields per epoch."""

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch's order; iteration then starts at `start_batch` (for mid-epoch resume)."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def rank_indices(n: int, *, epoch: int, seed: int, rank: int, world_size: int, train: bool,
                 batch_size: int) -> np.ndarray:
    """The sample indices this rank visits this epoch, in order.

    Train: one seeded permutation of all n samples per epoch, cut to a multiple of
    world_size * batch_size (drop_last), dealt to ranks in disjoint contiguous blocks.
    Eval: indices rank, rank + world_size, ... (no padding, so every sample is counted once).
    """
    if not train:
        return np.arange(rank, n, world_size, dtype=np.int64)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    per_rank = (n // (world_size * batch_size)) * batch_size
    return order[rank * per_rank:(rank + 1) * per_rank]


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """`size` sample indices (sorted), drawn from each class in proportion to its count (largest remainders) by
    a generator seeded with `seed` alone: the same subset on every rank and every epoch. Splits are stored
    class by class, so the first `size` records would cover only the first class or two."""
    labels = np.asarray(labels)
    if size >= len(labels):
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * size / len(labels)
    take = np.floor(exact).astype(np.int64)
    take[np.argsort(take - exact, kind="stable")[:size - take.sum()]] += 1
    rng = np.random.default_rng([seed, 0x5EB5E7])  # its own stream, apart from the training permutations'
    chosen = [rng.choice(np.flatnonzero(labels == c), k, replace=False) for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


def num_batches(n: int, *, train: bool, rank: int, world_size: int, batch_size: int) -> int:
    """len() of a loader: exact, consistent with rank_indices."""
    if train:
        return n // (world_size * batch_size)
    mine = len(range(rank, n, world_size))
    return -(-mine // batch_size)


def batch_generator(device: torch.device, *, seed: int, epoch: int, batch: int, rank: int) -> torch.Generator:
    """A generator on `device` seeded from (seed, epoch, batch, rank): reproducible and resumable."""
    gen = torch.Generator(device=device)
    key = np.random.SeedSequence([seed, epoch, batch, rank]).generate_state(1, dtype=np.uint64)[0]
    gen.manual_seed(int(key) & ((1 << 63) - 1))
    return gen


class ShardedLoader:
    """What the three backends share: the exact length, the epoch/start-batch state, this rank's
    order, and the device transform keyed by (seed, epoch, batch, rank). Subclasses implement __iter__."""

    def __init__(self, options: LoaderOptions, *, n: int, mean: Sequence[float], std: Sequence[float],
                 num_classes: int, labels: np.ndarray | None = None):
        self.options = options
        self.n = n
        self._pool = self._eval_subset(labels)  # None: every sample
        self._len = num_batches(n if self._pool is None else len(self._pool), train=options.train,
                                rank=options.rank, world_size=options.world_size, batch_size=options.batch_size)
        if options.train and self._len == 0:
            raise UserError(f"split '{options.split}' has {n} samples, fewer than one batch of "
                            f"{options.batch_size} per rank on {options.world_size} rank(s); lower batch_size")
        self.mean, self.std = tuple(mean), tuple(std)
        self.transform = TrainTransform(options.spec, mean=mean, std=std, num_classes=num_classes,
                                        label_smoothing=options.label_smoothing,
                                        channels_last=options.channels_last) if options.train \
            else EvalTransform(mean=mean, std=std, channels_last=options.channels_last)
        self.epoch = 0
        self._start_batch = 0

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch's order; the next iteration starts at `start_batch` (later ones at 0)."""
        self.epoch = epoch
        self._start_batch = start_batch

    def _eval_subset(self, labels: np.ndarray | None) -> np.ndarray | None:
        """With `max_batches` (evaluation only): the stratified subset every rank deals its shard from; `labels`
        are the split's, read from its .beton when not given."""
        o = self.options
        size = o.max_batches * o.batch_size * o.world_size
        if o.train or not o.max_batches or size >= self.n:
            return None
        if labels is None:
            labels = BetonFile(Path(o.data_dir) / f"{o.split}.beton").labels()
        return stratified_subset(labels, size, o.seed)

    def crop_side(self) -> int:
        """For photos of varied sizes: the side of the square crops this epoch (training) or of evaluation."""
        res = self.options.resolution
        return res.for_epoch(self.epoch) if self.options.train else res.eval

    def _take_order(self) -> tuple[np.ndarray, int]:
        """This rank's sample order for the current epoch and the batch to start at (consumed once)."""
        o = self.options
        order = rank_indices(self.n, epoch=self.epoch, seed=o.seed, rank=o.rank, world_size=o.world_size,
                             train=o.train, batch_size=o.batch_size) if self._pool is None \
            else self._pool[o.rank::o.world_size]
        start, self._start_batch = self._start_batch, 0
        return order, start

    def _generator(self, batch: int) -> torch.Generator:
        o = self.options
        return batch_generator(o.device, seed=o.seed, epoch=self.epoch, batch=batch, rank=o.rank)

    def _augment(self, images: torch.Tensor, labels: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 NCHW on the device -> the batch the model sees (augmented for training)."""
        if self.options.train:
            return self.transform(images, labels, self._generator(batch))
        return self.transform(images, labels)


class ArrayLoader(ShardedLoader):
    """A backend fed from the reading layer's decoded arrays (tensor, dali): `self.split` holds them and
    `self.labels` sits on the device."""

    def __init__(self, options: LoaderOptions, split: Split | None = None):
        split = split or open_split(options.data_dir, options.split)
        images, labels = split.images, split.labels
        if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
            raise UserError(f"split '{options.split}' holds images {images.dtype}{list(images.shape)} and "
                            f"{len(labels)} labels, expected uint8 (N, H, W, C) with N labels; convert the data again")
        super().__init__(options, n=len(images), mean=split.mean, std=split.std, num_classes=split.num_classes,
                         labels=split.labels)
        self.split = split
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(options.device)

    @classmethod
    def from_arrays(cls, images: np.ndarray, labels: np.ndarray, *, mean: Sequence[float], std: Sequence[float],
                    num_classes: int, options: LoaderOptions):
        """Build from uint8 images (N, H, W, C) and int labels (N,) already in memory."""
        return cls(options, Split.in_memory(images, labels, mean=mean, std=std, num_classes=num_classes))
