"""The page-aware order (`data.order = "page_aware"`): on real MNIST (23 pages of 2 MiB), each batch touches at
most two blocks' pages and FFCV's process cache holds at most two blocks (the figure FFCV's own schedule
gives); across ranks an epoch visits every sample once; epochs and seeds differ; and the FFCV backend, with
os_cache off, yields exactly the batches the order predicts, also when resumed mid-epoch."""

from __future__ import annotations

import numpy as np
import pytest

from beton_trainer.common.errors import UserError
from beton_trainer.format.beton import BetonFile
from beton_trainer.format.dataset import open_split
from beton_trainer.pipelines import build_loader
from beton_trainer.pipelines.base import cache_pages, num_batches, page_aware_indices, record_pages
from beton_trainer.trainer.config import load_recipe
from tests.loader_helpers import check_identity, options, require

BATCH = 256


@pytest.fixture(scope="module")
def pages(mnist_data) -> np.ndarray:
    return record_pages(BetonFile(mnist_data / "train.beton"))


def order(pages: np.ndarray, *, epoch: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1,
          train: bool = True, block_pages: int = 2) -> np.ndarray:
    return page_aware_indices(pages, epoch=epoch, seed=seed, rank=rank, world_size=world_size, train=train,
                              batch_size=BATCH, block_pages=block_pages)


@pytest.mark.parametrize("block_pages", [1, 2, 4])
def test_pages_per_batch_and_cached_pages_stay_within_two_blocks(pages, block_pages):
    """The bound, for blocks holding at least FFCV's prefetch window (4 batches): every batch reads the pages of
    at most 2 blocks, and at most 2 blocks' pages sit in FFCV's process cache at once. A random order keeps
    every page cached from the first batch to nearly the last."""
    per_page = np.unique(pages, return_counts=True)[1]
    assert per_page.min() * block_pages >= 4 * BATCH  # the bound's condition holds on this file
    for world_size in (1, 2):
        for rank in range(world_size):
            mine = order(pages, rank=rank, world_size=world_size, block_pages=block_pages)
            touched = [len(np.unique(pages[mine[i:i + BATCH]])) for i in range(0, len(mine), BATCH)]
            assert max(touched) <= 2 * block_pages
            assert cache_pages(pages[mine], BATCH) <= 2 * block_pages
    random = np.random.default_rng(0).permutation(len(pages))
    assert cache_pages(pages[random], BATCH) == len(per_page)


def test_cached_pages_match_ffcv_schedule(pages):
    """`cache_pages` (what the budget counts) is the slot count FFCV's process cache allocates."""
    require("ffcv")
    from ffcv.memory_managers.process_cache.schedule import compute_schedule

    for mine in (order(pages, block_pages=3), np.random.default_rng(1).permutation(len(pages))[:5000]):
        batches = [set(pages[mine[i:i + BATCH]].tolist()) for i in range(0, len(mine), BATCH)]
        assert cache_pages(pages[mine], BATCH) == compute_schedule(batches).num_slots


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_an_epoch_visits_every_sample_once_across_ranks(pages, world_size):
    n = len(pages)
    train = [order(pages, rank=r, world_size=world_size) for r in range(world_size)]
    assert all(len(t) == num_batches(n, train=True, rank=r, world_size=world_size, batch_size=BATCH) * BATCH
               for r, t in enumerate(train))
    seen = np.concatenate(train)
    assert len(np.unique(seen)) == len(seen) == (n // (world_size * BATCH)) * world_size * BATCH
    evals = [order(pages, rank=r, world_size=world_size, train=False) for r in range(world_size)]
    assert [-(-len(e) // BATCH) for e in evals] == [num_batches(n, train=False, rank=r, world_size=world_size,
                                                                batch_size=BATCH) for r in range(world_size)]
    np.testing.assert_array_equal(np.sort(np.concatenate(evals)), np.arange(n))


def test_seeded_by_seed_and_epoch(pages):
    first = order(pages, epoch=0)
    np.testing.assert_array_equal(first, order(pages, epoch=0))  # a resumed epoch recomputes the same order
    assert not np.array_equal(first, order(pages, epoch=1))
    assert not np.array_equal(first, order(pages, epoch=0, seed=1))
    dropped = [np.setdiff1d(np.arange(len(pages)), order(pages, epoch=e)) for e in range(3)]
    assert not all(np.array_equal(dropped[0], d) for d in dropped[1:])  # drop_last leaves out other samples


def test_page_aware_is_an_ffcv_order():
    with pytest.raises(UserError, match='data.order = "page_aware" is an order of the ffcv loader, not of '
                                        "'tensor'; use --loader ffcv"):
        load_recipe("mnist_cnn", ["data.order=page_aware"])
    assert load_recipe("mnist_cnn", ["data.loader=ffcv", "data.order=page_aware"]).data.memory_options() == {
        "order": "page_aware", "block_pages": 0, "memory_budget_gb": 0.0, "os_cache": None}


def test_ffcv_runs_the_page_aware_order_and_resumes(mnist_data, pages, device):
    """A real epoch through FFCV with os_cache off: the batches the order predicts, pixel for pixel; a resume at
    batch 200 yields that epoch's batches from 200 on."""
    require("ffcv")
    from ffcv.memory_managers import ProcessCacheManager

    split = open_split(mnist_data, "train")
    loader = build_loader("ffcv", options(mnist_data, "train", device, train=True, batch_size=BATCH, seed=4,
                                          order="page_aware", block_pages=2))
    assert loader.os_cache is False and loader.pages is not None
    for epoch, start in ((0, 0), (1, 200)):
        loader.set_epoch(epoch, start_batch=start)
        check_identity(loader, split, order(pages, epoch=epoch, seed=4)[start * BATCH:])
    assert isinstance(loader.ffcv_loader.memory_manager, ProcessCacheManager)
