"""Running train.py inside the test process (imports paid once) and reading what a run wrote."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from beton_trainer.trainer import checkpoint
from beton_trainer.trainer.cli import main as train_main
from beton_trainer.trainer.distributed import isolated_state


def run_train(argv: list[str]) -> dict:
    """The train.py command line in this process, leaving no global state behind; the run's summary.json."""
    with isolated_state():
        train_main(argv)
    flag = "--run-dir" if "--run-dir" in argv else "--resume"  # --resume PATH names the run or a checkpoint
    run_dir = checkpoint.run_folder(Path(argv[argv.index(flag) + 1]))
    return json.loads((run_dir / "summary.json").read_text())


def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))

