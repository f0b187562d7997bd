"""FFCV 1.0.2's `.beton` format, read and written with numpy and the standard library (no ffcv, no numba).

Reading a split then costs milliseconds instead of FFCV's ~4.6 s of numba compiling at `import ffcv`, and
the core installs without FFCV. Stock FFCV reads what `write_beton_file` writes, and `BetonFile` reads what
FFCV's own `DatasetWriter` writes (tests/test_beton_format.py shows both on real data).

The layout, as ffcv/types.py, writer.py and memory_allocator.py define it:

    header | field descriptors | metadata (one struct per sample) | zeros up to the first page boundary |
    pages of `page_size` bytes, each record whole inside one page | allocation table (sample_id, ptr, size)

The header's `alloc_table_ptr` points at the table. Only the fields the converters write are supported:
IntField (labels), RGBImageField (raw pixels or JPEG, record by record) and NDArrayField (uint8 grey images).

FFCV's writer fills pages from several processes at once, so its record layout differs from run to run.
`write_beton_file` lays records out in sample order, as FFCV's writer with one worker does; encoding may run
on many threads, but the bytes are the same for any number of them, so a file's sha256 names its dataset.

Every number the reader takes from a file (counts, offsets, sizes, field types and arguments, image sizes and
modes) is checked against the file's size and the format before it is used: a damaged or crafted file is
refused with one line naming it, never read past its end, and never makes the reader allocate more than
the file's own records would decode to.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NoReturn

import numpy as np
from PIL import Image, UnidentifiedImageError

from beton_trainer.common.errors import UserError

__all__ = ["ALLOC", "BetonFile", "CONVERT_AGAIN", "CONVERT_HINT", "FIELD", "HEADER", "MAX_PIXELS", "NDARRAY_ARGS",
           "encode_jpeg", "jpeg_frame_size", "metadata_type", "page_size_for", "write_beton_file"]

VERSION = 2
HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"), ("num_samples", "<u8"),
                   ("alloc_table_ptr", "<u8")], align=True)
FIELD = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True)
ALLOC = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
NDARRAY_ARGS = np.dtype([("shape", "<u8", 32), ("type_length", "<u8")])
RGB_META = np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])
INT_FIELD, RGB_FIELD, NDARRAY_FIELD = 1, 2, 4  # FFCV's type ids (ffcv/types.py TYPE_ID_HANDLER)
FIELD_NAMES = {INT_FIELD: "IntField", RGB_FIELD: "RGBImageField", NDARRAY_FIELD: "NDArrayField"}
JPG_MODE, RAW_MODE = 0, 1  # ffcv.fields.rgb_image.IMAGE_MODES
MIN_PAGE_SIZE, MAX_PAGE_SIZE = 1 << 21, 1 << 32  # ffcv.writer's bounds; page sizes are powers of two
MAX_FIELDS = 64
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's bomb threshold, the converter's --max-pixels default (crop_decode.c too)
CONVERT_HINT = "create it with `beton-convert <dataset> --src PATH --out DIR`"
CONVERT_AGAIN = "convert the dataset again with --force"
ENCODE_CHUNK = 1024  # records encoded per batch of threads: memory stays bounded for any split size


def metadata_type(type_ids: Sequence[int]) -> np.dtype:
    """One sample's metadata struct: each field's own struct in order, aligned (ffcv.types.get_metadata_type)."""
    per_field = {INT_FIELD: np.dtype("<i8"), RGB_FIELD: RGB_META, NDARRAY_FIELD: np.dtype("<u8")}
    return np.dtype([("", per_field[t]) for t in type_ids], align=True)


class BetonFile:
    """Random access to the records of one `.beton` holding an `image` field and integer `label` fields.

    Raises UserError when the file is missing, truncated, not a .beton, or holds anything the format or
    this project's converters do not allow.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"dataset file {self.path} is missing; {CONVERT_HINT}")
        size = self.path.stat().st_size
        if size < HEADER.itemsize:
            self._refuse(f"{size} bytes, shorter than a header")
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        header = self._data[:HEADER.itemsize].view(HEADER)[0]
        if int(header["version"]) != VERSION:
            self._refuse(f"format version {int(header['version'])}, not FFCV's {VERSION}")
        num_fields, n = int(header["num_fields"]), int(header["num_samples"])
        page_size, table_ptr = int(header["page_size"]), int(header["alloc_table_ptr"])
        if not 1 <= num_fields <= MAX_FIELDS:
            self._refuse(f"{num_fields} fields")
        if page_size & (page_size - 1) or not MIN_PAGE_SIZE <= page_size < MAX_PAGE_SIZE:
            self._refuse(f"page size {page_size}, not a power of two in [2 MiB, 4 GiB)")
        fields_end = HEADER.itemsize + num_fields * FIELD.itemsize
        if fields_end > size:
            self._refuse(f"its {num_fields} field descriptors end past the file's {size:,} bytes")
        fields = self._data[HEADER.itemsize:fields_end].view(FIELD)
        self._names = [self._field_name(f["name"]) for f in fields]
        type_ids = [int(t) for t in fields["type_id"]]
        self._check_fields(type_ids)
        meta_type = metadata_type(type_ids)
        meta_end = fields_end + n * meta_type.itemsize
        if not meta_end <= table_ptr <= size or (size - table_ptr) % ALLOC.itemsize:
            self._refuse(f"header claims {n:,} samples and a table at byte {table_ptr:,} in a file of {size:,}")
        self.num_samples = n
        self.page_size = page_size
        self._meta = self._data[fields_end:meta_end].view(meta_type)
        self._columns = {name: self._meta[f"f{k}"] for k, name in enumerate(self._names)}
        image_type = type_ids[self._names.index("image")]
        table = self._data[table_ptr:].view(ALLOC)
        self._data_start = -(-meta_end // page_size) * page_size if n else meta_end
        self._check_table(table, table_ptr)
        if image_type == NDARRAY_FIELD:
            self.storage = "ndarray"
            self.shape = self._ndarray_shape(fields[self._names.index("image")]["arguments"])
            self._ptrs = self._record_pointers(self._columns["image"], table_ptr)
            self._sizes = self._allocated_sizes(table)
            if np.any(self._sizes != int(np.prod(self.shape))):
                self._refuse(f"an image record's size differs from its field's shape {self.shape}")
            self._hw = np.tile(np.asarray(self.shape[:2], dtype=np.int64), (n, 1))
        else:
            image = self._columns["image"]
            mode = image["mode"]
            if np.any(mode > RAW_MODE):
                self._refuse(f"record {int(np.argmax(mode > RAW_MODE))} has image mode {int(mode.max())}")
            self._jpg = mode == JPG_MODE
            self.storage = "jpg" if self._jpg.any() else "raw"
            self._ptrs = self._record_pointers(image["data_ptr"], table_ptr)
            self._hw = np.stack([image["height"], image["width"]], axis=1).astype(np.int64)
            self._sizes = self._allocated_sizes(table)
            self._check_rgb_sizes()

    def _refuse(self, detail: str) -> NoReturn:
        raise UserError(f"{self.path} is truncated or not a .beton file ({detail}); {CONVERT_AGAIN}")

    def _field_name(self, raw: np.ndarray) -> str:
        try:
            return raw.tobytes().split(b"\0")[0].decode("ascii")
        except UnicodeDecodeError:
            self._refuse("a field name is not ASCII")

    def _check_fields(self, type_ids: list[int]) -> None:
        """Field types FFCV knows and this project writes; an image field and integer labels."""
        for name, type_id in zip(self._names, type_ids):
            if type_id not in FIELD_NAMES:
                raise UserError(f"{self.path}: field '{name}' has type id {type_id}, which this project does not "
                                f"read (it writes {', '.join(FIELD_NAMES.values())}); {CONVERT_AGAIN}")
        if len(set(self._names)) != len(self._names):
            self._refuse(f"repeated field names {self._names}")
        fields = dict(zip(self._names, type_ids))
        if (fields.get("image") not in (RGB_FIELD, NDARRAY_FIELD) or fields.get("label") != INT_FIELD
                or fields.get("coarse_label", INT_FIELD) != INT_FIELD):
            kinds = ", ".join(f"{n} ({FIELD_NAMES[t]})" for n, t in fields.items())
            raise UserError(f"{self.path} has fields {kinds}, not an image field and an integer label; "
                            f"{CONVERT_HINT}")

    def _ndarray_shape(self, args: np.ndarray) -> tuple[int, ...]:
        """The shape an NDArrayField's arguments give; uint8 only, as the converters write grey images."""
        head = args[:NDARRAY_ARGS.itemsize].view(NDARRAY_ARGS)[0]
        type_length = int(head["type_length"])
        if type_length > len(args) - NDARRAY_ARGS.itemsize:
            self._refuse(f"an array field's type takes {type_length:,} bytes")
        try:
            descr = json.loads(args[NDARRAY_ARGS.itemsize:NDARRAY_ARGS.itemsize + type_length].tobytes())
        except (UnicodeDecodeError, json.JSONDecodeError):
            self._refuse("an array field's type is not readable")
        if descr != [["", "|u1"]]:
            raise UserError(f"{self.path}: the image field holds {descr!r}, but this project reads uint8 images; "
                            f"{CONVERT_AGAIN}")
        shape = [int(d) for d in head["shape"]]
        while shape and shape[-1] == 0:
            shape.pop()
        if len(shape) != 3 or shape[2] not in (1, 3) or min(shape) < 1 or shape[0] * shape[1] > MAX_PIXELS:
            self._refuse(f"image shape {shape}, not (height, width, 1 or 3) within {MAX_PIXELS:,} pixels")
        return tuple(shape)

    def _record_pointers(self, pointers: np.ndarray, table_ptr: int) -> np.ndarray:
        """Each record's data pointer as int64, after refusing one past the data (a pointer from 2^63 up would
        turn negative as int64, so it is named as the file states it)."""
        past = pointers >= table_ptr
        if np.any(past):
            i = int(np.argmax(past))
            self._refuse(f"record {i} points at byte {int(pointers[i]):,}, past the data (which ends at byte "
                         f"{table_ptr:,})")
        return pointers.astype(np.int64)

    def _check_table(self, table: np.ndarray, table_ptr: int) -> None:
        """Every allocation lies in the data region, before the table, and belongs to a sample."""
        if not len(table):
            if self.num_samples:
                self._refuse(f"{self.num_samples:,} samples but an empty allocation table")
            return
        ptrs, sizes = table["ptr"], table["size"]
        if (int(ptrs.min()) < self._data_start or int(sizes.max()) > table_ptr
                or np.any(ptrs > table_ptr - sizes) or int(table["sample_id"].max()) >= self.num_samples):
            self._refuse("its allocation table points outside the data")

    def _allocated_sizes(self, table: np.ndarray) -> np.ndarray:
        """Each image's byte count, looked up in the allocation table by its data pointer (as FFCV reads)."""
        order = np.argsort(table["ptr"], kind="stable")
        ptrs, sizes = table["ptr"][order].astype(np.int64), table["size"][order].astype(np.int64)
        if not len(ptrs):
            return np.zeros(0, dtype=np.int64)
        where = np.minimum(np.searchsorted(ptrs, self._ptrs), len(ptrs) - 1)
        missing = ptrs[where] != self._ptrs
        if np.any(missing):
            self._refuse(f"record {int(np.argmax(missing))} points at byte {int(self._ptrs[missing][0]):,}, "
                         "which no allocation holds")
        found = sizes[where]
        if np.any(found < 1):
            self._refuse(f"record {int(np.argmax(found < 1))} is empty")
        return found

    def _check_rgb_sizes(self) -> None:
        """Heights and widths of at least one pixel and within MAX_PIXELS; raw records of h x w x 3 bytes."""
        h, w = self._hw[:, 0], self._hw[:, 1]
        bad = (h < 1) | (w < 1) | (h * w > MAX_PIXELS)
        if np.any(bad):
            i = int(np.argmax(bad))
            self._refuse(f"record {i} claims {h[i]}x{w[i]} pixels (at least 1x1, at most {MAX_PIXELS:,})")
        wrong = ~self._jpg & (self._sizes != h * w * 3)
        if np.any(wrong):
            i = int(np.argmax(wrong))
            self._refuse(f"record {i} holds {self._sizes[i]:,} bytes for {h[i]}x{w[i]} raw pixels")

    def check_jpeg_headers(self) -> None:
        """Every JPEG record starts as a JPEG and its frame header states the height and width the metadata does.

        Reads only each record's first markers (not a decode; ~5 us a record here): a backend that decodes in
        its own code (FFCV's workers, which ignore decoder errors) then never decodes a record whose size or
        kind is a lie.
        """
        if self.storage != "jpg":
            return
        data = memoryview(self._data)  # a plain buffer: slicing a np.memmap costs several times more
        ptrs, sizes, hw = self._ptrs.tolist(), self._sizes.tolist(), self._hw.tolist()
        for i in np.flatnonzero(self._jpg).tolist():
            size = jpeg_frame_size(data[ptrs[i]:ptrs[i] + sizes[i]])
            want = tuple(hw[i])
            if size != want:
                found = "no JPEG frame header" if size is None else f"a {size[0]}x{size[1]} JPEG"
                raise UserError(f"{self.path}: record {i} holds {found}, but the file says {want[0]}x{want[1]}; "
                                f"{CONVERT_AGAIN}")

    def __len__(self) -> int:
        return self.num_samples

    def has_field(self, name: str) -> bool:
        return name in self._columns

    def labels(self, name: str = "label") -> np.ndarray:
        """An integer field (label, coarse_label) as an int64 array."""
        return np.asarray(self._columns[name], dtype=np.int64).copy()

    def sizes(self) -> np.ndarray:
        """Each record's (height, width), as stored."""
        return self._hw.copy()

    def pointers(self) -> np.ndarray:
        """Each record's byte offset in the file (checked against the allocation table), int64."""
        return self._ptrs.copy()

    def record_sizes(self) -> np.ndarray:
        """Each record's stored byte count (checked against the allocation table), int64."""
        return self._sizes.copy()

    def jpeg_records(self) -> np.ndarray:
        """Whether each record is stored as JPEG bytes (bool; else pixels, and all False for ndarray storage)."""
        return self._jpg.copy() if self.storage != "ndarray" else np.zeros(self.num_samples, dtype=bool)

    def mapped(self) -> np.ndarray:
        """The whole file as mapped, read-only uint8: record i is bytes [pointers()[i], pointers()[i] +
        record_sizes()[i]). For a compiled reader handed one buffer for many records."""
        return self._data

    def stored_bytes(self, i: int) -> np.ndarray:
        """Sample i's image exactly as stored (pixels, or JPEG bytes): a read-only view into the file."""
        return self._data[self._ptrs[i]:self._ptrs[i] + self._sizes[i]]

    def is_jpeg(self, i: int) -> bool:
        """Whether sample i is stored as JPEG bytes (else as pixels; a mixed-mode file holds both)."""
        return self.storage != "ndarray" and bool(self._jpg[i])

    def image(self, i: int) -> np.ndarray:
        """Sample i as uint8 (H, W, C); a read-only view into the file for raw and ndarray storage."""
        buf = self.stored_bytes(i)
        if self.storage == "ndarray":
            return buf.reshape(self.shape)
        h, w = (int(v) for v in self._hw[i])
        if self._jpg[i]:
            return self._decode_jpeg(i, buf, h, w)
        return buf.reshape(h, w, 3)

    def _decode_jpeg(self, i: int, buf: np.ndarray, h: int, w: int) -> np.ndarray:
        """Decode record i's JPEG, refusing one that is damaged or not the h x w the metadata states (checked
        from its header before any pixel is decoded)."""
        try:
            with Image.open(io.BytesIO(buf.tobytes()), formats=["JPEG"]) as img:
                if img.size != (w, h):
                    raise UserError(f"{self.path}: record {i}'s JPEG is {img.size[0]}x{img.size[1]} pixels but "
                                    f"the file says {w}x{h}; {CONVERT_AGAIN}")
                return np.asarray(img.convert("RGB"))
        except UnidentifiedImageError:
            raise UserError(f"{self.path}: record {i} is not a readable JPEG (no JPEG header); "
                            f"{CONVERT_AGAIN}") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise UserError(f"{self.path}: record {i} is not a readable JPEG ({exc}); {CONVERT_AGAIN}") from None

    def image_shape(self) -> tuple[int, int, int]:
        """The (H, W, C) every record shares; a UserError when sizes vary (the tensor backend needs one)."""
        if self.storage == "ndarray":
            return self.shape
        if self.num_samples and np.any(self._hw != self._hw[0]):
            sizes = np.unique(self._hw, axis=0)
            raise UserError(f"{self.path} holds images of {len(sizes)} sizes (e.g. {sizes[0][0]}x{sizes[0][1]} and "
                            f"{sizes[-1][0]}x{sizes[-1][1]}), but the tensor loader needs one image size; convert "
                            "again with --max-side N (--force) if they share an aspect ratio, else resize them "
                            "to one size first, or use the ffcv loader")
        return (*(int(v) for v in self._hw[0]), 3) if self.num_samples else (0, 0, 3)

    def read_into(self, start: int, out: np.ndarray) -> None:
        """Records start, start + 1, ... into `out` (k, H, W, C) uint8, C-contiguous. Stored pixels are read with
        one read per run of records lying back to back in the file (no per-record Python work, and no file
        pages mapped into the process); JPEG records are decoded one by one."""
        stop = start + len(out)
        if self.storage == "jpg":  # JPEG records (and, in a mixed file, raw ones) one by one
            for i in range(start, stop):
                out[i - start] = self.image(i)
            return
        flat = out.reshape(-1)
        size = flat.size // max(len(out), 1)
        ptrs = self._ptrs[start:stop]
        breaks = np.flatnonzero(ptrs[1:] != ptrs[:-1] + size) + 1
        bounds = np.concatenate([[0], breaks, [len(ptrs)]]) if len(ptrs) else np.zeros(1, dtype=np.int64)
        with open(self.path, "rb", buffering=0) as fh:
            for a, b in zip(bounds[:-1], bounds[1:]):
                fh.seek(int(ptrs[a]))
                view, done = memoryview(flat[a * size:b * size]), 0
                while done < len(view):
                    got = fh.readinto(view[done:])
                    if not got:
                        self._refuse(f"it ends inside record {start + a}")
                    done += got

    def images(self) -> np.ndarray:
        """All samples stacked into one (N, H, W, C) array; they must share one shape."""
        out = np.empty((self.num_samples, *self.image_shape()), dtype=np.uint8)
        self.read_into(0, out)
        return out

    def chunks(self, size: int = 4096) -> Iterator[tuple[int, np.ndarray]]:
        """(first index, (k, H, W, C) records) for consecutive chunks of at most `size` records, read into one
        reused buffer (valid until the next chunk): a split reaches the device without a whole copy on the host."""
        shape = self.image_shape()
        buffer = np.empty((min(size, self.num_samples), *shape), dtype=np.uint8)
        for start in range(0, self.num_samples, size):
            part = buffer[:min(size, self.num_samples - start)]
            self.read_into(start, part)
            yield start, part


SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start of frame (not DHT, JPG, DAC)


def jpeg_frame_size(data: memoryview, prefix: int = 2048) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header, walking its markers from the start; None if there is none
    before the data ends or a marker is malformed. Only a prefix is copied (the frame header follows a few
    small tables in the JPEGs this project writes); a larger one is tried when metadata comes first."""
    buf = bytes(data[:prefix])
    if buf[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 <= len(buf):
        if buf[i] != 0xFF:
            return None
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in SOF_MARKERS:
            return (buf[i + 5] << 8 | buf[i + 6], buf[i + 7] << 8 | buf[i + 8])
        elif marker == 0xDA or marker == 0xD9:  # a scan or the end before any frame header
            return None
        else:
            i += 2 + (buf[i + 2] << 8 | buf[i + 3])
    if len(buf) == prefix < len(data) and prefix < 1 << 20:
        return jpeg_frame_size(data, prefix * 16)
    return None


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    """(H, W, 3) uint8 RGB as baseline JPEG (4:2:0) of `quality`: deterministic for given pixels."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels), "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def page_size_for(largest_record: int) -> int:
    """A page size that holds the largest record (FFCV never splits one across pages): a power of two,
    at least FFCV's 2 MiB minimum."""
    return max(MIN_PAGE_SIZE, 1 << int(largest_record).bit_length())


def write_beton_file(path: str | Path, images: Sequence[np.ndarray], int_fields: dict[str, np.ndarray], *,
                     jpeg: np.ndarray, quality: int = 90, workers: int = 1, page_size: int,
                     progress: Callable[[int], None] | None = None) -> None:
    """Write `path` (overwriting it): field `image`, then each of `int_fields` (name -> int array) in order.

    Images of one channel are stored as a fixed-shape uint8 NDArrayField (they must share one shape); RGB
    images as an RGBImageField, record i as JPEG of `quality` where `jpeg[i]`, else as raw pixels. JPEG
    encoding runs on `workers` threads; the bytes written do not depend on it. `progress(k)` is called as k
    more records are written.
    """
    n = len(images)
    grey = n > 0 and images[0].shape[-1] == 1
    type_ids = [NDARRAY_FIELD if grey else RGB_FIELD] + [INT_FIELD] * len(int_fields)
    names = ["image", *int_fields]
    meta_type = metadata_type(type_ids)
    meta = np.zeros(n, dtype=meta_type)
    for k, values in enumerate(int_fields.values(), start=1):
        meta[f"f{k}"] = values
    descriptors = np.zeros(len(names), dtype=FIELD)
    for k, (name, type_id) in enumerate(zip(names, type_ids)):
        encoded = name.encode("ascii")[:16]
        descriptors[k]["type_id"] = type_id
        descriptors[k]["name"][:len(encoded)] = np.frombuffer(encoded, dtype=np.uint8)
    if grey:
        descriptors[0]["arguments"][:] = _ndarray_arguments(tuple(images[0].shape))
    fields_end = HEADER.itemsize + descriptors.nbytes
    meta_end = fields_end + meta.nbytes
    data_start = -(-meta_end // page_size) * page_size if n else meta_end
    table = np.zeros(n, dtype=ALLOC)
    with open(path, "wb") as fh:
        fh.write(b"\0" * data_start)
        page, used, pages = np.zeros(page_size, dtype=np.uint8), 0, 0
        for i, record in enumerate(_records(images, jpeg, quality, workers, progress)):
            if len(record) > page_size:
                raise UserError(f"record {i} takes {len(record):,} bytes, more than a {page_size:,}-byte page; "
                                "convert it with a smaller --max-side")
            if pages == 0 or len(record) > page_size - used:
                if pages:
                    fh.write(page.tobytes())
                page[:], used, pages = 0, 0, pages + 1
            ptr = data_start + (pages - 1) * page_size + used
            page[used:used + len(record)] = np.frombuffer(record, dtype=np.uint8)
            used += len(record)
            table[i] = (i, ptr, len(record))
            if grey:
                meta["f0"][i] = ptr
            else:
                h, w = images[i].shape[:2]
                meta["f0"][i] = (JPG_MODE if jpeg[i] else RAW_MODE, w, h, ptr)
        if pages:
            fh.write(page.tobytes())
        table_ptr = fh.tell()
        fh.write(table.tobytes())
        header = np.zeros(1, dtype=HEADER)
        header[0] = (VERSION, len(names), page_size, n, table_ptr)
        fh.seek(0)
        fh.write(header.tobytes() + descriptors.tobytes() + meta.tobytes())


def _ndarray_arguments(shape: tuple[int, ...]) -> np.ndarray:
    """NDArrayField.to_binary for a uint8 array of `shape`: the shape, then the dtype's JSON description."""
    head = np.zeros(1, dtype=NDARRAY_ARGS)
    head["shape"][0][:len(shape)] = shape
    descr = json.dumps(np.dtype("uint8").descr).encode("ascii")
    head["type_length"][0] = len(descr)
    args = np.zeros(FIELD["arguments"].shape[0], dtype=np.uint8)
    packed = np.concatenate([head.view(np.uint8), np.frombuffer(descr, dtype=np.uint8)])
    args[:len(packed)] = packed
    return args


def _records(images: Sequence[np.ndarray], jpeg: np.ndarray, quality: int, workers: int,
             progress: Callable[[int], None] | None) -> Iterator[bytes]:
    """Each image's stored bytes in sample order: JPEG encoded on `workers` threads (Pillow releases the GIL
    while encoding), chunk by chunk, or the raw pixels."""
    def stored(i: int) -> bytes:
        pixels = images[i]
        return encode_jpeg(pixels, quality) if jpeg[i] else np.ascontiguousarray(pixels).tobytes()

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in range(0, len(images), ENCODE_CHUNK):
            chunk = range(start, min(start + ENCODE_CHUNK, len(images)))
            yield from (pool.map(stored, chunk) if workers > 1 and jpeg[chunk].any() else map(stored, chunk))
            if progress:
                progress(len(chunk))
