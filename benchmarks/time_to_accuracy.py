"""`python -m benchmarks.time_to_accuracy --recipe c10_fast --data data/cifar10`: train one recipe with
train.py and report how long it took to reach each test-accuracy threshold, as a markdown row appended
to a results file (with the device, versions, date and the exact command).

Times come from the run folder: "train s" is the sum of metrics.csv's per-epoch training time (steps
only; epoch 1 includes torch.compile and warm-up, shown separately), and a threshold counts as reached
at the end of the first epoch whose accuracy meets it. "wall s" is summary.json's wall time, which adds
the per-epoch evaluations and the final test.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.loaders import environment
from beton_trainer.common.errors import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]
HEADER = ("| date | device | versions | command | test accuracy | time to threshold (train s) | train s "
          "| epoch 1 s | wall s | epochs |\n|---|---|---|---|---:|---|---:|---:|---:|---:|\n")


@dataclass(frozen=True)
class RunTimes:
    """What a finished run folder says about its speed and accuracy."""

    recipe: str
    test_accuracy: float  # of the final (exported) model, from summary.json
    wall_s: float
    train_s: float  # sum of epoch_time_s
    first_epoch_s: float
    epochs: int
    reached: dict[float, float | None]  # threshold (fraction) -> train seconds when first met; None: never


def read_run(run_dir: Path, thresholds: list[float], metric: str = "test_accuracy") -> RunTimes:
    """Parse summary.json and metrics.csv of a finished train.py run."""
    summary_path, metrics_path = run_dir / "summary.json", run_dir / "metrics.csv"
    if not summary_path.is_file() or not metrics_path.is_file():
        raise UserError(f"{run_dir} has no summary.json and metrics.csv: the run did not finish; "
                        "check train.py's output, or point at a finished run folder")
    summary = json.loads(summary_path.read_text())
    with open(metrics_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or metric not in rows[0]:
        columns = ", ".join(rows[0]) if rows else "(none: no epoch finished)"
        raise UserError(f"{metrics_path} has no '{metric}' column; choose one of {columns}")
    elapsed, reached = 0.0, dict.fromkeys(thresholds)
    for row in rows:
        elapsed += float(row["epoch_time_s"])
        for threshold in thresholds:
            if reached[threshold] is None and float(row[metric]) >= threshold:
                reached[threshold] = elapsed
    return RunTimes(recipe=summary["recipe"], test_accuracy=summary["test_accuracy"],
                    wall_s=summary["wall_s"], train_s=elapsed, first_epoch_s=float(rows[0]["epoch_time_s"]),
                    epochs=len(rows), reached=reached)


def markdown_row(times: RunTimes, env: dict[str, str], command: str) -> str:
    reached = ", ".join(f"{t:.0%}: " + (f"{s:.1f}" if s is not None else "not reached")
                        for t, s in times.reached.items())
    cells = [env["date"], env["device"], env["versions"], f"`{command}`", f"{times.test_accuracy:.2%}",
             reached, f"{times.train_s:.1f}", f"{times.first_epoch_s:.1f}", f"{times.wall_s:.1f}",
             str(times.epochs)]
    return "| " + " | ".join(cells) + " |\n"


def append_row(out: Path, row: str) -> None:
    """Append to the results file, writing the table header first when the file is new."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(("" if out.is_file() and out.stat().st_size else HEADER) + row)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.time_to_accuracy",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True, help="recipe name or .toml path, as for train.py")
    parser.add_argument("--data", required=True, help="converted dataset folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override passed to train.py (repeatable)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[90, 93, 94], metavar="PERCENT",
                        help="test accuracies to time, in percent (default: 90 93 94)")
    parser.add_argument("--run-dir", type=Path,
                        help="train.py's run folder (default runs/tta-<recipe>-<time>)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU (train.py --cpu)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/time_to_accuracy.md"),
                        help="markdown file the result row is appended to")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not all(0 < t <= 100 for t in args.thresholds):
        raise UserError(f"--thresholds are percentages in (0, 100], got {args.thresholds}; "
                        "e.g. --thresholds 90 94")
    run_dir = args.run_dir or Path("runs") / f"tta-{Path(args.recipe).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    command = [sys.executable, str(ROOT / "train.py"), "--recipe", args.recipe, "--data", args.data,
               "--run-dir", str(run_dir), *(a for o in args.overrides for a in ("--set", o))]
    command += ["--cpu"] if args.cpu else []
    print("running " + shlex.join(command), flush=True)
    code = subprocess.run(command).returncode
    if code != 0:
        raise UserError(f"train.py exited with status {code}; see its output above")
    times = read_run(run_dir, [t / 100 for t in args.thresholds])
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    bench_command = "python -m benchmarks.time_to_accuracy " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    row = markdown_row(times, environment(device), bench_command)
    append_row(args.out, row)
    print(HEADER + row + f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
