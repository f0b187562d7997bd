"""The run folder: resolved recipe, environment record, metrics.csv, TensorBoard and W&B scalars."""

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

import torch

from beton_trainer.common.errors import UserError
from beton_trainer.common.files import atomic_path

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


class MetricsLog:
    """One row per epoch into metrics.csv (rewritten whole, so columns may grow), TensorBoard and W&B.

    W&B (recipe `wandb = true`, the `wandb` extra installed) runs offline unless WANDB_MODE says otherwise:
    `<run>/wandb/offline-run-*` holds the resolved recipe as its config and every epoch's numbers at step =
    epoch; `wandb sync` uploads it. A resumed run starts a second W&B run holding the epochs after the resume.
    """

    def __init__(self, run_dir: Path, *, tensorboard: bool, wandb: bool, config: dict, keep_rows: int = 0):
        self.path = run_dir / "metrics.csv"
        self.rows: list[dict] = []
        if keep_rows and self.path.is_file():
            with open(self.path, newline="") as f:
                self.rows = list(csv.DictReader(f))[:keep_rows]
        self.tb = None  # opened at the first row, so start-up does not wait for TensorBoard's imports
        self._tb_dir = run_dir / "tensorboard" if tensorboard else None
        self.wandb = None
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError:
                print("note: wandb is not installed (pip install .[wandb]); logging to metrics.csv and TensorBoard")
            else:
                os.environ.setdefault("WANDB_MODE", "offline")
                self.wandb = wandb_module.init(dir=str(run_dir), config=config, name=run_dir.name)

    def log(self, row: dict) -> None:
        self.rows.append(row)
        columns = list(dict.fromkeys(k for r in self.rows for k in r))
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "epoch"}
        if self._tb_dir is not None and self.tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # a bare image (torch without tensorboard)
                print("note: tensorboard is not installed (pip install tensorboard); logging to metrics.csv only")
                self._tb_dir = None
            else:
                self.tb = SummaryWriter(str(self._tb_dir))
        if self.tb is not None:
            for key, value in numbers.items():
                self.tb.add_scalar(key, value, row["epoch"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(numbers, step=row["epoch"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
