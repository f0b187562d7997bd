"""`python -m benchmarks.revisions --before REV --data data/mnist`: this checkout against an earlier revision on
the same machine, in one run: the step overhead (`benchmarks.step_overhead`: the trainer's step against a
minimal hand-written loop) and the whole training loop's steps per second (`train.py` on a model of negligible
compute, so that what the loop adds around each step shows).

The earlier revision is checked out into a temporary git worktree and run from there with the same Python, so
both sides use the same packages. The rounds alternate between the two, in turn first and second, so drifting
machine load hits both alike; the medians are reported. Each `train.py` run times its second epoch (the first
holds the start-up).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.loaders import environment
from beton_trainer.common.errors import UserError, run_cli
from beton_trainer.format.dataset import load_manifest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 400  # per timed epoch
LOOP_SETTINGS = ["--set", "phases.0.epochs=2", "--set", f"max_steps_per_epoch={STEPS}", "--set",
                 "data.batch_size=64", "--set", "model.args.hidden_size=32", "--set", "model.args.depth=1",
                 "--set", "tensorboard=false", "--set", "max_eval_batches=1"]


def run(tree: Path, argv: list[str]) -> str:
    """A command in `tree` with its own code first on the path (an older tree has top-level packages)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, *argv], cwd=tree, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise UserError(f"`{shlex.join(argv)}` failed in {tree} ({out.stderr.strip().splitlines()[-1:]})")
    return out.stdout


def step_overhead(tree: Path) -> tuple[float, float]:
    """(trainer step, minimal loop) steps per second, medians of 5 alternating rounds."""
    out = run(tree, ["-m", "benchmarks.step_overhead", "--rounds", "5"])
    rates = dict(re.findall(r"^(trainer step|minimal loop)\s+([\d,]+) steps/s", out, re.M))
    return float(rates["trainer step"].replace(",", "")), float(rates["minimal loop"].replace(",", ""))


def loop_rate(tree: Path, data: Path, run_dir: Path) -> float:
    """The training loop's steps per second over the second of two epochs."""
    run(tree, ["train.py", "--recipe", "mnist_mlp_smoke", "--data", str(data), "--cpu", "--run-dir", str(run_dir),
               *LOOP_SETTINGS])
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return STEPS / float(rows[1]["epoch_time_s"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.revisions", description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the earlier revision (a commit, tag or branch)")
    parser.add_argument("--data", type=Path, required=True, help="converted MNIST (beton-convert mnist ...)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (each runs both benchmarks)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data = args.data.resolve()
    load_manifest(data)
    work = Path(tempfile.mkdtemp(prefix="revisions-"))
    before = work / "before"
    made = subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], cwd=ROOT,
                          capture_output=True, text=True)
    if made.returncode != 0:
        raise UserError(f"cannot check out {args.before}: {made.stderr.strip()}")
    try:
        trees = {"before": before, "after": ROOT}
        results: dict[str, dict[str, list[float]]] = {side: {"step": [], "minimal": [], "loop": []} for side in trees}
        for r in range(args.rounds):
            for side, tree in list(trees.items())[::1 if r % 2 == 0 else -1]:  # ABBA: load drifts hit both alike
                step, minimal = step_overhead(tree)
                results[side]["step"].append(step)
                results[side]["minimal"].append(minimal)
                results[side]["loop"].append(loop_rate(tree, data, work / f"{side}-{r}"))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, capture_output=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    env = environment(torch.device("cpu"))
    command = "python -m benchmarks.revisions " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"device: {env['device']}  date: {env['date']}\ncommand: {command}\n")
    print("| revision | trainer step, steps/s | minimal loop, steps/s | step / minimal | training loop, steps/s |")
    print("|---|---:|---:|---:|---:|")
    for side, label in (("before", args.before), ("after", f"{head.stdout.strip()} (this checkout)")):
        m = {k: statistics.median(v) for k, v in results[side].items()}
        print(f"| {side}: {label} | {m['step']:,.0f} | {m['minimal']:,.0f} | {m['step'] / m['minimal']:.3f}x | "
              f"{m['loop']:,.0f} |")
    print(f"\nrounds: {shlex.quote(repr(results))}")
    return 0


if __name__ == "__main__":
    run_cli(main)
