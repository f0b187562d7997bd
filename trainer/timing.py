"""Did the device wait for data? Time spent waiting for the next batch vs. in the step, every epoch.

Each iteration is marked three times: before asking the loader for a batch, when it arrives, and after
the step. On CUDA the marks are CUDA events on the current stream, read once at the epoch's end (no
host sync in between): the gap between the previous step's end and the batch's arrival is time the GPU
sat idle for want of data, the rest is the step's GPU time. On the CPU the same code reads wall clocks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

STARVED = 0.05  # above this data-wait fraction, the end-of-run summary warns


@dataclass
class EpochTimes:
    data_wait_s: float
    step_s: float
    loader_images_per_s: float | None  # wall clock only: on CUDA the loader's own rate is not what events see


class StepTimer:
    """`mark()` before the batch is fetched, after it arrives and after the step; `read()` at the epoch's end."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.images = 0

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def count(self, images: int) -> None:
        self.images += images

    def read(self) -> EpochTimes:
        """The epoch's totals (on CUDA this waits for the last event: call it at the epoch's end)."""
        if not self.marks:
            return EpochTimes(0.0, 0.0, None)
        if self.cuda:
            self.marks[-1].synchronize()
            gaps = [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        else:
            gaps = [b - a for a, b in zip(self.marks, self.marks[1:])]
        wait, step = sum(gaps[0::3]), sum(gaps[1::3])  # (fetch, step) within each triple of marks
        rate = self.images / wait if not self.cuda and wait > 0 else None
        self.marks, self.images = [], 0
        return EpochTimes(wait, step, rate)


def starvation_warning(fraction: float, epoch: int, loader: str) -> str | None:
    """One line with the likely fixes when the device waited for data more than STARVED of an epoch."""
    if fraction <= STARVED:
        return None
    return (f"warning: the device waited for data {fraction:.0%} of epoch {epoch} (loader '{loader}'); likely fixes: "
            "more loader workers (data.num_workers), another backend (--loader tensor|ffcv|dali), or a shorter "
            "augmentation chain")
