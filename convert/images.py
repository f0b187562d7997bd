"""Any image file PIL reads, as RGB uint8 pixels the right way up, decoded by a pool of worker processes.

JPEG, PNG with alpha or a palette, 16-bit, greyscale and CMYK files all become 8-bit RGB (alpha dropped, as
torchvision's loader does), with the EXIF orientation applied. A file whose header claims more than
`max_pixels` pixels (a decompression bomb: a few KB that would decode to gigabytes) is refused from its
header, before any pixel is decoded. Results come back in input order, whatever the number of workers.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import re
import struct
import warnings
from collections import deque
from collections.abc import Hashable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from beton_trainer.common.errors import UserError
from beton_trainer.format.beton import MAX_PIXELS

__all__ = ["DEFAULT_MAX_PIXELS", "DecodeOptions", "decode_image", "decode_in_order", "default_workers",
           "image_signature"]

DEFAULT_MAX_PIXELS = MAX_PIXELS  # PIL's own bomb threshold: 89,478,485 pixels (a 3 x 8-bit 256 MiB); one limit
MAX_SIDE = 65535  # FFCV stores heights and widths as 16-bit numbers
CHUNK_FILES, CHUNK_BYTES = 32, 4 << 20  # files sent to a worker at once; a few chunks per worker in flight
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


@dataclass(frozen=True)
class DecodeOptions:
    max_side: int | None = None  # shrink so the longer side is at most this
    max_pixels: int = DEFAULT_MAX_PIXELS


@contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    """PIL's module-wide bomb limit set to ours (and its warning silenced: we check ourselves)."""
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


def _fit(width: int, height: int, max_side: int | None) -> tuple[int, int] | None:
    """The (width, height) that brings the longer side down to max_side, or None when it already fits."""
    if not max_side or max(width, height) <= max_side:
        return None
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB; 16-bit greyscale keeps its top 8 bits (PIL's own convert would clip it to white)."""
    if img.mode in SIXTEEN_BIT_MODES:
        img = Image.fromarray((np.clip(np.asarray(img), 0, 65535) >> 8).astype(np.uint8))
    return img if img.mode == "RGB" else img.convert("RGB")


def image_signature(prefix: bytes) -> bool:
    """Whether the first 16 bytes of a file are the signature of a format PIL reads (PIL's own test, whose
    errors on a short file it ignores as Image.open does; the few formats without a signature, none of them an
    ImageFolder suffix, say no)."""
    Image.init()
    for _, accept in Image.OPEN.values():
        try:
            if accept is not None and accept(prefix):
                return True
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue
    return False


def decode_image(data: bytes, options: DecodeOptions) -> np.ndarray | str:
    """An image file's RGB pixels (H, W, 3), upright and shrunk to max_side, or why it cannot be used."""
    if not data:
        return "an empty file"
    try:
        with _pixel_limit(options.max_pixels), Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > options.max_pixels:
                return (f"a decompression bomb: {width}x{height} pixels, over --max-pixels "
                        f"{options.max_pixels:,} (not decoded)")
            if max(width, height) > MAX_SIDE:
                return f"{width}x{height} pixels: a side over {MAX_SIDE}, more than FFCV can store"
            target = _fit(width, height, options.max_side)
            if target:
                img.draft("RGB", target)  # JPEG: decode at 1/2, 1/4 or 1/8 scale while that still covers target
            drafted = img.size
            upright = ImageOps.exif_transpose(img)  # decodes the pixels
        rgb = _rgb(upright)
        if target:
            rgb = rgb.resize(target if upright.size == drafted else target[::-1],  # [::-1]: EXIF turned it
                             Image.Resampling.LANCZOS)
        return np.asarray(rgb)
    except Image.DecompressionBombError as exc:  # over twice the limit (PIL's own check), or a frame inside
        pixels = re.search(r"\((\d+) pixels\)", str(exc))  # its message quotes twice our limit: ours instead
        size = f"{int(pixels[1]):,} pixels" if pixels else "a frame larger than its header says"
        return f"a decompression bomb: {size}, over --max-pixels {options.max_pixels:,} (not decoded)"
    except UnidentifiedImageError:
        return "not an image PIL can read"
    except Exception as exc:  # damaged files raise OSError, SyntaxError, ValueError, struct.error, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"a damaged image ({reason})"


def _decode_chunk(files: list[bytes | str], options: DecodeOptions) -> list[np.ndarray | str]:
    return [data if isinstance(data, str) else decode_image(data, options) for data in files]


def _chunks(items: Iterable[tuple[Hashable, bytes | str]]) -> Iterator[tuple[list, list[bytes | str]]]:
    """(keys, file contents) in groups of at most CHUNK_FILES files or about CHUNK_BYTES."""
    keys, files, size = [], [], 0
    for key, data in items:
        keys.append(key)
        files.append(data)
        size += len(data)
        if len(files) == CHUNK_FILES or size >= CHUNK_BYTES:
            yield keys, files
            keys, files, size = [], [], 0
    if files:
        yield keys, files


def default_workers() -> int:
    return os.cpu_count() or 1


def decode_in_order(items: Iterable[tuple[Hashable, bytes | str]], options: DecodeOptions,
                    workers: int) -> Iterator[tuple[Hashable, np.ndarray | str]]:
    """(key, pixels or the reason it was skipped) for each (key, file contents), in input order; a str in
    place of the contents is a reason already known (the file was not read), passed through in its place.

    With workers > 1 the files are decoded in that many processes, with at most 3 chunks per worker in
    flight, so memory does not grow with the size of the tree.
    """
    if workers <= 1:
        for keys, files in _chunks(items):
            yield from zip(keys, _decode_chunk(files, options))
        return
    pending: deque[tuple[list, Future]] = deque()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        try:
            for keys, files in _chunks(items):
                pending.append((keys, pool.submit(_decode_chunk, files, options)))
                if len(pending) >= 3 * workers:
                    keys, done = pending.popleft()
                    yield from zip(keys, done.result())
            while pending:
                keys, done = pending.popleft()
                yield from zip(keys, done.result())
        except BrokenProcessPool:
            raise UserError(f"an image decoder process died (near {keys[0]}): a file crashed PIL or memory ran out; "
                            "remove that file, or convert with --workers 1 to find it") from None
        finally:
            for _, future in pending:
                future.cancel()
