"""Two "nodes" on localhost, two CPU processes each (4 ranks, gloo), launched the ways users launch them:
torchrun with c10d rendezvous, and `accelerate launch` with launch/accelerate_2nodes_8gpu.yaml. Each
node runs in its own folder with a relative --run-dir, as if on its own disk, so what a node's ranks
write is visible: only the node of global rank 0 writes anything, and the run it writes equals a
4-process run on one node (metrics, weights byte for byte, test results). The loaders' sharding is
checked at 4 ranks over 2 nodes with tests/dist_worker.py: disjoint shards covering the split each
epoch, and evaluation counting every sample once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fault_helpers import outputs

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
SETTINGS = ["--set", "tensorboard=false"]  # mnist_cnn_smoke: 1 epoch of 5 steps of 128 per rank, full test set


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_nodes(commands: list[list[str]], folders: list[Path], timeout: float = 300) -> None:
    """Start one command per node (each in its own folder) at once and wait for all; each must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [folder.with_suffix(".log") for folder in folders]
    jobs = []
    for command, folder, log in zip(commands, folders, logs):
        folder.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            jobs.append(subprocess.Popen(command, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT))
    codes = [job.wait(timeout=timeout) for job in jobs]
    assert codes == [0] * len(jobs), "\n".join(log.read_text()[-3000:] for log in logs)


def train_args(data: Path) -> list[str]:
    return [str(ROOT / "train.py"), "--recipe", "mnist_cnn_smoke", "--data", str(data), "--cpu",
            "--run-dir", "run", *SETTINGS]


@pytest.fixture(scope="module")
def one_node(mnist_data, tmp_path_factory) -> dict:
    """A 4-process run on one node: what the two-node runs must reproduce."""
    folder = tmp_path_factory.mktemp("one-node") / "node"
    run_nodes([[*TORCHRUN, "--standalone", "--nproc_per_node=4", *train_args(mnist_data)]], [folder])
    summary = json.loads((folder / "run" / "summary.json").read_text())
    assert (summary["processes"], summary["test_samples"]) == (4, 10_000)
    return outputs(folder / "run")


def only_rank0_node_wrote(nodes: list[Path]) -> Path:
    """The run folder, after checking that exactly one node's folder holds anything, and only that."""
    written = [node for node in nodes if any(node.iterdir())]
    assert len(written) == 1, [sorted(p.name for p in node.iterdir()) for node in nodes]
    assert [p.name for p in written[0].iterdir()] == ["run"]
    return written[0] / "run"


def test_torchrun_two_nodes_equal_one_node(mnist_data, one_node, tmp_path):
    port = free_port()
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    commands = [[*TORCHRUN, "--nnodes=2", "--nproc_per_node=2", f"--node_rank={k}", "--rdzv_backend=c10d",
                 f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=multinode-test", *train_args(mnist_data)]
                for k in range(2)]
    run_nodes(commands, nodes)
    run = only_rank0_node_wrote(nodes)  # c10d assigns node ranks in arrival order: either node may hold rank 0
    assert outputs(run) == one_node
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["processes"], summary["test_samples"]) == (4, 10_000)


def test_accelerate_two_nodes_equal_one_node(mnist_data, one_node, tmp_path):
    port = free_port()
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    commands = [[sys.executable, "-m", "accelerate.commands.launch",
                 "--config_file", str(ROOT / "launch" / "accelerate_2nodes_8gpu.yaml"), "--num_processes", "4",
                 "--machine_rank", str(k), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                 *train_args(mnist_data)] for k in range(2)]
    run_nodes(commands, nodes)
    assert only_rank0_node_wrote(nodes) == nodes[0] / "run"  # static rendezvous: rank 0 on machine 0
    assert outputs(nodes[0] / "run") == one_node


def test_loaders_shard_over_four_ranks_on_two_nodes(tiny_rgb_data, tmp_path):
    """Each epoch the 4 ranks' train shards are disjoint and cover all but the drop_last remainder;
    evaluation gives every test sample to exactly one rank."""
    batch, world, n_train, n_test = 48, 4, 640, 200
    port, out = free_port(), tmp_path / "seen.json"
    commands = [[*TORCHRUN, "--nnodes=2", "--nproc_per_node=2", f"--node_rank={k}", "--rdzv_backend=c10d",
                 f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=shard-test", str(ROOT / "tests" / "dist_worker.py"),
                 "--backends", "tensor", "--data", str(tiny_rgb_data), "--out", str(out), "--batch-size", str(batch)]
                for k in range(2)]
    run_nodes(commands, [tmp_path / "node0", tmp_path / "node1"])
    seen = json.loads(out.read_text())["tensor"]
    per_rank = n_train // (world * batch) * batch  # 144: 64 samples fall to drop_last
    epochs = list(zip(*seen["train"]))  # [epoch][rank] -> ids
    assert len(epochs) == 2 and all(len(shards) == world for shards in epochs)
    for shards in epochs:
        assert all(len(ids) == len(set(ids)) == per_rank for ids in shards)
        assert len(set().union(*shards)) == world * per_rank  # disjoint
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    evaluated = [i for (ids,) in seen["eval"] for i in ids]
    assert sorted(evaluated) == list(range(n_test))
