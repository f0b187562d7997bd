"""`beton-convert <dataset> --src PATH --out DIR` (also `python -m convert` in a checkout): the command-line face
of `convert_dataset`."""

from __future__ import annotations

import argparse

from beton_trainer.common.errors import run_cli
from beton_trainer.convert.archive import Limits
from beton_trainer.convert.beton import ENCODINGS
from beton_trainer.convert.build import convert_dataset
from beton_trainer.convert.images import DEFAULT_MAX_PIXELS
from beton_trainer.convert.sources import DATASETS

__all__ = ["build_parser", "main", "run"]

EXAMPLES = """examples:
  beton-convert cifar10 --src ~/data/cifar-10-batches-py --out data      # or cifar-10-python.tar.gz
  beton-convert cifar100 --src ~/data/cifar-100-python.tar.gz --out data --val-fraction 0.1
  beton-convert mnist --src ../shared/data/mnist --out data               # the 4 IDX files, .gz or not
  beton-convert fashion-mnist --src ~/data/fashion --out data
  beton-convert imagefolder --src ../shared/data/cifar10-jpeg.tar.xz --out data   # -> data/cifar10-jpeg
  beton-convert imagefolder --src ../shared/data/hymenoptera_data.tar --out data --name hymenoptera \\
      --encode jpg --max-side 500 --quality 90                 # photos, train/ + val/ (val becomes test.beton)
  beton-convert imagefolder --src ~/imagenet --out data --encode mix --max-side 500 \\
      --compress-probability 0.5 --quality 90                  # as ffcv-imagenet writes ImageNet
  beton-convert cifar10 --src ~/data --out data --download                # online only

Output: DIR/NAME/{train,test}.beton (+ val.beton with --val-fraction, or from an ImageFolder holding both
val/ and test/) and DIR/NAME/manifest.json. An ImageFolder tree is <root>/train/<class>/* with val/ or test/
beside it (optionally under one top-level folder); any image PIL reads becomes RGB, upright per its EXIF.
Skipped (and listed in the manifest): .gif files (as torchvision's ImageFolder), unreadable or damaged
images, decompression bombs (over --max-pixels), archive members that are links, devices, or have absolute
or '..' paths. Ignored (and listed): hidden files such as .DS_Store. CIFAR pickles are read with an
unpickler that builds only arrays, lists, strings and numbers: a pickle asking for anything else is refused.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beton-convert", description="Convert a dataset into verified FFCV .beton files.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=DATASETS)
    parser.add_argument("--src", required=True, help="the source folder or archive (with --download: where to "
                        "download to)")
    parser.add_argument("--out", required=True, help="folder that receives NAME/")
    parser.add_argument("--name", help="output subfolder (default: the dataset, or for imagefolder the "
                        "source's name without extension)")
    parser.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                        help="carve a stratified, seeded val split of this fraction out of train")
    parser.add_argument("--seed", type=int, default=0, help="seed for the val split and --encode mix (default 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if an output exists")
    parser.add_argument("--strict", action="store_true",
                        help="fail on any file that would be skipped (unreadable, not an image, a .gif, a bomb, "
                        "an unsafe archive member) instead of skipping and listing it")
    parser.add_argument("--encode", choices=ENCODINGS, default="raw",
                        help="RGB storage: raw uint8 (lossless, default), JPEG, or mix: a seeded "
                        "--compress-probability fraction JPEG and the rest raw")
    parser.add_argument("--quality", type=int, default=90, metavar="N", help="JPEG quality (default 90)")
    parser.add_argument("--compress-probability", type=float, default=0.5, metavar="P",
                        help="--encode mix: the fraction of images stored as JPEG (default 0.5)")
    parser.add_argument("--max-side", type=int, metavar="N",
                        help="imagefolder: shrink images so the longer side is at most N pixels")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="processes decoding images (default: every CPU); the output does not depend on it")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                        help="skip images whose header claims more pixels, without decoding them (decompression "
                        f"bombs; default {DEFAULT_MAX_PIXELS:,}, PIL's own limit)")
    parser.add_argument("--max-files", type=int, default=Limits.max_files, metavar="N",
                        help=f"stop on an archive with more members (default {Limits.max_files:,})")
    parser.add_argument("--max-expansion", type=float, default=Limits.max_expansion, metavar="X",
                        help="stop on an archive that decompresses to more than X times its size (and over 1 GiB): "
                        f"a decompression bomb; images barely compress (default {Limits.max_expansion:g})")
    parser.add_argument("--download", action="store_true", help="download with torchvision into --src first")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    convert_dataset(args.dataset, args.src, args.out, name=args.name, val_fraction=args.val_fraction,
                    seed=args.seed, force=args.force, strict=args.strict, encode=args.encode,
                    quality=args.quality, max_side=args.max_side, compress_probability=args.compress_probability,
                    max_pixels=args.max_pixels, workers=args.workers,
                    limits=Limits(args.max_files, args.max_expansion), download_source=args.download)
    return 0


def run() -> None:
    """The `beton-convert` command."""
    run_cli(main)


if __name__ == "__main__":
    run()
