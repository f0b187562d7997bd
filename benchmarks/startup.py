"""`python -m benchmarks.startup --data-root ../shared/data`: how long a tensor-backend run takes from launch to
its first training step, and its peak RSS, beside the floor and a hand-written loop, side by side in one run.

- floor: `python -c "import torch, torchvision"`, the imports every PyTorch image job pays;
- ours: `train.py --recipe R --loader tensor --cpu` (its summary.json records when the first step began);
- hand-written: a plain PyTorch loop on the same job (the same model and data, SGD, the recipe's steps and
  test batches), what a user writes by hand, reading the converted split with `pipelines.beton`.

Jobs: `mnist_mlp_smoke` on converted MNIST and `c10_cnn_smoke` on CIFAR-10 (from the JPEG tarball), both
converted once into --work. Rounds interleave the three commands so drift on the machine hits them alike;
the table gives medians. Peak RSS is each child's own maximum resident set (`os.wait4`). Target here: ours
within 1.0 s of the floor, and no more RSS than the hand-written loop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from beton_trainer.common.errors import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]
FirstStep = Callable[[str], float]  # a child's stdout -> the Unix time its first training step began
JOBS = {"mnist_mlp_smoke": "mnist", "c10_cnn_smoke": "cifar10"}
FLOOR = "import time, torch, torchvision; print(time.time())"
HANDWRITTEN = """
import sys, time
import numpy as np
import torch
import torch.nn.functional as F
from beton_trainer.models import build_model
from beton_trainer.format.dataset import open_split

data, model_name, model_args, batch, lr, steps, eval_batches, eval_batch = sys.argv[1:9]
batch, steps, eval_batches, eval_batch = int(batch), int(steps), int(eval_batches), int(eval_batch)
train, test = open_split(data, "train"), open_split(data, "test")
images = torch.from_numpy(train.images).permute(0, 3, 1, 2)
labels = torch.from_numpy(train.labels)
mean = torch.tensor(train.mean).view(1, -1, 1, 1)
std = torch.tensor(train.std).view(1, -1, 1, 1)
model = build_model(model_name, num_classes=train.num_classes, image_shape=train.image_shape, **eval(model_args))
optimizer = torch.optim.SGD(model.parameters(), lr=float(lr), momentum=0.9)
order = torch.randperm(len(labels))
first = None
for k in range(steps):
    idx = order[k * batch:(k + 1) * batch]
    x = (images[idx].float() / 255 - mean) / std
    if first is None:
        first = time.time()
    loss = F.cross_entropy(model(x), labels[idx])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
model.eval()
correct = 0
with torch.no_grad():
    for k in range(eval_batches):
        x = torch.from_numpy(test.images[k * eval_batch:(k + 1) * eval_batch]).permute(0, 3, 1, 2)
        correct += (model((x.float() / 255 - mean) / std).argmax(1) == torch.from_numpy(
            test.labels[k * eval_batch:(k + 1) * eval_batch])).sum().item()
print(first)
"""


def run_child(command: list[str], first_step: FirstStep, cwd: Path = ROOT) -> tuple[float, float]:
    """Seconds from launch to the first step (the Unix time `first_step(stdout)` gives) and the child's peak RSS
    in MB (its own rusage: `os.wait4` reaps it, not Popen)."""
    start = time.time()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=err, env={**os.environ, "PYTHONPATH": str(cwd)})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise UserError(f"{' '.join(command[:5])} ... failed (exit {proc.returncode}): {err.read().strip()[-400:]}")
        return first_step(out.read()) - start, usage.ru_maxrss / 1024


def commands(recipe_name: str, data: Path, run_dir: Path,
             other: Path | None = None) -> dict[str, tuple[list[str], FirstStep, Path]]:
    """The commands of one job, each with how to read its first step's Unix time and where it runs; with `other`,
    also `train.py` of that checkout (e.g. an older commit, for a before/after table)."""
    from beton_trainer.trainer.config import load_recipe

    recipe = load_recipe(recipe_name)
    phase = recipe.phases[0]
    last_line = lambda out: float(out.strip().splitlines()[-1])  # noqa: E731
    summary = lambda _: json.loads((run_dir / "summary.json").read_text())["first_step_at"]  # noqa: E731
    ours = [sys.executable, "train.py", "--recipe", recipe_name, "--data", str(data), "--loader", "tensor", "--cpu",
            "--run-dir", str(run_dir)]
    hand = [sys.executable, "-c", HANDWRITTEN, str(data), recipe.model.name, repr(recipe.model.args),
            str(recipe.data.batch_size), str(phase.optimizer.lr), str(recipe.max_steps_per_epoch * phase.epochs),
            str(recipe.max_eval_batches), str(recipe.data.eval_batch_size)]
    runs = {"floor": ([sys.executable, "-c", FLOOR], last_line, ROOT), "ours": (ours, summary, ROOT),
            "hand-written": (hand, last_line, ROOT)}
    if other is not None:
        other_dir = run_dir.with_name(run_dir.name + "-other")
        other_summary = lambda _: json.loads((other_dir / "summary.json").read_text())["first_step_at"]  # noqa: E731
        runs[f"ours at {other.name}"] = ([*ours[:-1], str(other_dir)], other_summary, other)
    return runs


def prepare(data_root: Path, work: Path) -> dict[str, Path]:
    from beton_trainer.convert import convert_dataset

    quiet = lambda _: None  # noqa: E731
    return {"mnist": convert_dataset("mnist", data_root / "mnist", work, log=quiet),
            "cifar10": convert_dataset("imagefolder", data_root / "cifar10-jpeg.tar.xz", work, name="cifar10",
                                       log=quiet)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, required=True, help="folder with mnist/ and cifar10-jpeg.tar.xz")
    parser.add_argument("--work", type=Path, default=ROOT / "data" / "startup", help="where data is converted")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians are reported)")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument("--other-checkout", type=Path, metavar="DIR",
                        help="also time train.py of this checkout (its summary.json must record first_step_at)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        raise UserError(f"--rounds must be at least 1, got {args.rounds}")
    data = prepare(args.data_root, args.work)
    results: dict[str, dict[str, list[tuple[float, float]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for job, dataset in JOBS.items():
                run_dir = Path(tmp) / f"{job}-{r}"
                for name, (command, first_step, cwd) in commands(job, data[dataset], run_dir,
                                                                 args.other_checkout).items():
                    results.setdefault(job, {}).setdefault(name, []).append(run_child(command, first_step, cwd))
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    print(f"| job | command | launch to first step, s (median of {args.rounds}) | gap to floor, s | peak RSS, MB |")
    print("|---|---|---:|---:|---:|")
    for job, rows in results.items():
        floor = statistics.median(t for t, _ in rows["floor"])
        for name, values in rows.items():
            seconds = statistics.median(t for t, _ in values)
            rss = statistics.median(m for _, m in values)
            print(f"| {job} | {name} | {seconds:.2f} | {seconds - floor:+.2f} | {rss:,.0f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    run_cli(main)
