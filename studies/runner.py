"""Launch a study's runs as ordinary `train.py` subprocesses: resumable, N at a time, teachers first.

A run whose folder holds summary.json is done and skipped; one that stopped midway with checkpoints
continues with `--resume auto`. A finished run whose config.toml differs from what the study asks for
(another scale or data in the same --out) is an error, never silently reused. Nothing is deleted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from beton_trainer.common.errors import UserError
from beton_trainer.studies.catalog import Run, study_run_dir
from beton_trainer.trainer.config import load_recipe

__all__ = ["execute", "is_done", "plan"]

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Job:
    run: Run
    folder: Path
    overrides: list[str]  # everything train.py gets via --set (study, scale, run, data, teacher)
    log: Path


def plan(runs: list[Run], study_dir: Path, data: Path | None) -> list[Job]:
    """One job per run, each recipe + overrides validated now, so a typo fails before any training."""
    jobs = []
    for run in runs:
        overrides = list(run.overrides)
        if data is not None:
            overrides.append(f"data.path={json.dumps(str(data))}")
        if run.teacher:  # the study trains the teacher itself (first), with the study's settings
            teacher = json.dumps(str(study_run_dir(study_dir, run.teacher)))
            overrides += [f"loss.distill.teacher={teacher}", 'loss.distill.teacher_recipe=""']
        expected = load_recipe(run.recipe, overrides)
        folder = study_run_dir(study_dir, run.label)
        if (folder / "summary.json").is_file() and load_recipe(str(folder / "config.toml")) != expected:
            raise UserError(f"{folder} holds a finished run with other settings (another scale, data or "
                            "recipe version); choose another --out for this study")
        jobs.append(Job(run, folder, overrides, study_dir / "logs" / f"{run.label}.log"))
    return jobs


def is_done(job: Job) -> bool:
    return (job.folder / "summary.json").is_file()


def _last_error(log: Path) -> str:
    """The line that explains a failed run: train.py's `error: ...`, else the log's last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1]


def _execute(job: Job, threads: int | None) -> tuple[str, float]:
    """Run one job to completion: ('' on success, else the reason it failed; seconds taken)."""
    argv = [sys.executable, "-m", "beton_trainer.trainer.cli", "--recipe", job.run.recipe, "--run-dir", str(job.folder)]
    argv += [arg for override in job.overrides for arg in ("--set", override)]
    if job.folder.is_dir() and any(job.folder.iterdir()):
        if not any((job.folder / "checkpoints").glob("*")):
            return (f"{job.folder} holds an unfinished run without checkpoints (see {job.log}); "
                    "remove that folder to run it again"), 0.0
        argv += ["--resume", "auto"]
    env = dict(os.environ)
    if threads:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    job.log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(job.log, "a") as log:
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        code = subprocess.run(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    return "" if code == 0 else f"exit status {code}: {_last_error(job.log)}", time.perf_counter() - start


def execute(jobs: list[Job], parallel: int = 1, log=print) -> dict[str, str]:
    """Run every job not yet done, `parallel` at a time, each after its teacher; label -> error ('' = ok)."""
    errors = {job.run.label: "" for job in jobs if is_done(job)}
    for label in errors:
        log(f"  {label}: done earlier, skipped")
    pending = [job for job in jobs if job.run.label not in errors]
    threads = max(1, (os.cpu_count() or 1) // parallel) if parallel > 1 else None
    total, started = len(pending), 0
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        running: dict[Future, Job] = {}
        while pending or running:
            for job in list(pending):
                teacher = job.run.teacher
                if len(running) == parallel or (teacher and teacher not in errors):
                    continue  # no free slot, or its teacher is still training
                pending.remove(job)
                if teacher and errors[teacher]:
                    errors[job.run.label] = f"its teacher run '{teacher}' failed"
                    log(f"  {job.run.label}: not run ({errors[job.run.label]})")
                    continue
                started += 1
                log(f"  [{started}/{total}] {job.run.label}: training (log: {job.log})")
                running[pool.submit(_execute, job, threads)] = job
            if not running:
                continue
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                error, took = future.result()
                errors[job.run.label] = error
                log(f"  {job.run.label}: " + (f"FAILED ({error})" if error else f"finished in {took:.0f} s"))
    return errors
