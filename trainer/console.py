"""What a run prints while it trains: a line per phase, a progress bar per epoch (tqdm: widgets in a notebook,
the console bar elsewhere) moved at logging steps with the loss so far, and a line per epoch. Main process only."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from beton_trainer.trainer.callbacks import Callback

if TYPE_CHECKING:
    from beton_trainer.trainer.state import Phase, Run

__all__ = ["ProgressBar"]


class ProgressBar(Callback):
    """The console's view of the run (see the module's docstring)."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def on_phase_start(self, run: Run, phase: Phase) -> None:
        if run.main:
            print(f"phase {phase.index + 1}/{len(run.recipe.phases)} '{phase.config.name}': {phase.config.epochs} "
                  f"epochs, {phase.trainable:,} trainable parameters, groups {', '.join(phase.group_names)}")

    def on_epoch_start(self, run: Run) -> None:
        interactive = sys.stderr.isatty() or "ipykernel" in sys.modules
        self.bar = tqdm(total=run.steps_per_epoch, initial=run.progress.batch, disable=not run.main, leave=False,
                        desc=f"epoch {run.epoch_number + 1}/{run.recipe.total_epochs}",
                        mininterval=0.1 if interactive else 30)

    def on_step_end(self, run: Run) -> None:
        self.bar.update(run.progress.batch - self.bar.n)
        self.bar.set_postfix(loss=f"{run.totals.loss:.4f}")

    def on_epoch_end(self, run: Run, row: dict[str, Any]) -> None:
        self.bar.close()
        if run.main:
            shown = {k: f"{v:.4f}" for k, v in row.items() if k.endswith(("loss", "accuracy"))}
            print(f"epoch {row['epoch']}/{run.recipe.total_epochs} {row['phase']}: "
                  + " ".join(f"{k} {v}" for k, v in shown.items()) + f" ({row['epoch_time_s']:.1f}s)")
