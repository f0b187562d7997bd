"""Splits as the converters and the in-memory API build them, before they become `.beton` files: the samples of
one split, the stratified seeded val split carved out of train, and the per-channel statistics the manifest
records. The converters and `pipelines.memory` both use these, so a run on in-memory data sees exactly what it
would see after a conversion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from beton_trainer.common.errors import UserError

__all__ = ["SplitData", "carve_val", "channel_stats"]


@dataclass
class SplitData:
    """One split's samples: images uint8 (H, W, C) each, stacked (CIFAR, MNIST) or spilled to a file
    (ImageFolder trees, whatever their size)."""

    images: np.ndarray | Sequence[np.ndarray]
    labels: np.ndarray  # int64
    coarse_labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> SplitData:
        images = self.images[indices]
        coarse = None if self.coarse_labels is None else self.coarse_labels[indices]
        return SplitData(images, self.labels[indices], coarse)



def carve_val(train: SplitData, fraction: float, seed: int, num_classes: int) -> tuple[SplitData, SplitData]:
    """A stratified, seeded val split: round(fraction * n_c) random samples of each class c, order kept."""
    rng = np.random.default_rng(seed)
    val = []
    for c in range(num_classes):
        members = np.flatnonzero(train.labels == c)
        take = round(fraction * len(members))
        if members.size and take == len(members):
            raise UserError(f"--val-fraction {fraction} leaves no training samples of class {c}; use a smaller one")
        val.append(rng.permutation(members)[:take])
    val_idx = np.sort(np.concatenate(val))
    if not val_idx.size:
        raise UserError(f"--val-fraction {fraction} gives an empty val split; use a larger one")
    keep = np.ones(len(train), dtype=bool)
    keep[val_idx] = False
    return train.subset(np.flatnonzero(keep)), train.subset(val_idx)



def channel_stats(images: np.ndarray | Sequence[np.ndarray]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of all pixels in [0, 1] units, exact, from 256-bin histograms."""
    channels = images[0].shape[-1]
    hist = np.zeros((channels, 256), dtype=np.float64)
    chunks = (images[i:i + 4096] for i in range(0, len(images), 4096)) if isinstance(images, np.ndarray) else images
    for chunk in chunks:
        flat = chunk.reshape(-1, channels)
        for c in range(channels):
            hist[c] += np.bincount(flat[:, c], minlength=256)
    values = np.arange(256) / 255.0
    mean = hist @ values / hist.sum(axis=1)
    var = hist @ values**2 / hist.sum(axis=1) - mean**2
    return mean.tolist(), np.sqrt(np.maximum(var, 0)).tolist()
