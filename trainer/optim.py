"""Optimizers with per-module parameter groups, and LR schedules as closed-form multipliers.

Every schedule is one `LambdaLR` stepped once per batch. Schedules that torch steps per epoch
(cosine, warm restarts, step) use the epoch index (step // steps_per_epoch), so the learning rates
equal those of the torch scheduler stepped each epoch; OneCycle moves every batch. One mechanism
keeps resume exact (the scheduler state is the step count) and makes warm-up composable.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from beton_trainer.common.errors import UserError
from beton_trainer.trainer.config import OptimizerConfig, PhaseConfig, ScheduleConfig

__all__ = ["build_optimizer", "build_scheduler", "check_module_prefixes", "param_groups", "set_trainable"]


def _matches(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def check_module_prefixes(model: nn.Module, prefixes: list[str], key: str) -> None:
    """Fail clearly when a recipe names a module the model does not have."""
    names = {n for n, _ in model.named_modules()}
    for prefix in prefixes:
        if prefix not in names:
            top = sorted({n.split(".")[0] for n in names if n})
            raise UserError(f"'{key}' names module '{prefix}', which {type(model).__name__} does not have; "
                            f"top-level modules: {', '.join(top)}")


def set_trainable(model: nn.Module, train_modules: list[str]) -> int:
    """Freeze every parameter outside `train_modules` ([] = train all). Returns the trainable count."""
    check_module_prefixes(model, train_modules, "train_modules")
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(not train_modules or _matches(name, train_modules))
        count += param.numel() if param.requires_grad else 0
    return count


def param_groups(model: nn.Module, phase: PhaseConfig) -> list[dict]:
    """Trainable parameters split into the phase's named groups (own LR), the rest at the optimizer's LR.

    With `no_decay_norm_bias`, 1-D parameters (norm weights, biases) of each group get weight_decay 0.
    """
    opt = phase.optimizer
    for i, group in enumerate(phase.param_groups):
        check_module_prefixes(model, group.modules, f"phases.param_groups[{i}].modules")
    buckets: dict[str, list[tuple[str, nn.Parameter]]] = {}
    lrs = {"base": opt.lr}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        label = "base"
        for group in phase.param_groups:
            if _matches(name, group.modules):
                label = "+".join(group.modules)
                lrs[label] = group.lr
                break
        buckets.setdefault(label, []).append((name, param))
    groups = []
    for label, named in buckets.items():
        if opt.no_decay_norm_bias:
            decay = [p for _, p in named if p.ndim > 1]
            no_decay = [p for _, p in named if p.ndim <= 1]
            parts = [(label, decay, opt.weight_decay), (f"{label}_no_decay", no_decay, 0.0)]
        else:
            parts = [(label, [p for _, p in named], opt.weight_decay)]
        groups += [{"name": n, "params": ps, "lr": lrs[label], "weight_decay": wd} for n, ps, wd in parts if ps]
    if not groups:
        raise UserError(f"phase '{phase.name}' has no trainable parameters: check its train_modules")
    return groups


def build_optimizer(groups: list[dict], opt: OptimizerConfig, device_type: str = "cpu") -> torch.optim.Optimizer:
    """The recipe's optimizer: fused kernels on CPU/CUDA (one launch for all tensors, the step count kept on the
    device, and fp16's loss scaler then checks for infinities on the device instead of reading them on the
    host), foreach elsewhere."""
    fast = {"fused": True} if device_type in ("cpu", "cuda") else {"foreach": True}
    if opt.name == "sgd":
        return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov, **fast)
    if opt.name == "adam":
        return torch.optim.Adam(groups, lr=opt.lr, betas=opt.betas, **fast)
    if opt.name == "adamw":
        return torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas, **fast)
    return torch.optim.RMSprop(groups, lr=opt.lr, momentum=opt.momentum, foreach=True)  # torch has no fused RMSprop


def _shape(sched: ScheduleConfig, base_lr: float, epochs: int, steps_per_epoch: int) -> Callable[[int], float]:
    """LR multiplier at a global step of the phase, before warm-up."""
    if sched.name == "constant":
        return lambda step: 1.0
    if sched.name == "cosine":
        t_max = sched.t_max or epochs
        floor = sched.eta_min / base_lr
        return lambda step: floor + (1 - floor) * (1 + math.cos(math.pi * (step // steps_per_epoch) / t_max)) / 2
    if sched.name == "warm_restarts":
        floor = sched.eta_min / base_lr

        def restarts(step: int) -> float:
            epoch, period = step // steps_per_epoch, sched.t_0
            while epoch >= period:
                epoch -= period
                period *= sched.t_mult
            return floor + (1 - floor) * (1 + math.cos(math.pi * epoch / period)) / 2
        return restarts
    if sched.name == "step":
        return lambda step: sched.gamma ** ((step // steps_per_epoch) // sched.step_size)
    if sched.name == "triangular":
        return _triangular(sched.peak_epoch, epochs, steps_per_epoch)
    # onecycle, torch defaults: start at max/25, cosine up for pct_start, cosine down to start/1e4
    total = epochs * steps_per_epoch
    up_end = sched.pct_start * total - 1
    start, low = 1 / 25, 1 / 25 / 1e4

    def onecycle(step: int) -> float:
        if step <= up_end:
            a, b, pct = start, 1.0, step / up_end if up_end > 0 else 1.0
        else:
            a, b, pct = 1.0, low, (step - up_end) / (total - 1 - up_end)
        return b + (a - b) / 2 * (1 + math.cos(math.pi * min(pct, 1.0)))
    return onecycle


def _triangular(peak: float, epochs: int, steps_per_epoch: int) -> Callable[[int], float]:
    """ffcv-imagenet's "cyclic" schedule, per step: linear from 1e-4 up to 1 at epoch `peak`, then linear
    down to 0 at the end of the phase (at fractional epoch step / steps_per_epoch)."""
    if peak > epochs:
        raise UserError(f"'schedule.peak_epoch' {peak} is past the phase's {epochs} epochs; "
                        f"set it to at most {epochs}")
    start = 1e-4

    def triangular(step: int) -> float:
        t = step / steps_per_epoch
        return start + (1 - start) * t / peak if t < peak else (epochs - t) / (epochs - peak)
    return triangular


def build_scheduler(optimizer: torch.optim.Optimizer, sched: ScheduleConfig, *, epochs: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """One per-batch LambdaLR for all schedules, with optional linear warm-up."""
    warmup = 0 if sched.name == "onecycle" else int(sched.warmup_epochs * steps_per_epoch)
    lambdas = []
    for group in optimizer.param_groups:
        shape = _shape(sched, group["lr"], epochs, steps_per_epoch)
        lambdas.append(lambda step, shape=shape: shape(step) * (min(1.0, (step + 1) / warmup) if warmup else 1.0))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
