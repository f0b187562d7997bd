"""What a loader backend will hold in memory, checked against what is free before anything is loaded.

A split too large for its backend used to end in the kernel's OOM killer or a CUDA out-of-memory traceback
halfway through loading. Each backend now works out its need from the .beton's header alone (record counts,
image sizes, pages: no decoding) and, when it does not fit, stops with one line giving both figures and the
backend or setting that fits. Free memory is the device's (`torch.cuda.mem_get_info`) for what lives on a
CUDA device and the host's MemAvailable (/proc/meminfo), or the memory cgroup's room where that is less, for the
rest; a budget (the recipe's
`data.memory_budget_gb`, else $BETON_MEMORY_BUDGET_GB) caps both, so a test can show a refusal on real data.
Where neither a measurement nor a budget exists (no /proc, MPS), nothing is checked.

For photos of varied sizes the FFCV backend also counts what decoding sets aside for the largest image the file's
headers allow (`decode_bytes`): eight records claiming 9459 x 9459 pixels (under the pixel cap, headers
consistent) raised a run's peak from 1.53 GB to 2.4 GB, uncounted, and sometimes failed in FFCV's allocation. An
allocation that fails anyway (memory other processes took after the check) is one line (`allocations`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from beton_trainer.common.errors import UserError
from beton_trainer.format.beton import BetonFile
from beton_trainer.pipelines.base import cache_pages, record_pages

__all__ = ["ALLOCATION_FIX", "BUDGET_ENV", "MemoryNeed", "PAGE_AWARE_FIX", "PHOTO_FIX", "TENSOR_CHUNK", "USE_FFCV",
           "allocation_error", "allocations", "cgroup_free", "check", "choose_order", "dali_need", "decode_bytes",
           "decoded_bytes", "ffcv_need", "free_host", "gb", "host_free", "largest_batch", "largest_image",
           "out_of_memory", "photo_need", "record_bytes", "tensor_need"]

GB = 1e9
BUDGET_ENV = "BETON_MEMORY_BUDGET_GB"
MEMINFO = Path("/proc/meminfo")
PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")
PAGE_AWARE_FRACTION = 0.5  # order "auto": page-aware once a .beton is larger than this share of free host memory
TENSOR_CHUNK = 4096  # records the tensor backend stages on the host per copy to the device
FFCV_BATCH_SLOTS = 3 + 2  # FFCV's decoded batches in flight: batches_ahead (3) + 2 (its EpochIterator)
JPEG_COEFFICIENT_BYTES = 6  # per pixel libjpeg decodes: 3 components of 16-bit DCT coefficients (a progressive
# JPEG holds the whole image's at once)
USE_FFCV = "use --loader ffcv, which reads the .beton as it goes (with data.order = \"page_aware\" for a set larger " \
           "than RAM)"
ALLOCATION_FIX = "lower data.batch_size, or stop what else holds memory on this machine, and start again"
PAGE_AWARE_FIX = "use --loader ffcv with data.order = \"page_aware\" (or \"auto\"): FFCV then reads the .beton block " \
                 "by block with os_cache off, each page once an epoch"
PHOTO_FIX = f"lower data.batch_size or data.num_workers, or {PAGE_AWARE_FIX}"


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes a loader holds: on its training device (when that is not the host) and on the host."""

    backend: str
    device_bytes: int
    host_bytes: int
    what: str  # what is held, in words, for the message

    def describe(self) -> str:
        parts = [f"{gb(self.device_bytes)} on the device"] if self.device_bytes else []
        return f"{self.backend}: {', '.join(parts + [f'{gb(self.host_bytes)} on the host'])} ({self.what})"


def gb(nbytes: float) -> str:
    return f"{nbytes / GB:.3g} GB"


def budget_bytes(budget_gb: float = 0.0) -> float | None:
    """The cap on what counts as free: the recipe's value, else $BETON_MEMORY_BUDGET_GB; None when neither is set."""
    if budget_gb:
        return budget_gb * GB
    raw = os.environ.get(BUDGET_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise UserError(f"{BUDGET_ENV}={raw!r} is not a positive number of GB; set it to e.g. 16, or unset it")
    return value * GB


def host_free() -> int | None:
    """What this process can still allocate without swapping or being killed, or None without /proc: the
    host's MemAvailable, or less when the process's memory cgroup (a SLURM job, a container) allows less."""
    available = None
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    known = [v for v in (available, cgroup_free()) if v is not None]
    return min(known) if known else None


# per cgroup version: the limit, the usage, and memory.stat's reclaimable file pages (the page cache in use)
CGROUP_FILES = {"v2": ("memory.max", "memory.current", "inactive_file"),
                "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}
UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number near 2^63


def _cgroup_dirs() -> list[tuple[str, Path]]:
    """(version, folder) of this process's memory cgroup and of each cgroup above it, innermost first."""
    try:
        lines = PROC_CGROUP.read_text().splitlines()
    except OSError:
        return []
    dirs = []
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and not controllers:
            roots = [("v2", CGROUP_ROOT), ("v2", CGROUP_ROOT / "unified")]
        elif "memory" in controllers.split(","):
            roots = [("v1", CGROUP_ROOT / "memory")]
        else:
            continue
        parts = [part for part in path.strip().split("/") if part]
        for version, root in roots:
            dirs += [(version, root.joinpath(*parts[:k])) for k in range(len(parts), -1, -1)]
    return dirs


def cgroup_free() -> int | None:
    """The least any enclosing memory cgroup still allows: its limit less what it uses that cannot be
    reclaimed (usage less inactive page cache); None where no cgroup sets a limit."""
    frees = []
    for version, folder in _cgroup_dirs():
        limit_file, usage_file, inactive_key = CGROUP_FILES[version]
        try:
            limit_text = (folder / limit_file).read_text().strip()
            usage = int((folder / usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit_text == "max" or not limit_text.isdigit() or int(limit_text) >= UNLIMITED:
            continue
        inactive = 0
        try:
            for line in (folder / "memory.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == inactive_key:
                    inactive = int(value)
        except (OSError, ValueError):
            pass
        frees.append(max(int(limit_text) - (usage - inactive), 0))
    return min(frees) if frees else None


def _capped(measured: int | None, cap: float | None) -> float | None:
    known = [v for v in (measured, cap) if v is not None]
    return min(known) if known else None


def free_host(budget_gb: float = 0.0) -> float | None:
    """Host bytes that count as free: MemAvailable (or the cgroup's room), capped by the budget."""
    return _capped(host_free(), budget_bytes(budget_gb))


def check(need: MemoryNeed, device: torch.device, budget_gb: float, fix: str) -> None:
    """Refuse with one line, before loading, when `need` does not fit in what is free; `fix` names what fits."""
    cap = budget_bytes(budget_gb)
    host = free_host(budget_gb)
    if device.type == "cuda":
        on_device = _capped(torch.cuda.mem_get_info(device)[0], cap)
        places = [(need.device_bytes, on_device, str(device)), (need.host_bytes, host, "the host")]
    elif device.type == "cpu":
        places = [(need.device_bytes + need.host_bytes, host, "the host")]
    else:  # MPS and others: no free-memory query; the budget alone applies
        places = [(need.device_bytes, cap, str(device)), (need.host_bytes, cap, "the host")]
    for wanted, free, where in places:
        if free is not None and wanted > free:
            capped = f" (memory budget {gb(cap)}: data.memory_budget_gb or {BUDGET_ENV})" if free == cap else ""
            raise UserError(f"the {need.backend} loader needs {gb(wanted)} on {where} ({need.what}) but "
                            f"{gb(free)} is free{capped}; {fix}")


def decoded_bytes(beton: BetonFile) -> int:
    """The split decoded into one uint8 array: the sum of h * w * channels over its records (JPEGs included)."""
    channels = beton.shape[2] if beton.storage == "ndarray" else 3
    return int(np.prod(beton.sizes(), axis=1).sum()) * channels


def record_bytes(beton: BetonFile) -> int:
    """One decoded record of a fixed-size split."""
    return int(np.prod(beton.image_shape()))


def tensor_need(beton: BetonFile) -> MemoryNeed:
    """The split on the device, plus one chunk staged on the host (and its copy on the device before the
    transpose)."""
    chunk = min(TENSOR_CHUNK, len(beton)) * record_bytes(beton)
    return MemoryNeed("tensor", decoded_bytes(beton) + chunk, chunk,
                      f"{len(beton):,} decoded images and one chunk of {TENSOR_CHUNK} in staging")


def dali_need(beton: BetonFile, photos: bool) -> MemoryNeed:
    """Fixed-size data: the decoded split as host arrays feeding fn.external_source. Photos: their records, read
    through the page cache in a random order (a set larger than it is reread from disk every epoch)."""
    if photos:
        return MemoryNeed("dali", 0, beton.path.stat().st_size, "the .beton in the page cache, read in random order")
    return MemoryNeed("dali", 0, decoded_bytes(beton), f"{len(beton):,} decoded images as host arrays")


def largest_image(beton: BetonFile) -> tuple[int, int]:
    """(height, width) of the largest image the file's headers allow a decoder to meet: its tallest record's
    height and its widest record's width (FFCV sizes its decode buffers by these two)."""
    sizes = beton.sizes()
    return int(sizes[:, 0].max()), int(sizes[:, 1].max())


def decode_bytes(beton: BetonFile, *, batch_size: int, workers: int) -> int:
    """What FFCV's photo decoders set aside for `largest_image`: a scratch buffer of its RGB pixels for every
    image in flight (ResizedCropRGBImageDecoder's second allocation: batch_size in each batch slot, allocated when
    an epoch starts), and, in each of `workers` decoding at once, libjpeg's coefficient buffers for it."""
    height, width = largest_image(beton)
    return height * width * (3 * FFCV_BATCH_SLOTS * batch_size + JPEG_COEFFICIENT_BYTES * max(workers, 1))


def largest_batch(values: np.ndarray, batch_size: int) -> int:
    """The most a batch can add up to: the sum of the `batch_size` largest of `values` (one per record)."""
    return int(np.sort(np.asarray(values, dtype=np.int64))[-batch_size:].sum()) if len(values) else 0


def photo_need(beton: BetonFile, *, batch_size: int, side: int, workers: int, prefetch: int,
               device_chunk: int) -> MemoryNeed:
    """The .beton through the page cache in random order (as DALI's photo path), and the photo loader's batches:
    `prefetch` + 1 of crops (`side` squared, or the stored size when `side` is 0). On the host path
    (`device_chunk` 0) each of `workers` threads holds one record decoded at full size, 4 bytes a pixel as Pillow
    lays RGB out. On CUDA the host stages `prefetch` + 1 batches of stored bytes in pinned memory, and the device
    holds one batch decoded, one chunk of `device_chunk` records padded to the largest size (uint8 and float32),
    its filter weights (float64, each axis) and its first product."""
    sizes = beton.sizes()
    pixels = np.prod(sizes, axis=1)
    crop = side * side * 3 if side else record_bytes(beton)
    crops = (prefetch + 1) * batch_size * crop
    cache = beton.path.stat().st_size
    if not device_chunk:
        decoding = workers * int(pixels.max(initial=0)) * 4
        return MemoryNeed("photo", 0, cache + crops + decoding,
                          f"the .beton in the page cache, read in random order, {prefetch + 1} batches of crops and "
                          f"{workers} records decoding")
    height, width = (int(v) for v in sizes.max(axis=0, initial=0))
    out = side or max(height, width)
    chunk_records = min(device_chunk, batch_size)
    chunk = chunk_records * (3 * height * width * 5 + 8 * 4 * out * (height + width) + 3 * height * out * 4)
    staging = (prefetch + 1) * largest_batch(beton.record_sizes(), batch_size)
    return MemoryNeed("photo", largest_batch(pixels, batch_size) * 3 + chunk + crops, cache + staging,
                      f"a batch decoded, a chunk of {chunk_records} resizing and {prefetch + 1} batches of crops; the "
                      f".beton in the page cache, read in random order, and {prefetch + 1} batches of records pinned")


def ffcv_need(beton: BetonFile, order: np.ndarray | None, *, os_cache: bool, batch_size: int,
              sample_bytes: int, decode_workers: int = 0) -> MemoryNeed:
    """With os_cache and the random order (`order` None): the whole .beton in the page cache. Otherwise the pages
    this rank's `order` (an epoch's sample indices) keeps in FFCV's process cache or the page cache at once. Plus
    FFCV's decoded batches in flight (`sample_bytes` each sample) and, for photos decoded by `decode_workers`
    workers (0: images of one size, decoded straight into the batch), `decode_bytes`."""
    batches = FFCV_BATCH_SLOTS * batch_size * sample_bytes
    decode = decode_bytes(beton, batch_size=batch_size, workers=decode_workers) if decode_workers else 0
    height, width = largest_image(beton)
    decoding = f", and {gb(decode)} of decode buffers for images of up to {height}x{width}" if decode else ""
    if order is None:
        return MemoryNeed("ffcv", 0, beton.path.stat().st_size + batches + decode,
                          f"the .beton in the page cache (os_cache, random order) and its batches in flight{decoding}")
    pages = cache_pages(record_pages(beton)[order], batch_size)
    where = "FFCV's process cache" if not os_cache else "the page cache"
    return MemoryNeed("ffcv", 0, pages * beton.page_size + batches + decode,
                      f"{pages:,} pages of {beton.page_size >> 20} MiB at once in {where}, and batches in "
                      f"flight{decoding}")


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation that failed: numpy's MemoryError, torch's CPU allocator, CUDA's."""
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and any(
        words in str(exc) for words in ("can't allocate memory", "out of memory")))


def allocation_error(backend: str, exc: BaseException, fix: str) -> UserError:
    """The one line for a failed allocation `exc`: the loader, the allocator's words and `fix`."""
    words = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return UserError(f"the {backend} loader could not allocate its memory ({words}); {fix}")


@contextmanager
def allocations(backend: str, fix: str) -> Iterator[None]:
    """An allocation that fails inside is one line (`allocation_error`), not a traceback: `check` runs before
    loading, but other processes may take memory after it."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if not out_of_memory(exc):
            raise
        raise allocation_error(backend, exc, fix) from None


def choose_order(order: str, beton: BetonFile, budget_gb: float) -> str:
    """"random" or "page_aware": "auto" is page-aware when the .beton is larger than PAGE_AWARE_FRACTION of the
    free host memory (capped by the budget), where a random order would reread it from disk every epoch."""
    if order != "auto":
        return order
    free = free_host(budget_gb)
    large = free is not None and beton.path.stat().st_size > PAGE_AWARE_FRACTION * free
    return "page_aware" if large else "random"
