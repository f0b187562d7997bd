"""The project's own `.beton` reader and writer against stock FFCV 1.0.2, both ways, on real data.

Our files: FFCV's `Reader` sees the same fields, counts, labels and record bytes as `BetonFile`, and FFCV's
`Loader` yields exactly `BetonFile`'s pixels for raw and array records. JPEG records are the same bytes to
both; decoded, FFCV's decoder (TurboJPEG) and Pillow's (libjpeg's accurate DCT) differ by a few levels,
which the JPEG tests bound. FFCV's files (its parallel `DatasetWriter`) read
back through `BetonFile` record for record. And conversions are deterministic: 1 and 2 workers give the
same bytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from beton_trainer.convert import convert_dataset
from beton_trainer.format.beton import BetonFile, page_size_for, write_beton_file
from tests.loader_helpers import require

require("ffcv")

JPEG_DECODER_TOLERANCE = 12  # levels between FFCV's and Pillow's decodes of one JPEG; seen: 8 (photos), 9 (CIFAR)


def ffcv_records(path: Path) -> tuple[list[np.ndarray], np.ndarray, list[tuple[int, int, int]]]:
    """Each record's stored bytes, labels and (mode, height, width) as FFCV's Reader and memory manager see
    them: metadata plus the allocation table sorted by pointer, looked up as `OSCacheManager`'s reader does."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    table = reader.alloc_table
    order = np.argsort(table["ptr"])
    ptrs, sizes = table["ptr"][order], table["size"][order]
    data = np.memmap(path, dtype=np.uint8, mode="r")
    image, label = (reader.metadata[f"f{reader.field_names.index(n)}"] for n in ("image", "label"))
    pointers = image if image.dtype.names is None else image["data_ptr"]
    stored = [data[p:p + sizes[np.searchsorted(ptrs, p)]] for p in pointers]
    shapes = ([(1, 0, 0)] * len(image) if image.dtype.names is None else
              [(int(m["mode"]), int(m["height"]), int(m["width"])) for m in image])
    return stored, np.asarray(label), shapes


def ffcv_decode(stored: np.ndarray, height: int, width: int) -> np.ndarray:
    from ffcv.libffcv import imdecode

    out = np.zeros((height, width, 3), dtype=np.uint8)
    imdecode(stored, out, height, width, height, width, 0, 0, 1, 1, False, False)
    return out


def ffcv_loader_images(path: Path, grey: bool) -> tuple[np.ndarray, np.ndarray]:
    """Every record of a fixed-size .beton through stock FFCV's Loader, in file order."""
    from ffcv.fields.decoders import IntDecoder, NDArrayDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    loader = Loader(str(path), batch_size=500, num_workers=2, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [NDArrayDecoder() if grey else SimpleRGBImageDecoder()],
                               "label": [IntDecoder()]})
    batches = [(np.array(x), np.array(y).reshape(-1)) for x, y in loader]
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def assert_same_records(path: Path) -> None:
    """FFCV's view of `path` equals BetonFile's: labels, bytes, modes and sizes; decoded pixels exactly for
    raw records, within the decoders' difference for JPEG ones."""
    ours = BetonFile(path)
    stored, labels, shapes = ffcv_records(path)
    assert len(stored) == len(ours) > 0
    np.testing.assert_array_equal(labels, ours.labels())
    worst = 0
    for i, (raw, (mode, h, w)) in enumerate(zip(stored, shapes)):
        np.testing.assert_array_equal(raw, ours.stored_bytes(i))
        if ours.storage == "ndarray":
            continue
        assert (mode == 0) == ours.is_jpeg(i) and (h, w) == tuple(ours.sizes()[i])
        mine = ours.image(i)
        if mode == 0:
            worst = max(worst, int(np.abs(ffcv_decode(raw, h, w).astype(int) - mine).max()))
        else:
            np.testing.assert_array_equal(raw.reshape(h, w, 3), mine)
    assert worst <= JPEG_DECODER_TOLERANCE


def test_mnist_through_stock_ffcv_loader(mnist_data: Path) -> None:
    """Real MNIST (NDArrayField): FFCV's Loader yields exactly our images and labels."""
    ours = BetonFile(mnist_data / "test.beton")
    assert ours.storage == "ndarray" and len(ours) == 10_000
    assert_same_records(mnist_data / "test.beton")
    images, labels = ffcv_loader_images(mnist_data / "test.beton", grey=True)
    np.testing.assert_array_equal(images, ours.images())
    np.testing.assert_array_equal(labels, ours.labels())


def test_cifar10_through_stock_ffcv_loader(cifar10_data: Path) -> None:
    """Real CIFAR-10 (raw RGB records): FFCV's Loader yields exactly our pixels for the whole test split."""
    ours = BetonFile(cifar10_data / "test.beton")
    assert ours.storage == "raw" and len(ours) == 10_000
    images, labels = ffcv_loader_images(cifar10_data / "test.beton", grey=False)
    np.testing.assert_array_equal(images, ours.images())
    np.testing.assert_array_equal(labels, ours.labels())


@pytest.mark.parametrize("encode", ["raw", "jpg", "mix"])
def test_photos_in_every_storage_read_by_stock_ffcv(real_data_root: Path, tmp_path: Path, encode: str) -> None:
    """Real photos of varied sizes, stored raw, as JPEG, or mixed: every split reads the same through FFCV."""
    data = convert_dataset("imagefolder", real_data_root / "hymenoptera_data.tar", tmp_path, name="hym",
                           encode=encode, max_side=256, quality=90, log=lambda _: None)
    for split in ("train", "test"):
        beton = BetonFile(data / f"{split}.beton")
        jpegs = sum(beton.is_jpeg(i) for i in range(len(beton)))
        assert {"raw": jpegs == 0, "jpg": jpegs == len(beton), "mix": 0 < jpegs < len(beton)}[encode]
        assert_same_records(data / f"{split}.beton")


def test_cifar10_jpeg_records_through_stock_ffcv_loader(cifar10_data: Path, tmp_path: Path) -> None:
    """Real CIFAR-10 test images written as JPEG by our writer: FFCV's Loader decodes every record to within
    the decoders' difference of BetonFile's (1.07 levels on average, seen)."""
    source = BetonFile(cifar10_data / "test.beton")
    images, labels = source.images(), source.labels()
    path = tmp_path / "test.beton"
    write_beton_file(path, images, {"label": labels}, jpeg=np.ones(len(images), dtype=bool), quality=90,
                     workers=2, page_size=page_size_for(images[0].nbytes + (1 << 16)))
    ours = BetonFile(path)
    assert ours.storage == "jpg"
    decoded, got_labels = ffcv_loader_images(path, grey=False)
    np.testing.assert_array_equal(got_labels, labels)
    difference = np.abs(decoded.astype(np.int16) - ours.images())
    assert difference.max() <= JPEG_DECODER_TOLERANCE and difference.mean() < 1.5
    assert np.abs(ours.images().astype(np.int16) - images).mean() < 4  # and both near the source pixels


def test_ffcv_written_files_read_by_ours(tmp_path: Path) -> None:
    """FFCV's own parallel DatasetWriter (2 workers: records land in pages out of order), RGB in raw and JPEG
    records of varied sizes, and grey arrays: BetonFile reads every record as FFCV does."""
    from ffcv.fields import IntField, NDArrayField, RGBImageField
    from ffcv.writer import DatasetWriter

    rng = np.random.default_rng(3)
    smooth = [np.clip(rng.normal(128, 40, (h // 4, w // 4, 3)), 0, 255).astype(np.uint8).repeat(4, 0).repeat(4, 1)
              for h, w in rng.integers(8, 120, (300, 2)) * 4]
    labels = rng.integers(0, 5, len(smooth))

    class Records:
        def __init__(self, images, labels):
            self.images, self.labels = images, labels

        def __len__(self) -> int:
            return len(self.images)

        def __getitem__(self, i: int) -> tuple:
            return self.images[i], int(self.labels[i])

    for mode in ("raw", "jpg"):
        path = tmp_path / f"ffcv_{mode}.beton"
        writer = DatasetWriter(str(path), {"image": RGBImageField(write_mode=mode), "label": IntField()},
                               num_workers=2)
        writer.from_indexed_dataset(Records(smooth, labels), chunksize=16)
        ours = BetonFile(path)
        assert ours.storage == mode and len(ours) == len(smooth)
        assert_same_records(path)
        if mode == "raw":
            for i in range(len(smooth)):
                np.testing.assert_array_equal(ours.image(i), smooth[i])

    grey = rng.integers(0, 256, (500, 28, 28, 1), dtype=np.uint8)
    path = tmp_path / "ffcv_grey.beton"
    writer = DatasetWriter(str(path), {"image": NDArrayField(np.dtype("uint8"), (28, 28, 1)), "label": IntField()},
                           num_workers=2)
    writer.from_indexed_dataset(Records(grey, labels.repeat(2)[:500]), chunksize=32)
    ours = BetonFile(path)
    np.testing.assert_array_equal(ours.images(), grey)
    np.testing.assert_array_equal(ours.labels(), labels.repeat(2)[:500])


def sha256s(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.beton"))}


@pytest.mark.parametrize("encode", ["jpg", "mix"])
def test_conversions_are_byte_identical_for_any_workers(real_data_root: Path, tmp_path: Path, encode: str) -> None:
    """The same source and options give the same bytes with 1 and 2 workers (JPEG encoding on threads), so a
    file's sha256 names its dataset; the manifest records the same sha256 and identity."""
    import json

    outs = [convert_dataset("imagefolder", real_data_root / "hymenoptera_data.tar", tmp_path / f"w{w}",
                            name="hym", encode=encode, max_side=320, workers=w, log=lambda _: None) for w in (1, 2)]
    assert sha256s(outs[0]) == sha256s(outs[1]) and len(sha256s(outs[0])) == 2
    manifests = [json.loads((out / "manifest.json").read_text()) for out in outs]
    assert manifests[0]["identity"] == manifests[1]["identity"]
    assert {s: e["sha256"] for s, e in manifests[0]["splits"].items()} == {
        f"{s}": h for s, h in ((n.split(".")[0], h) for n, h in sha256s(outs[0]).items())}


def test_mnist_conversion_byte_identical_for_any_workers(real_data_root: Path, tmp_path: Path) -> None:
    outs = [convert_dataset("mnist", real_data_root / "mnist", tmp_path / f"w{w}", workers=w, log=lambda _: None)
            for w in (1, 2)]
    assert sha256s(outs[0]) == sha256s(outs[1])
