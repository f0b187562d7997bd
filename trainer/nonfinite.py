"""The non-finite check: training stops with one line once the loss (or, without fp16's loss scaler, the
gradient norm) is not finite.

It looks at the epoch's sums over all ranks at logging steps only (each look syncs the device), and those
include every checkpoint step, so a checkpoint never holds weights trained past a non-finite step, and every
rank stops at the same step.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from beton_trainer.common.errors import UserError
from beton_trainer.trainer.callbacks import Callback

if TYPE_CHECKING:
    from beton_trainer.trainer.state import Run

__all__ = ["NonFiniteCheck"]


class NonFiniteCheck(Callback):
    """Raises a UserError naming the step, the learning rate and the last finite loss."""

    def __init__(self, check_grads: bool) -> None:
        self.check_grads = check_grads
        self.last: tuple[float, int] | None = None  # (loss, step) at the last finite check

    def on_step_end(self, run: Run) -> None:
        totals, step = run.totals, run.progress.global_step
        loss = totals.loss
        what, value = ("gradient norm", totals.nonfinite_grad_norm_sum) if self.check_grads and math.isfinite(loss) \
            else ("loss", loss)
        if math.isfinite(value):
            self.last = (loss, step)
            return
        lr = run.phase.step.last_lrs[0]
        last = f"last finite loss {self.last[0]:.4g} at step {self.last[1]}" if self.last else "no finite loss seen"
        raise UserError(f"the training {what} became {value} by step {step} (lr {lr:.3g}; {last}); lower the "
                        f"learning rate or enable grad_clip_norm; the last good checkpoint is kept in {run.ckpt_root}")
