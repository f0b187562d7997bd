"""Killing real training runs and comparing what they leave: the machinery the fault tests (tests/test_faults.py,
tests/test_elastic.py) and the long fault harness (`python -m benchmarks.fault_harness`) share.

One uninterrupted reference run, then faulted runs of the same recipe and seed: each attempt is killed either
after a random delay (start-up, a training step, evaluation, export) or the moment a checkpoint is being
written (a `.tmp-*` folder appears), then resumed, until the run finishes. After every kill each complete
checkpoint is checked against the sizes and hashes recorded with it; `outputs` is what must equal the
reference's byte for byte. Training runs as `python train.py` subprocesses on the CPU, like a user's; with
several processes, as elastic `torchrun` jobs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from beton_trainer.common.errors import UserError
from beton_trainer.trainer import checkpoint
from beton_trainer.trainer.distributed import ELASTIC_ENV

ROOT = Path(__file__).resolve().parents[1]
# measured time, not results: they differ between any two runs and are left out of the comparison
WALL_COLUMNS = ("epoch_time_s", "images_per_s", "peak_mem_mb", "data_wait_s", "step_s", "data_wait_fraction",
                "input_device_s", "loader_images_per_s")
DEFAULT_SETTINGS = ("phases.0.epochs=3", "max_steps_per_epoch=40", "checkpoint_every_steps=7",
                    "tensorboard=false")


@dataclass
class Report:
    kills: int = 0  # SIGKILLs sent to a running training process
    during_checkpoint: int = 0  # ... of them while a checkpoint folder was being written
    before_run_folder: int = 0  # ... of them before the run folder existed (start-up)
    survived: int = 0  # kills after which the run resumed and finished with the reference's results
    corrupt_checkpoints: int = 0  # complete-looking checkpoints whose files do not match their record
    fallback_warnings: int = 0  # resumes that skipped a checkpoint that would not load
    attempts: int = 0  # training processes started
    runs: int = 0  # faulted runs, each to completion
    mismatches: list[str] = field(default_factory=list)


def train_command(recipe: str, data: Path, run_dir: Path, settings: list[str], resume: bool) -> list[str]:
    sets = [arg for s in settings for arg in ("--set", s)]
    return [sys.executable, str(ROOT / "train.py"), "--recipe", recipe, "--data", str(data), "--cpu",
            "--run-dir", str(run_dir), *sets, *(["--resume", "auto"] if resume else [])]


def torchrun_command(recipe: str, data: Path, run_dir: Path, settings: list[str], nproc: int,
                     max_restarts: int, resume: bool) -> list[str]:
    """train_command's run as one torchrun job of `nproc` CPU processes that restarts up to `max_restarts` times."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max_restarts={max_restarts}", *train_command(recipe, data, run_dir, settings, resume)[1:]]


def start(command: list[str], log: Path) -> subprocess.Popen:
    """`command` (train.py, or a torchrun job with the environment elastic restarts need) writing to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **ELASTIC_ENV})


def writing_checkpoint(run_dir: Path) -> bool:
    folder = run_dir / "checkpoints"
    return folder.is_dir() and any(p.name.startswith(".tmp-") for p in folder.iterdir())


def moment_came(proc: subprocess.Popen, run_dir: Path, delay: float | None, rng: random.Random) -> bool:
    """Wait `delay` seconds, or (delay None) until a checkpoint is being written, then up to 3 ms more (a
    small model's checkpoint folder is written in ~6-10 ms here); False when `proc` finished first."""
    deadline = time.monotonic() + (delay if delay is not None else 1e9)
    while proc.poll() is None:
        if delay is None and writing_checkpoint(run_dir):
            time.sleep(rng.uniform(0, 0.003))
            break
        if time.monotonic() >= deadline:
            break
        time.sleep(0.001 if delay is None else 0.01)
    return proc.poll() is None


def kill_when(proc: subprocess.Popen, run_dir: Path, delay: float | None, rng: random.Random) -> bool:
    """SIGKILL `proc` after `delay` seconds, or (delay None) as soon as it writes a checkpoint.
    False when it finished first."""
    if not moment_came(proc, run_dir, delay, rng):
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def _alive(pid: int) -> bool:
    """Running (not exited, not a zombie waiting for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def worker_pids(agent: int) -> dict[int, int]:
    """{global rank: pid} of the live workers a torchrun agent started (its children with RANK set)."""
    workers = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        ranks = [int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK=")]
        if int(fields[1]) == agent and fields[0] != "Z" and ranks:
            workers[ranks[0]] = int(stat.parent.name)
    return workers


def new_worker_group(job: subprocess.Popen, nproc: int, old: set[int]) -> dict[int, int]:
    """The job's next complete worker group (none of `old` among them); {} when the job ended first."""
    while job.poll() is None:
        workers = worker_pids(job.pid)
        if len(workers) == nproc and not old & set(workers.values()):
            return workers
        time.sleep(0.05)
    return {}


def damaged_checkpoints(run_dir: Path) -> list[str]:
    return [f"{ckpt.name}: {why}" for ckpt in checkpoint.candidates(run_dir)
            if (why := checkpoint.problem(ckpt))]


def outputs(run_dir: Path) -> dict:
    """What must not depend on interruptions: metrics without wall times, exported weights, test results."""
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [{k: v for k, v in row.items() if k not in WALL_COLUMNS} for row in csv.DictReader(f)]
    summary = json.loads((run_dir / "summary.json").read_text())
    weights = (run_dir / "model.safetensors").read_bytes()
    return {"metrics": rows, "model_sha256": hashlib.sha256(weights).hexdigest(),
            "test": (summary["test_accuracy"], summary["test_loss"], summary["test_samples"])}


def reference_run(recipe: str, data: Path, run_dir: Path, settings: list[str], nproc: int = 1) -> float:
    """An uninterrupted run (a torchrun job when nproc > 1); its wall time in seconds."""
    began = time.monotonic()
    command = torchrun_command(recipe, data, run_dir, settings, nproc, 0, resume=False) if nproc > 1 \
        else train_command(recipe, data, run_dir, settings, resume=False)
    proc = start(command, run_dir.with_suffix(".log"))
    if proc.wait() != 0:
        raise UserError(f"the uninterrupted reference run failed; see {run_dir.with_suffix('.log')}")
    return time.monotonic() - began


def kill_plan(kills: int, duration: float, rng: random.Random) -> list[float | None]:
    """When to kill each attempt: after a random delay up to `duration` seconds, or (None, 3 in 10)
    while a checkpoint is being written."""
    return [None if rng.random() < 0.3 else rng.uniform(0, duration) for _ in range(kills)]


def faulted_run(recipe: str, data: Path, run_dir: Path, settings: list[str], plan: list[float | None],
                rng: random.Random, report: Report, log=print) -> dict:
    """One run killed by `plan` and resumed until it finishes; its outputs."""
    log_file = run_dir.with_suffix(".log")
    pending = list(plan)
    while not (run_dir / "summary.json").is_file():  # written last: a kill after it found the run finished
        resume = run_dir.is_dir()  # a kill before the folder existed: start again from scratch
        proc = start(train_command(recipe, data, run_dir, settings, resume), log_file)
        report.attempts += 1
        if not pending or not kill_when(proc, run_dir, pending.pop(0), rng):
            if proc.wait() != 0:
                raise UserError(f"a resumed run failed with status {proc.returncode}; see {log_file}")
            break
        report.kills += 1
        in_checkpoint = writing_checkpoint(run_dir)
        report.during_checkpoint += in_checkpoint
        report.before_run_folder += not run_dir.is_dir()
        damaged = damaged_checkpoints(run_dir)
        report.corrupt_checkpoints += len(damaged)
        where = "while writing a checkpoint" if in_checkpoint else "not in a checkpoint write"
        log(f"  kill {report.kills} (attempt {report.attempts}, {where}); damaged: {damaged or 'none'}")
    report.fallback_warnings += log_file.read_text(errors="replace").count("could not be loaded")
    report.runs += 1
    return outputs(run_dir)


def elastic_run(recipe: str, data: Path, run_dir: Path, settings: list[str], nproc: int,
                plan: list[float | None], rng: random.Random, report: Report, log=print) -> dict | str:
    """One torchrun job allowed len(plan) restarts; one rank of each worker group is killed by `plan`,
    torchrun restarts the group, which resumes with `--resume auto`. The job's outputs, or why it failed."""
    log_file = run_dir.with_suffix(".log")
    job = start(torchrun_command(recipe, data, run_dir, settings, nproc, len(plan), resume=True), log_file)
    group: dict[int, int] = {}
    for delay in plan:
        group = new_worker_group(job, nproc, set(group.values()))
        report.attempts += bool(group)
        if not group or not moment_came(job, run_dir, delay, rng):
            break
        rank = rng.choice(sorted(group))
        try:
            os.kill(group[rank], signal.SIGKILL)
        except ProcessLookupError:  # it finished in the meantime
            continue
        report.kills += 1
        in_checkpoint = writing_checkpoint(run_dir)
        report.during_checkpoint += in_checkpoint
        report.before_run_folder += not run_dir.is_dir()
        while any(map(_alive, group.values())):  # torchrun stops the others before it restarts the group
            time.sleep(0.05)
        damaged = damaged_checkpoints(run_dir)  # the new group needs seconds to start: nothing writes now
        report.corrupt_checkpoints += len(damaged)
        where = "while writing a checkpoint" if in_checkpoint else "not in a checkpoint write"
        log(f"  kill {report.kills}: rank {rank} of {nproc} ({where}); damaged: {damaged or 'none'}")
    else:
        report.attempts += bool(new_worker_group(job, nproc, set(group.values())))
    text = log_file.read_text(errors="replace")
    if job.wait() != 0:
        errors = [line for line in text.splitlines() if line.startswith("error: ")]
        return f"the job failed (status {job.returncode}; last: {errors[-1] if errors else 'see ' + log_file.name})"
    report.fallback_warnings += text.count("could not be loaded")
    report.runs += 1
    return outputs(run_dir)


