"""What a run is made of while it trains, shared by the loop and every callback: how it was asked to run
(`RunOptions`), where it stands (`Progress`, saved in every checkpoint), its loaders (`Data`), the current
phase's objects (`Phase`) and the run itself (`Run`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from accelerate import Accelerator
from torch import nn

from beton_trainer.format.dataset import Split
from beton_trainer.pipelines.base import Loader
from beton_trainer.trainer.config import PhaseConfig, Recipe
from beton_trainer.trainer.step import EpochTotals, TrainStep
from beton_trainer.trainer.timing import EpochTimes, StepTimer

if TYPE_CHECKING:
    from beton_trainer.trainer.callbacks import Callback, CallbackList

__all__ = ["Data", "Phase", "Progress", "Run", "RunOptions", "StopRequest"]


class StopRequest:
    """Asks a run to stop with a checkpoint at its next logging step (the command line's SIGTERM/SIGINT handlers
    set it; a library never installs signal handlers). The flag is combined across ranks at that step, so every
    rank stops at the same step whichever rank was asked."""

    def __init__(self) -> None:
        self.requested = False

    def request(self, *_: object) -> None:
        """Set the flag (usable as a signal handler)."""
        self.requested = True


@dataclass
class RunOptions:
    """What the command line decides besides the recipe, and what the Python API (`trainer.api`) builds in Python."""

    run_dir: str | None = None
    resume: str | None = None  # "auto" (the newest good checkpoint of run_dir, if any) or a run/checkpoint path
    cpu: bool = False
    deterministic: bool = False
    check_syncs: bool = False  # fail on any host-device sync in a steady-state step
    profile_steps: int = 0  # profile this many steps after warm-up (trace and table in the run folder)
    model: nn.Module | None = None  # trained in place of the registry model (recipe.model.name "custom:<Class>")
    splits: dict[str, Split] | None = None  # in-memory data for the tensor backend, in place of data.path
    metrics: dict[str, Callable] = field(default_factory=dict)  # name -> fn(logits, labels), on val and test
    callbacks: list[Callback] = field(default_factory=list)  # the user's: after the built-in ones, before loggers
    stop: StopRequest = field(default_factory=StopRequest)


@dataclass
class Progress:
    """Where a run stands: what progress.json in each checkpoint holds."""

    phase: int = 0
    epoch: int = 0  # within the phase
    batch: int = 0  # the next batch of the epoch
    global_step: int = 0
    sums: dict = field(default_factory=dict)  # EpochTotals over all ranks so far this epoch (mid-epoch saves)
    history: list[dict] = field(default_factory=list)  # one metrics.csv row per finished epoch
    train_time: float = 0.0
    num_processes: int = 1
    scheduler: dict = field(default_factory=dict)
    stopped_early: bool = False  # a phase (early stopping) or the run (a callback) ended before its epochs did

    @classmethod
    def from_dict(cls, data: dict) -> Progress:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


@dataclass
class Data:
    manifest: dict
    train: Loader
    val: Loader | None
    test: Loader


@dataclass
class Phase:
    """One phase's prepared objects and its step."""

    index: int
    config: PhaseConfig
    step: TrainStep
    group_names: list[str]
    trainable: int


@dataclass
class Run:
    """Everything the epochs of a run share, and what every callback hook receives.

    Callbacks read any of it. They may set `teacher` (distillation), `evaluated` (a module evaluated, kept and
    exported in place of the trained one: the EMA's), add device-only updates to `step_updates` (called inside
    every step after the optimizer with the phase's step count: the EMA's blend), and set `stop_phase` /
    `stop_training` (see `trainer.callbacks`).
    """

    recipe: Recipe
    options: RunOptions
    accelerator: Accelerator
    data: Data
    info: dict  # model.json
    model: nn.Module  # the plain module (wrapped per phase inside Phase.step.model)
    run_dir: Path
    progress: Progress
    steps_per_epoch: int
    callbacks: CallbackList
    timer: StepTimer  # data wait vs. step, per epoch
    phase: Phase | None = None  # the current phase, prepared
    totals: EpochTotals = field(default_factory=EpochTotals)  # this epoch so far, over all ranks (logging steps)
    teacher: nn.Module | None = None
    evaluated: nn.Module | None = None
    step_updates: list[Callable[[int], None]] = field(default_factory=list)
    stop_phase: bool = False
    stop_training: bool = False
    resumed_from: Path | None = None
    epoch_times: EpochTimes | None = None  # the last epoch's
    epoch_seconds: float = 0.0  # the last epoch's wall time
    resumed_mid_epoch: bool = False  # the last epoch began at a mid-epoch checkpoint (its images/s is not whole)
    train_start: float = 0.0
    first_step_at: float | None = None  # Unix time this process began its first training step (start-up cost)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best.safetensors"

    @property
    def epoch_number(self) -> int:
        """The current epoch over all phases, from 0: the epochs finished so far."""
        return len(self.progress.history)

    def eval_model(self) -> nn.Module:
        """The module evaluated, kept and exported: `evaluated` (the EMA's), else the plain one under the DDP and
        compile wrappers. Not DDP's: its forward broadcasts BatchNorm buffers (a collective), which hangs a rank
        whose shard holds fewer evaluation batches than rank 0's (none, when a split has fewer samples than
        ranks). Not the compiled one: compile modes reduce-overhead and max-autotune replay CUDA graphs, whose
        outputs the next replay overwrites (flip TTA's second forward, the logits kept for metrics); evaluation
        is forward-only, and runs eager (only a GPU can time what that costs: benchmarks/device/README.md)."""
        if self.evaluated is not None:
            return self.evaluated
        return self.accelerator.unwrap_model(self.phase.step.model, keep_torch_compile=False)

