"""Checkpoints that survive being killed at any moment.

Each checkpoint is a folder written by `accelerator.save_state` under a temporary name, completed by
a `progress.json` (where the run stands: phase, epoch, next batch, running sums), then renamed into
place. A folder without `progress.json` was interrupted and is ignored; the previous complete one
is kept until a newer one is complete. Resume walks from the newest folder back to the first one
that loads, warning about any that do not.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

from accelerate import Accelerator

PROGRESS = "progress.json"
KEEP = 2


def _complete(root: Path) -> list[Path]:
    """Complete checkpoint folders, newest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / PROGRESS).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(accelerator: Accelerator, root: Path, progress: dict) -> Path:
    """Write a checkpoint for `progress['global_step']` on every rank; the main process completes it."""
    final = root / f"step-{progress['global_step']:09d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(tmp / PROGRESS, progress)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _complete(root)[KEEP:]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_progress(checkpoint: Path) -> dict:
    return json.loads((checkpoint / PROGRESS).read_text())


def candidates(path: Path) -> list[Path]:
    """Checkpoints to try for `--resume PATH`: a checkpoint folder itself, or a run folder's, newest first."""
    if (path / PROGRESS).is_file():
        return [path]
    return _complete(path / "checkpoints")


def load(accelerator: Accelerator, checkpoint: Path) -> bool:
    """Load one checkpoint into the prepared objects; False (with a warning) when it is corrupt."""
    try:
        accelerator.load_state(str(checkpoint))
        return True
    except Exception as exc:  # a truncated or corrupt file shows up as any of several exception types
        warnings.warn(f"checkpoint {checkpoint} could not be loaded ({type(exc).__name__}: {exc}); "
                      "falling back to the previous one", stacklevel=2)
        return False
