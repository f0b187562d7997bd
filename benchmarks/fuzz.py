"""Seeded fuzzing of everything that reads bytes a stranger may have written: `python -m benchmarks.fuzz
--cases N [--jpeg-cases M] [--seed S] [--kind jpeg|beton|convert|all] [--no-sanitize]`.

Three kinds of case, each derived from (seed, kind, case number) alone, so any failure reproduces with
`--case K`:
- jpeg: a mutated JPEG (bit flips, truncation, spliced or dropped segments, a frame header claiming other
  sizes or components) and a crop of it, some with hostile arguments, through the C crop decoder
  (pipelines/crop_decode.c), with guard bytes around the output buffers, decoded twice (the second time
  after another image: the result must not change), then the area resize, also with hostile bounds, then
  crop_batch (the photo backend's call) over it and a raw record, with boxes, sizes, offsets or lengths that are
  hostile one time in five.
- beton: a converted dataset (raw RGB, JPEG photos, single-channel arrays) with its .beton and manifest.json
  mutated, through `pipelines.dataset.open_split` and every installed backend's constructor and first batch.
- convert: a hostile source (a mutated or crafted CIFAR pickle, among them lists that expand when walked and
  labels of the wrong type; an IDX file, gzip, or ImageFolder tarball with unsafe members, non-images and bombs)
  through `convert.build.convert_dataset`.
- photo: a converted set of JPEG photos of varied sizes with 1-3 records mutated in place (bytes of their
  entropy-coded data changed, or as the jpeg cases mutate, then cut or zero-filled to the record's length, so
  the file stays well formed) or their stored height and width changed, through every decoder of the photo backend
  (`pipelines.photo_loader`: the compiled one where built, Pillow, and the device path run on the CPU), every batch
  of an epoch, with the page checksums off (they would refuse every case before a decoder saw it, as for a set
  converted from damaged files, whose checksums match); a refusal must name a mutated record.

Each case must end refused (UserError, or -1 from the decoder) or in a result that passes the checks here:
never another exception ("wrong"), garbage ("wrong"), a crash or a hang. Cases run in child processes, so a
crash or a hang costs one case: the child is restarted after it. The peak RSS is the largest of the children.
The jpeg cases run on the decoder built with -fsanitize=address,undefined where gcc has libasan (so an
out-of-bounds access or undefined behaviour is a crash, not luck), else on the built one (`--no-sanitize`).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import pickle
import platform
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import warnings
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("jpeg", "beton", "convert", "photo")
OUTCOMES = ("ok", "refused", "wrong", "crash", "hang")
# per case; the first also pays imports and JITs
TIMEOUT_S = {"jpeg": 10.0, "beton": 60.0, "convert": 60.0, "photo": 60.0}
GUARD = 64  # guard bytes each side of every buffer the decoder writes
GUARD_BYTE = 0xA5
MAX_CAPACITY = 8 << 20  # the decoder's output buffer, at most
REPRODUCE = False  # --case: an exception other than UserError propagates, with its traceback


@dataclass
class Report:
    """What one kind's run found: outcome counts, the failures (case, outcome, detail) and the peak RSS."""

    kind: str
    seed: int
    cases: int = 0
    counts: Counter = field(default_factory=Counter)
    failures: list[tuple[int, str, str]] = field(default_factory=list)
    peak_rss_mib: float = 0.0
    seconds: float = 0.0
    skipped: str = ""  # why the kind did not run (the decoder is not built, ...)
    sanitized: bool = False  # jpeg: the decoder ran under ASan/UBSan

    def row(self) -> str:
        counts = " | ".join(f"{self.counts[o]:,}" for o in OUTCOMES)
        kind = f"{self.kind} (ASan/UBSan)" if self.sanitized else self.kind
        return f"| {kind} | {self.cases:,} | {counts} | {self.peak_rss_mib:,.0f} | {self.seconds:.0f} |"


# ---- the parent: children, timeouts, crashes ----

def fuzz(kind: str, cases: int, seed: int, *, workdir: Path, sanitize: bool = False,
         timeout: float | None = None, first: int = 0, library: Path | None = None) -> Report:
    """Run cases [first, first + cases) of `kind` in child processes; a crash or hang is one case's outcome.
    `library`: the jpeg cases' decoder, instead of the built one."""
    report = Report(kind, seed)
    start_time = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    extra: list[str] = []
    if kind == "jpeg":
        if library is None and sanitize:
            library = sanitized_library(workdir, env)
            report.sanitized = library is not None
        library = library or built_library()
        if library is None:
            report.skipped = "the crop decoder is not built (python setup.py build_ext --inplace)"
            return report
        extra = ["--library", str(library)]
    else:
        prepare(kind, workdir, seed)
    case, stop = first, first + cases
    while case < stop:
        case = _child_run(kind, case, stop, seed, workdir, extra, env, timeout or TIMEOUT_S[kind], report)
    report.cases = sum(report.counts.values())
    report.seconds = time.perf_counter() - start_time
    return report


def _child_run(kind: str, case: int, stop: int, seed: int, workdir: Path, extra: list[str], env: dict,
               timeout: float, report: Report) -> int:
    """One child running cases from `case` until it finishes, crashes or hangs; the next case to run."""
    stderr_path = workdir / f"{kind}-stderr.txt"
    command = [sys.executable, "-m", "benchmarks.fuzz", "--child", kind, "--seed", str(seed), "--workdir",
               str(workdir), "--first", str(case), "--cases", str(stop - case), *extra]
    with open(stderr_path, "w") as stderr:
        child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr,
                                 start_new_session=True)
    current, buffer, deadline = None, b"", time.monotonic() + 2 * timeout  # the first case also imports
    fd = child.stdout.fileno()
    while True:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        if not ready:  # a hang: kill the child's whole group, count the case, go on after it
            os.killpg(child.pid, signal.SIGKILL)
            _reap(child, report)
            _record(report, current if current is not None else case, "hang", f"no result in {timeout:.0f} s")
            return (current if current is not None else case) + 1
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            words = line.decode(errors="replace").split(" ", 3)
            if words[0] == "start":
                current, deadline = int(words[1]), time.monotonic() + timeout
            elif words[0] == "end":
                _record(report, int(words[1]), words[2], words[3] if len(words) > 3 else "")
                current = None
    status = _reap(child, report)
    if current is not None:  # died inside a case
        tail = stderr_path.read_text(errors="replace").strip().splitlines()[-3:]
        _record(report, current, "crash", f"exit status {status}: {' / '.join(tail)}"[:400])
        return current + 1
    if status != 0 and report.cases == 0 and not report.counts:
        raise RuntimeError(f"the {kind} fuzz child failed before any case: {stderr_path.read_text()[-2000:]}")
    return stop


def _reap(child: subprocess.Popen, report: Report) -> int:
    """Wait for the child; its own peak RSS counts towards the report's. Returns its exit status."""
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    child.stdout.close()
    report.peak_rss_mib = max(report.peak_rss_mib, usage.ru_maxrss / 1024)
    return child.returncode


def _record(report: Report, case: int, outcome: str, detail: str) -> None:
    report.counts[outcome] += 1
    if outcome not in ("ok", "refused"):
        report.failures.append((case, outcome, detail))


# ---- the child: one case after another, reporting each on stdout ----

def child_main(kind: str, seed: int, workdir: Path, first: int, cases: int, library: str | None) -> None:
    """Run cases, printing `start K` before and `end K outcome detail` after each (the parent's protocol)."""
    warnings.simplefilter("ignore")
    run = _case_runner(kind, workdir, library)
    for case in range(first, first + cases):
        print(f"start {case}", flush=True)
        outcome, detail = run(case_rng(seed, kind, case))
        print(f"end {case} {outcome} {detail}".replace("\n", " "), flush=True)


def case_rng(seed: int, kind: str, case: int) -> np.random.Generator:
    """Each case's generator: from the seed, the kind and the case number alone."""
    return np.random.default_rng([seed, KINDS.index(kind), case])


def _case_runner(kind: str, workdir: Path, library: str | None) -> Callable[[np.random.Generator], tuple[str, str]]:
    if kind == "jpeg":
        return JpegCases(Path(library)).run
    if kind == "beton":
        return BetonCases(workdir).run
    if kind == "photo":
        return PhotoCases(workdir).run
    return ConvertCases(workdir).run


def guarded(run: Callable[[np.random.Generator], tuple[str, str]]) -> Callable[[np.random.Generator],
                                                                              tuple[str, str]]:
    """A case function whose UserError is a refusal and any other exception is wrong (with where it came from)."""
    from beton_trainer.common.errors import UserError

    def case(rng: np.random.Generator) -> tuple[str, str]:
        try:
            return run(rng)
        except UserError as exc:
            message = str(exc)
            return ("wrong", f"a UserError of {message.count(chr(10)) + 1} lines: {message[:200]}") if "\n" in message \
                else ("refused", message[:200])
        except Exception as exc:  # the finding: anything but UserError
            if REPRODUCE:
                raise
            where = traceback.extract_tb(exc.__traceback__)[-1]
            return "wrong", f"{type(exc).__name__}: {str(exc)[:160]} at {Path(where.filename).name}:{where.lineno}"
    return case


# ---- jpeg: the C crop decoder ----

def built_library() -> Path | None:
    """The crop decoder `setup.py build_ext` built next to pipelines/crop_decode.c, if any."""
    built = sorted((ROOT / "pipelines").glob("_crop_decode*.so"))
    return built[0] if built else None


def sanitized_library(workdir: Path, env: dict) -> Path | None:
    """crop_decode.c built with AddressSanitizer and UBSan (any finding aborts the child), and `env` set to
    preload libasan into the child's Python; None where gcc has no libasan."""
    libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not libasan or not Path(libasan).is_file():
        return None
    out = workdir / "_crop_decode_asan.so"
    build = subprocess.run(["gcc", "-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                            "-fno-sanitize-recover=all", "-shared", "-fPIC", str(ROOT / "pipelines/crop_decode.c"),
                            "-ljpeg", "-lm", "-o", str(out)], capture_output=True, text=True)
    if build.returncode != 0:
        return None
    env.update(LD_PRELOAD=str(Path(libasan).resolve()),
               ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:abort_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    return out


def jpeg_corpus() -> list[bytes]:
    """The images mutated: PIL's JPEGs of several sizes, subsamplings, progressive, greyscale, restart markers
    and optimized Huffman tables."""
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:200, 0:300]
    smooth = np.stack([(x * 0.8) % 256, (y * 1.2) % 256, ((x + y) * 0.5) % 256], axis=-1)
    options = [((37, 53), {}), ((64, 64), {"subsampling": 0}), ((96, 128), {"progressive": True}),
               ((200, 300), {"optimize": True}), ((48, 80), {"restart_marker_blocks": 2}),
               ((120, 90), {"progressive": True, "subsampling": 2, "quality": 50}), ((33, 17), {"subsampling": 1})]
    out = []
    for (h, w), save in options:
        pixels = np.clip(smooth[:h, :w] + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=save.pop("quality", 85), **save)
        out.append(buf.getvalue())
    grey = io.BytesIO()
    Image.fromarray(smooth[:70, :70, 0].astype(np.uint8)).save(grey, format="JPEG")
    return [*out, grey.getvalue()]


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment from SOI's end to the first SOS's end (the header)."""
    out, i = [], 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker, end = data[i + 1], i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
        out.append((marker, i, min(end, len(data))))
        if marker == 0xDA:
            break
        i = end
    return out


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from the frame header, if there is one."""
    for marker, start, end in jpeg_segments(data):
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and end - start >= 9:
            return int.from_bytes(data[start + 5:start + 7], "big"), int.from_bytes(data[start + 7:start + 9], "big")
    return None


INTERESTING = [0, 1, 2, 7, 8, 9, 15, 16, 17, 255, 256, 4096, 9459, 16384, 65500, 65535]


def mutate_jpeg(rng: np.random.Generator, data: bytes, other: bytes) -> bytes:
    """1-3 mutations of `data`: bit flips, bytes set, truncation, slices cut or repeated, a header segment
    dropped or corrupted, frame sizes changed, another image's body spliced in."""
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        segments = jpeg_segments(bytes(buf))
        header_end = segments[-1][2] if segments else min(len(buf), 600)
        op = int(rng.integers(10))
        if op == 0 and buf:  # bit flips, half of them in the header
            for _ in range(int(rng.integers(1, 9))):
                pos = int(rng.integers(header_end if rng.random() < 0.5 else len(buf)))
                buf[pos] ^= 1 << int(rng.integers(8))
        elif op == 1 and buf:
            for _ in range(int(rng.integers(1, 5))):
                buf[int(rng.integers(len(buf)))] = int(rng.choice([0, 0xFF, 0x7F, 0x80, 1, rng.integers(256)]))
        elif op == 2:
            buf = buf[:int(rng.integers(len(buf) + 1))]
        elif op == 3 and len(buf) > 4:
            a = int(rng.integers(len(buf)))
            b = min(len(buf), a + int(rng.integers(1, 64)))
            buf = buf[:a] + buf[b:] if rng.random() < 0.5 else buf[:b] + buf[a:b] + buf[b:]
        elif op == 4 and segments:  # drop one header segment
            _, start, end = segments[int(rng.integers(len(segments)))]
            buf = buf[:start] + buf[end:]
        elif op in (5, 6):  # the frame header: sizes, components, sampling factors, table numbers
            for marker, start, end in segments:
                if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and end - start >= 9:
                    if op == 5:
                        pos = start + 5 + 2 * int(rng.integers(2))
                        buf[pos:pos + 2] = int(rng.choice(INTERESTING)).to_bytes(2, "big")
                    else:
                        buf[start + 9 + int(rng.integers(max(end - start - 9, 1)))] = int(rng.integers(256))
                    break
        elif op == 7 and segments:  # inside a header segment (tables, scan parameters)
            _, start, end = segments[int(rng.integers(len(segments)))]
            if end - start > 4:
                buf[start + 4 + int(rng.integers(end - start - 4))] = int(rng.integers(256))
        elif op == 8:  # this image's header, another's body
            theirs = jpeg_segments(other)
            buf = buf[:header_end] + bytearray(other[theirs[-1][2]:] if theirs else other)
        elif op == 9:
            pos = int(rng.integers(len(buf) + 1))
            buf = buf[:pos] + bytearray(rng.integers(0, 256, int(rng.integers(1, 32)), dtype=np.uint8).tobytes()) \
                + buf[pos:]
    return bytes(buf)


class JpegCases:
    """The crop decoder, loaded straight from its library (no FFCV: a child starts in a fraction of a second)."""

    def __init__(self, library: Path):
        import ctypes

        self.lib = ctypes.CDLL(str(library))
        self.lib.decode_region.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64,
                                           *[ctypes.c_uint32] * 5, ctypes.c_void_p]
        self.lib.resize_area.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, *[ctypes.c_double] * 4,
                                         ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32]
        self.lib.crop_batch.argtypes = [ctypes.c_void_p, ctypes.c_uint64, *[ctypes.c_void_p] * 5, ctypes.c_int32,
                                        ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p]
        self.lib.decode_region.restype = self.lib.resize_area.restype = self.lib.crop_batch.restype = ctypes.c_int
        self.corpus = jpeg_corpus()

    def decode(self, data: bytes, args: tuple[int, ...], capacity: int) -> tuple[int, tuple, bytes] | str:
        """(status, region, pixels) of one guarded call, or what it did wrong."""
        src = np.frombuffer(data, dtype=np.uint8) if data else np.zeros(1, dtype=np.uint8)
        dst = np.full(capacity + 2 * GUARD, GUARD_BYTE, dtype=np.uint8)
        region = np.full(6 + 2 * 8, -7.25)
        status = self.lib.decode_region(src.ctypes.data, len(data), dst.ctypes.data + GUARD, capacity, *args,
                                        region.ctypes.data + 8 * 8)
        if (dst[:GUARD] != GUARD_BYTE).any() or (dst[GUARD + capacity:] != GUARD_BYTE).any():
            return "wrote outside its output buffer"
        if (region[:8] != -7.25).any() or (region[14:] != -7.25).any():
            return "wrote outside its region array"
        if status not in (0, -1):
            return f"returned {status}"
        bounds = tuple(float(v) for v in region[8:14])
        if status == -1:
            return status, (), b""
        rows, cols, y0, y1, x0, x1 = bounds
        if not (rows >= 1 and cols >= 1 and rows * cols * 3 <= capacity and 0 <= y0 < y1 <= rows
                and 0 <= x0 < x1 <= cols):
            return f"succeeded with an impossible region {bounds}"
        return status, bounds, dst[GUARD:GUARD + int(rows * cols * 3)].tobytes()

    def resize(self, src: np.ndarray, bounds: tuple[float, ...], out: tuple[int, int]) -> int | str:
        """resize_area's status for one guarded call (an output too large to allocate gets a one-pixel buffer:
        a correct call refuses it without writing), or what it did wrong."""
        size = min(max(out[0] * out[1] * 3, 0), MAX_CAPACITY)
        dst = np.full(size + 2 * GUARD, GUARD_BYTE, dtype=np.uint8)
        status = self.lib.resize_area(src.ctypes.data, src.shape[0], src.shape[1], *bounds,
                                      dst.ctypes.data + GUARD, *out)
        if (dst[:GUARD] != GUARD_BYTE).any() or (dst[GUARD + size:] != GUARD_BYTE).any():
            return "resize_area wrote outside its output"
        if status == -1 and (dst[GUARD:GUARD + size] != GUARD_BYTE).any():
            return "resize_area refused but wrote"
        return status

    def run(self, rng: np.random.Generator) -> tuple[str, str]:
        base = self.corpus[int(rng.integers(len(self.corpus)))]
        data = mutate_jpeg(rng, base, self.corpus[int(rng.integers(len(self.corpus)))])
        h, w = jpeg_size(data) or (int(rng.integers(1, 300)), int(rng.integers(1, 300)))
        denom = int(rng.choice([1, 1, 2, 4, 8]))
        if rng.random() < 0.15:  # hostile arguments
            args = tuple(int(rng.choice([0, 1, h, w, 2**31, 2**32 - 1, 2**32 - 8, int(rng.integers(2**32))]))
                         for _ in range(4)) + (int(rng.choice([0, 1, 2, 3, 5, 8, 16, 2**31])),)
        else:
            rh, rw = int(rng.integers(1, max(h, 1) + 1)), int(rng.integers(1, max(w, 1) + 1))
            args = (int(rng.integers(0, max(h - rh, 0) + 1)), int(rng.integers(0, max(w - rw, 0) + 1)), rh, rw, denom)
        need = (math.ceil(h / denom) + 2) * (math.ceil(w / denom) + 2) * 3
        capacity = min(need, MAX_CAPACITY) if rng.random() < 0.9 else int(rng.integers(1, 4096))
        first = self.decode(data, args, capacity)
        if isinstance(first, str):
            return "wrong", first
        other = self.corpus[int(rng.integers(len(self.corpus)))]
        oh, ow = jpeg_size(other)
        self.decode(other, (0, 0, oh, ow, 1), oh * ow * 3)  # a different image in between: no state may carry
        second = self.decode(data, args, capacity)
        if second != first:
            return "wrong", "decoded differently after another image"
        if (why := self.resizes(rng, first)) is not None:
            return "wrong", why
        if (why := self.batch(rng, data)) is not None:
            return "wrong", why
        return ("ok" if first[0] == 0 else "refused"), f"{len(data)} bytes, region {args}"

    def batch(self, rng: np.random.Generator, data: bytes) -> str | None:
        """crop_batch over the mutated JPEG and a raw record, one of whose offsets, lengths, sizes or box values is
        hostile one time in five: a status of 0 or -1 for each, their count returned, nothing written outside the
        output; with honest arguments the raw record's crop succeeds and equals resize_area's (a shrink) or
        `bilinear`'s (within one level)."""
        h, w = jpeg_size(data) or (int(rng.integers(1, 300)), int(rng.integers(1, 300)))
        rh, rw = int(rng.integers(1, 60)), int(rng.integers(1, 60))
        raw = rng.integers(0, 256, (rh, rw, 3), dtype=np.uint8)
        mapped = np.frombuffer(data + raw.tobytes(), dtype=np.uint8)
        offsets = np.array([0, len(data)], dtype=np.int64)
        lengths = np.array([len(data), raw.size], dtype=np.int64)
        sizes = np.array([[h, w], [rh, rw]], dtype=np.int64)
        boxes = np.array([random_box(rng, h, w), random_box(rng, rh, rw)], dtype=np.int64)
        out = (int(rng.integers(1, 80)), int(rng.integers(1, 80)))
        hostile = rng.random() < 0.2
        if hostile:
            target = [offsets, lengths, sizes.reshape(-1), boxes.reshape(-1)][int(rng.integers(4))]
            target[int(rng.integers(len(target)))] = int(rng.choice([-1, 0, 1, 2**31, 2**32 + 3, 2**62, -2**63,
                                                                     int(rng.integers(-1000, 100_000))]))
        size = out[0] * out[1] * 3
        dst = np.full(2 * size + 2 * GUARD, GUARD_BYTE, dtype=np.uint8)
        status = np.full(2 + 2, 7, dtype=np.int32)
        refused = self.lib.crop_batch(mapped.ctypes.data, mapped.size, offsets.ctypes.data, lengths.ctypes.data,
                                      np.array([1, 0], dtype=np.uint8).ctypes.data, sizes.ctypes.data,
                                      boxes.ctypes.data, 2, dst.ctypes.data + GUARD, *out, status.ctypes.data + 4)
        if (dst[:GUARD] != GUARD_BYTE).any() or (dst[GUARD + 2 * size:] != GUARD_BYTE).any():
            return "crop_batch wrote outside its output"
        if status[0] != 7 or status[3] != 7:
            return "crop_batch wrote outside its status array"
        if not set(status[1:3].tolist()) <= {0, -1} or refused != -int(status[1:3].sum()):
            return f"crop_batch returned {refused} with statuses {status[1:3].tolist()}"
        if hostile:
            return None
        if status[2] != 0:
            return f"crop_batch refused a raw {rh}x{rw} record's box {boxes[1].tolist()} to {out}"
        got = dst[GUARD + size:GUARD + 2 * size].reshape(*out, 3)
        top, left, ch, cw = boxes[1].tolist()
        if ch >= out[0] and cw >= out[1]:
            want = np.empty((*out, 3), dtype=np.uint8)
            self.lib.resize_area(raw.ctypes.data, rh, rw, float(top), float(top + ch), float(left), float(left + cw),
                                 want.ctypes.data, *out)
            if not np.array_equal(got, want):
                return f"crop_batch's area average of a raw record differs from resize_area's (box {boxes[1]})"
        elif np.abs(got.astype(int) - bilinear(raw[top:top + ch, left:left + cw], out)).max() > 1:
            return f"crop_batch's enlargement of a raw record is not bilinear (box {boxes[1].tolist()} to {out})"
        return None

    def resizes(self, rng: np.random.Generator, decoded: tuple[int, tuple, bytes]) -> str | None:
        """The area resize of a decoded crop (must succeed), and of a small array with hostile bounds (must
        succeed exactly when the bounds are a shrink inside it)."""
        status, bounds, pixels = decoded
        if status == 0 and bounds[3] - bounds[2] >= 1 and bounds[5] - bounds[4] >= 1:
            rows, cols, y0, y1, x0, x1 = bounds
            src = np.frombuffer(pixels, dtype=np.uint8).reshape(int(rows), int(cols), 3)
            out = (int(rng.integers(1, int(y1 - y0) + 1)), int(rng.integers(1, int(x1 - x0) + 1)))
            got = self.resize(src, (y0, y1, x0, x1), out)
            if got != 0:
                return f"resize_area of a decoded crop {bounds} to {out}: {got}"
        src = np.zeros((int(rng.integers(1, 40)), int(rng.integers(1, 40)), 3), dtype=np.uint8)
        special = [math.nan, math.inf, -math.inf, -0.5, 0.0, 1e300, -1e300]
        y0, y1, x0, x1 = (float(rng.choice(special)) if rng.random() < 0.3 else float(rng.uniform(-2, 42))
                          for _ in range(4))
        out = (int(rng.choice([0, 1, 2, 5, 2**31 - 1])), int(rng.choice([-1, 0, 1, 3, 7])))
        valid = (min(out) >= 1 and y0 >= 0 and y1 <= src.shape[0] and y1 - y0 >= out[0] and x0 >= 0
                 and x1 <= src.shape[1] and x1 - x0 >= out[1])
        got = self.resize(src, (y0, y1, x0, x1), out)
        if got != (0 if valid else -1):
            return f"resize_area({src.shape[:2]}, {(y0, y1, x0, x1)}, {out}) gave {got}"
        return None


def random_box(rng: np.random.Generator, h: int, w: int) -> tuple[int, int, int, int]:
    """A box (top, left, height, width) inside an h x w image, uniform in size and place (a one-pixel box at the
    origin of an image with no pixels)."""
    ch, cw = int(rng.integers(1, max(h, 1) + 1)), int(rng.integers(1, max(w, 1) + 1))
    return int(rng.integers(0, max(h - ch, 0) + 1)), int(rng.integers(0, max(w - cw, 0) + 1)), ch, cw


def bilinear(pixels: np.ndarray, out: tuple[int, int]) -> np.ndarray:
    """The (h, w, 3) `pixels` resized to `out` by bilinear interpolation at pixel centres, edges clamped (torch's
    interpolate with align_corners=False), in float64: the reference for crop_batch's enlargement."""
    def taps(n: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.maximum((np.arange(m) + 0.5) * (n / m) - 0.5, 0)
        k = np.minimum(x.astype(np.int64), n - 1)
        return k, np.minimum(k + 1, n - 1), x - k
    y0, y1, wy = taps(pixels.shape[0], out[0])
    x0, x1, wx = taps(pixels.shape[1], out[1])
    p = pixels.astype(np.float64)
    rows = p[y0] + wy[:, None, None] * (p[y1] - p[y0])
    return np.rint(rows[:, x0] + wx[None, :, None] * (rows[:, x1] - rows[:, x0]))


# ---- beton: converted datasets, mutated, through open_split and every backend ----

BASES = ("rgb", "photos", "mnist")


def prepare(kind: str, workdir: Path, seed: int) -> None:
    """The converted datasets the beton and photo cases mutate (once per work folder)."""
    if kind not in ("beton", "photo") or (workdir / "base" / "done").exists():
        return
    from beton_trainer.convert import convert_dataset

    base = workdir / "base"
    shutil.rmtree(base, ignore_errors=True)
    sources = base / "sources"
    quiet = dict(log=lambda _: None, workers=1)
    if kind == "photo":
        convert_dataset("imagefolder", write_photos(sources / "photos", seed), base / "photos", name="data",
                        encode="jpg", **quiet)
        (base / "done").touch()
        return
    convert_dataset("cifar10", write_cifar10(sources / "rgb", rows=40, seed=seed), base / "rgb", name="data",
                    **quiet)
    convert_dataset("imagefolder", write_photos(sources / "photos", seed), base / "photos", name="data",
                    encode="mix", **quiet)
    convert_dataset("mnist", write_mnist(sources / "mnist", seed), base / "mnist", name="data", **quiet)
    (base / "done").touch()


def write_cifar10(root: Path, rows: int, seed: int) -> Path:
    """A cifar-10-batches-py folder of `rows` random images per batch."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (rows, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, rows).tolist(), "batch_label": name}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}, protocol=2))
    return folder


def write_photos(root: Path, seed: int) -> Path:
    """An ImageFolder tree of small PNG photos of varied sizes (stored as JPEG or raw by --encode mix)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", 12), ("test", 6)):
        for i in range(n):
            path = root / split / f"class{i % 2}" / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            size = (int(rng.integers(40, 90)), int(rng.integers(40, 90)), 3)
            Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(path)
    return root


def idx(array: np.ndarray) -> bytes:
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_mnist(root: Path, seed: int, n: int = 40) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        (root / f"{prefix}-images-idx3-ubyte").write_bytes(idx(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)))
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(idx(rng.integers(0, 10, n, dtype=np.uint8)))
    return root


WEIRD_JSON = [None, -1, 0, 2**63, 1e308, float("nan"), "", "x" * 3, [], {}, [1, 2], True]


def mutate_manifest(rng: np.random.Generator, manifest: dict, split: str) -> None:
    """One change to the manifest: a key removed, or a value (top-level, or of the split) of another type."""
    target = manifest["splits"][split] if rng.random() < 0.5 else manifest
    key = str(rng.choice(sorted(target)))
    if rng.random() < 0.25:
        del target[key]
    elif key in ("mean", "std") and rng.random() < 0.5:
        target[key] = [float(rng.choice([math.nan, math.inf, 0.0, -1.0]))] * int(rng.integers(0, 4))
    elif key == "classes" and rng.random() < 0.5:
        target[key] = target[key][:int(rng.integers(0, 2))]
    elif key in ("count", "bytes") and rng.random() < 0.5:
        target[key] += int(rng.choice([-1, 1, -target[key]]))
    else:
        target[key] = WEIRD_JSON[int(rng.integers(len(WEIRD_JSON)))]


def mutate_beton(rng: np.random.Generator, data: bytes) -> bytes:
    """1-3 changes to a .beton: bits flipped or an 8-byte word (a pointer or a size, maybe) set to an extreme,
    in the header and field descriptions (the first 4 KiB), the allocation table (the last 4 KiB) or the
    records, or the file cut or extended."""
    buf = bytearray(data)
    extremes = [0, 1, 2**31, 2**32, 2**63 - 1, 2**64 - 1, len(buf), len(buf) + 1]
    nonzero = np.flatnonzero(np.frombuffer(data, dtype=np.uint8))  # the records (a .beton pads with zeros)

    def position() -> int:
        where = int(rng.integers(3))
        if where == 2 and len(nonzero):
            return min(int(nonzero[int(rng.integers(len(nonzero)))]), len(buf) - 1)
        return int(rng.integers(min(len(buf), 4096))) if where == 0 else max(len(buf) - 1 - int(rng.integers(4096)), 0)

    for _ in range(int(rng.integers(1, 4))):
        op = int(rng.integers(4))
        if op == 0 and buf:
            for _ in range(int(rng.integers(1, 9))):
                buf[position()] ^= 1 << int(rng.integers(8))
        elif op == 1 and len(buf) >= 8:
            pos = min(position() & ~7, len(buf) - 8)
            buf[pos:pos + 8] = extremes[int(rng.integers(len(extremes)))].to_bytes(8, "little")
        elif op == 2:
            buf = buf[:int(rng.integers(len(buf) + 1))]
        else:
            buf += bytes(int(rng.integers(1, 4096)))
    return bytes(buf)


class BetonCases:
    """Mutated copies of the base datasets through open_split and each installed backend."""

    def __init__(self, workdir: Path):
        import torch

        from beton_trainer.common.schema import from_dict
        from beton_trainer.pipelines.augment import AugmentSpec
        from tests.loader_helpers import installed

        torch.set_num_threads(1)
        self.workdir = workdir
        self.backends = [b for b, module in (("tensor", "torch"), ("ffcv", "ffcv"), ("dali", "nvidia.dali"))
                         if installed(module)]
        self.spec = from_dict(AugmentSpec, {})
        self.run = guarded(self._run)

    def _run(self, rng: np.random.Generator) -> tuple[str, str]:
        from beton_trainer.common.files import sha256_file
        from beton_trainer.format.beton import BetonFile
        from beton_trainer.format.integrity import page_checksums

        base = self.workdir / "base" / str(rng.choice(BASES)) / "data"
        data_dir = self.workdir / "case"
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.copytree(base, data_dir)
        split = str(rng.choice(["train", "test"]))
        manifest = json.loads((data_dir / "manifest.json").read_text())
        beton = data_dir / f"{split}.beton"
        what = []
        if rng.random() < 0.75:
            page_size = BetonFile(beton).page_size
            beton.write_bytes(mutate_beton(rng, beton.read_bytes()))
            what.append("beton")
            if rng.random() < 0.8:  # the manifest follows (size, sha256, pages), so the reader's own checks judge
                manifest["splits"][split].update(bytes=beton.stat().st_size, sha256=sha256_file(beton),
                                                 page_sha256=page_checksums(beton, page_size))
        if rng.random() < 0.5 or not what:
            mutate_manifest(rng, manifest, split)
            what.append("manifest")
        text = json.dumps(manifest)
        if rng.random() < 0.05:
            text = text[:int(rng.integers(len(text)))]
            what.append("json cut")
        (data_dir / "manifest.json").write_text(text)
        return self.check(data_dir, split, train=bool(rng.random() < 0.5), what="+".join(what))

    def check(self, data_dir: Path, split: str, *, train: bool, what: str) -> tuple[str, str]:
        """open_split and every backend's first batch: each refuses (UserError, raised to `guarded`) or gives
        data that is what a manifest promises."""
        import torch

        from beton_trainer.format.dataset import open_split
        from beton_trainer.pipelines import build_loader
        from beton_trainer.pipelines.base import LoaderOptions

        opened = open_split(data_dir, split)
        if (why := split_garbage(opened)) is not None:
            return "wrong", f"open_split ({what}): {why}"
        for backend in self.backends:
            options = LoaderOptions(data_dir=data_dir, split=split, batch_size=4, train=train, spec=self.spec,
                                    device=torch.device("cpu"), num_workers=1)
            images, labels = next(iter(build_loader(backend, options)))
            if (why := batch_garbage(images, labels, opened)) is not None:
                return "wrong", f"{backend} ({what}): {why}"
        return "ok", what


def split_garbage(split) -> str | None:
    """What is wrong with an opened split, judged against its own manifest; None if nothing."""
    manifest, images, labels = split.manifest, split.images, split.labels
    classes, mean, std = manifest.get("classes"), manifest.get("mean"), manifest.get("std")
    if not isinstance(classes, list) or not classes:
        return f"classes {str(classes)[:40]}"
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        return f"images {images.dtype} {images.shape}"
    if len(images) != len(labels) or len(labels) != manifest["splits"][split.name].get("count"):
        return f"{len(images)} images, {len(labels)} labels, count {manifest['splits'][split.name].get('count')}"
    if labels.dtype != np.int64 or (len(labels) and (labels.min() < 0 or labels.max() >= len(classes))):
        return f"labels outside [0, {len(classes)})"
    for name, values in (("mean", mean), ("std", std)):
        if not (isinstance(values, list) and len(values) == images.shape[-1]
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)):
            return f"{name} {str(values)[:40]} for {images.shape[-1]} channels"
    if not all(v > 0 for v in std):
        return f"std {std}"
    shape = manifest.get("image_shape")
    if shape is not None and list(images.shape[1:]) != shape:
        return f"images {images.shape[1:]} but image_shape {shape}"
    return None


def batch_garbage(images, labels, split) -> str | None:
    """What is wrong with a backend's first batch; None if nothing."""
    import torch

    if not (isinstance(images, torch.Tensor) and images.dtype == torch.float32 and images.dim() == 4):
        return f"images {getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}"
    if not torch.isfinite(images).all():
        return "non-finite pixels"
    if images.shape[1] != split.images.shape[-1] or len(images) != len(labels) or not len(labels):
        return f"a batch of {tuple(images.shape)} and {len(labels)} labels"
    if labels.dtype != torch.int64 or labels.min() < 0 or labels.max() >= split.num_classes:
        return f"labels outside [0, {split.num_classes})"
    return None


# ---- photo: mutated JPEG records through the photo backend's decoders ----

class PhotoCases:
    """Mutated records of a converted photo set through `PhotoLoader` with each of its decoders."""

    def __init__(self, workdir: Path):
        import torch

        from beton_trainer.common.schema import from_dict
        from beton_trainer.pipelines.augment import AugmentSpec
        from beton_trainer.pipelines.crop_library import available

        torch.set_num_threads(1)
        self.workdir = workdir
        self.decoders = [d for d in ("library", "pillow", "device") if d != "library" or available()]
        self.spec = from_dict(AugmentSpec, {"flip": {"p": 0.5}})
        self.corpus = jpeg_corpus()
        self.run = guarded(self._run)

    def _run(self, rng: np.random.Generator) -> tuple[str, str]:
        from beton_trainer.format.beton import BetonFile

        data_dir = self.workdir / "case"
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.copytree(self.workdir / "base" / "photos" / "data", data_dir)
        split = str(rng.choice(["train", "test"]))
        path = data_dir / f"{split}.beton"
        beton = BetonFile(path)
        mutated = sorted(set(rng.integers(len(beton), size=int(rng.integers(1, 4))).tolist()))
        what = []
        for i in mutated:
            if rng.random() < 0.15:
                what.append(f"record {i} size")
                mutate_size(rng, path, i)
            else:
                stored = beton.stored_bytes(i).tobytes()
                if rng.random() < 0.5:  # the entropy-coded data only: past the header check, into the decoders
                    data = bytearray(stored)
                    for _ in range(int(rng.integers(1, 9))):
                        data[int(rng.integers(jpeg_segments(stored)[-1][2], len(data)))] = int(
                            rng.choice([0, 0xFF, 0xD9, int(rng.integers(256))]))
                    data = bytes(data)
                else:
                    data = mutate_jpeg(rng, stored, self.corpus[int(rng.integers(len(self.corpus)))])
                with open(path, "r+b") as fh:
                    fh.seek(int(beton.pointers()[i]))
                    fh.write((data + bytes(len(stored)))[:len(stored)])
                what.append(f"record {i}")
        return self.check(data_dir, split, mutated, train=bool(rng.random() < 0.5), what=", ".join(what))

    def check(self, data_dir: Path, split: str, mutated: list[int], *, train: bool, what: str) -> tuple[str, str]:
        """Every decoder: a whole epoch of sound batches, or one line naming a mutated record."""
        import torch

        from beton_trainer.common.errors import UserError
        from beton_trainer.pipelines.base import LoaderOptions, ResolutionSchedule
        from beton_trainer.pipelines.photo_loader import PhotoLoader

        options = LoaderOptions(data_dir=data_dir, split=split, batch_size=4, train=train, spec=self.spec,
                                device=torch.device("cpu"), num_workers=2, verify="off",  # the decoders see them
                                resolution=ResolutionSchedule(train=8, eval=8))  # 2-8x crops: DCT scaling too
        refused = []
        for decoder in self.decoders:
            try:
                batches = list(PhotoLoader(options, decoder))
            except UserError as exc:
                message = str(exc)
                cited = {int(n) for n in re.findall(r"record (\d+)", message)}
                if listed := re.search(r"records \(([\d, .]+)\)", message):  # the device decoder's whole batch
                    cited |= {int(n) for n in re.findall(r"\d+", listed.group(1))}
                if "\n" in message or not cited & set(mutated):
                    return "wrong", f"{decoder} ({what}): {message[:200]}"
                refused.append(f"{decoder}: {message[:120]}")
                continue
            for images, labels in batches:
                if not (images.dtype == torch.float32 and images.shape[1:] == (3, 8, 8) and len(images) == len(labels)
                        and torch.isfinite(images).all() and labels.min() >= 0 and labels.max() <= 1):
                    return "wrong", f"{decoder} ({what}): a batch of {tuple(images.shape)}"
        return ("refused", "; ".join(refused)) if refused else ("ok", what)


def mutate_size(rng: np.random.Generator, path: Path, i: int) -> None:
    """Record i's stored height or width (the metadata the reader checks the frame header against) set to another
    value, in place."""
    from beton_trainer.format.beton import FIELD, HEADER, metadata_type

    header = np.fromfile(path, dtype=HEADER, count=1)[0]
    fields = np.fromfile(path, dtype=FIELD, count=int(header["num_fields"]), offset=HEADER.itemsize)
    meta = np.memmap(path, dtype=metadata_type([int(t) for t in fields["type_id"]]), mode="r+",
                     offset=HEADER.itemsize + fields.nbytes, shape=(int(header["num_samples"]),))
    image = meta["f0"]  # the image field comes first, as the converters write it
    key = str(rng.choice(["height", "width"]))
    image[key][i] = int(rng.choice([0, 1, int(image[key][i]) - 1, int(image[key][i]) + 1, 65535]))
    meta.flush()


# ---- convert: hostile sources ----

def _tar_add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE,
             link: str = "", size: int | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if size is None else size
    tar.addfile(info, io.BytesIO(data))


def expanding_lists(rng: np.random.Generator) -> tuple[object, bool]:
    """A seeded structure of lists for a value in a CIFAR pickle, and whether a CIFAR file could hold it (the
    unpickler must load it, else refuse it with one line): one list `width` times at each of `depth` levels
    (shared: a few bytes pickled, width**depth items walked), fresh lists `depth` deep, shared and fresh levels
    mixed, a list inside itself, a flat list of up to 400,000 items (wide), or one string repeated (text)."""
    from beton_trainer.convert.unpickle import MAX_ITEMS, MAX_TEXT

    kind = str(rng.choice(["shared", "nested", "mixed", "cyclic", "wide", "text"]))
    depth, width = int(rng.integers(1, 40)), int(rng.integers(2, 9))
    node: list = rng.integers(0, 10, width).tolist()
    if kind == "wide":
        n = int(rng.choice([rng.integers(1, 100_000), rng.integers(MAX_ITEMS, 2 * MAX_ITEMS)]))
        return rng.integers(0, 10, n).tolist(), n < MAX_ITEMS - 100
    if kind == "text":
        text, n = "x" * int(rng.integers(1, 1 << 20)), int(rng.integers(1, 64))
        return [text] * n, len(text) * n < MAX_TEXT - 1000
    if kind == "cyclic":
        outer = node = []
        for _ in range(depth - 1):
            node.append([])
            node = node[-1]
        node.append(outer)
        return outer, False
    for _ in range(depth):  # every kind left nests lists in a list: no CIFAR file does
        shared = kind == "shared" or (kind == "mixed" and rng.random() < 0.5)
        node = [node] * width if shared else [list(node) for _ in range(width)]  # list(): fresh, children shared
    return node, False


BAD_LABELS = [0.9, 1.0, -0.0, math.nan, math.inf, 2**70, -(2**70), 2**20000, -1, 10, "a", b"\x01", None, True,
              {"a": 1}, [0, 1], (0,)]
BAD_LABEL_LISTS = [None, {"a": 1}, "0123", 3, 2.5, b"\x00\x01"]


def bad_labels(rng: np.random.Generator, n: int, num_classes: int = 10) -> tuple[object, int | None]:
    """n seeded labels of which one, at a seeded index, is of a wrong type or out of [0, num_classes), and that
    index; or a value that is no list of labels at all, and None."""
    if rng.random() < 0.2:
        return BAD_LABEL_LISTS[int(rng.integers(len(BAD_LABEL_LISTS)))], None
    labels = rng.integers(0, num_classes, n).tolist()
    at = int(rng.integers(n))
    labels[at] = BAD_LABELS[int(rng.integers(len(BAD_LABELS)))]
    return labels, at


class ConvertCases:
    """Hostile sources of every kind the converter reads, through convert_dataset."""

    def __init__(self, workdir: Path):
        from beton_trainer.convert.build import convert_dataset

        self.workdir, self.convert = workdir, convert_dataset
        self.images = jpeg_corpus()
        self.run = guarded(self._run)

    def _run(self, rng: np.random.Generator) -> tuple[str, str]:
        case = self.workdir / "case"
        shutil.rmtree(case, ignore_errors=True)
        case.mkdir(parents=True)
        maker = [self.cifar, self.mnist, self.imagefolder][int(rng.integers(3))]
        dataset, src, bound = maker(rng, case / "src")
        from beton_trainer.convert.archive import Limits

        dest = self.convert(dataset, src, case / "out", log=lambda _: None, workers=1, max_pixels=1_000_000,
                            limits=Limits(max_files=1000, max_expansion=100.0))
        return self.judge(dest, bound)

    def judge(self, dest: Path, bound: int) -> tuple[str, str]:
        """A conversion that succeeded must open, and hold no more images than its source could."""
        from beton_trainer.format.dataset import dataset_identity, load_manifest, open_split

        manifest = load_manifest(dest)
        total = sum(entry["count"] for entry in manifest["splits"].values())
        if manifest["image_shape"] is None:  # photos of varied sizes: every record read, as the ffcv loader would
            dataset_identity(dest)
        for split in manifest["splits"] if manifest["image_shape"] is not None else ():
            if (why := split_garbage(open_split(dest, split))) is not None:
                return "wrong", f"converted {split}: {why}"
        if total > bound:
            return "wrong", f"{total} images from a source that holds at most {bound}"
        return "ok", f"{manifest['dataset']}: {total} images, {len(manifest['skipped_files'])} skipped"

    def cifar(self, rng: np.random.Generator, root: Path) -> tuple[str, Path, int]:
        folder = write_cifar10(root, rows=int(rng.integers(0, 6)), seed=int(rng.integers(1000)))
        name = str(rng.choice([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]))
        rows = np.zeros((int(rng.integers(1, 6)), 3072), np.uint8)

        def lists(values: object) -> bytes:  # in the file's list of class names or of labels
            return pickle.dumps({"label_names": values} if name == "batches.meta" else {"data": rows, "labels": values},
                                protocol=2)

        payloads = [  # an array too large, one built by calling ndarray, objects, code, a shape that lies
            lambda: pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [0]}, protocol=2).replace(
                b"K\x01M\x00\x0c", b"J@B\x0f\x00M\x00\x0c"),
            lambda: b"\x80\x02cnumpy\nndarray\nq\x00J@B\x0f\x00M\x00\x0c\x86q\x01X\x02\x00\x00\x00u1"
                    b"q\x02\x86q\x03Rq\x04.",
            lambda: pickle.dumps({"data": np.array([b"x" * 3072], dtype=object), "labels": [0]}, protocol=2),
            lambda: b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.",
            lambda: pickle.dumps({"data": np.zeros((3, 3072), np.uint8), "labels": [0, 1, 99]}, protocol=2),
            lambda: pickle.dumps({"data": np.zeros((2, 1024), np.uint8), "labels": [0, 1]}, protocol=2),
            lambda: lists(expanding_lists(rng)[0]),  # lists that expand when walked (issue 40)
            lambda: lists(bad_labels(rng, len(rows))[0]),  # labels (or class names) of the wrong type
        ]
        path = folder / name
        if rng.random() < 0.5:
            data = bytearray(path.read_bytes())
            for _ in range(int(rng.integers(1, 6))):
                data[int(rng.integers(len(data)))] = int(rng.integers(256))
            path.write_bytes(bytes(data[:int(rng.integers(len(data) // 2, len(data) + 1))]))
        else:
            path.write_bytes(payloads[int(rng.integers(len(payloads)))]())
        src: Path = folder
        if rng.random() < 0.3:
            src = root / "cifar-10-python.tar.gz"
            with tarfile.open(src, "w:gz") as tar:
                tar.add(folder, arcname=folder.name)
        size = sum(p.stat().st_size for p in folder.iterdir())
        return "cifar10", src, size // 3072

    def mnist(self, rng: np.random.Generator, root: Path) -> tuple[str, Path, int]:
        folder = write_mnist(root, int(rng.integers(1000)), n=int(rng.integers(0, 30)))
        name = str(rng.choice(sorted(p.name for p in folder.iterdir())))
        path = folder / name
        data = path.read_bytes()
        op = int(rng.integers(4))
        if op == 0:  # dimensions
            ndim = data[3]
            dims = [int(rng.choice([0, 1, 28, 60_000, 2**31, 2**32 - 1])) for _ in range(ndim)]
            data = data[:4] + struct.pack(f">{ndim}I", *dims) + data[4 + 4 * ndim:]
        elif op == 1:
            data = data[:int(rng.integers(len(data) + 1))]
        elif op == 2:
            data = bytes(b ^ (1 << int(rng.integers(8))) if rng.random() < 0.01 else b for b in data)
        if rng.random() < 0.5:  # gzipped, and sometimes a bomb: the header then megabytes of zeros
            squeeze = zlib.compressobj(9, wbits=31)
            tail = b"".join(squeeze.compress(bytes(1 << 20)) for _ in range(int(rng.choice([0, 0, 40]))))
            gz = squeeze.compress(data) + tail + squeeze.flush()
            path.unlink()
            path = folder / f"{name}.gz"
            path.write_bytes(gz[:int(rng.integers(len(gz) // 2, len(gz) + 1))] if rng.random() < 0.2 else gz)
        return "mnist", folder, 2 * 100 * (1 << 20) // 784

    def imagefolder(self, rng: np.random.Generator, root: Path) -> tuple[str, Path, int]:
        root.mkdir(parents=True)
        src = root / str(rng.choice(["tree.tar", "tree.tar.gz", "tree.tar.xz"]))
        members = 0
        with tarfile.open(src, {".tar": "w", ".gz": "w:gz", ".xz": "w:xz"}[src.suffix]) as tar:
            for split in ("train", "test"):
                for cls in ("a", "b"):
                    for k in range(int(rng.integers(1, 4))):
                        image = self.images[int(rng.integers(len(self.images)))]
                        if rng.random() < 0.3:
                            image = mutate_jpeg(rng, image, self.images[0])
                        _tar_add(tar, f"tree/{split}/{cls}/{k}.jpg", image)
                        members += 1
            for _ in range(int(rng.integers(1, 5))):
                hostile = int(rng.integers(7))
                name = f"tree/train/a/h{members}.jpg"
                if hostile == 0:
                    _tar_add(tar, str(rng.choice(["../up.jpg", "/tmp/fuzz-abs.jpg", "tree/train/a/../../../x.jpg"])),
                             self.images[0])
                elif hostile == 1:
                    _tar_add(tar, name, kind=rng.choice([tarfile.SYMTYPE, tarfile.LNKTYPE]), link="/etc/passwd")
                elif hostile == 2:
                    _tar_add(tar, name, kind=rng.choice([tarfile.CHRTYPE, tarfile.FIFOTYPE, tarfile.BLKTYPE]))
                elif hostile == 3:
                    _tar_add(tar, name, bytes(int(rng.integers(0, 1 << 20))))  # zeros named .jpg
                elif hostile == 4:  # a frame claiming 60000 x 60000 pixels
                    big = bytearray(self.images[0])
                    sof = big.find(b"\xff\xc0")
                    big[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)
                    _tar_add(tar, name, bytes(big))
                elif hostile == 5:
                    _tar_add(tar, "tree/train/a/" + "d" * 200 + ".jpg", self.images[1])
                else:
                    _tar_add(tar, name, self.images[2][:int(rng.integers(len(self.images[2])))])
                members += 1
        if rng.random() < 0.3:  # damage the archive itself
            data = bytearray(src.read_bytes())
            for _ in range(int(rng.integers(1, 4))):
                data[int(rng.integers(len(data)))] ^= 0xFF
            src.write_bytes(bytes(data[:int(rng.integers(len(data) // 2, len(data) + 1))]))
        return "imagefolder", src, members


# ---- the command line ----

def run_all(cases: dict[str, int], seed: int, *, sanitize: bool, workdir: Path | None = None) -> list[Report]:
    """Fuzz each kind with its number of cases in a temporary work folder (or `workdir`)."""
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        root = workdir or Path(tmp)
        return [fuzz(kind, n, seed, workdir=root / kind, sanitize=sanitize) for kind, n in cases.items()]


def table(reports: list[Report]) -> str:
    """A markdown table of the reports, for benchmarks/RESULTS.md."""
    lines = ["| kind | cases | " + " | ".join(OUTCOMES) + " | peak RSS (MiB) | seconds |",
             "|---" * (len(OUTCOMES) + 4) + "|"]
    return "\n".join(lines + [r.row() if not r.skipped else f"| {r.kind} | skipped: {r.skipped} |" for r in reports])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000, help="cases per kind (default 1000)")
    parser.add_argument("--jpeg-cases", type=int, metavar="N",
                        help="jpeg cases, if not --cases (they take about 1/100 of the time of the others')")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kind", choices=[*KINDS, "all"], default="all")
    parser.add_argument("--sanitize", action=argparse.BooleanOptionalAction, default=True,
                        help="jpeg: build the decoder with -fsanitize=address,undefined where gcc has libasan "
                        "(default; else the built decoder)")
    parser.add_argument("--case", type=int, help="run this one case here, with its traceback (to reproduce one)")
    parser.add_argument("--workdir", type=Path, help="keep the work files here (default: a temporary folder)")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--library", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child, args.seed, args.workdir, args.first, args.cases, args.library)
        return 0
    kinds = list(KINDS) if args.kind == "all" else [args.kind]
    if args.case is not None:
        global REPRODUCE
        REPRODUCE = True
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fuzz-case-"))
        for kind in kinds:
            prepare(kind, workdir / kind, args.seed)
            library = str(built_library()) if kind == "jpeg" else None
            outcome = _case_runner(kind, workdir / kind, library)(case_rng(args.seed, kind, args.case))
            print(f"{kind} case {args.case}: {outcome[0]}: {outcome[1]}")
        return 0
    started = time.strftime("%Y-%m-%d %H:%M")
    cases = {kind: args.jpeg_cases if kind == "jpeg" and args.jpeg_cases else args.cases for kind in kinds}
    reports = run_all(cases, args.seed, sanitize=args.sanitize, workdir=args.workdir)
    print(f"{started}, {platform.node()} ({os.cpu_count()} CPUs, {platform.machine()}), seed {args.seed}")
    print(table(reports))
    for report in reports:
        for case, outcome, detail in report.failures:
            print(f"{report.kind} case {case}: {outcome}: {detail}  (reproduce: python -m benchmarks.fuzz --kind "
                  f"{report.kind} --seed {args.seed} --case {case})")
    return 1 if any(r.failures for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
