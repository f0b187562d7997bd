"""`python -m benchmarks.loaders`: training-loader throughput (images/s) of every backend for a growing
augmentation chain, side by side in one run on one machine, with ratios against the torchvision baseline.

Each (backend, chain) gets a fresh train loader; warm-up batches (FFCV's JIT, DALI's pipeline build,
worker start-up) are excluded, then at least two whole epochs are timed, so each backend's per-epoch
set-up is in the figure, as in training; the device is synchronized before the clock is read at both
ends. Results are printed and written as CSV and as a markdown table with the device, versions,
date and the exact command.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from importlib import metadata
from pathlib import Path

import torch

from benchmarks.torchvision_baseline import build_torchvision_loader
from beton_trainer.common.errors import UserError, run_cli
from beton_trainer.common.schema import from_dict
from beton_trainer.pipelines import BACKENDS, build_loader
from beton_trainer.pipelines.augment import AugmentSpec
from beton_trainer.pipelines.base import Loader, LoaderOptions
from beton_trainer.trainer.loop import cpu_threads

BASELINE = "torchvision"
ALL_BACKENDS = (BASELINE, *BACKENDS)
CROP_FLIP = {"crop": {"padding": 4, "padding_mode": "reflect"}, "flip": {"p": 0.5}}
ERASE_JITTER = {**CROP_FLIP, "jitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4},
                "erase": {"p": 0.5}}
CHAINS = {
    "none": {},
    "crop+flip": CROP_FLIP,
    "crop+flip+erase+jitter": ERASE_JITTER,
    "crop+flip+erase+jitter+mixup": {**ERASE_JITTER, "mix": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}},
}
CONVERT_COMMAND = "python -m convert imagefolder --src ../shared/data/cifar10-jpeg.tar.xz --out data"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loaders", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data", type=Path, default=Path("data/cifar10-jpeg"),
                        help="a converted dataset folder (default: data/cifar10-jpeg)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2, help="timed whole epochs per (backend, chain), at least 2")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--backends", nargs="+", choices=ALL_BACKENDS, default=list(ALL_BACKENDS))
    parser.add_argument("--chains", nargs="+", choices=CHAINS, default=list(CHAINS))
    parser.add_argument("--out", type=Path, default=Path("runs/bench/loaders.csv"),
                        help="CSV file; the markdown table goes next to it as .md")
    parser.add_argument("--smoke", action="store_true", help="a tiny run that only proves the script works")
    return parser


def build(backend: str, options: LoaderOptions) -> Loader:
    return build_torchvision_loader(options) if backend == BASELINE else build_loader(backend, options)


def endless(loader: Loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of epoch 0, 1, 2, ... back to back."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(loader: Loader, device: torch.device, warmup: int, epochs: int) -> float:
    """Images/s over `epochs` whole epochs after `warmup` batches of a first one, so that what a backend pays
    once per epoch (building its pipeline, uploading the order) is in the figure."""
    loader.set_epoch(0)
    stream = iter(loader)
    for _ in range(warmup):
        next(stream, None)
    stream.close()
    synchronize(device)
    start = time.perf_counter()
    images = 0
    for epoch in range(1, epochs + 1):
        loader.set_epoch(epoch)
        for x, _ in loader:
            images += x.shape[0]
    synchronize(device)
    return images / (time.perf_counter() - start)


def version(module: str) -> str:
    """The installed version; ffcv's own __version__ string is stale, so distributions are asked first."""
    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        pass
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return "not installed"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, str]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    versions = ", ".join(f"{m} {version(m)}" for m in ("torch", "torchvision", "ffcv", "nvidia.dali"))
    return {"device": f"{device.type}: {name} ({os.cpu_count()} CPU cores)", "versions": versions,
            "date": datetime.now().astimezone().isoformat(timespec="seconds")}


def markdown(results: dict, backends: list[str], chains: list[str], header: dict[str, str]) -> str:
    """One row per chain, one column per backend: images/s and the ratio to the baseline."""
    lines = [f"- {key}: {value}" for key, value in header.items()]
    lines += ["", "| chain | " + " | ".join(backends) + " |", "|---|" + "---:|" * len(backends)]
    for chain in chains:
        base = results.get((BASELINE, chain))
        cells = []
        for backend in backends:
            rate = results.get((backend, chain))
            ratio = f" ({rate / base:.1f}x)" if rate and base else ""
            cells.append(f"{rate:,.0f}{ratio}" if rate else "n/a")
        lines.append(f"| {chain} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.batch_size, args.warmup, args.workers = 32, 1, 1
    if not (args.data / "manifest.json").is_file():
        raise UserError(f"no converted dataset at {args.data}; create it with `{CONVERT_COMMAND}` "
                        "(or pass --data DIR)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available; use --device cpu")
    if args.epochs < 2:
        raise UserError(f"--epochs {args.epochs}: time at least 2 whole epochs, so per-epoch costs show")
    device = torch.device(args.device)
    torch.set_num_threads(cpu_threads())  # as a training run sets them (importing FFCV left one)
    header = {**environment(device), "data": str(args.data), "batch size": str(args.batch_size),
              "timed": f"{args.epochs} whole epochs after {args.warmup} warm-up batches", "workers": str(args.workers),
              "command": "python -m benchmarks.loaders " + shlex.join(sys.argv[1:] if argv is None else argv)}

    results: dict[tuple[str, str], float] = {}
    notes = []
    for chain in args.chains:
        spec = from_dict(AugmentSpec, CHAINS[chain])
        for backend in args.backends:
            options = LoaderOptions(data_dir=args.data, split="train", batch_size=args.batch_size, train=True,
                                    spec=spec, device=device, num_workers=args.workers)
            try:
                loader = build(backend, options)
            except UserError as exc:  # a backend that cannot run here (package missing) is reported, not fatal
                notes.append(f"{backend}: {exc}")
                continue
            results[backend, chain] = images_per_second(loader, device, args.warmup, args.epochs)
            del loader
            print(f"{chain:<30} {backend:<12} {results[backend, chain]:>10,.0f} images/s", flush=True)

    table = markdown(results, args.backends, args.chains, header)
    if notes:
        table += "\n" + "\n".join(f"- not run: {note}" for note in sorted(set(notes))) + "\n"
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["backend", "chain", "images_per_s", "ratio_vs_" + BASELINE, "device", "batch_size",
                         "epochs", "date"])
        for (backend, chain), rate in results.items():
            base = results.get((BASELINE, chain))
            writer.writerow([backend, chain, f"{rate:.1f}", f"{rate / base:.3f}" if base else "", header["device"],
                             args.batch_size, args.epochs, header["date"]])
    args.out.with_suffix(".md").write_text(table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    run_cli(main)
