"""`python -m benchmarks.cold_cache`: epochs read from a cold page cache, for a .beton much larger than what
FFCV's cache or the page cache keeps: the random and the page-aware order, each with os_cache on and off,
against torchvision's ImageFolder reading the same images as files.

The data: the hymenoptera photos, re-encoded as the .beton stores them (JPEG quality 90, longer side at
most 500), copied over and over into an ImageFolder tree of about --gb, then converted (`--encode jpg`).
Before every timed epoch each file's pages are evicted with posix_fadvise(POSIX_FADV_DONTNEED) (no root
needed) and the loader is built afresh (pages a live loader has mapped cannot be evicted), so each epoch
reads from storage. Reported per loader: images/s over whole epochs (the loader's set-up included: each is
also shown apart), MB/s read from storage (/proc/self/io read_bytes: this process, its threads and its
reaped worker processes) and the bytes read over the bytes stored (1.0: each byte once an epoch).

At the default --gb this writes several GB and takes a long while; --gb 0.05 is a smoke run that only
proves the script works (its figures mean nothing about scale).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import torch

from benchmarks.loaders import environment, synchronize
from benchmarks.photo_loaders import MAX_SIDE, QUALITY, ImageFolderLoader, extract, reencoded_copy
from beton_trainer.common.errors import UserError, run_cli
from beton_trainer.common.schema import from_dict
from beton_trainer.convert import convert_dataset
from beton_trainer.format.beton import BetonFile
from beton_trainer.format.dataset import load_manifest
from beton_trainer.pipelines import build_loader
from beton_trainer.pipelines.augment import AugmentSpec
from beton_trainer.pipelines.base import Loader, LoaderOptions, ResolutionSchedule

BASELINE = "imagefolder"
FFCV_RUNS = {f"{order}-{'on' if cache else 'off'}": (order, cache)  # the ffcv rows: order and os_cache
             for order in ("random", "page_aware") for cache in (True, False)}
NAMES = {**{key: f"ffcv {order}, os_cache {key.split('-')[1]}" for key, (order, _) in FFCV_RUNS.items()},
         BASELINE: "torchvision ImageFolder (files)"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cold_cache", description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=Path("../shared/data/hymenoptera_data.tar"),
                        help="the hymenoptera_data.tar tarball (train/ and val/ of ants and bees)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench/cold_cache"),
                        help="folder for the image tree, the .beton and the results")
    parser.add_argument("--gb", type=float, default=4.0, help="size of the image tree and of the .beton, in GB")
    parser.add_argument("--side", type=int, default=224, help="side of the random-resized crops")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="the same for every loader")
    parser.add_argument("--epochs", type=int, default=2, help="timed cold epochs per loader (after one untimed)")
    parser.add_argument("--block-pages", type=int, default=0, help="page-aware blocks; 0 = the default (1 GiB)")
    parser.add_argument("--runs", nargs="+", choices=list(NAMES), default=list(NAMES),
                        help="the loaders to time (ffcv ORDER-OS_CACHE, and the ImageFolder baseline)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def repeated_tree(base: Path, dest: Path, gb: float) -> Path:
    """dest/train: copies of base's images (real copies, not links: each must be read from storage) until they
    hold `gb`; dest/val: one copy. Built once."""
    if dest.is_dir():
        return dest
    files = sorted(p for p in base.rglob("*.jpg"))
    if not files:
        raise UserError(f"no JPEG images under {base}; pass --src with the hymenoptera_data.tar tarball")
    partial, total, round_ = dest.with_suffix(".partial"), 0, 0
    shutil.rmtree(partial, ignore_errors=True)
    while total < gb * 1e9:
        for path in files:
            out = partial / "train" / path.parent.name / f"r{round_:05d}_{path.name}"
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out)
            total += out.stat().st_size
        round_ += 1
    shutil.copytree(base, partial / "val")
    partial.rename(dest)
    return dest


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache (clean pages not mapped by a live process)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_bytes() -> int:
    """Bytes this process (threads and reaped children included) has fetched from storage."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines() if ": " in line)
    return int(fields["read_bytes"])


def cold_epoch(loader: Loader, files: list[Path], epoch: int, device: torch.device) -> dict[str, float]:
    """One epoch after evicting `files`: images, seconds, set-up seconds (to the first batch), bytes read."""
    if hasattr(loader, "unmap_page_cache"):  # FFCV's os_cache map: the kernel keeps mapped pages
        loader.unmap_page_cache()
    evict(files)
    before, start = read_bytes(), time.perf_counter()
    loader.set_epoch(epoch)
    images, first = 0, None
    for x, _ in loader:
        images += len(x)
        first = first or time.perf_counter()
    synchronize(device)
    seconds = time.perf_counter() - start
    gc.collect()  # a baseline's worker processes exit and are reaped: their reads count in /proc/self/io
    return {"images": images, "seconds": seconds, "setup_s": (first or start) - start,
            "read_bytes": read_bytes() - before}


def row(name: str, epochs: list[dict[str, float]], stored: int) -> dict[str, float | str]:
    """The median epoch's figures."""
    rate = statistics.median(e["images"] / e["seconds"] for e in epochs)
    mb_s = statistics.median(e["read_bytes"] / e["seconds"] / 1e6 for e in epochs)
    return {"loader": name, "images_per_s": rate, "read_mb_per_s": mb_s,
            "read_over_stored": statistics.median(e["read_bytes"] / stored for e in epochs),
            "setup_s": statistics.median(e["setup_s"] for e in epochs)}


def markdown(rows: list[dict], header: dict[str, str]) -> str:
    lines = [f"- {key}: {value}" for key, value in header.items()]
    lines += ["", "| loader | images/s | MB/s read | read / stored | set-up s |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['loader']} | {r['images_per_s']:,.0f} | {r['read_mb_per_s']:,.0f} | "
              f"{r['read_over_stored']:.2f} | {r['setup_s']:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.gb > 0:
        raise UserError(f"--gb must be positive, got {args.gb}")
    device = torch.device(args.device)
    work = args.work
    base = reencoded_copy(extract(args.src, work / "source") / "train", work / "reencoded")
    tree = repeated_tree(base, work / f"tree_{args.gb:g}gb", args.gb)
    data = convert_dataset("imagefolder", tree, work / "converted", name=f"repeated_{args.gb:g}gb", encode="jpg",
                           max_side=MAX_SIDE, quality=QUALITY, log=lambda _: None)
    manifest = load_manifest(data)
    beton, images = data / "train.beton", sorted(p for p in (tree / "train").rglob("*.jpg"))
    spec = from_dict(AugmentSpec, {"flip": {"p": 0.5}})
    side = ResolutionSchedule(train=args.side, eval=args.side)

    def ffcv(order: str, cache: bool) -> Loader:
        return build_loader("ffcv", LoaderOptions(
            data_dir=data, split="train", batch_size=args.batch_size, train=True, spec=spec, device=device,
            num_workers=args.workers, resolution=side, order=order, os_cache=cache, block_pages=args.block_pages))

    def baseline() -> Loader:  # workers that end with each epoch, as without persistent_workers: reaped, counted
        return ImageFolderLoader(tree / "train", args.side, manifest["mean"], manifest["std"],
                                 batch_size=args.batch_size, workers=args.workers, device=device, persistent=False)

    runs = {key: (lambda how=how: ffcv(*how), [beton]) for key, how in FFCV_RUNS.items()}
    runs[BASELINE] = (baseline, images)
    rows = []
    for key in args.runs:
        make, files = runs[key]
        name, loader = NAMES[key], make()
        cold_epoch(loader, files, 0, device)  # untimed: FFCV builds its Loader and compiles its pipeline here
        epochs = [cold_epoch(loader, files, epoch, device) for epoch in range(1, args.epochs + 1)]
        del loader
        rows.append(row(name, epochs, sum(p.stat().st_size for p in files)))
        print(f"{name}: {rows[-1]['images_per_s']:,.0f} images/s, {rows[-1]['read_mb_per_s']:,.0f} MB/s read",
              flush=True)
    header = {**environment(device), ".beton": f"{beton.stat().st_size / 1e9:.2f} GB, {len(images):,} images, "
              f"pages of {BetonFile(beton).page_size >> 20} MiB", "batch": str(args.batch_size),
              "workers": str(args.workers), "crop side": str(args.side)}
    report = markdown(rows, header)
    (work / "cold_cache.md").write_text(report)
    (work / "cold_cache.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    print(report)
    return 0


if __name__ == "__main__":
    run_cli(main)
