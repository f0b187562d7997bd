"""Knowledge distillation (recipe `loss.distill`): the teacher, trained first when its folder holds no finished run,
then loaded frozen; `Distillation` is the callback that puts it into a run and logs the two loss terms."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file
from torch import nn

from beton_trainer.common.errors import UserError
from beton_trainer.trainer.callbacks import Callback
from beton_trainer.trainer.config import Recipe
from beton_trainer.trainer.modelio import make_model

if TYPE_CHECKING:
    from beton_trainer.trainer.state import Run

__all__ = ["TRAIN_COMMAND", "Distillation", "load_teacher", "train_teacher_first"]

TRAIN_COMMAND = [sys.executable, "-m", "beton_trainer.trainer.cli"]  # train.py, installed or not
TEACHER_IDLE_S = 3600.0  # a waiting rank gives up once the teacher's folder has not changed for this long
POLL_S = 2.0
DISTRIBUTED_ENV = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                   "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"}


def train_teacher_first(recipe: Recipe, cpu: bool) -> None:
    """Run the teacher's recipe into `loss.distill.teacher` when that folder holds no finished run yet.

    One process trains it (a plain single-process train.py); under torchrun/accelerate the other ranks
    wait for its summary.json, so no collective can time out while the teacher trains.
    """
    kd = recipe.loss.distill
    folder = Path(kd.teacher)
    if not kd.teacher_recipe or (folder / "summary.json").is_file():
        return
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        wait_for_teacher(folder, rank)
        return
    print(f"training the teacher first: recipe {kd.teacher_recipe} -> {folder}", flush=True)
    command = [*TRAIN_COMMAND, "--recipe", kd.teacher_recipe,
               "--data", recipe.data.path, "--run-dir", str(folder)]
    command += ["--cpu"] if cpu else []
    command += ["--resume", "auto"] if (folder / "config.toml").is_file() else []  # an interrupted teacher
    single = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV and not k.startswith("TORCHELASTIC")}
    code = subprocess.run(command, env=single).returncode
    if code != 0:
        raise UserError(f"training the teacher with recipe '{kd.teacher_recipe}' failed (exit status {code}); "
                        f"see its output above, fix it, and run again (it resumes from {folder})")


def _last_change(folder: Path) -> float:
    """The newest modification time of the folder or anything in it (0.0 while it does not exist)."""
    times = [0.0]
    for path in [folder, *(folder.rglob("*") if folder.is_dir() else ())]:
        try:
            times.append(path.stat().st_mtime)
        except FileNotFoundError:  # a temporary file renamed away meanwhile
            continue
    return max(times)


def wait_for_teacher(folder: Path, rank: int) -> None:
    """Wait for the teacher run that rank 0 trains into `folder` to finish; fail with one line once the
    folder has shown no change for TEACHER_IDLE_S (rank 0 failed or hangs, or this machine does not see
    the folder)."""
    last, since = _last_change(folder), time.monotonic()
    while not (folder / "summary.json").is_file():
        time.sleep(POLL_S)
        change = _last_change(folder)
        if change != last:
            last, since = change, time.monotonic()
        elif time.monotonic() - since > TEACHER_IDLE_S:
            raise UserError(f"rank {rank} waited for the teacher that rank 0 trains into {folder}, but nothing there "
                            f"changed for {TEACHER_IDLE_S:.0f} s; see rank 0's output (it may have failed) "
                            "and, on several machines, put that folder on a filesystem every machine shares")


def load_teacher(path: str, manifest: dict, device: torch.device, channels_last: bool) -> nn.Module:
    """A frozen teacher from a run folder (model.json + model.safetensors) of an earlier run, in the memory
    format of the batches it sees (channels-last ones would make a contiguous teacher convert every batch)."""
    folder = Path(path)
    folder = folder.parent if folder.suffix == ".safetensors" else folder
    if not (folder / "model.json").is_file() or not (folder / "model.safetensors").is_file():
        raise UserError(f"teacher {path} has no model.json and model.safetensors; point loss.distill.teacher "
                        "at the run folder of a finished training run")
    info = json.loads((folder / "model.json").read_text())
    if info["num_classes"] != len(manifest["classes"]):
        raise UserError(f"teacher {path} predicts {info['num_classes']} classes but the data has "
                        f"{len(manifest['classes'])}; use a teacher trained on this dataset")
    if list(info["image_shape"]) != list(manifest["image_shape"]):
        raise UserError(f"teacher {path} takes images of shape {info['image_shape']} but the data has "
                        f"{manifest['image_shape']}; use a teacher trained on this dataset")
    teacher = make_model(info)
    try:
        teacher.load_state_dict(load_file(folder / "model.safetensors"))
    except (RuntimeError, OSError) as exc:
        raise UserError(f"teacher weights in {folder} do not fit its model.json ({str(exc).splitlines()[0]}); "
                        "re-export the teacher run") from None
    if channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    return teacher.to(device).eval().requires_grad_(False)


class Distillation(Callback):
    """Puts the teacher into `run.teacher` (the step then adds the soft loss of its logits) and logs the epoch's
    two loss terms as kd_soft_loss and kd_hard_loss. `for_recipe` trains and loads the teacher when the run is
    built, so a teacher that does not fit stops the run before its folder is made."""

    def __init__(self, teacher: nn.Module) -> None:
        self.teacher = teacher

    @classmethod
    def for_recipe(cls, recipe: Recipe, manifest: dict, device: torch.device, cpu: bool) -> Distillation:
        train_teacher_first(recipe, cpu)
        return cls(load_teacher(recipe.loss.distill.teacher, manifest, device, recipe.channels_last))

    def on_fit_start(self, run: Run) -> None:
        run.teacher = self.teacher

    def on_epoch_end(self, run: Run, row: dict[str, Any]) -> None:
        totals = run.totals
        row["kd_soft_loss"], row["kd_hard_loss"] = totals.kd_soft_sum / totals.seen, totals.kd_hard_sum / totals.seen
