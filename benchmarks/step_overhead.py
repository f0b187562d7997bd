"""`python -m benchmarks.step_overhead`: what the trainer's step costs beyond the work itself.

A model so small that its compute is negligible, trained on the same batches (already on the device)
two ways, side by side in one run: the trainer's real step (`trainer.step.TrainStep`: Accelerate's
autocast and wrappers, the loss terms, the fused optimizer, the per-batch schedule, the running sums on
the device) and a minimal hand-written PyTorch loop (forward, cross-entropy, backward, SGD step,
zero_grad). The rounds alternate between the two so that drifting machine load hits both alike; the
median round of each is reported, and their ratio (target: >= 0.9x).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.loaders import environment
from benchmarks.train_throughput import StepConfig, shared_step
from beton_trainer.common.errors import UserError, run_cli
from beton_trainer.trainer.config import Recipe

TARGET = 0.9


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 32), nn.ReLU(), nn.Linear(32, 10))


def batches(n: int, batch_size: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(batch_size, 1, 28, 28, generator=gen).to(device),
             torch.randint(10, (batch_size,), generator=gen).to(device)) for _ in range(n)]


def trainer_loop(device: torch.device) -> Callable[[list], None]:
    """The trainer's step with a default recipe (SGD 0.1, momentum 0.9, constant schedule, fp32)."""
    step, sums = shared_step(tiny_model(), Recipe(channels_last=False), StepConfig("no", False, False), device, "")

    def run(data: list) -> None:
        for images, targets in data:
            step(images, targets, sums, log=False)
    return run


def minimal_loop(device: torch.device) -> Callable[[list], None]:
    """What a user writes by hand: no metrics, no schedule, no wrappers."""
    model = tiny_model().to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def run(data: list) -> None:
        for images, targets in data:
            loss = F.cross_entropy(model(images), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return run


def steps_per_second(run: Callable[[list], None], data: list, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run(data)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(data) / (time.perf_counter() - start)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300, help="steps per round")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds per loop (median reported)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available; use --device cpu")
    torch.set_num_threads(1)  # the two loops then compete for nothing but the same core
    device = torch.device(args.device)
    data = batches(args.steps, args.batch_size, device)
    loops = {"trainer step": trainer_loop(device), "minimal loop": minimal_loop(device)}
    for run in loops.values():  # warm-up: lazy optimizer state, allocator
        run(data[:20])
    rates: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(args.rounds):
        for name, run in loops.items():
            rates[name].append(steps_per_second(run, data, device))
    median = {name: statistics.median(r) for name, r in rates.items()}
    ratio = median["trainer step"] / median["minimal loop"]
    env = environment(device)
    command = "python -m benchmarks.step_overhead " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"device: {env['device']}  date: {env['date']}\ncommand: {command}")
    for name in loops:
        print(f"{name:<14} {median[name]:>9,.0f} steps/s  (rounds: {', '.join(f'{r:,.0f}' for r in rates[name])})")
    verdict = "met" if ratio >= TARGET else "NOT met"
    print(f"ratio trainer/minimal: {ratio:.3f}x (target >= {TARGET}x: {verdict})")
    return 0


if __name__ == "__main__":
    run_cli(main)
