"""One rank of the distributed loader test, started by torchrun (gloo, CPU).

Each rank iterates its train loader for two epochs and its eval loader once, with an identity spec,
identifies every sample it saw by its pixels, and rank 0 writes what all ranks saw (all_gather) to
--out as JSON: {backend: {"train": [rank][epoch] -> ids, "eval": [rank][0] -> ids}}. One launch serves
every backend, so the process start-up (torch, FFCV's JIT) is paid once.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from beton_trainer.format.dataset import open_split  # noqa: E402
from beton_trainer.pipelines import build_loader  # noqa: E402
from beton_trainer.pipelines.augment import AugmentSpec  # noqa: E402
from beton_trainer.pipelines.base import LoaderOptions  # noqa: E402
from tests.loader_helpers import as_pixels  # noqa: E402


def seen_ids(loader, split) -> list[int]:
    """The sample index of every image the loader yields, found by its exact pixels; labels must match."""
    index = {image.tobytes(): i for i, image in enumerate(split.images)}
    ids = []
    for images, labels in loader:
        batch = [index[p.tobytes()] for p in as_pixels(images, split.mean, split.std)]
        assert np.array_equal(split.labels[batch], labels.numpy()), "labels do not follow their images"
        ids += batch
    return ids


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", nargs="+", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=48)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    splits = {name: open_split(args.data, name) for name in ("train", "test")}
    result = {backend: {} for backend in args.backends}
    for backend, (name, split_name, train, epochs) in itertools.product(
            args.backends, (("train", "train", True, 2), ("eval", "test", False, 1))):
        split = splits[split_name]
        options = LoaderOptions(data_dir=args.data, split=split_name, batch_size=args.batch_size, train=train,
                                spec=AugmentSpec(), device=torch.device("cpu"), seed=3, rank=rank,
                                world_size=world, num_workers=1)
        loader = build_loader(backend, options)
        mine = []
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            mine.append(seen_ids(loader, split))
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        result[backend][name] = gathered
    if rank == 0:
        args.out.write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
