"""Two real CPU processes (torchrun, gloo) per backend: each rank's shard is disjoint from the other's,
reshuffled each epoch, and together they cover the split (train: all but the drop_last remainder;
eval: every sample exactly once)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.loader_helpers import installed, require

WORKER = Path(__file__).with_name("dist_worker.py")
BATCH, WORLD, N_TRAIN, N_TEST = 48, 2, 640, 200  # tiny_rgb_data: 640 train, 200 test
BACKENDS = {"tensor": None, "ffcv": "ffcv", "dali": "nvidia.dali"}


@pytest.fixture(scope="module")
def seen(tiny_rgb_data, tmp_path_factory) -> dict:
    """What each rank saw, per backend, from one torchrun launch for all installed backends."""
    out = tmp_path_factory.mktemp("dist") / "seen.json"
    backends = [backend for backend, package in BACKENDS.items() if package is None or installed(package)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
               str(WORKER), "--backends", *backends, "--data", str(tiny_rgb_data), "--out", str(out),
               "--batch-size", str(BATCH)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_see_disjoint_shards_covering_the_split(backend, seen):
    if BACKENDS[backend]:
        require(BACKENDS[backend])
    per_rank = N_TRAIN // (WORLD * BATCH) * BATCH  # 288: 64 samples fall to drop_last
    epochs = list(zip(*seen[backend]["train"]))  # [epoch][rank] -> ids
    for shards in epochs:
        a, b = (set(ids) for ids in shards)
        assert all(len(ids) == len(set(ids)) == per_rank for ids in shards)
        assert not a & b and len(a | b) == WORLD * per_rank
    assert epochs[0][0] != epochs[1][0]  # reshuffled each epoch

    (eval_a,), (eval_b,) = seen[backend]["eval"]
    assert sorted(eval_a + eval_b) == list(range(N_TEST))
