"""Running train.py inside the test process (imports paid once) and reading what a run wrote."""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

from accelerate.state import AcceleratorState

from beton_trainer.trainer import checkpoint
from beton_trainer.trainer.cli import main as train_main


def run_train(argv: list[str]) -> dict:
    """The train.py command line in this process, leaving no global state behind; the run's summary.json."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        train_main(argv)
    finally:
        AcceleratorState._reset_state(True)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    flag = "--run-dir" if "--run-dir" in argv else "--resume"  # --resume PATH names the run or a checkpoint
    run_dir = checkpoint.run_folder(Path(argv[argv.index(flag) + 1]))
    return json.loads((run_dir / "summary.json").read_text())


def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))

