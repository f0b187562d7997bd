"""The FFCV backend: exact pixels and labels with an identity spec (RGB and grey), every sample once, the
same batches as the tensor backend for the same seed, mid-epoch resume, and a clear error without ffcv.

All tests share one process, so FFCV's numba JIT is paid once."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from beton_trainer.common.errors import UserError
from beton_trainer.format.dataset import open_split
from beton_trainer.pipelines import build_loader
from beton_trainer.pipelines.base import rank_indices
from tests.loader_helpers import check_identity, options, require

require("ffcv")

FULL_CHAIN = {"crop": {"padding": 4}, "flip": {"p": 0.5}, "jitter": {"brightness": 0.3, "contrast": 0.3},
              "erase": {"p": 0.5}, "mix": {"mixup_alpha": 0.4, "cutmix_alpha": 1.0}}


def test_identity_rgb_eval_and_train(tiny_rgb_data, device):
    split = open_split(tiny_rgb_data, "test")
    n = len(split.labels)  # 200: the last eval batch is partial
    check_identity(build_loader("ffcv", options(tiny_rgb_data, "test", device, train=False)), split, np.arange(n))

    loader = build_loader("ffcv", options(tiny_rgb_data, "test", device, train=True, seed=3))
    assert len(loader) == n // 64
    orders = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        order = rank_indices(n, epoch=epoch, seed=3, rank=0, world_size=1, train=True, batch_size=64)
        assert len(set(order)) == len(order) == len(loader) * 64
        check_identity(loader, split, order)
        orders.append(order)
    assert not np.array_equal(orders[0], orders[1])


def test_one_ffcv_loader_for_every_epoch_and_resume(tiny_rgb_data, device):
    """FFCV's Loader (numba pipeline, memory manager) is built once and given each epoch's order, also the
    shorter order of a mid-epoch resume, then the full order again; a resume as the very first epoch too."""
    split = open_split(tiny_rgb_data, "test")
    n = len(split.labels)
    loader = build_loader("ffcv", options(tiny_rgb_data, "test", device, train=True, seed=5))
    loader.set_epoch(0, start_batch=2)  # the first iteration is a resume: FFCV's length must still be an epoch's
    order0 = rank_indices(n, epoch=0, seed=5, rank=0, world_size=1, train=True, batch_size=64)
    check_identity(loader, split, order0[2 * 64:])
    built = loader.ffcv_loader
    for epoch in (1, 2):
        loader.set_epoch(epoch)
        check_identity(loader, split, rank_indices(n, epoch=epoch, seed=5, rank=0, world_size=1, train=True,
                                                   batch_size=64))
    assert loader.ffcv_loader is built


def test_device_copies_block_ffcvs_thread_not_the_loop(tiny_rgb_data, device):
    """FFCV decodes into a ring of pinned slots and reuses each a few batches later: its copies to the device
    must complete in FFCV's worker thread (it waits on an event after each copy), or a lagging GPU could read
    a slot that is already being overwritten. The held batches of a whole epoch are all intact
    (check_identity keeps them)."""
    from ffcv.transforms import ToDevice

    split = open_split(tiny_rgb_data, "test")
    loader = build_loader("ffcv", options(tiny_rgb_data, "test", device, train=False, batch_size=16))
    check_identity(loader, split, np.arange(len(split.labels)))  # 13 batches held at once, slots reused
    copies = [op for spec in loader.ffcv_loader.pipeline_specs.values() for op in spec.transforms
              if isinstance(op, ToDevice)]
    assert [type(op).__name__ for op in copies] == ["WaitingToDevice"] * 2


def test_a_failure_in_ffcvs_worker_stops_the_consumer_within_seconds(tiny_rgb_data, monkeypatch, capsys, device):
    """FFCV's epoch thread catches only StopIteration: any other exception used to end it silently and leave
    the training loop waiting forever for the next batch. Now the consumer raises one line."""
    from ffcv.loader.epoch_iterator import EpochIterator

    real = EpochIterator.run_pipeline

    def failing(self, b_ix, *args):
        if b_ix == 2:
            raise RuntimeError("injected failure\nsecond line")
        return real(self, b_ix, *args)

    monkeypatch.setattr(EpochIterator, "run_pipeline", failing)
    loader = build_loader("ffcv", options(tiny_rgb_data, "train", device, train=True, batch_size=16, num_workers=1))
    outcome = {}

    def consume():
        try:
            outcome["batches"] = sum(1 for _ in loader)
        except Exception as exc:  # what the training loop would see
            outcome["error"] = exc

    consumer = threading.Thread(target=consume, daemon=True)
    start = time.monotonic()
    consumer.start()
    consumer.join(timeout=30)
    assert not consumer.is_alive(), "the consumer still waits for a batch FFCV's dead thread will never send"
    assert time.monotonic() - start < 30
    error = outcome.get("error")
    assert isinstance(error, UserError), outcome
    assert str(error).startswith("the ffcv loader's worker thread failed (RuntimeError: injected failure;")
    assert "\n" not in str(error)
    assert "injected failure" in capsys.readouterr().err  # the worker's traceback


def test_an_epoch_leaves_torchs_cpu_threads_as_it_found_them(tiny_rgb_data, device):
    """FFCV sets torch's CPU threads to its worker count at each epoch's start; the training loop owns them."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        loader = build_loader("ffcv", options(tiny_rgb_data, "test", device, train=True, num_workers=1))
        assert sum(len(labels) for _, labels in loader) == len(loader) * 64
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_identity_grey_mnist(mnist_data, device):
    split = open_split(mnist_data, "test")
    opts = options(mnist_data, "test", device, train=False, batch_size=1000, world_size=3, rank=1)
    loader = build_loader("ffcv", opts)
    check_identity(loader, split, np.arange(1, len(split.labels), 3))


def test_same_batches_as_tensor_backend(tiny_rgb_data, device):
    opts = options(tiny_rgb_data, "train", device, train=True, spec=FULL_CHAIN, seed=11, label_smoothing=0.1)
    ffcv, tensor = build_loader("ffcv", opts), build_loader("tensor", opts)
    assert len(ffcv) == len(tensor) == 10
    for epoch in (0, 1):
        ffcv.set_epoch(epoch)
        tensor.set_epoch(epoch)
        pairs = list(zip(ffcv, tensor, strict=True))
        for (x, y), (x_ref, y_ref) in pairs:
            assert y.shape == (64, 10) and torch.allclose(y.sum(1), torch.ones(64, device=device))
            torch.testing.assert_close(x, x_ref, rtol=0, atol=0)
            torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    # resume in the middle of epoch 1: batches 7.. of the uninterrupted epoch
    ffcv.set_epoch(1, start_batch=7)
    resumed = list(ffcv)
    assert len(resumed) == 3
    for (x, y), ((x_ref, y_ref), _) in zip(resumed, pairs[7:], strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_eval_matches_tensor_backend_on_a_rank(tiny_rgb_data, device):
    opts = options(tiny_rgb_data, "test", device, train=False, world_size=2, rank=1, batch_size=48)
    for (x, y), (x_ref, y_ref) in zip(build_loader("ffcv", opts), build_loader("tensor", opts), strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


@pytest.mark.parametrize("backend, package", [("ffcv", "ffcv"), ("dali", "nvidia.dali")])
def test_missing_package_is_one_line_user_error(monkeypatch, tiny_rgb_data, backend, package, device):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import <package>` raise ImportError
    with pytest.raises(UserError) as info:
        build_loader(backend, options(tiny_rgb_data, "train", device, train=True))
    message = str(info.value)
    assert "\n" not in message and package in message and "pip install" in message


def test_too_few_samples_for_one_batch(tiny_rgb_data, device):
    opts = replace(options(tiny_rgb_data, "test", device, train=True), batch_size=256)
    with pytest.raises(UserError, match="lower batch_size"):
        build_loader("ffcv", opts)
