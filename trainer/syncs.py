"""Catch host-device synchronisations in steady-state steps, on the CPU as well as on CUDA.

A CUDA step that calls `.item()`, builds a tensor from Python data, indexes with a boolean mask or
copies from pageable host memory makes the host wait for the device, and the GPU then waits for
Python. CUDA can report these itself (`torch.cuda.set_sync_debug_mode("error")`); on a machine without
a GPU the same operations are still visible to a dispatch mode and a function mode, which is how the
test suite proves the training step and every loader free of them.

`no_host_sync(device)` raises `HostSyncError` on any such operation, naming it and the line that called it;
`SyncCheck`, the callback of `--check-syncs`, puts every steady-state step of a run under it (the batch fetch
and the step; not a logging, checkpoint or warm-up step).
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from beton_trainer.common.errors import UserError
from beton_trainer.trainer.callbacks import Callback

if TYPE_CHECKING:
    from beton_trainer.trainer.state import Run

__all__ = ["HostSyncError", "SyncCheck", "no_host_sync"]

ROOT = Path(__file__).resolve().parents[1]
SYNC_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
            "aten.lift_fresh.default", "aten.lift_fresh_copy.default"}
HOST_METHODS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}
COPIES = {"to", "cuda", "copy_"}


class HostSyncError(UserError):
    """A steady-state step did something that makes the host wait for the device."""


def _caller() -> str:
    """The innermost line of this project (outside this module) on the stack."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename)
        if path.is_relative_to(ROOT) and path != Path(__file__) and ".venv" not in path.parts:
            return f"{path.relative_to(ROOT)}:{frame.lineno} ({frame.line})"
    return "outside the project"


def _in_torch_optimizer() -> bool:
    """Whether torch's optimizer is doing its host-side bookkeeping (foreach RMSprop builds a CPU scalar for
    its CPU step counts each step): on a CUDA run those stay on the host and wait for no device, and there
    CUDA's own sync debug mode checks the optimizers for real."""
    return any(f"{os.sep}torch{os.sep}optim{os.sep}" in frame.filename for frame in traceback.extract_stack())


def _fail(what: str) -> None:
    raise HostSyncError(f"host-device sync in a steady-state step: {what} at {_caller()}; keep it on the "
                        "device, or move it to a logging step")


def _target_device(args: tuple, kwargs: dict) -> torch.device | None:
    """The device a `.to(...)`/`.cuda(...)` call moves to, if it names one (not only a dtype or format)."""
    if "device" in kwargs:
        return torch.device(kwargs["device"])
    for arg in args[1:]:
        if isinstance(arg, torch.device):
            return arg
        if isinstance(arg, str) or isinstance(arg, int) and not isinstance(arg, bool):
            return torch.device(arg)
    return None


class _Dispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in SYNC_OPS and not _in_torch_optimizer():
            _fail(f"{name} ({'a tensor built from host data' if 'lift_fresh' in name else 'waits for a value'})")
        if name == "aten.index.Tensor" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                               for i in args[1]):
            _fail("boolean-mask indexing (a data-dependent shape)")
        return func(*args, **(kwargs or {}))


class _Function(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in HOST_METHODS and args and isinstance(args[0], torch.Tensor) and not _in_torch_optimizer():
            _fail(f"Tensor.{name}()")
        if name in COPIES and args and isinstance(args[0], torch.Tensor):
            source, target = (args[1], args[0].device) if name == "copy_" else \
                (args[0], torch.device("cuda") if name == "cuda" else _target_device(args, kwargs))
            crosses = isinstance(source, torch.Tensor) and target is not None and target.type != source.device.type
            if crosses and source.device.type == "cpu" and not source.is_pinned():
                _fail(f"Tensor.{name}() from pageable host memory")
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_sync(device: torch.device) -> Iterator[None]:
    """Raise on any operation that would synchronise a CUDA device with the host, checked the way the run's
    `device` allows: CUDA's own sync debug mode on a CUDA run (no overhead), else the dispatch and function
    modes above (HostSyncError). By the device, not by whether CUDA is initialised: FFCV initialises CUDA
    in a `--cpu` run on a GPU machine, where CUDA's mode would then watch a device the run never uses.

    CUDA's mode is process-wide, so it also watches other threads: FFCV's worker copies each batch with a
    wait that mode does not see (`pipelines.ffcv_loader`), and only a GPU can confirm that nothing else
    in another thread trips it (benchmarks/device/README.md). The CPU modes are per thread by design."""
    if device.type == "cuda":
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        return
    with _Function(), _Dispatch():
        yield


class SyncCheck(Callback):
    """`--check-syncs`: every steady-state step runs under `no_host_sync` for the run's device; the summary
    records how many did (`sync_checked_steps`: a test asserts there were enough)."""

    watches_steps = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.checked = 0

    def watch_step(self, run: Run, steady: bool) -> contextlib.AbstractContextManager:
        if not steady:
            return contextlib.nullcontext()
        self.checked += 1
        return no_host_sync(self.device)

    def on_fit_end(self, run: Run, summary: dict[str, Any]) -> None:
        summary["sync_checked_steps"] = self.checked
