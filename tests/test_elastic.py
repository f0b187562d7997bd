"""Elastic restart: under `torchrun --max-restarts 1`, a rank killed after the first checkpoint makes
torchrun restart the worker group, which resumes on its own (`--run-dir RUN --resume auto`) from that
checkpoint in the middle of the epoch and ends with exactly the uninterrupted run's results (CPU:
metrics, weights byte for byte, test results). `python -m benchmarks.fault_harness --nproc 2` is the
long version, with random kills of random ranks."""

from __future__ import annotations

import os
import re
import signal
import time

from tests.fault_helpers import new_worker_group, outputs, reference_run, start, torchrun_command

RECIPE = "mnist_cnn_smoke"
# one epoch of 12 steps per rank; checkpoints after steps 4 and 8
SETTINGS = ["max_steps_per_epoch=12", "checkpoint_every_steps=4", "tensorboard=false"]


def test_killed_rank_restarts_the_group_which_resumes_to_identical_results(mnist_data, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    reference_run(RECIPE, mnist_data, tmp_path / "reference", SETTINGS, nproc=2)
    run_dir = tmp_path / "elastic"
    log = run_dir.with_suffix(".log")
    job = start(torchrun_command(RECIPE, mnist_data, run_dir, SETTINGS, nproc=2, max_restarts=1, resume=True), log)
    first = new_worker_group(job, 2, set())
    while job.poll() is None and not list((run_dir / "checkpoints").glob("step-*")):
        time.sleep(0.01)
    assert job.poll() is None, "the job ended before its first checkpoint"
    os.kill(first[1], signal.SIGKILL)
    second = new_worker_group(job, 2, set(first.values()))
    assert job.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert second, "torchrun did not restart the worker group"
    resumed = re.findall(r"resuming from \S+step-(\d+)", log.read_text())
    assert len(resumed) == 1 and int(resumed[0]) in (4, 8)
    assert outputs(run_dir) == outputs(tmp_path / "reference")
