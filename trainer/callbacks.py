"""Behaviour added to the training loop without editing it, as Hugging Face's `TrainerCallback` and Lightning's
`Callback` add it: a `Callback` subclass overrides the hooks it needs and is passed to
`Trainer(callbacks=[...])` (or `RunOptions.callbacks`).

The loop calls the hooks at these points, on every process, in the order of the list (the built-in ones
first, then the user's, then the loggers, so that a logger sees every column the others add):

    on_fit_start(run)             the run is built (model, data, run folder); before a checkpoint is loaded
    on_phase_start(run, phase)    a phase starts at its first epoch (not when a run resumes inside it)
    on_epoch_start(run)           before the epoch's first step
    on_step_end(run)              at logging steps only: every LOG_EVERY steps, a checkpoint step and the
                                  epoch's last step; `run.totals` holds the epoch so far, summed over ranks
    on_evaluate(run, split, m)    after each evaluation of a split ('val', 'test') at an epoch's end
    on_epoch_end(run, row)        the epoch's metrics.csv row, to read or to add columns to
    on_checkpoint(run, path)      after a checkpoint is complete on disk
    on_train_end(run)             the last epoch has ended; the final test and the export follow
    on_fit_end(run, summary)      summary.json's contents, written after every callback has seen them

No hook runs inside a steady-state step: a step between two logging steps never waits on the host. The one
exception is opt-in: an instrument that must see every step (the sync check, the profiler) sets
`watches_steps = True` and returns a context manager from `watch_step`, which wraps the batch fetch and the
step; a run with no such callback pays nothing per step.

A callback may end training: `run.stop_phase = True` ends the current phase after this epoch, and
`run.stop_training = True` ends the run after this epoch (it is then tested and exported as usual). The flags
are combined across ranks at the epoch's end, so every rank stops at the same epoch; decide them from
`run.totals` and the row, which every rank shares.

`state_dict()` / `load_state_dict(state)`: a callback's state (tensors, numbers, strings, and lists and dicts
of them), saved in every checkpoint and restored when the run resumes (after `on_fit_start`).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from beton_trainer.common.errors import UserError

if TYPE_CHECKING:
    from beton_trainer.trainer.state import Phase, Run

__all__ = ["Callback", "CallbackList"]


class Callback:
    """The hooks, each doing nothing: override the ones you need (see the module's docstring)."""

    watches_steps = False  # True for instruments whose `watch_step` wraps every step

    def on_fit_start(self, run: Run) -> None:
        pass

    def on_phase_start(self, run: Run, phase: Phase) -> None:
        pass

    def on_epoch_start(self, run: Run) -> None:
        pass

    def on_step_end(self, run: Run) -> None:
        pass

    def on_evaluate(self, run: Run, split: str, metrics: dict[str, float]) -> None:
        pass

    def on_epoch_end(self, run: Run, row: dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, run: Run, path: Path) -> None:
        pass

    def on_train_end(self, run: Run) -> None:
        pass

    def on_fit_end(self, run: Run, summary: dict[str, Any]) -> None:
        pass

    def watch_step(self, run: Run, steady: bool) -> contextlib.AbstractContextManager:
        """With `watches_steps`: a context around one step (`steady`: not a logging, checkpoint or warm-up step)."""
        return contextlib.nullcontext()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class CallbackList:
    """The run's callbacks, called in order; registered with Accelerate as one object, so that their states
    travel in every checkpoint (keyed by class name, numbered when a class appears twice)."""

    def __init__(self, callbacks: list[Callback]) -> None:
        for callback in callbacks:
            if not isinstance(callback, Callback):
                raise UserError(f"callbacks must be instances of beton_trainer.Callback subclasses, got "
                                f"{type(callback).__name__}; subclass Callback and override the hooks you need")
        self.callbacks = list(callbacks)
        self.instruments = [c for c in self.callbacks if c.watches_steps]
        seen: Counter[str] = Counter()
        self.keys = []
        for callback in self.callbacks:
            name = type(callback).__name__
            seen[name] += 1
            self.keys.append(name if seen[name] == 1 else f"{name}#{seen[name]}")

    def __iter__(self):
        return iter(self.callbacks)

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(*args)

    def on_fit_start(self, run: Run) -> None:
        self._call("on_fit_start", run)

    def on_phase_start(self, run: Run, phase: Phase) -> None:
        self._call("on_phase_start", run, phase)

    def on_epoch_start(self, run: Run) -> None:
        self._call("on_epoch_start", run)

    def on_step_end(self, run: Run) -> None:
        self._call("on_step_end", run)

    def on_evaluate(self, run: Run, split: str, metrics: dict[str, float]) -> None:
        self._call("on_evaluate", run, split, metrics)

    def on_epoch_end(self, run: Run, row: dict[str, Any]) -> None:
        self._call("on_epoch_end", run, row)

    def on_checkpoint(self, run: Run, path: Path) -> None:
        self._call("on_checkpoint", run, path)

    def on_train_end(self, run: Run) -> None:
        self._call("on_train_end", run)

    def on_fit_end(self, run: Run, summary: dict[str, Any]) -> None:
        self._call("on_fit_end", run, summary)

    def watch_step(self, run: Run, steady: bool) -> contextlib.AbstractContextManager:
        """The instruments' contexts around one step; nothing at all without instruments."""
        if not self.instruments:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for callback in self.instruments:
            stack.enter_context(callback.watch_step(run, steady))
        return stack

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {key: callback.state_dict() for key, callback in zip(self.keys, self.callbacks)}

    def load_state_dict(self, state: dict[str, dict[str, Any]]) -> None:
        for key, callback in zip(self.keys, self.callbacks):
            if state.get(key):
                callback.load_state_dict(state[key])
