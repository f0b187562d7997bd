"""The run folder (made once, never overwritten), its environment record, and the loggers: metrics.csv,
TensorBoard and W&B, each a callback."""

from __future__ import annotations

import csv
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from beton_trainer.common.errors import UserError
from beton_trainer.common.files import atomic_path
from beton_trainer.trainer.callbacks import Callback
from beton_trainer.trainer.report import plot_history

if TYPE_CHECKING:
    from beton_trainer.trainer.state import Run

__all__ = ["METRICS", "CsvLogger", "TensorBoardLogger", "WandbLogger", "logged_numbers", "new_run_dir",
           "run_environment"]

METRICS = "metrics.csv"

PACKAGES = ("torch", "torchvision", "accelerate", "timm", "numpy", "ffcv", "nvidia-dali-cuda130", "nvidia-dali-cuda120")


def new_run_dir(run_dir: str | None, recipe_name: str, resume: bool, need_bytes: int = 0) -> Path:
    """The folder for this run. A fresh run never writes into a folder that already holds a run, and
    a disk without `need_bytes` free fails here, before training, rather than at the first checkpoint."""
    path = Path(run_dir) if run_dir else Path("runs") / f"{recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if path.exists() and not path.is_dir():
        raise UserError(f"run folder {path} is a file; pass --run-dir with a folder path")
    if not resume and path.is_dir() and any(path.iterdir()):
        raise UserError(f"run folder {path} already holds a run; continue it with --resume auto, "
                        "or choose another --run-dir")
    if resume and not path.is_dir():
        raise UserError(f"nothing to resume in {path}: the folder does not exist; drop --resume to start a new run")
    if resume and (path / "summary.json").is_file():
        raise UserError(f"the run in {path} has finished (summary.json is written); nothing to resume, "
                        "start a new run with another --run-dir")
    existing = next(p for p in (path, *path.parents) if p.exists())
    free = shutil.disk_usage(existing).free if existing.is_dir() else need_bytes
    if free < need_bytes:
        raise UserError(f"only {free / 2**20:,.0f} MiB free at {existing} but this run's checkpoints need "
                        f"about {need_bytes / 2**20:,.0f} MiB; free disk space or choose a --run-dir on another "
                        "disk")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to run folder {path} ({exc.strerror}); choose a writable --run-dir") from None
    return path


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parents[1])
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def run_environment(seed: int, manifest: dict, num_processes: int, device: str) -> dict:
    """What it takes to repeat a run: versions, commit, the data's identity, seed, hardware.

    The data is named by its identity over the records (the manifest's `identity`, see
    pipelines.dataset.dataset_identity): two conversions of one source share it even where FFCV's parallel
    writers laid the files out differently. The files' own sha256s are kept to tell copies apart.
    """
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "seed": seed,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": device,
        "num_processes": num_processes,
        "torch_threads": torch.get_num_threads(),  # CPU results differ in the last bits between thread counts
        "packages": versions,
        "git_commit": git_commit(),
        "data": {"name": manifest.get("name"), "identity": manifest.get("identity"),
                 "source_sha256": manifest.get("source", {}).get("sha256"),
                 "file_sha256": {k: v.get("sha256") for k, v in manifest.get("splits", {}).items()}},
        "argv": sys.argv,
    }


def logged_numbers(row: dict[str, Any]) -> dict[str, float]:
    """A metrics.csv row's numbers, as TensorBoard and W&B log them (at step = epoch)."""
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "epoch"}


class CsvLogger(Callback):
    """metrics.csv: one row per epoch, rewritten whole from the run's history (so columns may grow, and a resumed
    run's file holds exactly the epochs its checkpoint had); at the end, the learning-curve plots."""

    def on_epoch_end(self, run: Run, row: dict[str, Any]) -> None:
        if not run.main:
            return
        rows = run.progress.history
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with atomic_path(run.run_dir / METRICS) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    def on_fit_end(self, run: Run, summary: dict[str, Any]) -> None:
        if run.main:
            summary["plots"] = [p.name for p in plot_history(run.run_dir / METRICS, run.run_dir)]


class TensorBoardLogger(Callback):
    """recipe `tensorboard = true`: every epoch's numbers under <run>/tensorboard (opened at the first row, so
    start-up does not wait for TensorBoard's imports; a bare image without it logs to metrics.csv only)."""

    def __init__(self) -> None:
        self.writer = None
        self.missing = False

    def on_epoch_end(self, run: Run, row: dict[str, Any]) -> None:
        if not run.main or self.missing:
            return
        if self.writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("note: tensorboard is not installed (pip install tensorboard); logging to metrics.csv only")
                self.missing = True
                return
            self.writer = SummaryWriter(str(run.run_dir / "tensorboard"))
        for key, value in logged_numbers(row).items():
            self.writer.add_scalar(key, value, row["epoch"])
        self.writer.flush()

    def on_fit_end(self, run: Run, summary: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbLogger(Callback):
    """recipe `wandb = true` (the `wandb` extra installed): offline unless WANDB_MODE says otherwise.
    `<run>/wandb/offline-run-*` holds the resolved recipe as its config and every epoch's numbers at step =
    epoch; `wandb sync` uploads it. A resumed run starts a second W&B run holding the epochs after the resume."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.wandb = None

    def on_fit_start(self, run: Run) -> None:
        if not run.main:
            return
        try:
            import wandb
        except ImportError:
            print("note: wandb is not installed (pip install .[wandb]); logging to metrics.csv and TensorBoard")
            return
        os.environ.setdefault("WANDB_MODE", "offline")
        self.wandb = wandb.init(dir=str(run.run_dir), config=self.config, name=run.run_dir.name)

    def on_epoch_end(self, run: Run, row: dict[str, Any]) -> None:
        if self.wandb is not None:
            self.wandb.log(logged_numbers(row), step=row["epoch"])

    def on_fit_end(self, run: Run, summary: dict[str, Any]) -> None:
        if self.wandb is not None:
            self.wandb.finish()
