"""`python -m benchmarks.verify_cost --data DIR [--loaders tensor ffcv]`: what the integrity check at start-up
(`format.integrity`, the recipe's `data.verify`) adds to a loader's start-up, beside `data.verify = "off"`.

For each loader and each of "off", "pages" and "full", the loader's constructor (which opens the split, checks
it, plans its memory and, for the tensor loader, uploads every record) is timed from a warm page cache (the file
read just before) and from a cold one (its pages evicted with posix_fadvise(POSIX_FADV_DONTNEED): no root
needed), `--repeats` times in one process, after one untimed build; the table gives medians and the bytes read
from storage (/proc/self/io). A training loader reads every record over its epochs, so "pages" and "full" check
the same pages there; `--eval-batches N` builds evaluation loaders of a stratified subset of N batches instead
(as max_eval_batches does), whose FFCV and DALI loaders check the pages of that subset only.

`--photos-gb G` first builds the photo .beton of the cold-cache benchmark (the hymenoptera photos re-encoded as
the .beton stores them, copied over and over to about G GB, converted with `--encode jpg`) under --work, and
measures it instead of --data.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.cold_cache import evict, read_bytes, repeated_tree
from benchmarks.loaders import environment
from benchmarks.photo_loaders import MAX_SIDE, QUALITY, extract, reencoded_copy
from beton_trainer.common.errors import UserError, run_cli
from beton_trainer.common.schema import from_dict
from beton_trainer.convert import convert_dataset
from beton_trainer.format.beton import BetonFile
from beton_trainer.pipelines import build_loader
from beton_trainer.pipelines.augment import AugmentSpec
from beton_trainer.pipelines.base import LoaderOptions

CACHES = ("warm", "cold")
MODES = ("off", "pages", "full")  # the table's columns


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.verify_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a converted dataset (the folder holding manifest.json)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--loaders", nargs="+", choices=("tensor", "ffcv", "dali"), default=["tensor", "ffcv"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--eval-batches", type=int, default=0, help="evaluation loaders of this many batches "
                        "(0: training loaders)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--photos-gb", type=float, default=0.0, help="build and measure the cold-cache benchmark's "
                        "photo .beton of about this many GB instead of --data")
    parser.add_argument("--src", type=Path, default=Path("../shared/data/hymenoptera_data.tar"),
                        help="with --photos-gb: the hymenoptera_data.tar tarball")
    parser.add_argument("--work", type=Path, default=Path("runs/bench/verify_cost"),
                        help="with --photos-gb: the folder for the image tree and the .beton")
    return parser


def photo_beton(src: Path, work: Path, gb: float) -> Path:
    """The cold-cache benchmark's data: a converted dataset of about `gb` GB of re-encoded photos (built once)."""
    base = reencoded_copy(extract(src, work / "source") / "train", work / "reencoded")
    tree = repeated_tree(base, work / f"tree_{gb:g}gb", gb)
    return convert_dataset("imagefolder", tree, work / "converted", name=f"repeated_{gb:g}gb", encode="jpg",
                           max_side=MAX_SIDE, quality=QUALITY, log=print)


def start_up(options: LoaderOptions, backend: str, beton: Path, cache: str) -> tuple[float, int]:
    """Seconds to build the loader, and bytes read from storage meanwhile, from a warm or a cold page cache."""
    gc.collect()  # the previous loader's mapping of the file goes: its pages can be evicted
    if cache == "cold":
        evict([beton])
    else:
        with open(beton, "rb") as fh:
            while fh.read(64 << 20):
                pass
    before, start = read_bytes(), time.perf_counter()
    loader = build_loader(backend, options)
    seconds, read = time.perf_counter() - start, read_bytes() - before
    del loader
    return seconds, read


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.photos_gb > 0:
        data = photo_beton(args.src, args.work, args.photos_gb)
    elif args.data is not None:
        data = args.data
    else:
        raise UserError("pass --data DIR (a converted dataset) or --photos-gb G")
    beton = data / f"{args.split}.beton"
    device = torch.device("cpu")
    spec = from_dict(AugmentSpec, {})
    rows = []
    for backend in args.loaders:
        for cache in CACHES:
            medians = {}
            for verify in MODES:
                options = LoaderOptions(data_dir=data, split=args.split, batch_size=args.batch_size,
                                        train=not args.eval_batches, spec=spec, device=device,
                                        num_workers=args.workers, max_batches=args.eval_batches, verify=verify)
                start_up(options, backend, beton, cache)  # untimed: imports, first allocations
                runs = [start_up(options, backend, beton, cache) for _ in range(args.repeats)]
                medians[verify] = (statistics.median(s for s, _ in runs), statistics.median(r for _, r in runs))
            rows.append((backend, cache, medians))
            print(backend, cache, {k: f"{s:.3f} s, {r / 1e6:,.0f} MB read" for k, (s, r) in medians.items()},
                  flush=True)
    size, page = beton.stat().st_size, BetonFile(beton).page_size
    lines = [f"- {key}: {value}" for key, value in environment(device).items()]
    lines += [f"- {beton}: {size / 1e9:.3f} GB, {-(-size // page)} pages of {page >> 20} MiB",
              f"- loaders: {f'evaluation, {args.eval_batches} batches' if args.eval_batches else 'training'} of "
              f"{args.batch_size}, {args.workers} workers", "",
              "| loader | page cache | off: s (MB read) | pages: s (MB read) | full: s (MB read) | pages - off |",
              "|---|---|---:|---:|---:|---:|"]
    for backend, cache, m in rows:
        cells = " | ".join(f"{m[v][0]:.3f} ({m[v][1] / 1e6:,.0f})" for v in MODES)
        lines.append(f"| {backend} | {cache} | {cells} | {m['pages'][0] - m['off'][0]:+.3f} s |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    run_cli(main)
