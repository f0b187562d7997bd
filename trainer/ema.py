"""An exponential moving average of the weights that never waits for the host.

torch's `AveragedModel` keeps its update count on the host (a host-to-device copy every step) and
updates tensor by tensor (~600 small ops for ResNet34). This one copies the model once, then blends
all floating-point parameters and buffers with one `_foreach_lerp_` every `every` steps, using
decay**every so the average follows the same time constant (timm's ModelEmaV3 does the same). The
update count lives on the device. Integer buffers (BatchNorm's `num_batches_tracked`) are copied.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from beton_trainer.trainer.callbacks import Callback

__all__ = ["Ema", "ModelEma"]


class ModelEma:
    """`module` holds the averaged weights; `update(step)` blends the live model in on every k-th step."""

    def __init__(self, model: nn.Module, decay: float, every: int = 1) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.every = every
        self.weight = 1 - decay ** every  # a Python float: no tensor is built per update
        live = list(model.parameters()) + list(model.buffers())
        mine = list(self.module.parameters()) + list(self.module.buffers())
        self._float = ([d for d, s in zip(mine, live) if d.is_floating_point()],
                       [s.detach() for s in live if s.is_floating_point()])
        self._other = ([d for d, s in zip(mine, live) if not d.is_floating_point()],
                       [s.detach() for s in live if not s.is_floating_point()])
        self.updates = torch.zeros((), dtype=torch.int64, device=next(model.parameters()).device)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Blend the live weights in when `step` (1-based, a host counter) is a multiple of `every`."""
        if step % self.every:
            return
        torch._foreach_lerp_(self._float[0], self._float[1], self.weight)
        if self._other[0]:
            torch._foreach_copy_(self._other[0], self._other[1])
        self.updates.add_(1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.module.state_dict(), "ema.updates": self.updates}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        self.updates.copy_(state.pop("ema.updates"))
        self.module.load_state_dict(state)


class Ema(Callback):
    """recipe `ema_decay`: the run's weights as an exponential moving average (see the module's docstring)."""

    def __init__(self, decay: float, every: int = 1) -> None:
        self.decay, self.every = decay, every
        self.ema: ModelEma | None = None

    def on_fit_start(self, run) -> None:
        self.ema = ModelEma(run.model, self.decay, self.every)
        run.evaluated = self.ema.module
        run.step_updates.append(self.ema.update)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.ema.state_dict() if self.ema is not None else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.ema.load_state_dict(state)
