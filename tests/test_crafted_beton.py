"""Crafted `.beton` and manifest.json files (issue 26, items 4-6): each is refused with one line naming the file,
by `open_split` and by every backend's constructor, before any training; or it is read correctly.

Each case edits one field of a real conversion in place, at the offsets the format defines (pipelines/beton.py).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from beton_trainer.common.errors import UserError
from beton_trainer.common.files import sha256_file
from beton_trainer.format.beton import ALLOC, FIELD, HEADER, NDARRAY_ARGS, BetonFile, metadata_type
from beton_trainer.format.dataset import open_split
from beton_trainer.format.integrity import page_checksums
from beton_trainer.pipelines import build_loader
from tests.loader_helpers import installed, options

BACKENDS = ["tensor", "ffcv", "dali"]


class Layout:
    """Where things are in one .beton: the header, the field descriptors, each sample's metadata, the table."""

    def __init__(self, path: Path):
        self.path = path
        self.header = np.fromfile(path, dtype=HEADER, count=1)[0]
        self.fields = np.fromfile(path, dtype=FIELD, count=int(self.header["num_fields"]), offset=HEADER.itemsize)
        self.names = [bytes(f["name"]).split(b"\0")[0].decode() for f in self.fields]
        self.meta = metadata_type([int(t) for t in self.fields["type_id"]])
        self.meta_start = HEADER.itemsize + self.fields.nbytes
        self.table_ptr = int(self.header["alloc_table_ptr"])

    def write(self, offset: int, value: np.ndarray | bytes) -> None:
        with open(self.path, "r+b") as fh:
            fh.seek(offset)
            fh.write(value if isinstance(value, bytes) else value.tobytes())

    def header_field(self, name: str, value: int) -> None:
        dtype, offset = HEADER.fields[name][:2]
        self.write(offset, np.array(value, dtype=dtype))

    def sample_field(self, i: int, field: str, value: int, part: str | None = None) -> None:
        """Set field `field` (or its struct member `part`) of sample i's metadata."""
        dtype, offset = self.meta.fields[f"f{self.names.index(field)}"][:2]
        if part is not None:
            dtype, inner = dtype.fields[part][:2]
            offset += inner
        self.write(self.meta_start + i * self.meta.itemsize + offset, np.array(value, dtype=dtype))

    def descriptor(self, k: int, part: str, value: np.ndarray | bytes, at: int = 0) -> None:
        offset = HEADER.itemsize + k * FIELD.itemsize + FIELD.fields[part][1] + at
        self.write(offset, value)

    def table_entry(self, j: int, part: str, value: int) -> None:
        self.write(self.table_ptr + j * ALLOC.itemsize + ALLOC.fields[part][1], np.array(value, dtype="<u8"))


def keep_manifest_in_step(data: Path, split: str = "train") -> None:
    """After an in-place edit, the manifest's size, sha256 and page checksums for the split still match (a careful
    forger's file: only the reader's own checks can refuse it)."""
    path, beton = data / "manifest.json", data / f"{split}.beton"
    manifest = json.loads(path.read_text())
    page_size = int(np.fromfile(beton, dtype=HEADER, count=1)[0]["page_size"])
    manifest["splits"][split].update(bytes=beton.stat().st_size, sha256=sha256_file(beton),
                                     page_sha256=page_checksums(beton, page_size))
    path.write_text(json.dumps(manifest))


@pytest.fixture
def rgb(tiny_rgb_data: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_rgb_data, tmp_path / "rgb"))


@pytest.fixture(scope="module")
def grey_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from beton_trainer.convert import convert_dataset
    from tests.data_fixtures import write_mnist

    root = tmp_path_factory.mktemp("grey")
    write_mnist(root / "src", n_train=300, n_test=100)
    return convert_dataset("mnist", root / "src", root / "out", log=lambda _: None)


@pytest.fixture
def grey(grey_source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(grey_source, tmp_path / "grey"))


def refused_everywhere(data: Path, match: str, split: str = "train") -> None:
    """open_split and each installed backend's constructor refuse `data` with one line matching `match`."""
    with pytest.raises(UserError, match=match) as caught:
        open_split(data, split)
    assert "\n" not in str(caught.value)
    for backend in BACKENDS:
        if backend != "tensor" and not installed({"ffcv": "ffcv", "dali": "nvidia.dali"}[backend]):
            continue
        with pytest.raises(UserError, match=match):
            build_loader(backend, options(data, split, torch.device("cpu"), train=split == "train", batch_size=16))


# ---- item 4: a header that claims one sample more than was written ----------------------------------------

def test_one_sample_more_in_the_header_is_refused_by_every_backend(rgb: Path) -> None:
    layout = Layout(rgb / "train.beton")
    layout.header_field("num_samples", int(layout.header["num_samples"]) + 1)
    refused_everywhere(rgb, "holds 641 records but the manifest says 640|truncated or not a .beton")


def test_one_sample_more_in_header_and_manifest_is_refused_by_the_file_itself(rgb: Path) -> None:
    """The forger also raised the manifest's count: the extra sample's metadata is the padding's zeros, which
    name no record."""
    layout = Layout(rgb / "train.beton")
    layout.header_field("num_samples", 641)
    manifest = json.loads((rgb / "manifest.json").read_text())
    manifest["splits"]["train"]["count"] = 641
    (rgb / "manifest.json").write_text(json.dumps(manifest))
    refused_everywhere(rgb, r"train.beton is truncated or not a .beton file \(record 640")


# ---- item 6: every other field of a .beton --------------------------------------------------------------

RGB_CASES: dict[str, tuple[Callable[[Layout], None], str]] = {
    "version": (lambda b: b.header_field("version", 3), r"format version 3, not FFCV's 2"),
    "no fields": (lambda b: b.header_field("num_fields", 0), r"\(0 fields\)"),
    "many fields": (lambda b: b.header_field("num_fields", 60000), r"\(60000 fields\)"),
    "page size not a power of two": (lambda b: b.header_field("page_size", 3 << 20), r"page size 3145728"),
    "page size too small": (lambda b: b.header_field("page_size", 4096), r"page size 4096"),
    "table past the end": (lambda b: b.header_field("alloc_table_ptr", 1 << 40), r"a table at byte"),
    "table before the metadata": (lambda b: b.header_field("alloc_table_ptr", 100), r"a table at byte 100"),
    "samples past 2^64 / itemsize": (lambda b: b.header_field("num_samples", (1 << 64) - 1), r"header claims"),
    "unknown field type": (lambda b: b.descriptor(0, "type_id", bytes([9])), r"type id 9, which this project"),
    "json field": (lambda b: b.descriptor(1, "type_id", bytes([5])), r"type id 5"),
    "label as a float field": (lambda b: b.descriptor(1, "type_id", bytes([0])), r"type id 0"),
    "no label field": (lambda b: b.descriptor(1, "name", b"lbl\0"), r"not an image field and an integer label"),
    "non-ASCII name": (lambda b: b.descriptor(0, "name", b"\xffmage"), r"a field name is not ASCII"),
    "repeated names": (lambda b: b.descriptor(1, "name", b"image\0"), r"repeated field names"),
    "pointer nowhere": (lambda b: b.sample_field(5, "image", 12345, "data_ptr"), r"record 5 points at byte 12,345"),
    "pointer past the end": (lambda b: b.sample_field(7, "image", 1 << 62, "data_ptr"), r"record 7 points at"),
    "pointer past 2^63": (lambda b: b.sample_field(7, "image", 2**64 - 256, "data_ptr"),  # was printed as -256
                          r"record 7 points at byte 18,446,744,073,709,551,360, past the data"),
    "height 0": (lambda b: b.sample_field(3, "image", 0, "height"), r"record 3 claims 0x32 pixels"),
    "width 65535": (lambda b: b.sample_field(4, "image", 65535, "width"), r"record 4 holds 3,072 bytes for 32x65535"),
    "huge image": (lambda b: (b.sample_field(2, "image", 65535, "width"), b.sample_field(2, "image", 65535,
                                                                                             "height")),
                   r"record 2 claims 65535x65535 pixels \(at least 1x1, at most 89,478,485\)"),
    "image mode 7": (lambda b: b.sample_field(9, "image", 7, "mode"), r"record 9 has image mode 7"),
    "raw record as JPEG": (lambda b: b.sample_field(11, "image", 0, "mode"),
                           r"record 11 (holds no JPEG frame header|is not a readable JPEG \(no JPEG header\))"),
    "record size wrong": (lambda b: b.table_entry(0, "size", 100), r"record 0 holds 100 bytes"),
    "record size past the table": (lambda b: b.table_entry(0, "size", 1 << 40), r"allocation table points outside"),
    "table sample id out of range": (lambda b: b.table_entry(1, "sample_id", 10**6), r"allocation table points"),
    "label out of range": (lambda b: b.sample_field(0, "label", 10), r"labels from 0 to 10, but the manifest names 10"),
    "negative label": (lambda b: b.sample_field(1, "label", -1), r"labels from -1 to 9"),
}


@pytest.mark.parametrize("case", RGB_CASES)
def test_each_crafted_field_is_refused_naming_the_file(rgb: Path, case: str) -> None:
    edit, match = RGB_CASES[case]
    edit(Layout(rgb / "train.beton"))
    keep_manifest_in_step(rgb)
    refused_everywhere(rgb, rf"{rgb}/train.beton.*{match}" if "labels" not in match else match)


GREY_CASES: dict[str, tuple[Callable[[Layout], None], str]] = {
    "uint16 arrays": (lambda b: b.descriptor(0, "arguments", json.dumps([["", "<u2"]]).encode() + b" ",
                                             at=NDARRAY_ARGS.itemsize), r"holds \[\['', '<u2'\]\]"),
    "shape with a zero": (lambda b: b.descriptor(0, "arguments", np.array([28, 0, 1], "<u8"), at=0),
                          r"image shape \[28, 0, 1\], not \(height, width, 1 or 3\)"),
    "shape too large": (lambda b: b.descriptor(0, "arguments", np.array([1 << 20, 1 << 20, 1], "<u8"), at=0),
                        r"image shape \[1048576, 1048576, 1\]"),
    "type length past the arguments": (lambda b: b.descriptor(0, "arguments", np.array(5000, "<u8"),
                                                              at=NDARRAY_ARGS.fields["type_length"][1]),
                                       r"an array field's type takes 5,000 bytes"),
    "pointer nowhere": (lambda b: b.sample_field(3, "image", 99), r"record 3 points at byte 99"),
}


@pytest.mark.parametrize("case", GREY_CASES)
def test_each_crafted_array_field_is_refused(grey: Path, case: str) -> None:
    edit, match = GREY_CASES[case]
    edit(Layout(grey / "train.beton"))
    keep_manifest_in_step(grey)
    refused_everywhere(grey, match)


def test_an_untouched_copy_reads_exactly(rgb: Path, tiny_rgb_data: Path) -> None:
    """The editing harness itself changes nothing: a copy rewritten with its own values reads the same."""
    layout = Layout(rgb / "train.beton")
    layout.header_field("num_samples", int(layout.header["num_samples"]))
    layout.sample_field(0, "label", int(BetonFile(tiny_rgb_data / "train.beton").labels()[0]))
    np.testing.assert_array_equal(open_split(rgb, "train").images, open_split(tiny_rgb_data, "train").images)
    loader = build_loader("tensor", options(rgb, "test", torch.device("cpu"), train=False, batch_size=50))
    assert sum(len(y) for _, y in loader) == 200


# ---- item 5: manifest.json against its schema -----------------------------------------------------------

MANIFEST_CASES: dict[str, tuple[Callable[[dict], None], str]] = {
    "splits as a list": (lambda m: m.update(splits=[m["splits"]]), r"'splits' must be a table of splits"),
    "split without bytes": (lambda m: m["splits"]["train"].pop("bytes"), r"splits.train.bytes must be an integer"),
    "count as a string": (lambda m: m["splits"]["train"].update(count="640"),
                          r"splits.train.count must be an integer of at least 1, got '640'"),
    "count as a bool": (lambda m: m["splits"]["train"].update(count=True), r"splits.train.count must be an integer"),
    "split not a table": (lambda m: m["splits"].update(train=3), r"splits.train must be a table"),
    "unknown split": (lambda m: m["splits"].update(extra={"count": 1, "bytes": 1}), r"unknown split 'extra'"),
    "classes as a number": (lambda m: m.update(classes=10), r"'classes' must be a list of class names, got 10"),
    "classes empty": (lambda m: m.update(classes=[]), r"'classes' must be a list of class names"),
    "fewer class names than labels": (lambda m: m.update(classes=m["classes"][:5]),
                                      r"labels from 0 to 9, but the manifest names 5 classes"),
    "mean as a string": (lambda m: m.update(mean="0.5"), r"'mean' must be a list of 1 or 3 finite numbers"),
    "mean with NaN": (lambda m: m.update(mean=[0.5, float("nan"), 0.5]), r"'mean' must be a list of 1 or 3 finite"),
    "zero std": (lambda m: m.update(std=[0.2, 0.0, 0.2]), r"'std' must be positive"),
    "std of 2 channels": (lambda m: m.update(std=[0.2, 0.2]), r"'std' must be a list of 1 or 3 finite numbers"),
    "std of 1 channel, mean of 3": (lambda m: m.update(std=[0.2]),  # was blamed on std's sign (issue 40)
                                    r"'std' has 1 values but 'image_shape' has 3 channels"),
    "mean of 1 channel, std of 3": (lambda m: m.update(mean=[0.5]), r"'mean' has 1 values but 'image_shape' has 3"),
    "mean of 3, std of 1, varied sizes": (lambda m: m.update(std=[0.2], image_shape=None),
                                          r"'mean' has 3 values and 'std' 1: each needs one per channel"),
    "no image_shape": (lambda m: m.pop("image_shape"),  # was taken for varied sizes, then blamed on the model
                       r"'image_shape' is missing \(it is \(height, width, channels\), or null for images of varied"),
    "image_shape of another size": (lambda m: m.update(image_shape=[28, 28, 3]),
                                    r"train.beton: record 0 is 32x32x3 but the manifest's image_shape is 28x28x3"),
    "grey statistics for RGB images": (lambda m: m.update(mean=[0.5], std=[0.2], image_shape=[32, 32, 1]),
                                       r"holds 3-channel images but the manifest's mean has 1 values"),
    "image_shape as a string": (lambda m: m.update(image_shape="32x32"), r"'image_shape' must be \(height, width"),
}


def test_a_grey_dataset_whose_manifest_says_varied_sizes_is_refused(grey: Path) -> None:
    """Null image_shape means photos of varied sizes; arrays have one shape: by the manifest's own storage key,
    and by the file when that key says otherwise."""
    path = grey / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["image_shape"] = None
    path.write_text(json.dumps(manifest))
    refused_everywhere(grey, r"'image_shape' is null \(images of varied sizes\) but 'storage' is 'ndarray'")
    manifest["storage"] = "raw"
    path.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"train.beton holds 28x28x1 arrays but the manifest's image_shape is null"):
        open_split(grey, "train")


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_each_manifest_mistake_is_one_line(rgb: Path, case: str) -> None:
    edit, match = MANIFEST_CASES[case]
    path = rgb / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    refused_everywhere(rgb, match)


def test_a_manifest_mistake_stops_train_py_before_training(rgb: Path, tmp_path: Path) -> None:
    """Through the command line: exit 2, one `error:` line, and no run folder written."""
    import subprocess
    import sys

    path = rgb / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["std"] = [0.2, 0.0, 0.2]
    path.write_text(json.dumps(manifest))
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "train.py", "--recipe", "c10_cnn_smoke", "--data", str(rgb), "--cpu",
                          "--run-dir", str(tmp_path / "run")], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.splitlines() == [
        f"error: {path} is damaged: 'std' must be positive, one per channel like 'mean', got [0.2, 0.0, 0.2]; "
        "convert the dataset again with --force"]
    assert not (tmp_path / "run").exists()


def test_a_jpeg_record_whose_size_is_a_lie_is_refused_before_ffcv_or_dali_decode_it(hymenoptera_data: Path,
                                                                                    tmp_path: Path) -> None:
    """Photos: FFCV's workers ignore decoder errors and size their buffers from the metadata, so a JPEG record
    that is not the size the file states is refused when the split is opened (its frame header is read)."""
    data = Path(shutil.copytree(hymenoptera_data, tmp_path / "hym"))
    layout = Layout(data / "train.beton")
    width = int(BetonFile(data / "train.beton").sizes()[3][1])
    layout.sample_field(3, "image", width + 8, "width")
    keep_manifest_in_step(data)
    match = rf"train.beton: record 3 holds a \d+x{width} JPEG, but the file says \d+x{width + 8}"
    with pytest.raises(UserError, match=match):
        open_split(data, "train")
    for backend in ("ffcv", "dali"):
        with pytest.raises(UserError, match=match):
            build_loader(backend, options(data, "train", torch.device("cpu"), train=True, batch_size=16))


def test_jpeg_frame_size_on_seeded_mutations_never_raises_and_reads_intact_headers() -> None:
    """The frame-header walk is new parsing code over untrusted bytes: 2,000 seeded mutations (bit flips, cuts,
    inserted runs) of real-encoder JPEGs, aimed at the markers before the first scan (what the walk reads),
    give a size or None, never an exception; intact ones give their size."""
    from beton_trainer.format.beton import encode_jpeg, jpeg_frame_size

    rng = np.random.default_rng(26)
    shapes = list(zip(rng.integers(1, 300, 20).tolist(), rng.integers(1, 300, 20).tolist()))
    sources = [encode_jpeg(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), int(q))
               for (h, w), q in zip(shapes, rng.integers(5, 100, 20))]
    for data, shape in zip(sources, shapes):
        assert jpeg_frame_size(memoryview(data)) == shape
    outcomes = {"size": 0, "none": 0}
    for case in range(2000):
        data = bytearray(sources[case % len(sources)])
        head = data.find(b"\xff\xda") + 2  # the markers up to the first scan
        kind = case % 3
        if kind == 0:
            for at in rng.integers(0, head, 1 + case % 8):
                data[at] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:
            del data[int(rng.integers(0, head)):]
        else:
            at = int(rng.integers(0, head))
            data[at:at] = bytes(rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8))
        size = jpeg_frame_size(memoryview(bytes(data)))
        assert size is None or (len(size) == 2 and all(0 <= v <= 65535 for v in size))
        outcomes["none" if size is None else "size"] += 1
    assert min(outcomes.values()) > 200  # both outcomes are exercised
