"""`--profile N`: where a step's time goes, for N steps after warm-up, under `torch.profiler`.

The loop labels the batch fetch `data` and the step labels `forward`, `backward` and `optimizer`
(`torch.profiler.record_function`, only while profiling). The profiled steps leave a Chrome/Perfetto
trace in the run folder (open it at https://ui.perfetto.dev or chrome://tracing) and a table: time per
label, the operators with the most self time, and the host syncs seen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from beton_trainer.trainer.callbacks import Callback

if TYPE_CHECKING:
    from beton_trainer.trainer.state import Run

__all__ = ["WARMUP", "StepProfiler", "unlabelled"]

LABELS = ("data", "forward", "backward", "optimizer")
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
               "aten::_local_scalar_dense", "aten::nonzero")
WARMUP = 5  # steps run before profiling starts (compilation, lazy state, allocator)


def unlabelled(name: str) -> contextlib.AbstractContextManager:
    """The label context outside profiling: nothing."""
    return contextlib.nullcontext()


class StepProfiler(Callback):
    """`--profile N`: counts steps; profiles N of them after WARMUP, then writes the trace and the table (also
    when the run ends first, before the final test)."""

    watches_steps = True

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.seen = 0
        self.active: profile | None = None

    def on_fit_start(self, run: Run) -> None:
        self.run_dir, self.rank, self.main = run.run_dir, run.accelerator.process_index, run.main
        self.cuda = run.accelerator.device.type == "cuda"

    @contextlib.contextmanager
    def watch_step(self, run: Run, steady: bool) -> Iterator[None]:
        if self.seen == WARMUP and self.active is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.active = profile(activities=activities)
            self.active.start()
        run.phase.step.label = record_function if self.active is not None else unlabelled
        try:
            yield
        finally:
            self.seen += 1
            if self.active is not None and self.seen == WARMUP + self.steps:
                self.finish()
                run.phase.step.label = unlabelled

    def on_train_end(self, run: Run) -> None:
        self.finish()
        run.phase.step.label = unlabelled

    def finish(self) -> None:
        """Stop (also for a run with fewer steps than asked), write the trace and the table."""
        if self.active is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
        self.active.stop()
        trace = self.run_dir / f"profile-rank{self.rank}.json"
        self.active.export_chrome_trace(str(trace))
        table = self.table(self.seen - WARMUP)
        if self.main:
            (self.run_dir / "profile.txt").write_text(table)
            print(f"{table}\ntrace: {trace} (open it at https://ui.perfetto.dev or chrome://tracing)")
        self.active = None

    def table(self, steps: int) -> str:
        events = self.active.key_averages()
        by_key = {e.key: e for e in events}
        device_time = "device_time_total" if self.cuda else None
        lines = [f"profile: {steps} steps after {WARMUP} warm-up (rank {self.rank})", "",
                 "time per part of the step (host; device where CUDA ran):"]
        for label in LABELS:
            e = by_key.get(label)
            host = e.cpu_time_total / 1000 / steps if e else 0.0
            device = getattr(e, device_time) / 1000 / steps if e and device_time else None
            lines.append(f"  {label:<10} {host:9.3f} ms/step host" + (f"  {device:9.3f} ms/step device"
                                                                     if device is not None else ""))
        syncs = {name: by_key[name].count for name in SYNC_EVENTS if name in by_key}
        seen = ", ".join(f"{k} x{v}" for k, v in syncs.items()) or "none"
        if self.cuda:
            lines += ["", f"host syncs seen (CUDA runtime waits, scalar reads): {seen}"]
        else:  # a CPU has nothing to wait for; reads of CPU scalars (e.g. inside fused Adam) cost no sync
            lines += ["", f"host syncs: none on the CPU (scalar reads seen: {seen}; `--check-syncs` finds the "
                          "ones that would sync a GPU)"]
        sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        lines += ["", "operators by self time:", events.table(sort_by=sort, row_limit=15)]
        return "\n".join(lines)
