"""Schedules equal torch's own schedulers; parameter groups and freezing do what recipes say."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from beton_trainer.common.errors import UserError
from beton_trainer.trainer.config import OptimizerConfig, ParamGroupConfig, PhaseConfig, ScheduleConfig
from beton_trainer.trainer.optim import build_optimizer, build_scheduler, param_groups, set_trainable

SPE = 7  # steps per epoch


def _lrs(sched_cfg: ScheduleConfig, epochs: int, lr: float = 0.1) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = build_scheduler(opt, sched_cfg, epochs=epochs, steps_per_epoch=SPE)
    out = []
    for _ in range(epochs * SPE):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _torch_per_epoch(make, epochs: int, lr: float = 0.1) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make(opt)
    out = []
    for _ in range(epochs):
        out += [opt.param_groups[0]["lr"]] * SPE
        opt.step()
        sched.step()
    return out


def test_cosine_matches_torch_per_epoch():
    ours = _lrs(ScheduleConfig(name="cosine", t_max=10, eta_min=1e-4), 10)
    ref = _torch_per_epoch(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10, eta_min=1e-4), 10)
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_warm_restarts_matches_torch():
    ours = _lrs(ScheduleConfig(name="warm_restarts", t_0=2, t_mult=2, eta_min=1e-3), 14)
    ref = _torch_per_epoch(lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        o, T_0=2, T_mult=2, eta_min=1e-3), 14)
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_step_matches_torch():
    ours = _lrs(ScheduleConfig(name="step", step_size=3, gamma=0.5), 10)
    ref = _torch_per_epoch(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5), 10)
    assert ours == pytest.approx(ref, rel=1e-9)


def test_onecycle_matches_torch_per_batch():
    ours = _lrs(ScheduleConfig(name="onecycle", pct_start=0.3), 5)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=5 * SPE, pct_start=0.3,
                                                cycle_momentum=False)
    ref = []
    for _ in range(5 * SPE):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert ours == pytest.approx(ref, rel=1e-6)


def test_warmup_ramps_linearly_then_follows_schedule():
    lrs = _lrs(ScheduleConfig(name="constant", warmup_epochs=1), 2)
    assert lrs[:SPE] == pytest.approx([0.1 * (i + 1) / SPE for i in range(SPE)])
    assert lrs[SPE:] == pytest.approx([0.1] * SPE)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.fc = nn.Linear(4, 2)


def test_freeze_groups_and_no_decay():
    net = Net()
    assert set_trainable(net, ["fc"]) == 10
    assert not any(p.requires_grad for p in net.body.parameters())
    set_trainable(net, [])
    phase = PhaseConfig(epochs=1, optimizer=OptimizerConfig(lr=1e-3, weight_decay=5e-4, no_decay_norm_bias=True),
                        param_groups=[ParamGroupConfig(modules=["fc"], lr=1e-2)])
    groups = param_groups(net, phase)
    by_name = {g["name"]: g for g in groups}
    assert by_name["fc"]["lr"] == 1e-2 and by_name["fc"]["weight_decay"] == 5e-4
    assert by_name["fc_no_decay"]["weight_decay"] == 0.0
    assert by_name["base"]["lr"] == 1e-3
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in net.parameters())
    opt = build_optimizer(groups, phase.optimizer)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in groups]


def test_unknown_module_is_a_clear_error():
    with pytest.raises(UserError, match="does not have; top-level modules: body, fc"):
        set_trainable(Net(), ["head"])


def test_triangular_matches_ffcv_imagenet_by_hand():
    """ffcv-imagenet's per-step LR: np.interp(epoch + i / steps, [0, peak, epochs], [1e-4 * lr, lr, 0])."""
    spe, lr = 4, 2.0
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = build_scheduler(opt, ScheduleConfig(name="triangular", peak_epoch=2), epochs=5, steps_per_epoch=spe)
    ours = []
    for _ in range(5 * spe):
        ours.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    up = [lr * (1e-4 + (1 - 1e-4) * (i / spe) / 2) for i in range(2 * spe)]  # 0 .. peak: 2e-4 -> 2.0
    down = [lr * (5 - (2 + i / spe)) / 3 for i in range(3 * spe)]  # peak .. end: 2.0 -> 0
    assert ours == pytest.approx(up + down, rel=1e-12)
    assert ours[0] == pytest.approx(2e-4) and ours[2 * spe] == pytest.approx(lr)
    assert ours[-1] == pytest.approx(lr * 0.25 / 3)  # a quarter epoch before the end


def test_triangular_peak_past_the_phase_is_a_clear_error():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(UserError, match="'schedule.peak_epoch' 5.0 is past the phase's 3 epochs"):
        build_scheduler(opt, ScheduleConfig(name="triangular", peak_epoch=5.0), epochs=3, steps_per_epoch=2)
