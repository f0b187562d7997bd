"""Two training processes (torchrun, gloo, CPU) at the end of a run: every rank tests the weights rank 0
kept, and evaluation never runs a collective a rank without samples would miss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from beton_trainer.convert import convert_dataset
from tests.data_fixtures import write_cifar10
from tests.rank_worker import digest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # the runs take ~30 s; a hang before the fixes stayed forever


def two_ranks(data: Path, run_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "tests" / "rank_worker.py"), "--out", str(out), *extra,
               "--recipe", "c10_cnn_smoke", "--data", str(data), "--run-dir", str(run_dir), "--cpu",
               "--set", "tensorboard=false", "--set", "max_steps_per_epoch=2", "--set", "data.batch_size=8"]
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        pytest.fail(f"two ranks still running after {TIMEOUT} s: a rank waits in a collective the other missed")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_every_rank_tests_the_best_weights_rank_0_kept_even_when_written_late(tiny_rgb_data, tmp_path):
    """The last epoch is a new best and rank 0 writes best.safetensors late: the other rank used to load the
    file first (the previous epoch's weights) and the final test mixed two models across ranks."""
    run_dir, out = tmp_path / "run", tmp_path / "out"
    two_ranks(tiny_rgb_data, run_dir, out, "--slow-best")
    tested = {json.loads((out / f"rank{r}.json").read_text())["tested"] for r in range(2)}
    assert tested == {digest(load_file(run_dir / "best.safetensors"))}
    assert tested == {digest(load_file(run_dir / "model.safetensors"))}


@pytest.fixture(scope="module")
def one_test_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CIFAR-like set whose test split has one sample: on two ranks, rank 1 evaluates nothing."""
    source = write_cifar10(tmp_path_factory.mktemp("one-test-src"), batch_size=16, n_test=1, seed=2)
    return convert_dataset("cifar10", source["folder"], tmp_path_factory.mktemp("one-test-data"))


def test_a_rank_without_evaluation_samples_neither_hangs_nor_fails(one_test_sample, tmp_path):
    """DDP's forward broadcasts BatchNorm buffers: evaluating through it, rank 0 waited in that broadcast for a
    rank with no batch to evaluate. The plain module is evaluated; the empty shard adds nothing."""
    run_dir = tmp_path / "run"
    two_ranks(one_test_sample, run_dir, tmp_path / "out", "--set", "max_eval_batches=0")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["processes"], summary["test_samples"]) == (2, 1)
