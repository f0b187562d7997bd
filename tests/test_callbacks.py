"""Callbacks: a user's behaviour added to the loop without editing it, through the public API only.

Real MNIST digits, held in memory; each test checks what the hooks saw against what the run wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from beton_trainer import Callback, Trainer, UserError
from beton_trainer.trainer.loop import LOG_EVERY
from tests.data_fixtures import mnist_subset

N_TRAIN, N_TEST = 2000, 500
RECIPE = {"name": "callbacks", "data": {"batch_size": 50, "eval_batch_size": 250},
          "model": {"name": "mlp", "args": {"hidden_size": 32, "depth": 1}},
          "phases": [{"epochs": 5, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
                      "schedule": {"name": "cosine"}}],
          "max_steps_per_epoch": 12, "tensorboard": False}
SAME = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr_base")


@pytest.fixture(scope="module")
def mnist(real_data_root: Path) -> dict:
    return mnist_subset(real_data_root, N_TRAIN, N_TEST)


class LearningRates(Callback):
    """Records the learning rate of every epoch; ends the run once the test accuracy reaches `target`."""

    def __init__(self, target: float = 2.0) -> None:
        self.target = target
        self.lrs: list[float] = []

    def on_epoch_end(self, run, row) -> None:
        self.lrs.append(row["lr_base"])
        if row["test_accuracy"] >= self.target:
            run.stop_training = True

    def state_dict(self) -> dict:
        return {"lrs": self.lrs}

    def load_state_dict(self, state: dict) -> None:
        self.lrs = list(state["lrs"])


class Interrupt(Callback):
    """Fails the run right after its `after`-th checkpoint is complete, as a killed job would stop."""

    def __init__(self, after: int) -> None:
        self.after, self.seen = after, 0

    def on_checkpoint(self, run, path: Path) -> None:
        self.seen += 1
        if self.seen == self.after:
            raise RuntimeError(f"interrupted after {path.name}")


def rows(result) -> list[tuple]:
    return [tuple(row[c] for c in SAME) for row in result.history]


def test_a_users_callback_records_stops_and_resumes_with_its_state(mnist, tmp_path):
    recorder = LearningRates()
    reference = Trainer(RECIPE, data=mnist, device="cpu", run_dir=tmp_path / "reference", callbacks=[recorder]).fit()
    assert recorder.lrs == [row["lr_base"] for row in reference.history] and len(recorder.lrs) == 5
    assert recorder.lrs == sorted(recorder.lrs, reverse=True) and recorder.lrs[0] > recorder.lrs[-1]  # cosine

    # the same run, killed right after its third checkpoint (end of epoch 3), then resumed with a fresh callback:
    # its state comes back from the checkpoint, and the run ends exactly as the uninterrupted one
    folder = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="interrupted after step-000000036"):
        Trainer(RECIPE, data=mnist, device="cpu", run_dir=folder, callbacks=[LearningRates(), Interrupt(3)]).fit()
    again = LearningRates()
    resumed = Trainer(RECIPE, data=mnist, device="cpu", run_dir=folder, callbacks=[again]).fit(resume=True)
    assert again.lrs == recorder.lrs
    assert rows(resumed) == rows(reference)
    assert resumed.summary["test_accuracy"] == reference.summary["test_accuracy"]

    # a target the run reaches: it stops after that epoch, and is tested and exported as usual
    target = reference.history[1]["test_accuracy"]
    stopping = LearningRates(target=target)
    stopped = Trainer(RECIPE, data=mnist, device="cpu", run_dir=tmp_path / "target", callbacks=[stopping]).fit()
    reached = next(i for i, row in enumerate(reference.history) if row["test_accuracy"] >= target)
    assert len(stopped.history) == reached + 1 < 5
    assert stopped.summary["early_stopped"] and stopped.summary["epochs"] == reached + 1
    assert stopped.summary["test_accuracy"] == stopped.history[-1]["test_accuracy"] >= target


class Hooks(Callback):
    """Every hook call in order, with what the run showed at that moment."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_fit_start(self, run) -> None:
        self.calls.append(("fit_start",))

    def on_phase_start(self, run, phase) -> None:
        self.calls.append(("phase_start", phase.index))

    def on_epoch_start(self, run) -> None:
        self.calls.append(("epoch_start", run.epoch_number))

    def on_step_end(self, run) -> None:
        # a host read here is harmless: no hook runs inside a steady-state step
        seen = int(torch.tensor(run.totals.seen).item())
        self.calls.append(("step_end", run.progress.global_step, run.progress.batch, seen))

    def on_evaluate(self, run, split, metrics) -> None:
        self.calls.append(("evaluate", split, metrics["count"]))

    def on_epoch_end(self, run, row) -> None:
        row["hooks_seen"] = len(self.calls)  # a column of the user's own
        self.calls.append(("epoch_end", row["epoch"]))

    def on_checkpoint(self, run, path) -> None:
        self.calls.append(("checkpoint", path.name))

    def on_train_end(self, run) -> None:
        self.calls.append(("train_end",))

    def on_fit_end(self, run, summary) -> None:
        summary["hooks"] = len(self.calls)
        self.calls.append(("fit_end", summary["epochs"]))


def test_hooks_fire_in_order_at_logging_steps_only_and_add_to_the_outputs(mnist, tmp_path):
    steps = 2 * LOG_EVERY + 7  # logging steps 50, 100 and the epoch's last
    recipe = {**RECIPE, "data": {"batch_size": 16, "eval_batch_size": 250}, "max_steps_per_epoch": steps,
              "phases": [{"name": "a", "epochs": 1}, {"name": "b", "epochs": 1}]}
    hooks = Hooks()
    result = Trainer(recipe, data=mnist, device="cpu", run_dir=tmp_path / "run", callbacks=[hooks]).fit()

    def epoch(number: int, first_step: int) -> list[tuple]:
        logged = [LOG_EVERY, 2 * LOG_EVERY, steps]
        return [("epoch_start", number),
                *[("step_end", first_step + k, k, 16 * k) for k in logged],
                ("evaluate", "test", N_TEST), ("epoch_end", number + 1)]

    assert hooks.calls == [("fit_start",), ("phase_start", 0), *epoch(0, 0),
                           ("checkpoint", f"step-{steps:09d}"), ("phase_start", 1), *epoch(1, steps),
                           ("train_end",), ("fit_end", 2)]
    assert [row["hooks_seen"] for row in result.history] == [7, 15]
    assert json.loads((result.run_dir / "summary.json").read_text())["hooks"] == len(hooks.calls) - 1
    assert "hooks_seen" in (result.run_dir / "metrics.csv").read_text().splitlines()[0]


class EndPhase(Callback):
    def on_epoch_end(self, run, row) -> None:
        run.stop_phase = run.phase.index == 0  # the first phase ends after one of its three epochs


def test_a_callback_ends_a_phase_and_the_next_one_runs(mnist, tmp_path):
    recipe = {**RECIPE, "phases": [{"name": "a", "epochs": 3}, {"name": "b", "epochs": 2}]}
    result = Trainer(recipe, data=mnist, device="cpu", run_dir=tmp_path / "run", callbacks=[EndPhase()]).fit()
    assert [row["phase"] for row in result.history] == ["a", "b", "b"]
    assert result.summary["early_stopped"]


def test_a_callback_that_is_not_one_is_refused_in_one_line(mnist, tmp_path):
    with pytest.raises(UserError, match="callbacks must be instances of beton_trainer.Callback subclasses, got "
                                        "function"):
        Trainer(RECIPE, data=mnist, device="cpu", run_dir=tmp_path / "run", callbacks=[lambda run: None]).fit()
