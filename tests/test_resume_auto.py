"""`--resume auto` is one command line for a whole job's life (what torchrun --max-restarts and a requeued
SLURM job repeat): a fresh run while the folder holds no checkpoint, the newest checkpoint after that, and
nothing to do, exit status 0, once the run has finished."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT
from tests.train_helpers import metrics, run_train


def test_resume_auto_starts_continues_and_then_does_nothing(mnist_data, tmp_path):
    run_dir = tmp_path / "job" / "run"
    argv = ["--recipe", "mnist_cnn_smoke", "--data", str(mnist_data), "--run-dir", str(run_dir), "--cpu",
            "--resume", "auto"]
    summary = run_train(argv)  # no folder yet: a fresh run there
    assert summary["epochs"] == 1 and len(metrics(run_dir)) == 1
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    out = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert f"the run in {run_dir} has finished (summary.json is written); nothing to resume" in out.stdout
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before  # nothing rewritten
