"""Early stopping and the best weights: each phase's `early_stopping` table (metric, mode, patience).

The phase stops once its metric has not improved for `patience` epochs, and every improvement writes the
evaluated module to best.safetensors, which the final test and the export then use. A phase without a
metric runs all its epochs, and the run's last weights decide.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from beton_trainer.common.errors import UserError
from beton_trainer.trainer.callbacks import Callback
from beton_trainer.trainer.config import PhaseConfig
from beton_trainer.trainer.modelio import save_weights

if TYPE_CHECKING:
    from beton_trainer.trainer.state import Phase, Run

__all__ = ["EarlyStopping"]


class EarlyStopping(Callback):
    """Counts each phase's epochs without improvement of the watched metric; keeps the phase's best weights."""

    def __init__(self, phases: list[PhaseConfig], has_val: bool) -> None:
        known = {f"{s}_{m}" for s in ("train", "test") + (("val",) if has_val else ()) for m in ("loss", "accuracy")}
        for metric in {p.early_stopping.metric for p in phases if p.early_stopping.metric} - known:
            raise UserError(f"early stopping watches '{metric}', which this run does not compute; choose one of "
                            f"{', '.join(sorted(known))}" + ("" if has_val else " (or set data.val_split=val)"))
        self.phases = phases
        self.best: float | None = None  # the current phase's best value so far
        self.bad_epochs = 0

    def on_phase_start(self, run: Run, phase: Phase) -> None:
        self.best, self.bad_epochs = None, 0

    def observe(self, row: dict[str, Any], config: PhaseConfig) -> bool:
        """Record this epoch's value; True when it is the phase's best so far."""
        rule = config.early_stopping
        if not rule.metric:
            return False
        value = row[rule.metric]
        improved = self.best is None or (value < self.best if rule.mode == "min" else value > self.best)
        if improved:
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        return improved

    def on_epoch_end(self, run: Run, row: dict[str, Any]) -> None:
        config = self.phases[run.phase.index]
        rule = config.early_stopping
        if self.observe(row, config) and run.main:
            save_weights(run.eval_model(), run.best_path)
        if rule.metric and self.bad_epochs >= rule.patience:
            run.stop_phase = True
            if run.main:
                print(f"early stopping: {rule.metric} has not improved for {rule.patience} epochs")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_epochs = state["best"], state["bad_epochs"]
