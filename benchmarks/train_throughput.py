"""`python -m benchmarks.train_throughput`: training throughput (images/s) of one model fed by each loader
backend, side by side in one run with the ceiling (synthetic batches already on the device) and the
torchvision DataLoader + PIL baseline, plus ablations of the ceiling (compile, channels-last, bf16 off).

Every row times the training step users run (`trainer.step.TrainStep`: Accelerate's autocast and loss
scaler, the loss terms, backward, the recipe's gradient clipping, the fused optimizer and the schedule of
c10_finetune's last phase, the running sums); the backends and the baseline apply c10_finetune's
augmentations. Warm-up steps (compilation, loader start-up) are excluded, the device is synchronized
before the clock starts and stops (CUDA events on a GPU), and every batch is full, so a compiled model
never recompiles. A loader row is timed over at least ten times the batches its loader holds ready (the
DataLoader baseline's workers x prefetch_factor), so that no queue filled during the warm-up's compile hides
the loader's real rate; the row says how many were prefetched. Reported: images/s, ratios to the ceiling and
the baseline, MFU against the device's dense bf16 peak, peak device memory, and whether the H100 targets are
met. Each row is written (CSV and markdown, with the device, versions, date and the exact command) the
moment it is measured, and a row that fails (a compile error, out of memory) records its error as its result,
so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import csv
import gc
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from benchmarks.flops import flops_per_image, peak_flops
from benchmarks.loaders import ALL_BACKENDS, BASELINE, build, endless, environment, synchronize
from beton_trainer.common.errors import UserError, run_cli
from beton_trainer.format.dataset import load_manifest
from beton_trainer.models import build_model
from beton_trainer.pipelines.base import LoaderOptions
from beton_trainer.trainer.config import PhaseConfig, Recipe, load_recipe
from beton_trainer.trainer.distributed import reset_accelerate_state
from beton_trainer.trainer.optim import build_optimizer, build_scheduler, param_groups
from beton_trainer.trainer.step import EpochSums, TrainStep, configure_backends
from beton_trainer.trainer.timing import StepTimer

RECIPE = "c10_finetune"  # its augmentations, loss, gradient clipping and optimizer
CEILING = "ceiling"
TARGET_DEVICES = ("H100", "H200")
TARGET_CEILING = 50_000  # images/s
TARGET_VS_CEILING = 0.95  # every backend
TARGET_VS_BASELINE = 3.0  # every backend
# batches a backend's loader holds ready ahead of the step: the tensor backend none; FFCV its batches_ahead plus
# its EpochIterator's two (pipelines.budget); DALI its prefetch queue; the baseline reports its own
BATCHES_AHEAD = {"tensor": 0, "ffcv": 5, "dali": 2}
PREFETCH_MARGIN = 10  # a loader row times at least this many times the batches held ready
PRECISIONS = ("bf16", "fp16", "no")  # Accelerate's mixed_precision
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CONVERT_COMMAND = ("python -m convert imagefolder --src ../shared/data/cifar10-jpeg.tar.xz --out data "
                   "--name cifar10")


@dataclass(frozen=True)
class StepConfig:
    precision: str  # "bf16" | "fp16" | "no"
    compile: bool
    channels_last: bool

    def __str__(self) -> str:
        return (f"{'fp32' if self.precision == 'no' else self.precision}, "
                f"{'compiled' if self.compile else 'eager'}, "
                f"{'channels-last' if self.channels_last else 'contiguous'}")


@dataclass(frozen=True)
class Result:
    name: str
    config: StepConfig
    images_per_s: float  # NaN when the row failed
    data_wait_fraction: float  # of the timed steps, the host waiting for the next batch
    peak_mem_mb: float | None  # None off the GPU
    timed_steps: int = 0
    prefetched_batches: int = 0  # batches the loader held ready when the clock started, at most
    error: str = ""  # why the row has no figure

    @property
    def ok(self) -> bool:
        return not self.error


def shared_step(model: nn.Module, recipe: Recipe, config: StepConfig, device: torch.device,
                compile_mode: str) -> tuple[TrainStep, EpochSums]:
    """The trainer's own step (Accelerate's autocast, scaler and wrappers, c10_finetune's last-phase
    optimizer and schedule, the running sums) on `model`, set up as `config` says."""
    reset_accelerate_state()  # one Accelerator per row: each row has its own precision
    accelerator = Accelerator(mixed_precision=config.precision, cpu=device.type == "cpu")
    configure_backends(device)  # cuDNN autotuning and TF32 as train.py sets them
    fmt = torch.channels_last if config.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=fmt).train()
    last = recipe.phases[-1]  # its optimizer and schedule, on every module (the model may lack its groups' names)
    phase = PhaseConfig(epochs=last.epochs, optimizer=last.optimizer, schedule=last.schedule)
    optimizer = build_optimizer(param_groups(model, phase), phase.optimizer, device.type)
    scheduler = build_scheduler(optimizer, phase.schedule, epochs=phase.epochs, steps_per_epoch=10_000)
    model, optimizer = accelerator.prepare(model, optimizer)
    if config.compile:
        model = torch.compile(model, mode=compile_mode)
    return TrainStep(accelerator, model, optimizer, scheduler, recipe), EpochSums(device)


Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


def synthetic_batches(batch_size: int, image_shape: tuple[int, int, int], num_classes: int,
                      device: torch.device, channels_last: bool) -> Batches:
    """The same normalized-looking batch, already on the device, forever: no loader cost at all."""
    h, w, c = image_shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.randn(batch_size, c, h, w, device=device).contiguous(memory_format=fmt)
    targets = torch.randint(num_classes, (batch_size,), device=device)
    while True:
        yield images, targets


def device_seconds(device: torch.device, work: Callable[[], None]) -> float:
    """Wall time of `work`: on a GPU between CUDA events after queued work has finished (CPU ops are
    synchronous already)."""
    if device.type == "cuda":
        synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        work()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    start_s = time.perf_counter()
    work()
    return time.perf_counter() - start_s


def fresh_row_memory(device: torch.device) -> None:
    """Free the previous row's model before this row's peak memory is counted: Accelerate's forward patch makes
    reference cycles, so the model outlives its last reference until the garbage collector runs."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def images_per_second(step: TrainStep, sums: EpochSums, batches: Batches, device: torch.device, warmup: int,
                      steps: int) -> tuple[float, float]:
    """Images/s over `steps` steps after `warmup`, and the fraction of that time the host waited for the loader
    (the trainer's own `StepTimer`, so the loader's on-device augmentations are not counted as waiting)."""
    for _ in range(warmup):
        step(*next(batches), sums, log=False)
    images = 0
    timer = StepTimer(device)

    def timed_steps() -> None:
        nonlocal images
        for _ in range(steps):
            timer.mark()
            x, y = next(batches)
            timer.mark()
            step(x, y, sums, log=False)
            timer.mark()
            images += x.shape[0]

    seconds = device_seconds(device, timed_steps)
    return images / seconds, timer.read().data_wait_s / seconds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_throughput",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data", type=Path, default=Path("data/cifar10"),
                        help="a converted dataset folder (default: data/cifar10)")
    parser.add_argument("--model", default="resnet34_cifar")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation)")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="default")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                        help="loader workers/threads (default: 16, or the CPU count if lower)")
    parser.add_argument("--backends", nargs="+", choices=ALL_BACKENDS, default=list(ALL_BACKENDS))
    parser.add_argument("--out", type=Path, default=Path("runs/bench/train_throughput.csv"),
                        help="CSV file; the markdown table goes next to it as .md")
    parser.add_argument("--ablations", action="store_true",
                        help="also time the ceiling with channels-last off and in fp32 (two more compiles)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny CPU-sized run (simple_cnn, batch 32, 3 steps, eager) that only "
                             "proves the script works")
    return parser


def ablations(main: StepConfig, more: bool) -> list[tuple[str, StepConfig]]:
    """The ceiling with one speed-up turned off at a time (those already off are skipped): compile always,
    channels-last and bf16 with `more`."""
    rows = []
    if main.compile:
        rows.append((f"{CEILING}, compile off", replace(main, compile=False)))
    if not more:
        return rows
    if main.channels_last:
        rows.append((f"{CEILING}, channels-last off", replace(main, channels_last=False)))
    if main.precision != "no":
        rows.append((f"{CEILING}, fp32", replace(main, precision="no")))
    return rows


def target_lines(results: dict[str, Result], device_name: str) -> list[str]:
    """Met / not met for each H100 target, or why they do not apply."""
    if not any(name in device_name for name in TARGET_DEVICES):
        return [f"targets (H100/H200): not applicable on {device_name}"]
    results = {name: r for name, r in results.items() if r.ok}
    ceiling = results.get(CEILING)
    baseline = results.get(BASELINE)
    if ceiling is None:
        return ["targets: no ceiling row was measured"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    lines = [f"ceiling >= {TARGET_CEILING:,} images/s: {verdict(ceiling.images_per_s >= TARGET_CEILING)} "
             f"({ceiling.images_per_s:,.0f})"]
    for name, result in results.items():
        if name in (CEILING, BASELINE) or name.startswith(CEILING):
            continue
        ratio = result.images_per_s / ceiling.images_per_s
        lines.append(f"{name} >= {TARGET_VS_CEILING} x ceiling: {verdict(ratio >= TARGET_VS_CEILING)} "
                     f"({ratio:.3f}x)")
        if baseline is not None:
            ratio = result.images_per_s / baseline.images_per_s
            lines.append(f"{name} >= {TARGET_VS_BASELINE:g} x {BASELINE}: "
                         f"{verdict(ratio >= TARGET_VS_BASELINE)} ({ratio:.2f}x)")
    return lines


def table_rows(results: dict[str, Result], train_flops: float, peak: float | None) -> list[dict[str, str]]:
    """One dict per result, as printed, written to CSV and to markdown."""
    ceiling, baseline = results.get(CEILING), results.get(BASELINE)
    ceiling = ceiling if ceiling and ceiling.ok else None
    baseline = baseline if baseline and baseline.ok else None
    rows = []
    for result in results.values():
        rate = result.images_per_s
        measured = result.ok
        rows.append({
            "name": result.name, "config": str(result.config), "images_per_s": f"{rate:.1f}" if measured else "",
            "data_wait_fraction": f"{result.data_wait_fraction:.3f}" if measured else "",
            "ratio_vs_ceiling": f"{rate / ceiling.images_per_s:.3f}" if ceiling and measured else "",
            "ratio_vs_" + BASELINE: f"{rate / baseline.images_per_s:.3f}" if baseline and measured else "",
            "mfu": (f"{rate * train_flops / peak:.3f}" if peak else "n/a") if measured else "",
            "peak_mem_mb": f"{result.peak_mem_mb:.0f}" if result.peak_mem_mb is not None else "n/a",
            "timed_steps": str(result.timed_steps), "prefetched_batches": str(result.prefetched_batches),
            "error": result.error})
    return rows


def markdown(rows: list[dict[str, str]], header: dict[str, str], notes: list[str], targets: list[str]) -> str:
    lines = [f"- {key}: {value}" for key, value in header.items()]
    lines += ["", "| " + " | ".join(rows[0]) + " |", "|---|---|" + "---:|" * (len(rows[0]) - 2)]
    lines += ["| " + " | ".join(row.values()) + " |" for row in rows]
    lines += [""] + [f"- not run: {note}" for note in notes]
    lines += ["", "Targets:"] + [f"- {line}" for line in targets]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.model, args.batch_size, args.steps, args.warmup, args.workers, args.compile = \
            "simple_cnn", 32, 3, 1, 1, False
    if not (args.data / "manifest.json").is_file():
        raise UserError(f"no converted dataset at {args.data}; create it with `{CONVERT_COMMAND}` "
                        "(or pass --data DIR)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available; use --device cpu")
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        raise UserError("--steps and --batch-size must be >= 1 and --warmup >= 0")
    device = torch.device(args.device)
    recipe = load_recipe(RECIPE)
    manifest = load_manifest(args.data)
    shape, num_classes = tuple(manifest["image_shape"]), len(manifest["classes"])

    def new_model() -> nn.Module:
        torch.manual_seed(recipe.seed)
        return build_model(args.model, num_classes=num_classes, image_shape=shape)

    forward_flops = flops_per_image(new_model(), shape, train=False)
    train_flops = flops_per_image(new_model(), shape, train=True)
    env = environment(device)
    peak = peak_flops(env["device"]) if device.type == "cuda" else None
    main_config = StepConfig(args.precision, args.compile, args.channels_last)
    command = "python -m benchmarks.train_throughput " + shlex.join(sys.argv[1:] if argv is None else argv)
    header = {**env, "data": str(args.data), "model": args.model, "batch size": str(args.batch_size),
              "step": f"{main_config} (compile mode {args.compile_mode}); loss/clipping/optimizer: {RECIPE}",
              "augmentations (backends, baseline)": ", ".join(recipe.augment.enabled()) or "none",
              "timed steps": f"{args.steps} after {args.warmup} warm-up", "workers": str(args.workers),
              "FLOPs per image": f"{forward_flops / 1e9:.3f} G forward, {train_flops / 1e9:.3f} G training",
              "MFU against": f"{peak / 1e12:,.0f} TFLOP/s dense bf16 peak" if peak else "n/a (peak unknown)",
              "command": command}

    plan = [(CEILING, main_config, None)] + [(b, main_config, b) for b in args.backends] \
        + [(name, config, None) for name, config in ablations(main_config, args.ablations)]
    results: dict[str, Result] = {}
    notes = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    extra = {"device": env["device"], "model": args.model, "batch_size": str(args.batch_size), "date": env["date"]}
    for name, config, backend in plan:
        steps, ahead = args.steps, 0
        try:
            if backend is None:
                batches = synthetic_batches(args.batch_size, shape, num_classes, device, config.channels_last)
            else:
                options = LoaderOptions(
                    data_dir=args.data, split="train", batch_size=args.batch_size, train=True,
                    spec=recipe.augment, device=device, seed=recipe.seed, num_workers=args.workers,
                    label_smoothing=recipe.loss.label_smoothing, channels_last=config.channels_last)
                loader = build(backend, options)
                ahead = getattr(loader, "prefetched_batches", BATCHES_AHEAD.get(backend, 0))
                steps = max(args.steps, PREFETCH_MARGIN * ahead)
                batches = endless(loader)
        except UserError as exc:  # a backend that cannot run here (package missing) is noted, not fatal
            notes.append(f"{backend}: {exc}")
            continue
        torch.compiler.reset()  # a fresh compile per row, never the recompile limit
        fresh_row_memory(device)
        try:
            step, sums = shared_step(new_model(), recipe, config, device, args.compile_mode)
            rate, wait = images_per_second(step, sums, batches, device, args.warmup, steps)
            memory = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
            results[name] = Result(name, config, rate, wait, memory, steps, ahead)
            print(f"{name:<28} {config!s:<36} {rate:>10,.0f} images/s  data wait {wait:6.1%}  "
                  f"({steps} steps, {ahead} prefetched)", flush=True)
        except Exception as exc:  # this row's result is its error; the next row still runs
            error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
            results[name] = Result(name, config, math.nan, math.nan, None, steps, ahead, error)
            print(f"{name:<28} {config!s:<36} failed: {error}", flush=True)
        finally:
            batches.close()
            step = sums = None
        write_tables(args.out, results, train_flops, peak, header, notes, extra, env["device"])
    print("\n" + args.out.with_suffix(".md").read_text())
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0 if all(r.ok for r in results.values()) else 1


def write_tables(out: Path, results: dict[str, Result], train_flops: float, peak: float | None,
                 header: dict[str, str], notes: list[str], extra: dict[str, str], device_name: str) -> None:
    """The rows measured so far, as CSV and as markdown (rewritten after every row)."""
    rows = table_rows(results, train_flops, peak)
    if not rows:
        return
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*rows[0], *extra])
        writer.writeheader()
        writer.writerows({**row, **extra} for row in rows)
    out.with_suffix(".md").write_text(markdown(rows, header, notes, target_lines(results, device_name)))


if __name__ == "__main__":
    run_cli(main)
