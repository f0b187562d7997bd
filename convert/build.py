"""Turn a source into `<out>/<name>/{train,val,test}.beton` + manifest.json: safely, once, and verified.

Every beton is written to a hidden temp file, verified, then renamed into place; the manifest is written
last (also by rename), so a folder with a manifest is always complete. A rerun with the same source and
options finds the output up to date and does nothing.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

import numpy as np

from beton_trainer.common.errors import UserError, did_you_mean
from beton_trainer.common.files import fsync_path, hash_into, sha256_file, write_json
from beton_trainer.convert.archive import Limits
from beton_trainer.convert.beton import ENCODINGS, jpeg_plan, storage_for, verify_beton, write_beton
from beton_trainer.convert.imagefolder import GIF_POLICY, IMAGE_SUFFIXES, read_imagefolder
from beton_trainer.convert.images import DEFAULT_MAX_PIXELS, DecodeOptions, default_workers
from beton_trainer.convert.sources import DATASETS, ReadOptions, SourceData, download, read_source, source_stem
from beton_trainer.convert.spill import ImageSpill, SpilledImages, image_shapes
from beton_trainer.format.beton import BetonFile
from beton_trainer.format.dataset import MANIFEST, dataset_identity, load_manifest
from beton_trainer.format.integrity import page_checksums
from beton_trainer.format.splits import SplitData, carve_val, channel_stats

__all__ = ["convert_dataset"]

FORMAT_VERSION = 1
CONVERTER_VERSION = "1.2"  # 1.2: page checksums (page_sha256) in each split's entry
ALL_SPLITS = ("train", "val", "test")


def convert_dataset(dataset: str, src: str | Path, out: str | Path, *, name: str | None = None,
                    val_fraction: float = 0.0, seed: int = 0, force: bool = False, strict: bool = False,
                    encode: str = "raw", quality: int = 90, max_side: int | None = None,
                    compress_probability: float = 0.5, max_pixels: int = DEFAULT_MAX_PIXELS,
                    workers: int | None = None, limits: Limits | None = None, download_source: bool = False,
                    log: Callable[[str], None] = print) -> Path:
    """Convert `src` into `<out>/<name>/`; returns that folder (the one holding manifest.json)."""
    start = time.perf_counter()
    _check_options(dataset, val_fraction, encode, quality, max_side, compress_probability, max_pixels, workers,
                   limits)
    src = Path(src).expanduser()
    if download_source:
        src = download(dataset, src)
    if not src.exists():
        raise UserError(f"source {src} does not exist; pass --src with the downloaded files (or use --download)")
    out = Path(out).expanduser()
    dest = out / (name or (source_stem(src) if dataset == "imagefolder" else dataset))
    for path in (out, dest):
        if path.exists() and not path.is_dir():
            raise UserError(f"output path {path} is a file, not a folder; choose another --out or --name")

    options = {"val_fraction": val_fraction, "seed": seed, "encode": encode, "quality": quality,
               "max_side": max_side, "compress_probability": compress_probability, "max_pixels": max_pixels,
               "strict": strict}
    source = {"path": str(src.resolve()), "sha256": source_checksum(src)}
    state, damage = _existing_output(dest, dataset, source["sha256"], options)
    if state == "current" and not force:
        log(f"{dest}: up to date, skipping (use --force to rebuild)")
        return dest
    if state == "different" and not force:
        raise UserError(f"{dest} already holds a different conversion (other source or options); "
                        "pass --force to rebuild it, or choose another --out or --name")
    if state == "damaged" and not force:
        raise UserError(f"{dest} holds a damaged conversion of this source ({damage}); rebuild it with the same "
                        "command and --force")

    workers = workers or default_workers()
    read = ReadOptions(strict, DecodeOptions(max_side, max_pixels), workers, limits or Limits())
    photos = dataset == "imagefolder"
    with ImageSpill(out) if photos else nullcontext() as spill:  # a photo tree's decoded pixels wait there
        reading = time.perf_counter()
        data = read_imagefolder(src, read, spill) if photos else read_source(dataset, src, read)
        reading = time.perf_counter() - reading
        splits = dict(data.splits)
        if val_fraction > 0:
            if "val" in splits:
                raise UserError(f"{src} already has a val folder (and a test folder); drop --val-fraction")
            splits["train"], splits["val"] = carve_val(splits["train"], val_fraction, seed, len(data.classes))
            if data.split_folders:
                data.split_folders["val"] = data.split_folders["train"]
        jpeg = {split: jpeg_plan(len(part), encode, compress_probability, [seed, ALL_SPLITS.index(split)])
                for split, part in splits.items()}
        _write_all(dest, splits, jpeg, quality=quality, workers=workers, seed=seed)
        manifest = _manifest(dest, data, splits, jpeg, source, options, storage_for(splits["train"], encode))
    manifest["identity"] = dataset_identity(dest, manifest)  # over records: FFCV's writers vary the file layout
    write_json(dest / MANIFEST, manifest)

    seconds = time.perf_counter() - start
    total = sum(len(part) for part in splits.values())
    counts = ", ".join(f"{s} {manifest['splits'][s]['count']:,}" for s in ALL_SPLITS if s in splits)
    log(f"wrote {dest} ({counts}) in {seconds:.1f} s: {total / seconds:,.0f} images/s (reading and decoding "
        f"{reading:.1f} s, {total / reading:,.0f} images/s on {workers} workers)")
    return dest


def _check_options(dataset: str, val_fraction: float, encode: str, quality: int, max_side: int | None,
                   compress_probability: float, max_pixels: int, workers: int | None,
                   limits: Limits | None) -> None:
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset '{dataset}'{did_you_mean(dataset, DATASETS)}; "
                        f"choose one of {', '.join(DATASETS)}")
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if encode not in ENCODINGS:
        raise UserError(f"--encode must be one of {', '.join(ENCODINGS)}, got {encode!r}")
    if encode != "raw" and dataset in ("mnist", "fashion-mnist"):
        raise UserError(f"--encode {encode} is for RGB images; {dataset} is stored as raw single-channel arrays")
    if not 1 <= quality <= 100:
        raise UserError(f"--quality must be in 1..100, got {quality}")
    if not 0 <= compress_probability <= 1:
        raise UserError(f"--compress-probability must be in [0, 1], got {compress_probability}")
    if max_side is not None and (dataset != "imagefolder" or max_side < 1):
        raise UserError("--max-side takes a positive number of pixels and applies to imagefolder only")
    if max_pixels < 1:
        raise UserError(f"--max-pixels must be a positive number of pixels, got {max_pixels}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if limits is not None and (limits.max_files < 1 or not limits.max_expansion > 0):
        raise UserError(f"--max-files and --max-expansion must be positive, got {limits.max_files} and "
                        f"{limits.max_expansion}")


def _existing_output(dest: Path, dataset: str, source_sha: str, options: dict) -> tuple[str, str]:
    """The state of what `dest` holds, and what is wrong with it: 'missing' (nothing of ours there),
    'current' (same source and options, files intact), 'different' (other source or options) or 'damaged'
    (this source and options, but a file is missing, truncated or altered, or the conversion was cut short)."""
    if not (dest / MANIFEST).exists():
        if any((dest / f"{s}.beton").exists() for s in ALL_SPLITS):
            return "damaged", f"there are .beton files but no {MANIFEST}: an interrupted conversion"
        return "missing", ""
    try:
        manifest = load_manifest(dest)
    except UserError as exc:
        return "damaged", str(exc).split(";")[0]
    if (manifest.get("dataset"), manifest.get("source", {}).get("sha256"), manifest.get("options")) != (
            dataset, source_sha, options):
        return "different", ""
    for split, entry in manifest["splits"].items():
        path = dest / f"{split}.beton"
        if not path.is_file():
            return "damaged", f"{path.name} is missing"
        if path.stat().st_size != entry["bytes"]:
            return "damaged", f"{path.name} is {path.stat().st_size:,} bytes, {entry['bytes']:,} were written"
        if sha256_file(path) != entry["sha256"]:
            return "damaged", f"{path.name} does not match its sha256 in {MANIFEST}"
    return "current", ""


def _write_all(dest: Path, splits: dict[str, SplitData], jpeg: dict[str, np.ndarray], *, quality: int,
               workers: int, seed: int) -> None:
    """Write and verify every split to temp files, then rename them into place (old manifest removed first)."""
    dest.mkdir(parents=True, exist_ok=True)
    temps = {split: dest / f".{split}.beton.partial" for split in splits}
    try:
        for split, data in splits.items():
            write_beton(temps[split], data, jpeg=jpeg[split], quality=quality, workers=workers)
            verify_beton(temps[split], data, jpeg=jpeg[split], quality=quality, seed=seed)
        for temp in temps.values():
            fsync_path(temp)  # a rename publishes only what is on disk
        (dest / MANIFEST).unlink(missing_ok=True)  # from here on the folder must not look complete
        for split in ALL_SPLITS:
            if split in temps:
                os.replace(temps[split], dest / f"{split}.beton")
            else:
                (dest / f"{split}.beton").unlink(missing_ok=True)
        fsync_path(dest)
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)


def _manifest(dest: Path, data: SourceData, splits: dict[str, SplitData], jpeg: dict[str, np.ndarray],
              source: dict, options: dict, storage: str) -> dict:
    train = splits["train"]
    mean, std = channel_stats(train.images)
    shapes = {tuple(s) for part in splits.values() for s in np.unique(image_shapes(part.images), axis=0).tolist()}
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": dest.name,
        "dataset": data.dataset,
        "source": source,
        "classes": data.classes,
        "splits": {split: {**_split_entry(dest / f"{split}.beton", part, len(data.classes)),
                           "jpeg_count": int(jpeg[split].sum())}
                   for split, part in splits.items()},
        "mean": mean,
        "std": std,
        "image_shape": list(shapes.pop()) if len(shapes) == 1 else None,  # None: sizes vary
        "storage": storage,
        "fields": ["image", "label"] + (["coarse_label"] if train.coarse_labels is not None else []),
        "options": options,
        "skipped_files": dict(sorted(data.skipped_files.items())),
        "converter_version": CONVERTER_VERSION,
        "created": datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if data.coarse_classes is not None:
        manifest["coarse_classes"] = data.coarse_classes
    if data.dataset == "imagefolder":
        manifest.update(split_folders=data.split_folders, ignored_files=sorted(data.ignored_files),
                        image_suffixes=list(IMAGE_SUFFIXES), gif=GIF_POLICY)
    return manifest


def _split_entry(path: Path, split: SplitData, num_classes: int) -> dict:
    """The manifest's record of one split: what it holds, and the file's size, sha256 and the sha256 of each
    page (checked when a loader opens it: `format.integrity`)."""
    return {"count": len(split), "histogram": np.bincount(split.labels, minlength=num_classes).tolist(),
            "bytes": path.stat().st_size, "sha256": sha256_file(path), "image_size": size_stats(split.images),
            "page_sha256": page_checksums(path, BetonFile(path).page_size)}


def size_stats(images: np.ndarray | SpilledImages) -> dict[str, dict[str, float]]:
    """Min, median and max of the images' heights and widths (as stored, after --max-side)."""
    sizes = image_shapes(images)[:, :2]
    return {axis: {"min": int(sizes[:, k].min()), "median": float(np.median(sizes[:, k])),
                   "max": int(sizes[:, k].max())} for k, axis in enumerate(("height", "width"))}


def source_checksum(src: Path) -> str:
    """sha256 of a source file, or of a folder's sorted relative paths, sizes and contents."""
    if src.is_file():
        return sha256_file(src)
    digest = hashlib.sha256()
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(src).as_posix()}\0{path.stat().st_size}\0".encode())
        hash_into(digest, path)
    return digest.hexdigest()
