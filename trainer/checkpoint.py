"""Checkpoints that survive being killed at any moment.

Each checkpoint is a folder written by `accelerator.save_state` under a temporary name, completed by
a `progress.json` (where the run stands: phase, epoch, next batch, running sums, plus the size and
sha256 of every file beside it), flushed to disk, then renamed into place. A folder without
`progress.json` was interrupted and is ignored; the previous complete one is kept until a newer one
is complete, and old ones are renamed away before they are deleted, so no half-deleted folder ever
looks complete. Resume walks from the newest folder back to the first one whose files match their
checksums and load, warning about any that do not.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import load as weights_only_load
from torch import nn

from beton_trainer.common.errors import UserError
from beton_trainer.common.files import fsync_path, sha256_file, write_json

__all__ = ["candidates", "fast_forward", "load", "problem", "read_progress", "run_folder", "save", "space_needed"]

PROGRESS = "progress.json"
KEEP = 2


def _complete(root: Path) -> list[Path]:
    """Complete checkpoint folders, newest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / PROGRESS).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def _seal(folder: Path) -> dict[str, dict]:
    """Size and sha256 of every file in `folder`, each flushed to disk (a rename is only as durable as
    the data it publishes)."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    for path in files:
        fsync_path(path)
    return {path.name: {"bytes": path.stat().st_size, "sha256": sha256_file(path)} for path in files}


def _discard(folder: Path) -> None:
    """Delete a checkpoint folder; renamed away first, so a kill midway leaves only a `.tmp-*` folder."""
    if folder.exists():
        doomed = folder.with_name(f".tmp-old-{folder.name}")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(folder, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def save(accelerator: Accelerator, root: Path, progress: dict) -> Path:
    """Write a checkpoint for `progress['global_step']` on every rank; the main process completes it.

    A failed write (disk full, permissions) removes the partial folder and raises a UserError; the
    earlier checkpoints are untouched.
    """
    final = root / f"step-{progress['global_step']:09d}"
    tmp = root / f".tmp-{final.name}"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json(tmp / PROGRESS, {**progress, "files": _seal(tmp)})
            _discard(final)  # the same step written again after a resume from an older checkpoint
            os.replace(tmp, final)
            for old in _complete(root)[KEEP:]:
                _discard(old)
            for stale in root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
    except OSError as exc:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write checkpoint {final} ({exc.strerror or exc}); free disk space or fix "
                        "the folder's permissions, then continue with --resume auto (earlier checkpoints "
                        "are intact)") from None
    accelerator.wait_for_everyone()
    return final


def problem(checkpoint: Path) -> str | None:
    """Why a complete-looking checkpoint folder cannot be trusted (unreadable progress, a missing,
    truncated or altered file), or None when every file matches the record written with it."""
    try:
        files = json.loads((checkpoint / PROGRESS).read_text())["files"]
        for name, expected in files.items():
            path = checkpoint / name
            if not path.is_file():
                return f"{name} is missing"
            size = path.stat().st_size
            if size != expected["bytes"]:
                return f"{name} is {size} bytes, {expected['bytes']} were written"
            if sha256_file(path) != expected["sha256"]:
                return f"{name} does not match its sha256"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{PROGRESS} is unreadable ({type(exc).__name__}: {exc})"
    return None


def _warn(checkpoint: Path, why: str) -> None:
    warnings.warn(f"checkpoint {checkpoint} could not be loaded ({why}); trying the one before it",
                  stacklevel=3)


def read_progress(checkpoint: Path) -> dict | None:
    """Where the run stood at this checkpoint; None, with a warning, when the folder is damaged."""
    why = problem(checkpoint)
    if why:
        _warn(checkpoint, why)
        return None
    progress = json.loads((checkpoint / PROGRESS).read_text())
    del progress["files"]
    return progress


def run_folder(path: Path) -> Path:
    """The run folder of `--resume PATH`: PATH itself, or the run holding the checkpoint folder PATH."""
    return path.parent.parent if (path / PROGRESS).is_file() else path


def candidates(path: Path) -> list[Path]:
    """Checkpoints to try for `--resume PATH`: a checkpoint folder itself, or a run folder's, newest first."""
    if (path / PROGRESS).is_file():
        return [path]
    return _complete(path / "checkpoints")


def load(accelerator: Accelerator, checkpoint: Path) -> bool:
    """Load one checkpoint into the prepared objects; False (with a warning) when it is corrupt or unsafe.

    Accelerate reads weights, optimizer, scheduler and RNG files with `weights_only=True`, but registered
    objects (the EMA) with `weights_only=False`, which runs whatever a crafted file names. So every pickle
    in the folder is first read with the weights-only unpickler (plus Accelerate's numpy allowances for
    RNG states): one that asks for anything else is refused before Accelerate unpickles it.
    """
    try:
        for path in sorted(checkpoint.glob("*.bin")) + sorted(checkpoint.glob("*.pkl")):
            try:
                weights_only_load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as exc:
                asks = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
                if asks is None:
                    raise
                _warn(checkpoint, f"{path.name} holds more than tensors and numbers (it asks for {asks.group(1)}), "
                      "so it was not unpickled")
                return False
        accelerator.load_state(str(checkpoint))
        return True
    except Exception as exc:  # a corrupt file shows up as any of several exception types
        _warn(checkpoint, f"{type(exc).__name__}: {exc}")
        return False


def space_needed(model: nn.Module) -> int:
    """Bytes the run folder needs: KEEP checkpoints plus one being written (weights and up to two
    optimizer moments each), plus the exported and best weights."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return (3 * (KEEP + 1) + 2) * weights


def fast_forward(scheduler: object, steps: int) -> None:
    """Step a fresh schedule to where `steps` optimizer steps leave it (a resume on another number of
    processes, whose schedule has another number of steps per epoch)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": intended here
        for _ in range(steps):
            scheduler.step()
