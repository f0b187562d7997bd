"""The one training step, shared by the trainer and the throughput benchmarks, and the epoch's running sums.

Nothing in a step waits for the host: the loss, accuracy and gradient-norm sums stay on the device
(`EpochSums`, summed a few steps at a time, read at logging steps and epoch ends), the parameter list is
built once per phase, the gradient norm is computed only when it is clipped by or logged, the EMA is a
foreach blend with host-side constants, and the optimizers are fused where torch has them
(`trainer.optim`), so fp16's loss scaler does not read `found_inf` on the host.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from accelerate import Accelerator
from accelerate.utils.modeling import get_mixed_precision_context_manager
from torch import nn

from beton_trainer.trainer.config import Recipe
from beton_trainer.trainer.losses import loss_terms
from beton_trainer.trainer.profiling import unlabelled

__all__ = ["EpochSums", "EpochTotals", "TrainStep", "configure_backends"]


def configure_backends(device: torch.device, *, deterministic: bool = False, strict_fp32: bool = False) -> dict:
    """cuDNN's autotuner (fixed shapes: it picks the fastest kernels) and, on CUDA, TF32 for fp32 matmuls and
    convolutions, set in this one place for train.py and the throughput benchmarks alike, so a benchmark
    times the step users run. `strict_fp32` (the recipe key) keeps full fp32; TF32 stays off on the CPU,
    where the setting would change CPU matmuls. Process-wide torch settings; what was set, for
    environment.json. Only a GPU can time their effect (benchmarks/device/README.md)."""
    tf32 = device.type == "cuda" and not strict_fp32
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    return {"cudnn_benchmark": torch.backends.cudnn.benchmark, "cudnn_allow_tf32": tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


@dataclass
class EpochTotals:
    """The epoch's sums read back to the host (summed over ranks at the epoch's end)."""

    loss_sum: float = 0.0
    correct: float = 0.0
    seen: float = 0.0
    grad_norm_sum: float = 0.0
    grad_norms: float = 0.0  # how many finite gradient norms were summed (every step when clipping by norm)
    nonfinite_grad_norm_sum: float = 0.0  # the others' sum: 0, or inf/NaN (what the non-finite check looks at)
    kd_soft_sum: float = 0.0
    kd_hard_sum: float = 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.seen, 1)

    @property
    def grad_norm(self) -> float:
        return self.grad_norm_sum / max(self.grad_norms, 1)


NAMES = [f.name for f in fields(EpochTotals)]


# per-sample mean terms, summed times the batch size: epoch total -> the loss term it sums
WEIGHTED = {"loss_sum": "loss", "kd_soft_sum": "kd_soft_loss", "kd_hard_sum": "kd_hard_loss"}


class EpochSums:
    """Running sums on the device, one 0-d float64 tensor per `EpochTotals` field but `seen` (host-known).

    A step queues its loss terms and its hits (prediction == label) and they are summed every `FLUSH_EVERY`
    steps, or when the batch size changes or the sums are read: a few batched ops instead of six small ones
    a step, which on a laptop CPU cost ~60 µs of a tiny model's ~350 µs step.
    """

    FLUSH_EVERY = 32

    def __init__(self, device: torch.device, start: EpochTotals | None = None) -> None:
        start = start or EpochTotals()
        self.seen = int(start.seen)
        self.values = {n: torch.full((), getattr(start, n), dtype=torch.float64, device=device)
                       for n in NAMES if n != "seen"}
        self._queued: dict[str, list[torch.Tensor]] = {total: [] for total in WEIGHTED}
        self._hits: list[torch.Tensor] = []
        self._batch = 0  # the batch size of every queued step

    def add(self, terms: dict[str, torch.Tensor], logits: torch.Tensor, targets: torch.Tensor,
            grad_norm: torch.Tensor | None) -> None:
        n = targets.shape[0]
        if n != self._batch:
            self._flush()
            self._batch = n
        for total, term in WEIGHTED.items():
            if term in terms:
                self._queued[total].append(terms[term].detach())
        labels = targets.argmax(1) if targets.dtype.is_floating_point else targets
        self._hits.append(logits.argmax(1) == labels)
        if grad_norm is not None:  # only finite norms: fp16's loss scaler skips the steps whose norm is inf/NaN
            norm = grad_norm.detach()
            finite = torch.isfinite(norm)
            self.values["grad_norm_sum"].add_(torch.where(finite, norm, 0.0))
            self.values["grad_norms"].add_(finite)
            self.values["nonfinite_grad_norm_sum"].add_(torch.where(finite, 0.0, norm))
        self.seen += n
        if len(self._hits) >= self.FLUSH_EVERY:
            self._flush()

    def _flush(self) -> None:
        """Add the queued steps to the running sums (device ops only)."""
        if not self._hits:
            return
        for total, queued in self._queued.items():
            if queued:
                self.values[total].add_(torch.stack(queued).sum(dtype=torch.float64), alpha=self._batch)
                queued.clear()
        self.values["correct"].add_(torch.cat(self._hits).sum())
        self._hits.clear()

    def stacked(self) -> torch.Tensor:
        """All fields as one device tensor, in `NAMES` order (for a reduction across ranks)."""
        self._flush()
        seen = self.values["loss_sum"].new_full((), self.seen)  # a fill, not a host-to-device copy
        return torch.stack([seen if n == "seen" else self.values[n] for n in NAMES])

    @staticmethod
    def totals(stacked: torch.Tensor) -> EpochTotals:
        """Read a `stacked()` tensor back to the host: the one sync."""
        return EpochTotals(*stacked.tolist())


class TrainStep:
    """Forward under autocast, loss terms, backward, clipping, optimizer, schedule, `updates`, running sums."""

    def __init__(self, accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, recipe: Recipe, *,
                 teacher: nn.Module | None = None, updates: list[Callable[[int], None]] | None = None) -> None:
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.recipe, self.teacher = recipe, teacher
        self.updates = updates if updates is not None else []  # device-only work after the optimizer (the EMA)
        # Accelerate's context and optimizer wrappers look up optional packages and signatures on every call
        # (~1 ms a step on a laptop CPU): take the autocast context once, and without a loss scaler or gradient
        # accumulation (their only work here) backward, step and zero directly
        self.autocast = get_mixed_precision_context_manager(accelerator.native_amp, accelerator.autocast_handler)
        direct = accelerator.scaler is None and accelerator.gradient_accumulation_steps == 1
        inner = getattr(optimizer, "optimizer", optimizer)
        self.backward = torch.Tensor.backward if direct else accelerator.backward
        self.optimizer_step = inner.step if direct else optimizer.step
        self.zero_grad = inner.zero_grad if direct else optimizer.zero_grad
        if accelerator.scaler is not None and not getattr(inner, "_step_supports_amp_scaling", False):
            from beton_trainer.common.errors import UserError

            raise UserError(f"precision fp16 with {type(inner).__name__}: torch has no fused kernel for it, so the "
                            "loss scaler would read found_inf on the host every step; use precision=bf16, or "
                            "sgd/adam/adamw")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.steps = 0  # steps taken by this object (drives the EMA's every-k schedule)
        self.last_lrs = scheduler.get_last_lr()  # the rates the latest step used (host floats)
        self.label = unlabelled  # torch.profiler.record_function while --profile runs

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, sums: EpochSums, *, log: bool) -> None:
        """One optimizer step; `log` also computes the gradient norm when nothing clips by norm."""
        with self.label("forward"), self.autocast:
            logits = self.model(images)
            teacher_logits = None
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits = self.teacher(images).float()
            terms = loss_terms(self.recipe, logits.float(), targets, teacher_logits)
        with self.label("backward"):
            self.backward(terms["loss"])
        with self.label("optimizer"):
            grad_norm = self._clip(log)
            self.optimizer_step()
            self.last_lrs = self.scheduler.get_last_lr()
            self.scheduler.step()
            self.zero_grad(set_to_none=True)
            self.steps += 1
            for update in self.updates:
                update(self.steps)
            sums.add(terms, logits, targets, grad_norm)

    def _clip(self, log: bool) -> torch.Tensor | None:
        """Clip as the recipe says; the gradient norm when it comes for free or `log` asks for it."""
        if self.recipe.grad_clip_norm:
            return self.accelerator.clip_grad_norm_(self.params, self.recipe.grad_clip_norm)
        if self.recipe.grad_clip_value:
            self.accelerator.clip_grad_value_(self.params, self.recipe.grad_clip_value)
        elif log:
            self.accelerator.unscale_gradients()
        if not log:
            return None
        return torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
