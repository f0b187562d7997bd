"""`python -m benchmarks.fault_harness`: kill a real training run with SIGKILL at random moments and
check that `--resume auto` still ends with exactly the results of an uninterrupted run.

One uninterrupted reference run, then faulted runs of the same recipe and seed: each attempt is
killed either after a random delay (start-up, a training step, evaluation, export) or the moment a
checkpoint is being written (a `.tmp-*` folder appears), then resumed, until the run finishes. After
every kill each complete checkpoint is checked against the sizes and hashes recorded with it. At the
end `metrics.csv` (without the wall-time columns) and `model.safetensors` must equal the reference's
byte for byte. Training runs as `python train.py` subprocesses on the CPU, like a user's.

With `--nproc N` (N > 1) each faulted run is one elastic job, `torchrun --standalone --nproc_per_node N
--max-restarts K train.py --run-dir RUN --resume auto`: the harness SIGKILLs one rank, chosen at random,
at a random moment of each worker group; torchrun restarts the group, which resumes on its own from
the newest good checkpoint. The reference is an uninterrupted torchrun job with the same N.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shlex
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from beton_trainer.common.errors import UserError, run_cli
from beton_trainer.format.dataset import load_manifest
from tests.fault_helpers import (
    DEFAULT_SETTINGS,
    WALL_COLUMNS,
    Report,
    elastic_run,
    faulted_run,
    kill_plan,
    outputs,
    reference_run,
)


def markdown(report: Report, command: str, reference_s: float, recipe: str, settings: list[str],
             nproc: int = 1) -> str:
    ok = not report.mismatches and report.survived == report.kills and not report.corrupt_checkpoints
    when = datetime.now().astimezone().isoformat(timespec="seconds")
    if nproc > 1:
        heading, attempts = f"## Fault harness, elastic torchrun ({nproc} processes)", "worker groups / jobs"
        how = (f"as one `torchrun --standalone --nproc_per_node {nproc} --max_restarts K train.py ... --cpu "
               "--run-dir RUN --resume auto` job per faulted run (K: its planned kills); in each worker group one "
               "rank, chosen at random, killed with SIGKILL after a random delay up to the reference job's "
               "duration (start-up, steps, evaluation, export) or, 3 times in 10, the moment a `.tmp-*` "
               "checkpoint folder appeared; torchrun then restarts the group, which resumes on its own.")
    else:
        heading, attempts = "## Fault harness", "attempts / runs"
        how = ("as `python train.py ... --cpu` subprocesses, each attempt killed with SIGKILL after a random delay "
               "up to the reference run's duration (start-up, steps, evaluation, export) or, 3 times in 10, the "
               "moment a `.tmp-*` checkpoint folder appeared.")
    return "\n".join([
        heading, "",
        f"`{command}` ({when}; {platform.node() or 'this machine'}: {os.cpu_count()}-core CPU, no GPU;"
        f" reference run {reference_s:.0f} s)", "",
        "| kills tried | survived | during a checkpoint write | before the run folder existed | "
        f"corrupt checkpoints found | resumes that fell back | {attempts} | results equal |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| {report.kills} | {report.survived} | {report.during_checkpoint} | {report.before_run_folder} | "
        f"{report.corrupt_checkpoints} | {report.fallback_warnings} | {report.attempts} / {report.runs} | "
        f"{'yes' if ok else 'NO: ' + '; '.join(report.mismatches)} |", "",
        f"Recipe `{recipe}` with `{' '.join(settings)}`, {how}", "",
        "Equal means: `metrics.csv` without the wall-time columns (" + ", ".join(WALL_COLUMNS) + ") and "
        "`model.safetensors` byte for byte, plus the final test accuracy and loss. The wall-time columns "
        "measure the machine, not the training, and differ between any two runs.", ""])


def write_section(path: Path, section: str) -> None:
    """Replace the section of a results file headed by `section`'s first line (or append it), keeping the rest."""
    text = path.read_text() if path.is_file() else "# Measured results\n"
    heading = section.splitlines()[0] + "\n"
    begin = text.find(heading)
    if begin < 0:
        path.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    end = text.find("\n## ", begin)
    path.write_text(text[:begin] + section + ("\n" + text[end + 1:] if end >= 0 else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fault_harness",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/mnist"), help="a converted dataset folder")
    parser.add_argument("--recipe", default="mnist_cnn_smoke")
    parser.add_argument("--set", dest="settings", action="append", default=None, metavar="KEY=VALUE",
                        help=f"recipe overrides (default: {' '.join(DEFAULT_SETTINGS)})")
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs to send in all (faulted runs repeat)")
    parser.add_argument("--kills-per-run", type=int, default=8)
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes per run; > 1: elastic torchrun jobs, one rank killed at a time")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    parser.add_argument("--work", type=Path, help="folder for the runs (default: a temporary folder)")
    parser.add_argument("--results", type=Path, help="also write the result as a '## Fault harness' "
                                                     "section of this markdown file (benchmarks/RESULTS.md)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    load_manifest(args.data)  # a clear error before anything starts
    settings = args.settings or list(DEFAULT_SETTINGS)
    if not any(s.startswith("checkpoint_every_steps=") for s in settings):
        raise UserError("the harness needs mid-epoch checkpoints: add --set checkpoint_every_steps=N")
    work = args.work or Path(tempfile.mkdtemp(prefix="fault-harness-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.nproc < 1:
        raise UserError(f"--nproc {args.nproc}: pass 1 (plain runs) or more (elastic torchrun jobs)")
    rng = random.Random(args.seed)
    print(f"reference run in {work / 'reference'}")
    reference_s = reference_run(args.recipe, args.data, work / "reference", settings, args.nproc)
    expected = outputs(work / "reference")
    report = Report()
    while report.kills < args.kills:
        run_dir = work / f"faulted-{report.runs}"
        before = report.kills
        print(f"faulted run {run_dir} (reference took {reference_s:.0f} s)")
        plan = kill_plan(min(args.kills_per_run, args.kills - report.kills), reference_s, rng)
        if args.nproc > 1:
            got = elastic_run(args.recipe, args.data, run_dir, settings, args.nproc, plan, rng, report)
        else:
            got = faulted_run(args.recipe, args.data, run_dir, settings, plan, rng, report)
        if isinstance(got, str):
            report.runs += 1
            report.mismatches.append(f"{run_dir.name}: {got}")
            continue
        mismatched = [key for key in expected if got[key] != expected[key]]
        if mismatched:
            report.mismatches.append(f"{run_dir.name}: {', '.join(mismatched)} differ")
        else:
            report.survived += report.kills - before
    command = "python -m benchmarks.fault_harness " + shlex.join(argv if argv is not None else sys.argv[1:])
    section = markdown(report, command, reference_s, args.recipe, settings, args.nproc)
    print(section)
    if args.results:
        write_section(args.results, section)
    return 0 if not report.mismatches and not report.corrupt_checkpoints else 1


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
