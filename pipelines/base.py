"""What every loader backend shares: the options it is built from, the per-rank index plan, and
per-batch random generators.

Every backend (tensor, ffcv, dali, photo) yields `(images, targets)` already on the training device:
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

from beton_trainer.common.errors import UserError
from beton_trainer.format.beton import BetonFile
from beton_trainer.format.dataset import Split, open_split
from beton_trainer.pipelines.augment import AugmentSpec, EvalTransform, TrainTransform

__all__ = ["ArrayLoader", "CENTER_CROP_RATIO", "Loader", "LoaderOptions", "MIN_RESOLUTION", "RRC_RATIO",
           "RRC_SCALE", "ResolutionSchedule", "ShardedLoader", "cache_pages", "default_block_pages",
           "model_image_shape", "num_batches", "page_aware_indices", "rank_indices", "record_pages",
           "stratified_subset", "varied_sizes"]

MIN_RESOLUTION = 8  # the smallest crop side a photo loader makes
RRC_SCALE = (0.08, 1.0)  # RandomResizedCrop: area fraction of the source image
RRC_RATIO = (3 / 4, 4 / 3)  # and aspect ratio (width / height) of the crop
CENTER_CROP_RATIO = 224 / 256  # evaluation: crop side / shorter image side, the ImageNet convention
BLOCK_BYTES = 1 << 30  # page-aware order: pages shuffled together by default (FFCV's cache holds about two blocks)
PAGE_AWARE_STREAM = 0x9A6E  # the page-aware order's own random stream, apart from rank_indices' permutations
FFCV_PREFETCH = 3  # batches ahead FFCV's process cache loads a page (compute_schedule's prefetch_ahead)


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
    order: str = "auto"  # ffcv: "random" | "page_aware" | "auto" (page-aware for a .beton larger than RAM allows)
    block_pages: int = 0  # page-aware order: pages shuffled together; 0 = as many as fill BLOCK_BYTES
    os_cache: bool | None = None  # ffcv: FFCV's os_cache; None = off with the page-aware order, on with the random
    memory_budget_gb: float = 0.0  # at most this much memory counts as free (also $BETON_MEMORY_BUDGET_GB); 0 = no cap
    verify: str = "pages"  # the .beton's page checksums: "pages" the loader reads, "full", "off" (format.integrity)


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
    return _deal(np.random.default_rng([seed, epoch]).permutation(n), rank=rank, world_size=world_size,
                 batch_size=batch_size)


def _deal(order: np.ndarray, *, rank: int, world_size: int, batch_size: int) -> np.ndarray:
    """Rank `rank`'s contiguous block of an epoch's global training order, cut to a multiple of
    world_size * batch_size (drop_last): disjoint shards, each sample at most once per epoch."""
    per_rank = (len(order) // (world_size * batch_size)) * batch_size
    return order[rank * per_rank:(rank + 1) * per_rank]


def record_pages(beton: BetonFile) -> np.ndarray:
    """The page each record lies in (records never straddle pages), as FFCV maps them: data pointer // page size."""
    return beton.pointers() // beton.page_size


def default_block_pages(page_size: int) -> int:
    """Pages per block of the page-aware order when the recipe names none: as many as fill BLOCK_BYTES."""
    return max(1, BLOCK_BYTES // page_size)


def page_aware_indices(pages: np.ndarray, *, epoch: int, seed: int, rank: int, world_size: int, train: bool,
                       batch_size: int, block_pages: int) -> np.ndarray:
    """The sample indices this rank visits this epoch, in an order that reads each page of the file once.

    Train: the pages in a permutation seeded by (seed, epoch), cut into blocks of `block_pages` pages; each
    block's samples shuffled together, the blocks one after another; then dealt as `rank_indices` deals (each
    rank a contiguous run, drop_last), so a rank reads its own pages. Every batch then draws from the pages of
    at most two blocks when a block holds at least a batch (`pages` gives each sample's page: `record_pages`).
    Eval: the samples in file order, each rank a contiguous run of as many samples as `rank_indices` gives it.
    """
    n = len(pages)
    if not train:
        start = rank * (n // world_size) + min(rank, n % world_size)
        return np.argsort(pages, kind="stable")[start:start + len(range(rank, n, world_size))]
    rng = np.random.default_rng([seed, epoch, PAGE_AWARE_STREAM])
    page_ids, page_of = np.unique(pages, return_inverse=True)
    block = rng.permutation(len(page_ids))[page_of] // block_pages
    shuffled = rng.permutation(n)
    order = shuffled[np.argsort(block[shuffled], kind="stable")]  # block by block, shuffled within each
    return _deal(order, rank=rank, world_size=world_size, batch_size=batch_size)


def cache_pages(pages: np.ndarray, batch_size: int, prefetch: int = FFCV_PREFETCH) -> int:
    """The most pages FFCV's process cache (os_cache=False) holds at once for a rank visiting pages `pages` (one
    per sample, in order) in batches of `batch_size`: a page takes a slot from `prefetch` batches before its first
    batch through its last (ffcv.memory_managers.process_cache.schedule.compute_schedule); FFCV allocates that
    many pages up front."""
    if not len(pages):
        return 0
    batch = np.arange(len(pages)) // batch_size
    page_ids, page_of = np.unique(pages, return_inverse=True)
    first = np.full(len(page_ids), batch[-1])
    np.minimum.at(first, page_of, batch)
    last = np.zeros(len(page_ids), dtype=np.int64)
    np.maximum.at(last, page_of, batch)
    change = np.zeros(int(batch[-1]) + 2, dtype=np.int64)
    np.add.at(change, np.maximum(first - prefetch, 0), 1)
    np.add.at(change, last + 1, -1)
    return int(np.cumsum(change).max())


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
    """What the backends share: the exact length, the epoch/start-batch state, this rank's
    order, and the device transform keyed by (seed, epoch, batch, rank). Subclasses implement __iter__."""

    def __init__(self, options: LoaderOptions, *, n: int, mean: Sequence[float], std: Sequence[float],
                 num_classes: int, labels: np.ndarray):
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
        self.pages: np.ndarray | None = None  # each sample's page when the order is page-aware (FfcvLoader)
        self.block_pages = 0

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch's order; the next iteration starts at `start_batch` (later ones at 0)."""
        self.epoch = epoch
        self._start_batch = start_batch

    def _eval_subset(self, labels: np.ndarray) -> np.ndarray | None:
        """With `max_batches` (evaluation only): the stratified subset of the split (its `labels`) every rank
        deals its shard from."""
        o = self.options
        size = o.max_batches * o.batch_size * o.world_size
        if o.train or not o.max_batches or size >= self.n:
            return None
        return stratified_subset(labels, size, o.seed)

    def crop_side(self) -> int:
        """For photos of varied sizes: the side of the square crops this epoch (training) or of evaluation."""
        res = self.options.resolution
        return res.for_epoch(self.epoch) if self.options.train else res.eval

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's sample order in `epoch`: the eval subset's shard, the page-aware order, or rank_indices'."""
        o = self.options
        if self._pool is not None:
            return self._pool[o.rank::o.world_size]
        shard = dict(epoch=epoch, seed=o.seed, rank=o.rank, world_size=o.world_size, train=o.train,
                     batch_size=o.batch_size)
        if self.pages is not None:
            return page_aware_indices(self.pages, block_pages=self.block_pages, **shard)
        return rank_indices(self.n, **shard)

    def records_read(self) -> np.ndarray | None:
        """The records this loader reads over a run, whose pages `format.integrity` checks: all (None) when
        training, where every epoch visits a new permutation, else the evaluation order, the same every epoch."""
        return None if self.options.train else self.epoch_order(0)

    def _take_order(self) -> tuple[np.ndarray, int]:
        """This rank's sample order for the current epoch and the batch to start at (consumed once)."""
        start, self._start_batch = self._start_batch, 0
        return self.epoch_order(self.epoch), start

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
        split = split or open_split(options.data_dir, options.split, options.verify)
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
