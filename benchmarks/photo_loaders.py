"""`python -m benchmarks.photo_loaders`: training-loader throughput (images/s) on photos of varied sizes, at
several crop sides, for the photo, ffcv and dali backends against torchvision's ImageFolder + PIL
RandomResizedCrop DataLoader with the same number of workers, side by side in one run; and conversion images/s.

Two datasets: the hymenoptera tarball (real photos up to 2592x1944) and a generated set of varied sizes,
each converted twice with longer sides of at most 500: all JPEG quality 90 (the very JPEGs the baseline
reads as files: for hymenoptera, re-encoded copies of the originals; a last row shows the baseline on the
original files too), and ffcv-imagenet's mixed mode (half JPEG, half raw pixels). Every loader yields
normalized float batches of random-resized crops with random flips: torchvision in its worker processes,
the others by decoding straight to the crop and running flip and normalize as device ops. The photo backend
runs twice: with its default decoder (the compiled crop decoder where it is built, the one ffcv's path uses;
nvJPEG with --device cuda) and with Pillow, the core install's. Warm-up batches are not timed; epochs are
chained, so each loader's per-epoch set-up counts, as in training; the loaders take turns over several rounds
and each reports its median, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import statistics
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

from benchmarks.loaders import environment, images_per_second
from beton_trainer.common.errors import UserError, run_cli
from beton_trainer.common.schema import from_dict
from beton_trainer.convert import convert_dataset
from beton_trainer.format.dataset import load_manifest
from beton_trainer.pipelines import build_loader
from beton_trainer.pipelines.augment import AugmentSpec
from beton_trainer.pipelines.base import RRC_RATIO, RRC_SCALE, Loader, LoaderOptions, ResolutionSchedule
from beton_trainer.pipelines.crop_library import available
from beton_trainer.pipelines.photo_loader import PhotoLoader
from beton_trainer.trainer.loop import cpu_threads

BASELINE = "torchvision"
PILLOW = "photo-Pillow"  # the photo backend with the core install's decoder
BACKENDS = (BASELINE, "ffcv", "dali", "photo", PILLOW)
MAX_SIDE, QUALITY = 500, 90  # ffcv-imagenet's ImageNet storage
ENCODINGS = ("jpg", "mix")  # all JPEG; half JPEG and half raw pixels
TARGET = 2.0  # ffcv >= 2x the baseline at equal workers (issue 13); the photo backend too (issue 38)
FFCV_TARGET = 0.8  # the photo backend >= 0.8x ffcv with its compiled crop decoder (issue 38)
DATASETS = ("hymenoptera", "generated")
RATIOS = (("photo", BASELINE, TARGET), ("photo", "ffcv", FFCV_TARGET), (PILLOW, BASELINE, TARGET),
          (PILLOW, "ffcv", FFCV_TARGET), ("ffcv", BASELINE, TARGET))  # (loader, against, target)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.photo_loaders", description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=Path("../shared/data/hymenoptera_data.tar"),
                        help="the hymenoptera_data.tar tarball (train/ and val/ of ants and bees)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench/photos"),
                        help="folder for the extracted, generated and converted data and the results")
    parser.add_argument("--generated", type=int, default=500, help="photos in the generated set")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[160, 192, 224])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=12, help="timed epochs per round and loader (chained)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of timing; the median is reported")
    parser.add_argument("--workers", type=int, default=2, help="worker processes/threads, the same for every loader")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS[1:], default=list(BACKENDS[1:]),
                        help="the loaders beside the baseline (default all; a bare GPU machine has no ffcv or DALI)")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--smoke", action="store_true", help="a tiny run that only proves the script works")
    return parser


class ImageFolderLoader:
    """torchvision's ImageNet training input: ImageFolder, RandomResizedCrop + flip + ToTensor + Normalize in
    DataLoader workers (kept alive across epochs unless `persistent` is off), batches moved to the device."""

    def __init__(self, root: Path, side: int, mean, std, *, batch_size: int, workers: int, device: torch.device,
                 persistent: bool = True):
        transform = T.Compose([T.RandomResizedCrop(side, scale=RRC_SCALE, ratio=RRC_RATIO), T.RandomHorizontalFlip(),
                               T.ToTensor(), T.Normalize(mean, std)])
        self.loader = DataLoader(datasets.ImageFolder(str(root), transform=transform), batch_size=batch_size,
                                 shuffle=True, drop_last=True, num_workers=workers,
                                 persistent_workers=persistent and workers > 0, pin_memory=device.type == "cuda")
        self.device = device

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        pass  # DataLoader reshuffles by itself

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def extract(tarball: Path, dest: Path) -> Path:
    """The tarball's ImageFolder tree (once); returns the folder holding train/."""
    if not tarball.is_file():
        raise UserError(f"{tarball} not found; pass --src with the hymenoptera_data.tar tarball")
    if not dest.is_dir():
        with tarfile.open(tarball) as tar:
            tar.extractall(dest.with_suffix(".partial"), filter="data")
        dest.with_suffix(".partial").rename(dest)
    return next(p.parent for p in dest.rglob("train") if p.is_dir())


def reencoded_copy(train: Path, dest: Path) -> Path:
    """train/<class>/* as JPEG quality 90 with the longer side at most 500 (what the .beton stores)."""
    if dest.is_dir():
        return dest
    for path in sorted(p for p in train.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.thumbnail((MAX_SIDE, MAX_SIDE), Image.LANCZOS)
            out = dest.with_suffix(".partial") / path.relative_to(train).with_suffix(".jpg")
            out.parent.mkdir(parents=True, exist_ok=True)
            img.save(out, quality=QUALITY)
    dest.with_suffix(".partial").rename(dest)
    return dest


def generated_photos(dest: Path, count: int, seed: int = 0) -> Path:
    """`count` photo-like JPEGs (smooth colour fields plus grain, quality 90) of varied sizes within the stored
    500 px: shorter side 240-375, aspect 1-4/3 either way, in 10 classes under dest/train; 10 per class under
    dest/val."""
    if dest.is_dir():
        return dest
    rng = np.random.default_rng(seed)
    for split, n in (("train", count), ("val", 10 * 10)):
        for i in range(n):
            short = int(rng.integers(240, 376))  # longer side <= 375 * 4/3 = 500: the files are what .beton stores
            long = int(short * rng.uniform(1, 4 / 3))
            h, w = (short, long) if rng.random() < 0.5 else (long, short)
            field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
            pixels = np.asarray(field, dtype=np.float64) + rng.normal(0, 8, (h, w, 3))
            out = dest.with_suffix(".partial") / split / f"class{i % 10}" / f"{i:05d}.jpg"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, quality=QUALITY)
    dest.with_suffix(".partial").rename(dest)
    return dest


def converted(src: Path, out: Path, name: str, encode: str) -> tuple[Path, str]:
    """`src` converted with longer sides of at most 500 and JPEG quality 90, all JPEG (`jpg`) or half JPEG
    and half raw pixels (`mix`, ffcv-imagenet's ImageNet); the conversion's images/s (or 'cached')."""
    messages: list[str] = []
    start = time.perf_counter()
    folder = convert_dataset("imagefolder", src, out, name=f"{name}_{encode}", encode=encode, max_side=MAX_SIDE,
                             quality=QUALITY, compress_probability=0.5, log=messages.append)
    elapsed = time.perf_counter() - start
    if any("up to date" in m for m in messages):
        return folder, "converted earlier (cached)"
    count = sum(entry["count"] for entry in load_manifest(folder)["splits"].values())
    return folder, f"{count / elapsed:,.1f} images/s ({count} images in {elapsed:.1f} s)"


def measure(loaders: dict[str, Loader], args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Each loader's median images/s over `args.rounds` rounds, the loaders taking turns within a round, so a
    change in the machine's load (it is shared) falls on all of them alike."""
    rates: dict[str, list[float]] = {key: [] for key in loaders}
    for _ in range(args.rounds):
        for key, loader in loaders.items():
            rates[key].append(images_per_second(loader, device, args.warmup, args.epochs))
    return {key: statistics.median(values) for key, values in rates.items()}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.generated, args.resolutions, args.epochs, args.warmup, args.batch_size, args.rounds = 40, [64], 2, 1, 8, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available; use --device cpu")
    device = torch.device(args.device)
    torch.set_num_threads(cpu_threads())  # as a training run sets them (importing FFCV left one)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    sources = {}
    if "hymenoptera" in args.datasets:
        hymenoptera_root = extract(args.src, work / "hymenoptera_src")
        sources["hymenoptera"] = (args.src, reencoded_copy(hymenoptera_root / "train", work / "hymenoptera_500"))
    if "generated" in args.datasets:
        generated_root = generated_photos(work / f"generated_{args.generated}", args.generated)
        sources[f"generated_{args.generated}"] = (generated_root, generated_root / "train")
    conversions = {}
    rows = []  # (dataset, side, {loader: images/s})
    for name, (src, image_folder) in sources.items():
        data = {}
        for encode in ENCODINGS:
            data[encode], conversions[f"{name}, {encode}"] = converted(src, work / "data", name, encode)
        manifest = load_manifest(data["jpg"])
        for side in args.resolutions:
            loaders: dict[str, Loader] = {BASELINE: ImageFolderLoader(
                image_folder, side, manifest["mean"], manifest["std"], batch_size=args.batch_size,
                workers=args.workers, device=device)}
            for backend, encode in itertools.product(args.backends, ENCODINGS):
                options = LoaderOptions(
                    data_dir=data[encode], split="train", batch_size=args.batch_size, train=True,
                    spec=from_dict(AugmentSpec, {"flip": {"p": 0.5}}), device=device, num_workers=args.workers,
                    resolution=ResolutionSchedule(train=side))
                loaders[f"{backend} {encode}"] = PhotoLoader(options, "pillow") if backend == PILLOW else \
                    build_loader(backend, options)
            rates = measure(loaders, args, device)
            del loaders
            print(f"{name:<16} {side:>4} " + "  ".join(f"{k} {v:,.0f}" for k, v in rates.items()), flush=True)
            rows.append((name, side, rates))
    if "hymenoptera" in args.datasets:
        manifest = load_manifest(work / "data" / "hymenoptera_jpg")
        original = measure({BASELINE: ImageFolderLoader(hymenoptera_root / "train", args.resolutions[-1],
                                                        manifest["mean"], manifest["std"], batch_size=args.batch_size,
                                                        workers=args.workers, device=device)}, args, device)[BASELINE]

    command = "python -m benchmarks.photo_loaders " + shlex.join(sys.argv[1:] if argv is None else argv)
    decoder = "nvJPEG (the device path)" if device.type == "cuda" else \
        "the compiled crop decoder" if available() else "Pillow (the compiled crop decoder is not built)"
    header = {**environment(device), "batch size": str(args.batch_size), "workers (every loader)": str(args.workers),
              "photo's default decoder here": decoder,
              "timed": f"median of {args.rounds} rounds of {args.epochs} epochs (after {args.warmup} warm-up batches), "
                       "loaders taking turns, epochs chained",
              **{f"conversion, {key}": rate for key, rate in conversions.items()}, "command": command}
    lines = [f"- {key}: {value}" for key, value in header.items()]
    columns = [f"{b} {e}" for b, e in itertools.product(args.backends, ENCODINGS)]
    ratios = [r for r in RATIOS if r[0] in args.backends and r[1] in (BASELINE, *args.backends)]
    lines += ["", "| dataset | side | torchvision ImageFolder + PIL (JPEG files) | " + " | ".join(columns) + " | "
              + " | ".join(f"{a} / {b}, jpg and mix (target {t:g}x)" for a, b, t in ratios) + " |",
              "|---|---:|" + "---:|" * (len(columns) + 1 + len(ratios))]
    for name, side, rates in rows:
        base = rates[BASELINE]
        cells = [f"{base:,.0f}"] + [f"{rates[c]:,.0f}" for c in columns]
        for a, b, target in ratios:
            found = [rates[f"{a} {e}"] / (base if b == BASELINE else rates[f"{b} {e}"]) for e in ENCODINGS]
            cells.append(", ".join(f"{r:.2f}x" for r in found) + (" (met)" if min(found) >= target else " (not met)"))
        lines.append(f"| {name} | {side} | " + " | ".join(cells) + " |")
    if "hymenoptera" in args.datasets:
        lines.append(f"| hymenoptera, baseline on the original files (up to 2592x1944) | {args.resolutions[-1]} | "
                     f"{original:,.0f} |" + " |" * (len(columns) + len(ratios)))
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    (work / "photo_loaders.md").write_text(table)
    print(f"wrote {work / 'photo_loaders.md'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
