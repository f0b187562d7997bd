"""Untrusted data runs no code and exhausts nothing: crafted CIFAR pickles, hostile tar members, decompression
bombs, headers that claim more than the file holds and checkpoints that would run code are refused or skipped
and listed, each built here in the test."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
import time
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ImageFile

from benchmarks.fuzz import bad_labels, expanding_lists
from beton_trainer.common.errors import UserError, run_cli
from beton_trainer.convert import archive, convert_dataset
from beton_trainer.convert.cli import main
from beton_trainer.convert.images import DecodeOptions, decode_image
from beton_trainer.convert.sources import ReadOptions, read_source
from beton_trainer.convert.unpickle import MAX_ITEMS, load_cifar_pickle
from beton_trainer.format.dataset import load_manifest, open_split
from tests.data_fixtures import (
    CIFAR10_CLASSES,
    structured_images,
    tar_folder,
    write_cifar10,
    write_idx,
    write_imagefolder,
    write_mnist,
)
from tests.test_convert import cli_fails


def quiet(*_: object) -> None:
    """A log function for convert_dataset that prints nothing."""


def convert(*args, **kwargs) -> Path:
    return convert_dataset(*args, log=quiet, workers=1, **kwargs)


class WritesMarker:
    """Unpickling this calls open(marker, 'w'): the file appears if the loader runs what a pickle names."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


# ---- CIFAR pickles ----

def test_cifar_pickle_that_would_run_code_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = write_cifar10(tmp_path / "src")["folder"]
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"data": WritesMarker(marker), "labels": [0] * 20}, protocol=2)
    (folder / "data_batch_1").write_bytes(payload)
    message = cli_fails(["cifar10", "--src", str(folder), "--out", str(tmp_path / "out")], capsys)
    assert "data_batch_1 is not a plain CIFAR pickle" in message and "'io.open'" in message
    assert not marker.exists() and not (tmp_path / "out").exists()
    pickle.loads(payload)  # the control: plain pickle does run it, so the assertion above could fail
    assert marker.exists()


def test_cifar_pickle_in_a_tarball_cannot_run_code_either(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path / "src")["folder"]
    marker = tmp_path / "pwned"
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [WritesMarker(marker)]}))
    with pytest.raises(UserError, match=r"batches.meta is not a plain CIFAR pickle: it asks to call 'io.open'"):
        convert("cifar10", tar_folder(folder, tmp_path / "cifar-10-python.tar.gz"), tmp_path / "out")
    assert not marker.exists()


def test_original_numpy1_pickles_still_load(tmp_path: Path) -> None:
    """The 2009 files name numpy.core.multiarray (numpy 1.x); pixels and labels come through exactly."""
    source = write_cifar10(tmp_path / "src")
    for path in source["folder"].iterdir():
        data = path.read_bytes()
        path.write_bytes(data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))
    assert b"cnumpy.core.multiarray\n" in (source["folder"] / "test_batch").read_bytes()
    data = open_split(convert("cifar10", source["folder"], tmp_path / "out"), "test")
    np.testing.assert_array_equal(data.images, source["test"][0])
    np.testing.assert_array_equal(data.labels, source["test"][1])
    assert data.classes == CIFAR10_CLASSES


# ---- archives ----

def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data)
    tar.addfile(info, io.BytesIO(data))


def _png(shape: tuple[int, int, int] = (20, 24, 3)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(structured_images(np.array([1]), shape)[0]).save(out, "PNG")
    return out.getvalue()


UNSAFE = {
    "../evil.png": "a path with '..'",
    "/tmp/evil-absolute.png": "an absolute path",
    "tree/train/cat/../../../../evil-up.png": "a path with '..'",
    "tree/train/cat/link.png": "a link (links inside archives are never followed)",
    "tree/train/dog/hard.png": "a link (links inside archives are never followed)",
    "tree/train/dog/device.png": "a device, FIFO or other special file",
}


def test_tar_members_with_links_devices_absolute_or_dotdot_paths_are_skipped(tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture) -> None:
    source = write_imagefolder(tmp_path / "tree")
    archive_path = tmp_path / "tree.tar"
    with tarfile.open(archive_path, "w") as tar:
        tar.add(tmp_path / "tree", arcname="tree")
        for name in ("../evil.png", "/tmp/evil-absolute.png", "tree/train/cat/../../../../evil-up.png"):
            _add(tar, name, _png())
        _add(tar, "tree/train/cat/link.png", kind=tarfile.SYMTYPE, link="/etc/passwd")
        _add(tar, "tree/train/dog/hard.png", kind=tarfile.LNKTYPE, link="tree/train/cat/0000.png")
        _add(tar, "tree/train/dog/device.png", kind=tarfile.CHRTYPE)
    with pytest.warns(UserWarning, match="skipped 6 file"):
        out = convert("imagefolder", archive_path, tmp_path / "out")
    manifest = load_manifest(out)
    assert manifest["skipped_files"] == UNSAFE
    train = open_split(out, "train")
    np.testing.assert_array_equal(train.images, source["train"][0])  # exactly the safe members
    assert not list(tmp_path.rglob("evil*")) and not Path("/tmp/evil-absolute.png").exists()

    message = cli_fails(["imagefolder", "--src", str(archive_path), "--out", str(tmp_path / "strict"), "--strict"],
                        capsys)
    assert message.startswith(f"error: {archive_path}: ../evil.png is a path with '..'; remove it, or drop --strict")
    assert not (tmp_path / "strict").exists()


def test_archive_with_absurd_member_count_stops(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_imagefolder(tmp_path / "tree")
    archive_path = tar_folder(tmp_path / "tree", tmp_path / "tree.tar.gz")
    argv = ["imagefolder", "--src", str(archive_path), "--out", str(tmp_path / "out")]
    message = cli_fails([*argv, "--max-files", "20"], capsys)
    assert "holds more than 20 members" in message and "--max-files" in message
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exc:  # the default limit leaves a real tree alone
        run_cli(main, [*argv, "--workers", "1"])
    assert exc.value.code == 0


def test_decompression_bomb_archive_stops_before_filling_memory(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A 60 KB .tar.gz that expands to 64 MB (a pax header of zeros: tarfile would read it all into memory)
    stops once it has expanded more than --max-expansion times; the 1 GiB floor is lowered to 1 MiB here."""
    monkeypatch.setattr(archive, "MIN_EXPANSION_BYTES", 1 << 20)
    write_imagefolder(tmp_path / "tree")
    bomb = tmp_path / "bomb.tar.gz"
    with tarfile.open(bomb, "w:gz") as tar:
        _add(tar, "header", bytes(64 << 20), kind=tarfile.XHDTYPE)
        tar.add(tmp_path / "tree", arcname="tree")
    assert bomb.stat().st_size < 200_000
    message = cli_fails(["imagefolder", "--src", str(bomb), "--out", str(tmp_path / "out")], capsys)
    assert "bomb.tar.gz expands to more than" in message and "--max-expansion" in message
    assert not (tmp_path / "out").exists()


# ---- images ----

def png_bomb(side: int) -> bytes:
    """A valid greyscale PNG of side x side zeros: ~100 KB on disk for side 10,000 (100 megapixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    squeeze = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte 0, then the row
    idat = b"".join(squeeze.compress(row) for _ in range(side)) + squeeze.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_png_bomb_is_skipped_and_never_decoded(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "tree"
    source = write_imagefolder(root)
    bomb = png_bomb(10_000)
    assert len(bomb) < 200_000
    (root / "train" / "cat" / "bomb.png").write_bytes(bomb)
    decoded = []
    real_load = ImageFile.ImageFile.load

    def recording_load(self):
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    with warnings.catch_warnings(record=True):
        out = convert("imagefolder", root, tmp_path / "out")
    assert load_manifest(out)["skipped_files"] == {
        "train/cat/bomb.png": "a decompression bomb: 10000x10000 pixels, over --max-pixels 89,478,485 (not decoded)"}
    assert (24, 20) in decoded and (10_000, 10_000) not in decoded  # the others were decoded, the bomb not
    np.testing.assert_array_equal(open_split(out, "train").images, source["train"][0])
    message = cli_fails(["imagefolder", "--src", str(root), "--out", str(tmp_path / "strict"), "--strict"], capsys)
    assert "train/cat/bomb.png is a decompression bomb" in message and not (tmp_path / "strict").exists()


def test_max_pixels_option(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    write_imagefolder(root)  # 24 x 20 = 480 pixels each
    (root / "train" / "dog" / "big.png").write_bytes(_png((30, 40, 3)))  # 1,200 pixels
    with pytest.warns(UserWarning, match="skipped 1 file"):
        out = convert("imagefolder", root, tmp_path / "out", max_pixels=1000)
    manifest = load_manifest(out)
    assert list(manifest["skipped_files"]) == ["train/dog/big.png"] and manifest["options"]["max_pixels"] == 1000
    assert decode_image(_png((30, 40, 3)), DecodeOptions(max_pixels=1200)).shape == (30, 40, 3)


# ---- checkpoints ----

class Counter:
    """A registered object, like the training loop's EMA: Accelerate unpickles it with weights_only=False."""

    def __init__(self) -> None:
        self.value = torch.zeros(3)

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def test_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    from accelerate import Accelerator

    from beton_trainer.trainer import checkpoint

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    counter = Counter()
    accelerator.register_for_checkpointing(counter)
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    folder = tmp_path / "step-000000001"
    accelerator.save_state(str(folder))

    counter.value = torch.ones(3)
    assert checkpoint.load(accelerator, folder)  # a genuine checkpoint passes the weights-only check
    assert torch.equal(counter.value, torch.zeros(3))

    marker = tmp_path / "pwned"
    torch.save({"value": WritesMarker(marker)}, folder / "custom_checkpoint_0.pkl")
    with pytest.warns(UserWarning, match=r"custom_checkpoint_0.pkl holds more than tensors and numbers \(it asks "
                                         r"for io.open\), so it was not unpickled"):
        assert not checkpoint.load(accelerator, folder)
    assert not marker.exists()
    accelerator.load_state(str(folder))  # the control: Accelerate alone unpickles it, and the file appears
    assert marker.exists()
    counter.value.close()


# ---- real data still converts ----

@pytest.mark.slow
def test_real_cifar10_tarball_has_no_unsafe_or_skipped_member(cifar10_data: Path) -> None:
    manifest = load_manifest(cifar10_data)
    assert manifest["skipped_files"] == {} and manifest["ignored_files"] == []
    assert [manifest["splits"][s]["count"] for s in ("train", "test")] == [50000, 10000]
    assert manifest["split_folders"] == {"train": "train", "test": "test"}


# ---- round 2 (issue 26): sizes a header or a pickle claims, checked before anything is allocated ----

class HugeArray:
    """Unpickles as numpy.ndarray((1_000_000, 3072), 'u1'): 3 GB of zeros from a file of under 200 bytes."""

    def __reduce__(self):
        return np.ndarray, ((1_000_000, 3072), "u1")


def test_cifar_pickle_that_builds_a_huge_array_is_refused(tmp_path: Path) -> None:
    """The allowed `numpy.ndarray`, called directly, made a 193-byte data_batch_1 convert into 1,000,040 black
    images (7.1 GB of RSS, exit 0). numpy's own pickles build an empty array and fill it from the file's bytes."""
    folder = write_cifar10(tmp_path / "src")["folder"]
    payload = pickle.dumps({"data": HugeArray(), "labels": [0] * 1_000_000}, protocol=2)
    assert len(payload) < 3_000_000
    (folder / "data_batch_1").write_bytes(payload)
    with pytest.raises(UserError, match=r"^data_batch_1 is not a CIFAR pickle: it builds an array by calling "
                                        r"numpy.ndarray directly.*; download the dataset again"):
        convert("cifar10", folder, tmp_path / "out")
    small = pickle.dumps({"data": HugeArray()}, protocol=2)
    assert len(small) < 200
    with pytest.raises(UserError, match="numpy.ndarray directly"):
        load_cifar_pickle(small, "data_batch_1")


def test_cifar_arrays_larger_than_the_format_or_of_objects_are_refused(tmp_path: Path) -> None:
    rows = np.zeros((1, 3072), dtype=np.uint8)
    too_many = pickle.dumps({"data": rows}, protocol=2).replace(b"K\x01M\x00\x0c", b"J@B\x0f\x00M\x00\x0c")
    with pytest.raises(UserError, match=r"an array of shape \(1000000, 3072\), larger than any CIFAR file holds"):
        load_cifar_pickle(too_many, "data_batch_1")  # 1,000,000 x 3072 claimed, refused before numpy allocates
    with pytest.raises(UserError, match="an array of dtype 'object'"):
        load_cifar_pickle(pickle.dumps({"data": np.array(["x"], dtype=object)}, protocol=2), "data_batch_1")
    folder = write_cifar10(tmp_path / "src", batch_size=20)["folder"]
    eleven_thousand = pickle.dumps({"data": np.zeros((11_000, 3072), dtype=np.uint8), "labels": [0] * 11_000},
                                   protocol=2)
    (folder / "data_batch_2").write_bytes(eleven_thousand)
    with pytest.raises(UserError, match=r"data_batch_2: 'data' holds 11,000 images, more than the 10,000 this CIFAR "
                                        "file holds"):
        convert("cifar10", folder, tmp_path / "out")
    assert not (tmp_path / "out" / "cifar10").exists()


def test_idx_header_whose_size_wraps_in_64_bits_is_refused(tmp_path: Path) -> None:
    """2^32-1 x 2^32-1 x 2^32-1 items wrapped to a small number in numpy's int64 product, so a 16-byte file
    passed the length check and ended in a traceback."""
    folder = tmp_path / "mnist"
    write_mnist(folder, gz=False)
    huge = 2**32 - 1
    (folder / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", huge, huge, huge))
    with pytest.raises(UserError, match=rf"header says {huge} items \(\d+ bytes\) but the file has 16 bytes"):
        convert("mnist", folder, tmp_path / "out")


def test_idx_file_with_no_items_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "mnist"
    write_mnist(folder)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", np.zeros((0, 28, 28), dtype=np.uint8))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(0, dtype=np.uint8))
    with pytest.raises(UserError, match=r"^t10k-images-idx3-ubyte.gz: its header says 0 x 28 x 28, no data; pass a "
                                        "file that holds items"):
        convert("mnist", folder, tmp_path / "out")
    write_idx(folder / "t10k-images-idx3-ubyte.gz", np.zeros((10, 0, 28), dtype=np.uint8))
    with pytest.raises(UserError, match="its header says 10 x 0 x 28, no data"):
        convert("mnist", folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cifar_split_with_no_images_is_refused(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path / "src")["folder"]
    (folder / "test_batch").write_bytes(pickle.dumps({"data": np.zeros((0, 3072), dtype=np.uint8), "labels": []},
                                                     protocol=2))
    with pytest.raises(UserError, match=r"the test split holds no images; pass a source with images in every split"):
        convert("cifar10", folder, tmp_path / "out")


def test_gzipped_idx_that_expands_past_max_expansion_stops_early(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1.1 MB train-images-idx3-ubyte.gz expanded to 1.1 GB (2.2 GB of RSS) before its count was checked:
    now it is decompressed as a stream, only as far as its header says and never past --max-expansion (whose
    1 GiB floor is lowered to 1 MiB here)."""
    monkeypatch.setattr(archive, "MIN_EXPANSION_BYTES", 1 << 20)
    folder = tmp_path / "mnist"
    write_mnist(folder)
    header = b"\x00\x00\x08\x03" + struct.pack(">3I", 60_000, 28, 28)  # 47 MB of zeros: about 46 KB gzipped
    squeeze = zlib.compressobj(9, wbits=31)
    bomb = squeeze.compress(header) + b"".join(squeeze.compress(bytes(1 << 20)) for _ in range(45))
    (folder / "train-images-idx3-ubyte.gz").write_bytes(bomb + squeeze.flush())
    with pytest.raises(UserError, match=r"^train-images-idx3-ubyte.gz \(its header claims 60,000 items\) expands to "
                                        r"more than .*raise --max-expansion"):
        convert("mnist", folder, tmp_path / "out")
    # a header that fits, with the rest of the stream going on far past it: read only one byte past its size
    squeeze = zlib.compressobj(9, wbits=31)
    header = b"\x00\x00\x08\x03" + struct.pack(">3I", 30, 28, 28)
    endless = squeeze.compress(header) + b"".join(squeeze.compress(bytes(1 << 20)) for _ in range(200))
    (folder / "train-images-idx3-ubyte.gz").write_bytes(endless + squeeze.flush())
    read = []
    real_read = gzip.GzipFile.read
    monkeypatch.setattr(gzip.GzipFile, "read", lambda self, size=-1: read.append(size) or real_read(self, size))
    with pytest.raises(UserError, match=r"header says 30 items \(23536 bytes\) but the file has more bytes"):
        convert("mnist", folder, tmp_path / "out")
    assert max(read) == 30 * 28 * 28 + 1


def test_archive_member_that_is_not_an_image_is_skipped_unread(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2.1 MB .tar.gz holding one 900 MiB member named .jpg cost 2.8 GB of RSS: it was read whole before PIL
    found it was no image. Its first 16 bytes tell; and a member larger than any --max-pixels image is not read."""
    source = write_imagefolder(tmp_path / "tree")
    archive_path = tmp_path / "tree.tar.gz"
    with tarfile.open(archive_path, "w:gz") as tar:
        tar.add(tmp_path / "tree", arcname="tree")
        _add(tar, "tree/train/cat/zeros.jpg", bytes(8 << 20))
        _add(tar, "tree/train/dog/huge.png", _png()[:16] + bytes(32 << 20))
    assert archive_path.stat().st_size < 1_000_000
    reads = []
    real_read = tarfile.ExFileObject.read
    monkeypatch.setattr(tarfile.ExFileObject, "read",
                        lambda self, size=-1: (data := real_read(self, size), reads.append(len(data)))[0])
    with pytest.warns(UserWarning, match="skipped 2 file"):
        out = convert("imagefolder", archive_path, tmp_path / "out", max_pixels=1000)
    assert load_manifest(out)["skipped_files"] == {
        "tree/train/cat/zeros.jpg": "not an image PIL can read",
        "tree/train/dog/huge.png": "33,554,448 bytes, more than any image of --max-pixels 1,000 pixels needs "
                                   "(16,785,216; not read)"}
    assert max(reads) < 1 << 20  # neither was read whole
    np.testing.assert_array_equal(open_split(out, "train").images, source["train"][0])


def test_a_bomb_over_twice_the_limit_names_our_limit_not_pils(tmp_path: Path) -> None:
    """PIL refuses an image over twice its limit itself, and its message quoted 178,956,970 pixels where the
    README (and --max-pixels) say 89,478,485."""
    reason = decode_image(png_bomb(13_400), DecodeOptions())  # 179,560,000 pixels
    assert reason == "a decompression bomb: 179,560,000 pixels, over --max-pixels 89,478,485 (not decoded)"
    assert decode_image(png_bomb(10_000), DecodeOptions()).startswith(
        "a decompression bomb: 10000x10000 pixels, over --max-pixels 89,478,485")


def test_archive_member_shorter_than_a_signature_is_skipped(tmp_path: Path) -> None:
    """Found by the converter fuzzing: a member of 2 bytes named .jpg made PIL's BMP signature test raise."""
    source = write_imagefolder(tmp_path / "tree")
    archive_path = tmp_path / "tree.tar"
    with tarfile.open(archive_path, "w") as tar:
        tar.add(tmp_path / "tree", arcname="tree")
        _add(tar, "tree/train/cat/short.jpg", b"\xff\xd8")
    with pytest.warns(UserWarning, match="skipped 1 file"):
        out = convert("imagefolder", archive_path, tmp_path / "out")
    assert load_manifest(out)["skipped_files"] == {"tree/train/cat/short.jpg": "not an image PIL can read"}
    np.testing.assert_array_equal(open_split(out, "train").images, source["train"][0])


def test_cifar_file_larger_than_any_cifar_file_is_refused_unread(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A member is read whole before it is unpickled: one larger than CIFAR-100's train pickle (155 MB; the cap,
    256 MiB, is lowered to 1 MB here) stops with one line from its size alone."""
    from beton_trainer.convert import sources

    monkeypatch.setattr(sources, "CIFAR_MAX_FILE_BYTES", 1 << 20)
    folder = write_cifar10(tmp_path / "src")["folder"]
    (folder / "data_batch_4").write_bytes(bytes(2 << 20))
    for src in (folder, tar_folder(folder, tmp_path / "cifar-10-python.tar.gz")):
        with pytest.raises(UserError, match=r"data_batch_4 is 2,097,152 bytes, more than any such file holds "
                                            r"\(1,048,576 at most\); download the dataset again"):
            convert("cifar10", src, tmp_path / "out")


# ---- round 3 (issue 40): pickles that expand when walked, labels of the wrong type ----

def shared_lists(levels: int) -> list:
    """A list holding one list twice, `levels` deep: a few hundred bytes pickled (the memo shares it), 2**levels
    items once walked."""
    node: list = [0]
    for _ in range(levels):
        node = [node, node]
    return node


def test_cifar_lists_that_expand_when_walked_are_refused_before_anything_walks_them(tmp_path: Path) -> None:
    """27 levels took 4.26 GB and 32 s before a one-line error, and 22 levels in batches.meta converted, with two
    33.5 MB class names. 22 levels (4M items once walked) are refused here, in either file, in a few MB."""
    folder = write_cifar10(tmp_path / "src")["folder"]
    assert len(pickle.dumps(shared_lists(22), protocol=2)) < 200
    batch = pickle.dumps({"data": np.zeros((20, 3072), np.uint8), "labels": shared_lists(22)}, protocol=2)
    meta = pickle.dumps({"label_names": shared_lists(22)}, protocol=2)
    for name, payload in (("data_batch_1", batch), ("batches.meta", meta)):
        original = (folder / name).read_bytes()
        (folder / name).write_bytes(payload)
        tracemalloc.start()
        with pytest.raises(UserError, match=rf"^{name} is not a CIFAR pickle: it builds a list (reached twice|nested "
                                            r"3 deep).*; download the dataset again"):
            convert("cifar10", folder, tmp_path / "out")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 16 << 20, f"{name}: {peak / 2**20:.0f} MiB"
        (folder / name).write_bytes(original)
    assert not (tmp_path / "out").exists()


def test_seeded_expanding_lists_load_exactly_when_a_cifar_file_could_hold_them() -> None:
    """300 seeded structures (lists shared level after level, fresh lists deep and wide, mixed, cyclic, flat lists
    of up to 400,000 items, one string repeated) as a data batch's labels or a meta file's class names: each is
    loaded when a CIFAR file could hold it and refused with one line otherwise, in bounded time and memory."""
    rng = np.random.default_rng(40)
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(300):
        values, allowed = expanding_lists(rng)
        key = "labels" if case % 2 else "label_names"
        payload = pickle.dumps({"data": np.zeros((1, 3072), np.uint8), key: values}, protocol=2)
        del values
        tracemalloc.start()
        start = time.perf_counter()
        try:
            loaded = load_cifar_pickle(payload, "data_batch_1")
            assert allowed, f"case {case}: loaded what no CIFAR file holds"
            assert len(loaded[key]) <= MAX_ITEMS and all(not isinstance(v, list) for v in loaded[key])
            outcomes["loaded"] += 1
        except UserError as exc:
            assert not allowed, f"case {case}: refused a plain list: {exc}"
            assert "\n" not in str(exc) and str(exc).startswith("data_batch_1 is not a CIFAR pickle: it builds ")
            outcomes["refused"] += 1
        seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert seconds < 5 and peak < 8 * len(payload) + (64 << 20), (case, seconds, peak)
    assert min(outcomes.values()) >= 30, outcomes


def test_labels_of_the_wrong_type_are_one_line_naming_the_file_and_the_first_bad_index(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Labels 2**70, 'a', None, a dict or [[0, 1]] * 10 ended in a traceback (exit 1); labels of 0.9 converted as
    class 0 (exit 0). 60 seeded cases of a wrong label (a float, a huge or negative integer, a class past the
    last, a string, bytes, None, a bool, a dict, a list or tuple) at a seeded place, or labels that are no list,
    in a seeded batch: each one line, naming the file and the first bad index."""
    source = write_cifar10(tmp_path / "src")
    folder = source["folder"]
    originals = {p.name: p.read_bytes() for p in folder.iterdir()}
    rng = np.random.default_rng(41)
    for case in range(60):
        name = str(rng.choice([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]))
        labels, at = bad_labels(rng, 20)
        (folder / name).write_bytes(pickle.dumps({"data": np.zeros((20, 3072), np.uint8), "labels": labels},
                                                 protocol=2))
        if case < 6:  # through the command line: exit status 2 and one line
            message = cli_fails(["cifar10", "--src", str(folder), "--out", str(tmp_path / "out")], capsys)
            message = message.removeprefix("error: ")
        else:
            with pytest.raises(UserError) as caught:
                read_source("cifar10", folder, ReadOptions(workers=1))
            message = str(caught.value)
        if at is None:
            assert message.startswith(f"{name}: 'labels' is ") and "not a list of labels" in message, message
        elif isinstance(labels[at], (list, tuple, dict)):
            assert message.startswith(f"{name} is not a CIFAR pickle: it builds a "), message
        else:
            assert message.startswith(f"{name}: 'labels'[{at}] is ") and "not a class index in [0, 10)" in message
        (folder / name).write_bytes(originals[name])
    assert not (tmp_path / "out").exists()


def test_float_labels_are_refused_not_truncated(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Labels of 0.9 converted with status 0, every one class 0."""
    folder = write_cifar10(tmp_path / "src")["folder"]
    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": np.zeros((20, 3072), np.uint8),
                                                        "labels": [0.9] * 20}, protocol=2))
    assert cli_fails(["cifar10", "--src", str(folder), "--out", str(tmp_path / "out")], capsys) == (
        "error: data_batch_3: 'labels'[0] is 0.9, not a class index in [0, 10); download the dataset again")


def test_class_names_are_bounded_in_count_and_length(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path / "src")["folder"]
    for names, match in (([f"c{i}" for i in range(11)], r"'label_names' holds 11 names, not the 10 class names"),
                         (["x" * 1000] * 10, r"'label_names'\[0\] is 'xxx.*', not a class name of 1 to 200 characters"),
                         ([3] * 10, r"'label_names'\[0\] is 3, not a class name"),
                         ({"a": 1}, r"'label_names' holds no list")):
        (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}, protocol=2))
        with pytest.raises(UserError, match=rf"^batches.meta: {match}"):
            convert("cifar10", folder, tmp_path / "out")
