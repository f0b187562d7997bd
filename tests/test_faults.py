"""Faults during training: SIGKILL at random moments and mid-checkpoint, SIGTERM, damaged checkpoints,
a non-finite loss, a full disk, and a rank that dies in a 2-process run. Each time the run either
resumes to exactly the results of an uninterrupted run, or stops with a clear message and its last
good checkpoint intact. (`python -m benchmarks.fault_harness` is the long version, with 20+ kills.)
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import accelerate
import pytest
import torch
from safetensors.torch import load_file

from beton_trainer.common.errors import UserError
from beton_trainer.trainer import checkpoint, runlog, teacher
from beton_trainer.trainer.config import load_recipe
from tests.fault_helpers import Report, faulted_run, outputs, train_command
from tests.train_helpers import metrics, run_train

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "c10_cnn_smoke"  # affine + flip augmentation: a resumed run must redraw the same random transforms
# two epochs of 8 steps; checkpoints at steps 3 and 6, at the end of epoch 1 (8), then 9, 12 and 15
SETTINGS = ["phases.0.epochs=2", "max_steps_per_epoch=8", "checkpoint_every_steps=3", "tensorboard=false"]


def train_argv(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return train_command(RECIPE, data, run_dir, SETTINGS, resume=False)[2:] + list(extra)


def assert_checkpoints_sound(run_dir: Path) -> list[Path]:
    """Only complete checkpoints, each matching its recorded files, with finite weights."""
    root = run_dir / "checkpoints"
    assert not list(root.glob(".tmp-*"))
    found = checkpoint.candidates(run_dir)
    assert found and [p.name for p in found] == sorted((p.name for p in root.iterdir()), reverse=True)
    for ckpt in found:
        assert checkpoint.problem(ckpt) is None, ckpt
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "model.safetensors").values()), ckpt
    return found


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if list((run_dir / "checkpoints").glob("step-*")):
            return
        time.sleep(0.005)


@pytest.fixture(scope="module")
def reference(tiny_rgb_data, tmp_path_factory) -> dict:
    """The outputs of the uninterrupted run everything else must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_train(train_argv(tiny_rgb_data, run_dir))
    assert [p.name for p in checkpoint.candidates(run_dir)] == ["step-000000015", "step-000000012"]
    return {"dir": run_dir, "outputs": outputs(run_dir)}


def test_sigkill_anywhere_then_resume_gives_identical_results(tiny_rgb_data, reference, tmp_path):
    """SIGKILL twice the moment a checkpoint is being written, then after a random delay (if the run has
    not finished by then); `--resume auto` each time; the final metrics and weights equal the
    uninterrupted run's, byte for byte."""
    report = Report()
    plan = [None, None, random.Random(1).uniform(1, 8)]  # None: while a checkpoint is being written
    got = faulted_run(RECIPE, tiny_rgb_data, tmp_path / "run", SETTINGS, plan, random.Random(0), report,
                      log=lambda _: None)
    assert report.kills >= 2 and report.during_checkpoint >= 1
    assert report.corrupt_checkpoints == 0
    assert got == reference["outputs"]
    assert_checkpoints_sound(tmp_path / "run")


def test_sigterm_finishes_the_step_checkpoints_and_resumes_identically(tiny_rgb_data, reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", *train_argv(tiny_rgb_data, run_dir)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(run_dir, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2
    last = stderr.strip().splitlines()[-1]
    match = re.search(r"error: stopped by signal at step (\d+); checkpoint written to (\S+); continue with "
                      r"--run-dir (\S+) --resume auto$", last)
    assert match, last
    assert match[2] == str(run_dir / "checkpoints") and match[3] == str(run_dir)
    assert checkpoint.candidates(run_dir)[0].name == f"step-{int(match[1]):09d}"
    assert_checkpoints_sound(run_dir)
    run_train(train_argv(tiny_rgb_data, run_dir, "--resume", "auto"))
    assert outputs(run_dir) == reference["outputs"]


def test_damaged_newest_checkpoint_is_detected_and_the_previous_one_used(reference, tiny_rgb_data, tmp_path):
    """A run killed during its final export, whose newest checkpoint lost the end of a file."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference["dir"], run_dir)
    (run_dir / "summary.json").unlink()
    damaged = run_dir / "checkpoints" / "step-000000015" / "optimizer.bin"
    damaged.write_bytes(damaged.read_bytes()[:-1000])
    with pytest.warns(UserWarning, match=r"step-000000015 could not be loaded \(optimizer.bin is \d+ bytes, "
                                         r"\d+ were written\); trying the one before it"):
        run_train(train_argv(tiny_rgb_data, run_dir, "--resume", "auto"))
    assert outputs(run_dir) == reference["outputs"]
    assert [p.name for p in assert_checkpoints_sound(run_dir)] == ["step-000000015", "step-000000012"]


def test_resume_from_a_named_checkpoint_continues_its_run(reference, tiny_rgb_data, tmp_path):
    """`--resume RUN/checkpoints/step-N` continues RUN from step N, writing nothing into the checkpoint."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference["dir"], run_dir)
    (run_dir / "summary.json").unlink()
    named = run_dir / "checkpoints" / "step-000000012"
    argv = train_argv(tiny_rgb_data, run_dir)
    at = argv.index("--run-dir")
    run_train(argv[:at] + argv[at + 2:] + ["--resume", str(named)])
    assert outputs(run_dir) == reference["outputs"]
    recorded = json.loads((named / "progress.json").read_text())["files"]
    assert {p.name for p in named.iterdir()} == {*recorded, "progress.json"}


def test_non_finite_loss_stops_with_step_lr_and_last_finite_loss(mnist_data, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(UserError) as info:
        run_train(["--recipe", "mnist_mlp_smoke", "--data", str(mnist_data), "--run-dir", str(run_dir),
                   "--cpu", "--set", "phases.0.optimizer.name=sgd", "--set", "phases.0.optimizer.lr=1e6",
                   "--set", "phases.0.schedule.name=constant", "--set", "checkpoint_every_steps=2"])
    message = str(info.value)
    assert re.fullmatch(r"the training (loss|gradient norm) became (nan|inf) by step \d+ \(lr 1e\+06; "
                        r"last finite loss \S+ at step \d+\); lower the learning rate or enable "
                        r"grad_clip_norm; the last good checkpoint is kept in "
                        + re.escape(str(run_dir / "checkpoints")), message), message
    found = assert_checkpoints_sound(run_dir)  # written before the loss stopped being finite
    last_finite_step = int(re.search(r"at step (\d+)", message)[1])
    assert int(found[0].name.split("-")[1]) <= last_finite_step


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tiny_rgb_data, reference, tmp_path,
                                                                     monkeypatch):
    real_save = accelerate.Accelerator.save_state
    calls = []

    def save_until_disk_full(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        real_save(self, output_dir, **kwargs)
        if len(calls) == 2:  # the second checkpoint runs out of space half-way
            Path(output_dir, "optimizer.bin").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_until_disk_full)
    run_dir = tmp_path / "run"
    expected = (r"cannot write checkpoint \S+step-000000006 \(No space left on device\); free disk space .*"
                r"--resume auto \(earlier checkpoints are intact\)")
    with pytest.raises(UserError, match=expected):
        run_train(train_argv(tiny_rgb_data, run_dir))
    assert [p.name for p in assert_checkpoints_sound(run_dir)] == ["step-000000003"]
    monkeypatch.undo()  # space freed: the run continues from step 3 to the same end
    run_train(train_argv(tiny_rgb_data, run_dir, "--resume", "auto"))
    assert outputs(run_dir) == reference["outputs"]


def test_too_little_disk_space_fails_before_the_run_starts(tiny_rgb_data, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(runlog.shutil, "disk_usage", lambda _: usage._replace(free=2**20))
    expected = r"only 1 MiB free at \S+ but this run's checkpoints need about \d+ MiB; free disk space"
    with pytest.raises(UserError, match=expected):
        run_train(train_argv(tiny_rgb_data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def child_pids(parent: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            pids.append(int(stat.parent.name))
    return pids


def rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def test_dead_rank_stops_the_job_and_the_run_resumes_on_one_process(mnist_data, tmp_path):
    """torchrun, 2 CPU processes: SIGKILL rank 1 after the first checkpoint; the whole job must exit
    within 60 s instead of hanging. The run then resumes on 1 process (its interrupted epoch restarts,
    since each process's share of the data depends on their number) and finishes."""
    run_dir = tmp_path / "run"
    argv = ["--recipe", "mnist_cnn_smoke", "--data", str(mnist_data), "--run-dir", str(run_dir), "--cpu",
            "--set", "phases.0.epochs=2", "--set", "max_steps_per_epoch=30",
            "--set", "checkpoint_every_steps=4", "--set", "tensorboard=false"]
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]
    job = subprocess.Popen([*torchrun, "train.py", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_checkpoint(run_dir, job)
    workers = {rank_of(pid): pid for pid in child_pids(job.pid)}
    assert job.poll() is None and 1 in workers, "the job ended before its first checkpoint"
    os.kill(workers[1], signal.SIGKILL)
    killed_at = time.monotonic()
    code = job.wait(timeout=90)
    assert code != 0 and time.monotonic() - killed_at < 60
    assert_checkpoints_sound(run_dir)
    summary = run_train([*argv, "--resume", "auto"])
    assert summary["processes"] == 1 and summary["test_samples"] == 10_000
    assert [r["epoch"] for r in metrics(run_dir)] == ["1", "2"]


def test_waiting_for_the_teacher_of_another_rank_is_bounded(tmp_path, monkeypatch):
    """Rank 1 waits while rank 0's teacher run makes progress, and stops with one line once its folder has
    been still for the limit (rank 0 died, or this machine does not see the folder)."""
    monkeypatch.setattr(teacher, "TEACHER_IDLE_S", 0.6)
    monkeypatch.setattr(teacher, "POLL_S", 0.05)
    monkeypatch.setenv("RANK", "1")
    folder = tmp_path / "teacher"
    recipe = load_recipe("c10_kd_smoke", [f"loss.distill.teacher={json.dumps(str(folder))}"])

    def teacher_run(epochs: int, finish: bool) -> None:  # writes something every 0.2 s, then maybe finishes
        folder.mkdir(exist_ok=True)
        for epoch in range(epochs):
            (folder / f"epoch-{epoch}").write_text("metrics")
            time.sleep(0.2)
        if finish:
            (folder / "summary.json").write_text("{}")

    def wait() -> None:  # in a thread, so that a wait without a limit fails this test instead of hanging it
        try:
            teacher.train_teacher_first(recipe, cpu=True)
        except UserError as exc:
            outcome.append(exc)

    outcome: list[UserError] = []
    writer, waiter = threading.Thread(target=teacher_run, args=(8, False)), threading.Thread(target=wait, daemon=True)
    began = time.monotonic()
    writer.start()
    waiter.start()
    waiter.join(timeout=60)
    writer.join()
    assert not waiter.is_alive() and outcome, "rank 1 still waits for a teacher whose folder stopped changing"
    assert time.monotonic() - began >= 7 * 0.2 + 0.6  # it waited while the folder changed (last at 1.4 s), then 0.6 s
    assert re.fullmatch(r"rank 1 waited for the teacher that rank 0 trains into \S+teacher, but nothing there "
                        r"changed for 1 s; see rank 0's output \(it may have failed\) and, on several machines, "
                        r"put that folder on a filesystem every machine shares", str(outcome[0])), str(outcome[0])
    shutil.rmtree(folder)
    writer = threading.Thread(target=teacher_run, args=(8, True))  # slower than the limit, but progressing
    writer.start()
    teacher.train_teacher_first(recipe, cpu=True)
    writer.join()
    assert (folder / "summary.json").is_file()
