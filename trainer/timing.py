"""Did the device wait for data? The host's wait for the loader vs. the step's time, every epoch.

Each iteration is marked three times: before asking the loader for a batch, when it arrives, and after
the step. At every mark the host reads its clock: the time between the first two marks is the host's wait
for the loader (workers decoding, a pipeline filling), which is what the data-wait columns and the warning
are based on. On CUDA each mark also records a CUDA event on the current stream, read once at the epoch's
end (no host sync in between): between the first two events lies the device time of the input pipeline
(the augmentations the loader enqueued inside `next()`, plus any time the GPU sat idle for want of a
batch), between the last two the step's device time. A heavy on-device augmentation chain therefore shows
as input-pipeline device time, not as data wait: the host enqueues it and moves on while the GPU works.
On the CPU the device is the host, so the input pipeline's time is the wait itself and only clocks are read.

What only a GPU can confirm: that the host's wait in `next()` stays near zero for the tensor backend
under a heavy chain while the GPU is busy (kernel launches return at once), and that it does not grow
when the launch queue fills up and a launch inside `next()` blocks (then the wait would count time the
GPU was busy with earlier steps); `tests/test_data_wait.py`'s CUDA test measures the first.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

__all__ = ["EpochTimes", "Feed", "STARVED", "StepTimer", "starvation_warning"]

STARVED = 0.05  # above this data-wait fraction, the end-of-run summary warns


@dataclass
class EpochTimes:
    data_wait_s: float  # host wall seconds waiting for the loader's next batch
    step_s: float  # in the step: device time on CUDA, wall time on the CPU
    input_device_s: float | None  # CUDA: device time of the input pipeline (between asking and receiving)
    loader_images_per_s: float | None  # CPU only: on CUDA the host's wait is not the loader's whole cost


class StepTimer:
    """`mark()` before the batch is fetched, after it arrives and after the step; `read()` at the epoch's end."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.clocks: list[float] = []
        self.events: list = []
        self.images = 0

    def mark(self) -> None:
        self.clocks.append(time.perf_counter())
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)

    def count(self, images: int) -> None:
        self.images += images

    def read(self) -> EpochTimes:
        """The epoch's totals (on CUDA this waits for the last event: call it at the epoch's end)."""
        clocks = [b - a for a, b in zip(self.clocks, self.clocks[1:])]
        wait = sum(clocks[0::3])  # (fetch, step) within each triple of marks
        if self.events:
            self.events[-1].synchronize()
            device = [a.elapsed_time(b) / 1000 for a, b in zip(self.events, self.events[1:])]
            times = EpochTimes(wait, sum(device[1::3]), sum(device[0::3]), None)
        else:
            times = EpochTimes(wait, sum(clocks[1::3]), None, self.images / wait if wait > 0 else None)
        self.clocks, self.events, self.images = [], [], 0
        return times


@dataclass(frozen=True)
class Feed:
    """What the advice of the starvation warning depends on: how this run is fed."""

    loader: str  # tensor | ffcv | dali | photo
    device: str  # cuda | cpu
    num_workers: int  # read by ffcv (workers), dali and photo (threads); the tensor backend has none
    batch_size: int
    fixed_size: bool  # one image shape (the tensor backend can hold it); False for photos of varied sizes
    augmentations: tuple[str, ...]  # the recipe's enabled stages


def fixes(feed: Feed) -> list[str]:
    """The fixes that apply to this run, most likely first."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    chain = ", ".join(feed.augmentations)
    found = []
    if feed.loader != "tensor":
        if feed.num_workers < cpus:
            found.append(f"more loader workers (data.num_workers, now {feed.num_workers} of {cpus} CPUs)")
        if feed.fixed_size:
            found.append("the tensor backend (--loader tensor: the split held on the device, nothing decoded)")
        if feed.loader == "ffcv" and feed.device == "cuda":
            found.append("DALI (--loader dali: decoding and augmentations on the GPU)")
    if chain and (feed.device == "cpu" or feed.loader == "dali"):  # where the loader itself runs the chain
        found.append(f"a shorter augmentation chain (now {chain})")
    if feed.loader == "tensor":  # its cost per batch is mostly fixed: fewer, larger batches
        found.append(f"a larger batch (data.batch_size, now {feed.batch_size})")
    return found


def starvation_warning(fraction: float, epoch: int, feed: Feed) -> str | None:
    """One line with the fixes that fit the run when the host waited for data more than STARVED of an epoch."""
    if fraction <= STARVED:
        return None
    return (f"warning: the device waited for data {fraction:.0%} of epoch {epoch} (loader '{feed.loader}'); "
            f"likely fixes: {'; '.join(fixes(feed))}")
