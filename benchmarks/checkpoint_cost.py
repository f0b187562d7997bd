"""`python -m benchmarks.checkpoint_cost`: what one checkpoint of a run costs, for the recipe key
`checkpoint_every_epochs` to weigh against an epoch's time.

A checkpoint is Accelerate's `save_state` (weights, optimizer, scheduler and RNG states, the callbacks' states)
followed by the main process's seal: every file flushed to disk and hashed (sha256) for `progress.json`, while
the other ranks wait at a barrier. Both are timed here on the trainer's own objects: the model named (default
ResNet34-CIFAR) with c10_finetune's last-phase optimizer (SGD with momentum: one moment per weight), on the
CPU, in a single process. Reported: the checkpoint's size, the median seconds of `save_state` alone and of a
whole `checkpoint.save`, and the difference (the seal).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from benchmarks.loaders import environment
from beton_trainer.common.errors import run_cli
from beton_trainer.models import build_model
from beton_trainer.trainer import checkpoint
from beton_trainer.trainer.config import PhaseConfig, load_recipe
from beton_trainer.trainer.distributed import isolated_state
from beton_trainer.trainer.optim import build_optimizer, param_groups


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.checkpoint_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet34_cifar")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, help="where to write (default: a temporary folder)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="checkpoint-cost-", dir=args.dir))
    recipe = load_recipe("c10_finetune")
    last = recipe.phases[-1]
    with isolated_state():
        accelerator = Accelerator(cpu=True)
        model = build_model(args.model, num_classes=10, image_shape=(32, 32, 3))
        phase = PhaseConfig(epochs=last.epochs, optimizer=last.optimizer, schedule=last.schedule)
        optimizer = build_optimizer(param_groups(model, phase), phase.optimizer, "cpu")
        model, optimizer = accelerator.prepare(model, optimizer)
        model(torch.randn(8, 3, 32, 32)).sum().backward()
        optimizer.step()  # the moments exist, as in a real run's checkpoint
        state, whole = [], []
        for i in range(args.repeats):
            start = time.perf_counter()
            accelerator.save_state(str(root / f"plain-{i}"))
            state.append(time.perf_counter() - start)
            start = time.perf_counter()
            saved = checkpoint.save(accelerator, root / "checkpoints", {"global_step": i})
            whole.append(time.perf_counter() - start)
        size = folder_bytes(saved)
    shutil.rmtree(root, ignore_errors=True)
    s, w = statistics.median(state), statistics.median(whole)
    env = environment(torch.device("cpu"))
    command = "python -m benchmarks.checkpoint_cost " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"device: {env['device']}  date: {env['date']}\ncommand: {command}\n")
    print("| model | checkpoint MB | save_state s | checkpoint.save s | seal (fsync + sha256) s |")
    print("|---|---:|---:|---:|---:|")
    print(f"| {args.model} | {size / 1e6:.1f} | {s:.2f} | {w:.2f} | {w - s:.2f} |")
    return 0


if __name__ == "__main__":
    run_cli(main)
