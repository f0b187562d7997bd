"""`python -m convert <dataset> --src PATH --out DIR`: the command-line face of `convert_dataset`."""

from __future__ import annotations

import argparse

from common.errors import run_cli
from convert.build import convert_dataset
from convert.sources import DATASETS

EXAMPLES = """examples:
  python -m convert cifar10 --src ~/data/cifar-10-batches-py --out data      # or cifar-10-python.tar.gz
  python -m convert cifar100 --src ~/data/cifar-100-python.tar.gz --out data --val-fraction 0.1
  python -m convert mnist --src ../shared/data/mnist --out data               # the 4 IDX files, .gz or not
  python -m convert fashion-mnist --src ~/data/fashion --out data
  python -m convert imagefolder --src ../shared/data/cifar10-jpeg.tar.xz --out data   # -> data/cifar10-jpeg
  python -m convert imagefolder --src ~/photos --out data --encode jpg --quality 90 --max-side 256
  python -m convert cifar10 --src ~/data --out data --download                # online only

Output: DIR/NAME/{train,test}.beton (+ val.beton with --val-fraction) and DIR/NAME/manifest.json.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m convert", description="Convert a dataset into verified FFCV .beton files.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=DATASETS)
    parser.add_argument("--src", required=True, help="the source folder or archive (with --download: where to "
                        "download to)")
    parser.add_argument("--out", required=True, help="folder that receives NAME/")
    parser.add_argument("--name", help="output subfolder (default: the dataset, or for imagefolder the "
                        "source's name without extension)")
    parser.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                        help="carve a stratified, seeded val split of this fraction out of train")
    parser.add_argument("--seed", type=int, default=0, help="seed for the val split (default 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if an output exists")
    parser.add_argument("--strict", action="store_true",
                        help="imagefolder: fail on unreadable or non-image files instead of skipping them")
    parser.add_argument("--encode", choices=("raw", "jpg"), default="raw",
                        help="RGB storage: raw uint8 (lossless, default) or JPEG")
    parser.add_argument("--quality", type=int, default=90, metavar="N", help="JPEG quality for --encode jpg")
    parser.add_argument("--max-side", type=int, metavar="N",
                        help="imagefolder: shrink images so the longer side is at most N pixels")
    parser.add_argument("--download", action="store_true", help="download with torchvision into --src first")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    convert_dataset(args.dataset, args.src, args.out, name=args.name, val_fraction=args.val_fraction,
                    seed=args.seed, force=args.force, strict=args.strict, encode=args.encode,
                    quality=args.quality, max_side=args.max_side, download_source=args.download)
    return 0


if __name__ == "__main__":
    run_cli(main)
