"""What every loader backend shares: the options it is built from, the per-rank index plan, and
per-batch random generators.

Every backend (tensor, ffcv, dali) yields `(images, targets)` already on the training device:
images float, normalized, channels-last for 4-D; targets int64 labels, or float soft targets
(N, num_classes) when MixUp/CutMix is on. Randomness is keyed by (seed, epoch, batch, rank), so a
run resumed in the middle of an epoch sees exactly the same batches as one that never stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from pipelines.augment import AugmentSpec


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
