"""`python -m benchmarks.photo_loaders`: training-loader throughput (images/s) on photos of varied sizes, at
several crop sides, for the ffcv and dali backends against torchvision's ImageFolder + PIL RandomResizedCrop
DataLoader with the same number of workers, side by side in one run; and conversion images/s.

Two datasets: the hymenoptera tarball (real photos up to 2592x1944) and a generated set of varied sizes.
Both are converted as ffcv-imagenet stores ImageNet (JPEG quality 90, longer side at most 500), and the
baseline reads JPEG files of that same size and quality (for hymenoptera, re-encoded copies of the
originals; a last row shows it on the original files too). Every loader yields normalized float batches
of random-resized crops with random flips: torchvision in its worker processes, ffcv and dali by
decoding straight to the crop and running flip and normalize as device ops. Warm-up batches are not
timed; epochs are chained, so each loader's per-epoch set-up counts, as in training.
"""

from __future__ import annotations

import argparse
import shlex
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
from common.errors import UserError, run_cli
from common.schema import from_dict
from convert import convert_dataset
from pipelines import build_loader
from pipelines.augment import AugmentSpec
from pipelines.base import RRC_RATIO, RRC_SCALE, LoaderOptions, ResolutionSchedule
from pipelines.dataset import load_manifest

BASELINE = "torchvision"
BACKENDS = (BASELINE, "ffcv", "dali")
MAX_SIDE, QUALITY = 500, 90  # ffcv-imagenet's ImageNet storage
TARGET = 2.0  # ffcv >= 2x the baseline at equal workers (issue 13)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.photo_loaders", description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=Path("../shared/data/hymenoptera_data.tar"),
                        help="the hymenoptera_data.tar tarball (train/ and val/ of ants and bees)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench/photos"),
                        help="folder for the extracted, generated and converted data and the results")
    parser.add_argument("--generated", type=int, default=1000, help="photos in the generated set")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[160, 192, 224])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=24, help="timed batches per (dataset, side, loader)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    parser.add_argument("--workers", type=int, default=2, help="worker processes/threads, the same for every loader")
    parser.add_argument("--smoke", action="store_true", help="a tiny run that only proves the script works")
    return parser


class ImageFolderLoader:
    """torchvision's ImageNet training input: ImageFolder, RandomResizedCrop + flip + ToTensor + Normalize in
    DataLoader workers (kept alive across epochs), batches moved to the device."""

    def __init__(self, root: Path, side: int, mean, std, *, batch_size: int, workers: int, device: torch.device):
        transform = T.Compose([T.RandomResizedCrop(side, scale=RRC_SCALE, ratio=RRC_RATIO), T.RandomHorizontalFlip(),
                               T.ToTensor(), T.Normalize(mean, std)])
        self.loader = DataLoader(datasets.ImageFolder(str(root), transform=transform), batch_size=batch_size,
                                 shuffle=True, drop_last=True, num_workers=workers, persistent_workers=workers > 0,
                                 pin_memory=device.type == "cuda")
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
    """`count` photo-like JPEGs (smooth colour fields plus grain, quality 90) of varied sizes: shorter side
    240-480, aspect 3/4-4/3 either way, in 10 classes under dest/train; and 10 per class under dest/val."""
    if dest.is_dir():
        return dest
    rng = np.random.default_rng(seed)
    for split, n in (("train", count), ("val", 10 * 10)):
        for i in range(n):
            short = int(rng.integers(240, 481))
            long = int(short * rng.uniform(1, 4 / 3))
            h, w = (short, long) if rng.random() < 0.5 else (long, short)
            field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
            pixels = np.asarray(field, dtype=np.float64) + rng.normal(0, 8, (h, w, 3))
            out = dest.with_suffix(".partial") / split / f"class{i % 10}" / f"{i:05d}.jpg"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, quality=QUALITY)
    dest.with_suffix(".partial").rename(dest)
    return dest


def converted(src: Path, out: Path, name: str) -> tuple[Path, str]:
    """`src` converted as ffcv-imagenet stores photos; the conversion's images/s (or 'cached')."""
    messages: list[str] = []
    start = time.perf_counter()
    folder = convert_dataset("imagefolder", src, out, name=name, encode="jpg", max_side=MAX_SIDE, quality=QUALITY,
                             log=messages.append)
    elapsed = time.perf_counter() - start
    if any("up to date" in m for m in messages):
        return folder, "converted earlier (cached)"
    count = sum(entry["count"] for entry in load_manifest(folder)["splits"].values())
    return folder, f"{count / elapsed:,.1f} images/s ({count} images in {elapsed:.1f} s)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.generated, args.resolutions, args.batches, args.warmup, args.batch_size = 40, [64], 2, 1, 8
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available; use --device cpu")
    device = torch.device(args.device)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    hymenoptera_root = extract(args.src, work / "hymenoptera_src")
    generated_root = generated_photos(work / f"generated_{args.generated}", args.generated)
    sets = {}  # name -> (converted folder, ImageFolder train root for the baseline, conversion rate)
    folder, conversion = converted(args.src, work / "data", "hymenoptera")
    sets["hymenoptera"] = (folder, reencoded_copy(hymenoptera_root / "train", work / "hymenoptera_500"), conversion)
    folder, conversion = converted(generated_root, work / "data", f"generated_{args.generated}")
    sets[f"generated ({args.generated})"] = (folder, generated_root / "train", conversion)

    rows = []  # (dataset, side, {backend: images/s})
    for name, (data, image_folder, _) in sets.items():
        manifest = load_manifest(data)
        for side in args.resolutions:
            rates = {}
            for backend in BACKENDS:
                if backend == BASELINE:
                    loader = ImageFolderLoader(image_folder, side, manifest["mean"], manifest["std"],
                                               batch_size=args.batch_size, workers=args.workers, device=device)
                else:
                    loader = build_loader(backend, LoaderOptions(
                        data_dir=data, split="train", batch_size=args.batch_size, train=True,
                        spec=from_dict(AugmentSpec, {"flip": {"p": 0.5}}), device=device,
                        num_workers=args.workers, resolution=ResolutionSchedule(train=side)))
                rates[backend] = images_per_second(loader, device, args.warmup, args.batches)
                del loader
                print(f"{name:<20} {side:>4} {backend:<12} {rates[backend]:>8,.0f} images/s", flush=True)
            rows.append((name, side, rates))
    manifest = load_manifest(sets["hymenoptera"][0])
    original = ImageFolderLoader(hymenoptera_root / "train", args.resolutions[-1], manifest["mean"], manifest["std"],
                                 batch_size=args.batch_size, workers=args.workers, device=device)
    original_rate = images_per_second(original, device, args.warmup, args.batches)

    command = "python -m benchmarks.photo_loaders " + shlex.join(sys.argv[1:] if argv is None else argv)
    header = {**environment(device), "batch size": str(args.batch_size), "workers (every loader)": str(args.workers),
              "timed batches": f"{args.batches} after {args.warmup} warm-up, epochs chained",
              **{f"conversion, {name}": conv for name, (_, _, conv) in sets.items()}, "command": command}
    lines = [f"- {key}: {value}" for key, value in header.items()]
    lines += ["", "| dataset | crop side | torchvision ImageFolder + PIL | ffcv | dali | ffcv / torchvision |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, side, rates in rows:
        base = rates[BASELINE]
        ratio = rates["ffcv"] / base
        lines.append(f"| {name} | {side} | {base:,.0f} | {rates['ffcv']:,.0f} | {rates['dali']:,.0f} | "
                     f"{ratio:.2f}x ({'met' if ratio >= TARGET else 'not met'}) |")
    lines.append(f"| hymenoptera, baseline on the original files (up to 2592x1944) | {args.resolutions[-1]} | "
                 f"{original_rate:,.0f} | | | |")
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    (work / "photo_loaders.md").write_text(table)
    print(f"wrote {work / 'photo_loaders.md'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
