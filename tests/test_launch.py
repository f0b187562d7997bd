"""The launch files: every accelerate config loads through accelerate's own launcher and resolves to the
topology it names; the SLURM script's dry run prints each node's exact torchrun command, which
torchrun's own parser accepts; the launcher's mixed precision reaches the recipe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands import launch
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.utils.launch import prepare_multi_gpu_env, prepare_simple_launcher_cmd_env
from torch.distributed.run import get_args_parser

from beton_trainer.trainer.config import load_recipe
from beton_trainer.trainer.distributed import launcher_overrides
from launch.slurm import expand_nodelist, node_command

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
# file -> distributed type, processes in all, machines, processes per machine, mixed precision
CONFIGS = {
    "accelerate_1gpu.yaml": ("NO", 1, 1, 1, "no"),
    "accelerate_8gpu.yaml": ("MULTI_GPU", 8, 1, 8, "no"),
    "accelerate_8gpu_bf16.yaml": ("MULTI_GPU", 8, 1, 8, "bf16"),
    "accelerate_2nodes_8gpu.yaml": ("MULTI_GPU", 16, 2, 8, "no"),
}


def test_every_config_is_checked():
    assert sorted(p.name for p in LAUNCH.glob("*.yaml")) == sorted(CONFIGS)


def resolved(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> object:
    """The arguments `accelerate launch argv` hands its launcher (which is replaced: nothing starts)."""
    seen = []
    monkeypatch.setattr(launch, "simple_launcher", seen.append)
    monkeypatch.setattr(launch, "multi_gpu_launcher", seen.append)
    launch.launch_command(launch.launch_command_parser().parse_args(argv))
    (args,) = seen
    return args


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_launches_as_named(name, monkeypatch):
    kind, processes, machines, per_machine, precision = CONFIGS[name]
    config = load_config_from_file(str(LAUNCH / name))  # raises on unknown or missing keys
    assert isinstance(config, ClusterConfig) and config.distributed_type.value == kind
    assert (config.num_processes, config.num_machines, config.mixed_precision) == (processes, machines, precision)

    node = ["--main_process_ip", "10.0.0.1", "--machine_rank", "1"] if machines > 1 else []
    args = resolved(["--config_file", str(LAUNCH / name), *node, "train.py", "--recipe", "c10_cnn"], monkeypatch)
    assert args.multi_gpu == (kind == "MULTI_GPU")
    if not args.multi_gpu:
        command, env = prepare_simple_launcher_cmd_env(args)
        assert command[1:] == ["train.py", "--recipe", "c10_cnn"]
    else:
        env = prepare_multi_gpu_env(args)  # the arguments accelerate hands to torchrun
        assert int(args.nproc_per_node) == per_machine
        if machines > 1:
            assert (int(args.nnodes), args.node_rank, args.rdzv_endpoint) == (machines, 1, "10.0.0.1:29500")
    assert env["ACCELERATE_MIXED_PRECISION"] == precision


def test_launcher_precision_reaches_the_recipe_and_set_still_wins(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what the bf16 config makes accelerate export
    assert load_recipe("c100_scratch", launcher_overrides()).precision == "bf16"  # the recipe says fp16
    assert load_recipe("c10_cnn", [*launcher_overrides(), "precision=no"]).precision == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert launcher_overrides() == []
    assert load_recipe("c100_scratch", launcher_overrides()).precision == "fp16"


SLURM_ENV = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242",
             "SLURM_JOB_NAME": "c10", "SLURM_GPUS_ON_NODE": "8", "SLURM_SUBMIT_DIR": str(ROOT)}


def sbatch(*args: str, **env: str) -> subprocess.CompletedProcess:
    """launch/slurm.sbatch under bash, outside SLURM (no scontrol, no srun): only the dry run works here."""
    return subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "PYTHON": sys.executable, **env})


def test_slurm_dry_run_prints_each_nodes_command():
    run = sbatch("--recipe", "c10_finetune", "--data", "data/cifar10", DRY_RUN="1", **SLURM_ENV)
    assert run.returncode == 0, run.stderr
    tail = ("--rdzv_id=4242 --rdzv_backend=c10d --rdzv_endpoint=gpu07:29500 --max_restarts=3 train.py "
            "--recipe c10_finetune --data data/cifar10 --run-dir runs/c10-4242 --resume auto")
    assert run.stdout.splitlines() == [
        f"env TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 {sys.executable} -m torch.distributed.run --nnodes=2 "
        f"--nproc_per_node=8 --node_rank={k} {tail}" for k in (0, 1)]


def test_slurm_command_is_valid_torchrun():
    command = node_command({**SLURM_ENV, "SLURM_NODEID": "1", "SLURM_GPUS_ON_NODE": "h100:4", "MASTER_PORT": "6000"},
                           ["--recipe", "c10_cnn", "--run-dir", "runs/mine"])
    assert command[:4] == ["env", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", sys.executable, "-m"]
    args = get_args_parser().parse_args(command[5:])
    assert (args.nnodes, args.nproc_per_node, args.node_rank, args.rdzv_backend, args.rdzv_endpoint,
            args.rdzv_id, args.max_restarts) == ("2", "4", 1, "c10d", "gpu07:6000", "4242", 3)
    assert (args.training_script, args.training_script_args) == (
        "train.py", ["--recipe", "c10_cnn", "--run-dir", "runs/mine", "--resume", "auto"])
    named = node_command({**SLURM_ENV, "SLURM_NODEID": "0"}, ["--recipe", "c10_cnn", "--resume", "runs/old"])
    assert named[-4:] == ["--recipe", "c10_cnn", "--resume", "runs/old"]  # --resume PATH names its run


def test_slurm_node_lists():
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_nodelist("r[1-2]-n[8-9]") == ["r1-n8", "r1-n9", "r2-n8", "r2-n9"]
    assert expand_nodelist("node-a") == ["node-a"]


def test_slurm_outside_an_allocation_says_what_to_do():
    run = sbatch("--recipe", "c10_cnn", DRY_RUN="1")
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.splitlines() == ["error: SLURM_JOB_NUM_NODES is not set: this runs inside a SLURM allocation; "
                                       "submit with `sbatch launch/slurm.sbatch --recipe ...` (or set the SLURM_* "
                                       "variables for a dry run)"]
