"""Two training processes (torchrun, gloo, CPU): a stop that reaches one rank, or the ranks at different steps,
ends both at the same step with one good checkpoint, from which the run resumes to exactly the uninterrupted
run's results; and every rank evaluates the same module (rank 0's BatchNorm statistics)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from beton_trainer.trainer import checkpoint
from tests.fault_helpers import outputs

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # a run takes ~30 s; ranks that disagree on a collective hang until this
STEPS = 60  # per epoch: one logging step (LOG_EVERY = 50) before the epoch's end
SETTINGS = ["--set", "tensorboard=false", "--set", "phases.0.epochs=2", "--set", f"max_steps_per_epoch={STEPS}",
            "--set", "data.batch_size=4"]


def two_ranks(data: Path, run_dir: Path, out: Path, *extra: str, resume: bool = False
              ) -> subprocess.CompletedProcess:
    """Both ranks of one c10_cnn_smoke run (`extra`: the worker's own options, tests/rank_worker.py)."""
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "tests" / "rank_worker.py"), "--out", str(out), *extra,
               "--recipe", "c10_cnn_smoke", "--data", str(data), "--run-dir", str(run_dir), "--cpu", *SETTINGS,
               *(["--resume", "auto"] if resume else [])]
    try:
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        pytest.fail(f"two ranks still running after {TIMEOUT} s: a rank waits in a collective the other missed")


@pytest.fixture(scope="module")
def reference(tiny_rgb_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    run_dir, out = tmp_path_factory.mktemp("reference") / "run", tmp_path_factory.mktemp("reference-out")
    proc = two_ranks(tiny_rgb_data, run_dir, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"outputs": outputs(run_dir), "evaluated": [json.loads((out / f"rank{r}.json").read_text())
                                                       for r in range(2)]}


def test_every_rank_evaluates_rank_0s_module(reference):
    """DDP broadcasts BatchNorm's running statistics only at the start of a forward: after an epoch's last step
    each rank held its own, and evaluated (and judged early stopping by) a different model."""
    ranks = reference["evaluated"]
    assert len(ranks[0]["evaluated"]) == 2  # the test split at each epoch's end (no val split)
    assert ranks[0]["evaluated"] == ranks[1]["evaluated"]
    assert ranks[0]["tested"] == ranks[1]["tested"]


@pytest.mark.parametrize(("when", "stopped_at"), [
    ({1: 10}, 50),  # only rank 1 is signalled: both stop at the next logging step, with a checkpoint there
    ({0: 45, 1: 55}, 50),  # the ranks 10 steps apart: both stop at the logging step between the two signals
])
def test_a_stop_on_some_ranks_stops_all_at_one_step_and_resumes_exactly(tiny_rgb_data, reference, tmp_path, when,
                                                                        stopped_at):
    run_dir = tmp_path / "run"
    signals = ",".join(f"{rank}:{step}" for rank, step in when.items())
    proc = two_ranks(tiny_rgb_data, run_dir, tmp_path / "out", "--sigterm-after", signals)
    assert proc.returncode != 0
    # each rank stops with one line (torchrun may end the second once the first has exited)
    errors = {line.split("error: ")[1].split(";")[0] for line in proc.stderr.splitlines() if "error: stopped" in line}
    assert errors == {f"stopped by signal at step {stopped_at}"}, proc.stderr[-3000:]
    (newest, *_) = checkpoint.candidates(run_dir)
    assert newest.name == f"step-{stopped_at:09d}" and checkpoint.problem(newest) is None
    resumed = two_ranks(tiny_rgb_data, run_dir, tmp_path / "out2", resume=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert outputs(run_dir) == reference["outputs"]
