"""The torchrun command of one SLURM node, built from the SLURM_* variables (used by launch/slurm.sbatch).

    python launch/slurm.py [--dry-run | --all-nodes] -- --recipe c10_finetune --data data/cifar10 ...

Every node runs torchrun with c10d rendezvous on the first node of the allocation; torchrun starts one
process per GPU and restarts the whole group (up to MAX_RESTARTS times) when a worker dies (in the
environment that needs: trainer.distributed.ELASTIC_ENV). The run folder is fixed per job
(runs/<job name>-<job id>, or the --run-dir given) and `--resume auto` is added, so a restarted
group, or a requeued job, continues from the newest good checkpoint.
Without --dry-run/--all-nodes the command replaces this process.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from beton_trainer.common.errors import UserError, run_cli  # noqa: E402
from beton_trainer.trainer.distributed import ELASTIC_ENV  # noqa: E402

DEFAULT_PORT = 29500
DEFAULT_MAX_RESTARTS = 3


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compact host list ('gpu[01-03,07],login1', 'r[1-2]-n[1-2]') as host names, in order."""
    return [host for part in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist) for host in _expand(part)]


def _expand(pattern: str) -> list[str]:
    match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", pattern)
    if not match:
        return [pattern]
    prefix, ranges, rest = match.groups()
    numbers = []
    for item in ranges.split(","):
        lo, _, hi = item.partition("-")
        if not lo.isdigit() or not (hi or lo).isdigit():
            raise UserError(f"cannot read the SLURM node list '{pattern}'; set RDZV_HOST to the first node's name")
        numbers += [f"{n:0{len(lo)}d}" for n in range(int(lo), int(hi or lo) + 1)]
    return [f"{prefix}{n}{tail}" for n in numbers for tail in _expand(rest)]


def _require(env: Mapping[str, str], *names: str) -> str:
    for name in names:
        if env.get(name):
            return env[name]
    raise UserError(f"{names[0]} is not set: this runs inside a SLURM allocation; submit with "
                    "`sbatch launch/slurm.sbatch --recipe ...` (or set the SLURM_* variables for a dry run)")


def gpus_per_node(env: Mapping[str, str]) -> int:
    """Processes per node: NPROC_PER_NODE, else the GPUs SLURM gave this node ('8' or 'h100:8')."""
    value = env.get("NPROC_PER_NODE") or _require(env, "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE")
    count = value.rsplit(":", 1)[-1]
    if not count.isdigit() or int(count) < 1:
        raise UserError(f"cannot read a GPU count from '{value}'; request GPUs with #SBATCH --gpus-per-node=N "
                        "or set NPROC_PER_NODE")
    return int(count)


def train_arguments(env: Mapping[str, str], args: list[str]) -> list[str]:
    """train.py's arguments with a per-job run folder and `--resume auto` unless the user chose them."""
    args = list(args)
    if "--resume" in args:  # --resume PATH names its run; --run-dir ... --resume auto is complete
        return args
    if "--run-dir" not in args:
        name = env.get("SLURM_JOB_NAME", "slurm")
        args += ["--run-dir", f"runs/{name}-{_require(env, 'SLURM_JOB_ID')}"]
    return [*args, "--resume", "auto"]


def node_command(env: Mapping[str, str], args: list[str], node_rank: int | None = None) -> list[str]:
    """The command node `node_rank` (default: this node, SLURM_NODEID) runs."""
    hosts = expand_nodelist(_require(env, "SLURM_JOB_NODELIST", "SLURM_NODELIST"))
    nnodes = int(_require(env, "SLURM_JOB_NUM_NODES", "SLURM_NNODES"))
    if len(hosts) != nnodes:
        raise UserError(f"the node list names {len(hosts)} hosts but SLURM says {nnodes} nodes; "
                        "check SLURM_JOB_NODELIST")
    rank = int(_require(env, "SLURM_NODEID")) if node_rank is None else node_rank
    head = env.get("RDZV_HOST") or hosts[0]
    return ["env", *(f"{k}={v}" for k, v in ELASTIC_ENV.items()), env.get("PYTHON") or sys.executable,
            "-m", "torch.distributed.run",
            f"--nnodes={nnodes}", f"--nproc_per_node={gpus_per_node(env)}", f"--node_rank={rank}",
            f"--rdzv_id={_require(env, 'SLURM_JOB_ID')}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint={head}:{env.get('MASTER_PORT') or DEFAULT_PORT}",
            f"--max_restarts={env.get('MAX_RESTARTS') or DEFAULT_MAX_RESTARTS}",
            "train.py", *train_arguments(env, args)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python launch/slurm.py", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print this node's command instead of running it")
    mode.add_argument("--all-nodes", action="store_true", help="print every node's command, one per line")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then train.py's arguments")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    env = os.environ
    if args.all_nodes:
        nnodes = int(_require(env, "SLURM_JOB_NUM_NODES", "SLURM_NNODES"))
        for rank in range(nnodes):
            print(shlex.join(node_command(env, train_args, rank)))
        return 0
    command = node_command(env, train_args)
    print(f"{env.get('SLURMD_NODENAME', 'this node')}: {shlex.join(command)}", flush=True)
    if not args.dry_run:
        os.execvp(command[0], command)
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
