"""The device-resident loader: the whole uint8 split lives on the training device (as in airbench).

Each batch is an index_select plus the batched augmentation ops of `pipelines.augment`, all on the
device, so there are no workers, no host copies and no host-device syncs after the one upload.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from common.errors import UserError
from pipelines.augment import EvalTransform, TrainTransform
from pipelines.base import LoaderOptions, batch_generator, num_batches, rank_indices
from pipelines.dataset import open_split


class TensorLoader:
    """Implements `pipelines.base.Loader` over a split held on `options.device`."""

    def __init__(self, options: LoaderOptions):
        split = open_split(options.data_dir, options.split)
        self._setup(split.images, split.labels, mean=split.mean, std=split.std,
                    num_classes=split.num_classes, options=options)

    @classmethod
    def from_arrays(cls, images: np.ndarray, labels: np.ndarray, *, mean: Sequence[float], std: Sequence[float],
                    num_classes: int, options: LoaderOptions) -> TensorLoader:
        """Build from uint8 images (N, H, W, C) and int labels (N,) already in memory."""
        loader = cls.__new__(cls)
        loader._setup(images, labels, mean=mean, std=std, num_classes=num_classes, options=options)
        return loader

    def _setup(self, images: np.ndarray, labels: np.ndarray, *, mean: Sequence[float], std: Sequence[float],
               num_classes: int, options: LoaderOptions) -> None:
        if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
            raise UserError(f"split '{options.split}' holds images {images.dtype}{list(images.shape)} and "
                            f"{len(labels)} labels, expected uint8 (N, H, W, C) with N labels; "
                            "convert the data again")
        self.options = options
        self.n = len(images)
        self._len = num_batches(self.n, train=options.train, rank=options.rank,
                                world_size=options.world_size, batch_size=options.batch_size)
        if options.train and self._len == 0:
            raise UserError(f"split '{options.split}' has {self.n} samples, fewer than one batch of "
                            f"{options.batch_size} per rank on {options.world_size} rank(s); lower batch_size")
        device = options.device
        # one upload (copying on the host only if the array is read-only, e.g. a memory map);
        # the NHWC -> NCHW transpose runs on the device
        host = np.require(images, requirements=["C", "W"])
        self.images = torch.from_numpy(host).to(device).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
        if options.train:
            self.transform = TrainTransform(options.spec, mean=mean, std=std, num_classes=num_classes,
                                            label_smoothing=options.label_smoothing,
                                            channels_last=options.channels_last)
        else:
            self.transform = EvalTransform(mean=mean, std=std, channels_last=options.channels_last)
        self.epoch = 0
        self._start_batch = 0

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch's order; the next iteration starts at `start_batch` (later ones at 0)."""
        self.epoch = epoch
        self._start_batch = start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        o = self.options
        order = rank_indices(self.n, epoch=self.epoch, seed=o.seed, rank=o.rank, world_size=o.world_size,
                             train=o.train, batch_size=o.batch_size)
        order = torch.from_numpy(order).to(o.device)
        start, self._start_batch = self._start_batch, 0
        for b in range(start, self._len):
            idx = order[b * o.batch_size:(b + 1) * o.batch_size]
            images, labels = self.images.index_select(0, idx), self.labels.index_select(0, idx)
            if o.train:
                gen = batch_generator(o.device, seed=o.seed, epoch=self.epoch, batch=b, rank=o.rank)
                yield self.transform(images, labels, gen)
            else:
                yield self.transform(images, labels)
