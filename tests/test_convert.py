"""The converters: every source format round-trips exactly, outputs are atomic and idempotent, bad input
fails with one line (exit status 2) and writes nothing."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from beton_trainer.common.errors import UserError, run_cli
from beton_trainer.convert import build, convert_dataset
from beton_trainer.convert.cli import main
from beton_trainer.format.dataset import load_manifest, open_split
from tests.data_fixtures import (
    CIFAR10_CLASSES,
    structured_images,
    tar_folder,
    write_cifar10,
    write_cifar100,
    write_idx,
    write_imagefolder,
    write_mnist,
)


def quiet(*_: object) -> None:
    """A log function for convert_dataset that prints nothing."""


def convert(*args, **kwargs) -> Path:
    return convert_dataset(*args, log=quiet, **kwargs)


def read_idx_gz(path: Path) -> np.ndarray:
    """An independent IDX reader: big-endian dims after the 4-byte magic."""
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def cli_fails(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run the CLI, expect exit status 2, and return its one-line error."""
    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
    return err[-1]


# ---- real data ----

def test_mnist_real_data_round_trips_exactly(mnist_data: Path, real_data_root: Path) -> None:
    manifest = load_manifest(mnist_data)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx_gz(real_data_root / "mnist" / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx_gz(real_data_root / "mnist" / f"{prefix}-labels-idx1-ubyte.gz")
        data = open_split(mnist_data, split)
        assert data.images.shape == (len(images), 28, 28, 1) and data.images.dtype == np.uint8
        np.testing.assert_array_equal(data.images[..., 0], images)
        np.testing.assert_array_equal(data.labels, labels)
        assert manifest["splits"][split]["count"] == len(labels)
        assert manifest["splits"][split]["histogram"] == np.bincount(labels, minlength=10).tolist()
    assert manifest["storage"] == "ndarray" and manifest["image_shape"] == [28, 28, 1]
    assert manifest["classes"] == [str(d) for d in range(10)]
    assert manifest["mean"][0] == pytest.approx(0.1307, abs=5e-4)
    assert manifest["std"][0] == pytest.approx(0.3081, abs=5e-4)


FASHION = Path(os.environ.get("FASHION_MNIST_ROOT", "/usr/share/datasets/fashion-mnist"))


def test_fashion_mnist_real_data_round_trips_exactly(tmp_path: Path) -> None:
    """Debian's dataset-fashion-mnist (gzipped IDX, as users have it): exact arrays, the ten class names."""
    if not FASHION.is_dir():
        message = f"Fashion-MNIST not found at {FASHION}: apt-get install dataset-fashion-mnist"
        if os.environ.get("REQUIRE_REAL_DATA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    out = convert_dataset("fashion-mnist", FASHION, tmp_path, log=lambda _: None)
    manifest = load_manifest(out)
    assert manifest["classes"][0] == "T-shirt/top" and manifest["classes"][9] == "Ankle boot"
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx_gz(FASHION / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx_gz(FASHION / f"{prefix}-labels-idx1-ubyte.gz")
        data = open_split(out, split)
        np.testing.assert_array_equal(data.images[..., 0], images)
        np.testing.assert_array_equal(data.labels, labels)
        assert manifest["splits"][split]["histogram"] == [len(labels) // 10] * 10


@pytest.mark.slow
def test_cifar10_jpeg_tarball_converts(cifar10_data: Path, real_data_root: Path) -> None:
    """The shared tarball: 50,000 / 10,000 images, 5,000 / 1,000 per class, pixels equal to the JPEGs."""
    train = open_split(cifar10_data, "train")
    test = open_split(cifar10_data, "test")
    manifest = train.manifest
    assert manifest["name"] == "cifar10-jpeg" and manifest["classes"] == CIFAR10_CLASSES
    assert train.images.shape == (50000, 32, 32, 3) and test.images.shape == (10000, 32, 32, 3)
    assert np.bincount(train.labels).tolist() == [5000] * 10 == manifest["splits"]["train"]["histogram"]
    assert np.bincount(test.labels).tolist() == [1000] * 10 == manifest["splits"]["test"]["histogram"]
    assert all(0.4 < m < 0.55 for m in manifest["mean"]) and all(0.2 < s < 0.3 for s in manifest["std"])
    # Independently decode a few JPEGs of class 'truck' (label 9) from the tarball and find them in order.
    with tarfile.open(real_data_root / "cifar10-jpeg.tar.xz") as tar:
        names = sorted(n for n in tar.getnames() if n.startswith("cifar10-jpeg/test/truck/"))
        for k in (0, len(names) - 1):
            want = np.asarray(Image.open(io.BytesIO(tar.extractfile(names[k]).read())).convert("RGB"))
            np.testing.assert_array_equal(test.images[9000 + k], want)


# ---- CIFAR pickles ----

@pytest.mark.parametrize("layout", ["folder", "tar.gz", "parent"])
def test_cifar10_pickles_round_trip_exactly(tmp_path: Path, layout: str) -> None:
    source = write_cifar10(tmp_path / "src")
    src = {"folder": source["folder"], "parent": tmp_path / "src",  # torchvision's root: files one level down
           "tar.gz": tar_folder(source["folder"], tmp_path / "cifar-10-python.tar.gz")}[layout]
    out = convert("cifar10", src, tmp_path / "out")
    assert out == tmp_path / "out" / "cifar10"
    for split in ("train", "test"):
        data = open_split(out, split)
        images, labels = source[split]
        np.testing.assert_array_equal(data.images, images)
        np.testing.assert_array_equal(data.labels, labels)
    assert data.classes == CIFAR10_CLASSES and data.manifest["storage"] == "raw"
    assert data.manifest["splits"]["train"]["count"] == 100
    assert data.mean == pytest.approx(tuple(source["train"][0].reshape(-1, 3).mean(0) / 255))
    assert data.std == pytest.approx(tuple(source["train"][0].reshape(-1, 3).std(0) / 255))


@pytest.mark.parametrize("as_tar", [False, True], ids=["folder", "tar.gz"])
def test_cifar100_keeps_fine_and_coarse_labels(tmp_path: Path, as_tar: bool) -> None:
    source = write_cifar100(tmp_path / "src")
    src = tar_folder(source["folder"], tmp_path / "cifar-100-python.tar.gz") if as_tar else source["folder"]
    out = convert("cifar100", src, tmp_path / "out")
    for split in ("train", "test"):
        data = open_split(out, split)
        images, fine, coarse = source[split]
        np.testing.assert_array_equal(data.images, images)
        np.testing.assert_array_equal(data.labels, fine)
        np.testing.assert_array_equal(data.coarse_labels, coarse)
    assert data.num_classes == 100 and len(data.manifest["coarse_classes"]) == 20
    assert data.manifest["fields"] == ["image", "label", "coarse_label"]


def test_fashion_mnist_uncompressed_idx(tmp_path: Path) -> None:
    source = write_mnist(tmp_path / "fashion", gz=False)
    data = open_split(convert("fashion-mnist", tmp_path / "fashion", tmp_path / "out"), "test")
    np.testing.assert_array_equal(data.images[..., 0], source["test"][0])
    assert data.classes[0] == "T-shirt/top" and data.classes[9] == "Ankle boot"


# ---- ImageFolder ----

@pytest.mark.parametrize("archive", [None, "tree.tar.gz"])
def test_imagefolder_raw_is_exact(tmp_path: Path, archive: str | None) -> None:
    root = tmp_path / "tree"
    source = write_imagefolder(root)
    (root / "README.txt").write_text("outside the split folders: ignored")
    src = tar_folder(root, tmp_path / archive) if archive else root
    out = convert("imagefolder", src, tmp_path / "out")
    assert out.name == "tree"
    for split in ("train", "test"):
        data = open_split(out, split)
        np.testing.assert_array_equal(data.images, source[split][0])
        np.testing.assert_array_equal(data.labels, source[split][1])
    assert data.classes == ["cat", "dog", "frog"] and data.manifest["skipped_files"] == {}
    assert data.manifest["image_shape"] == [20, 24, 3]


def test_imagefolder_jpg_within_tolerance(tmp_path: Path) -> None:
    source = write_imagefolder(tmp_path / "tree", shape=(48, 64, 3), noise=2)  # smooth, photo-like
    out = convert("imagefolder", tmp_path / "tree", tmp_path / "out", encode="jpg", quality=90)
    data = open_split(out, "train")
    assert data.manifest["storage"] == "jpg"
    assert data.images.shape == source["train"][0].shape
    error = np.abs(data.images.astype(int) - source["train"][0]).mean()
    assert 0 < error < 4  # lossy, but the same pictures
    low = open_split(convert("imagefolder", tmp_path / "tree", tmp_path / "out", name="low", encode="jpg",
                             quality=10), "train")
    assert np.abs(low.images.astype(int) - source["train"][0]).mean() > error


def test_imagefolder_max_side_and_mixed_sizes(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    write_imagefolder(root, shape=(40, 30, 3))
    Image.fromarray(structured_images(np.array([0]), (80, 60, 3))[0]).save(root / "train" / "cat" / "big.png")
    mixed = convert("imagefolder", root, tmp_path / "out")
    assert load_manifest(mixed)["image_shape"] is None
    with pytest.raises(UserError, match="one image size.*--max-side"):
        open_split(mixed, "train")
    shrunk = open_split(convert("imagefolder", root, tmp_path / "out", name="small", max_side=20), "train")
    assert shrunk.images.shape[1:] == (20, 15, 3)


def test_imagefolder_memory_does_not_hold_the_tree(tmp_path: Path) -> None:
    """A photo tree converts in memory that does not grow with it: 160 photos of 1500x1000 decode to 720 MB,
    yet the most the conversion holds at once (tracemalloc: numpy arrays and Python objects, not what the
    allocator or the page cache keeps; decoding in-process with workers=1) is a part of that, and the
    spill file that held the pixels is gone afterwards. The output bytes are those of the in-memory path
    (the real CIFAR-10 tarball converts to the same sha256 as before the spill file)."""
    import tracemalloc

    root = tmp_path / "tree"
    rows = np.linspace(0, 255, 1000, dtype=np.uint8)[:, None, None]
    for split, n in (("train", 140), ("val", 20)):
        for k in range(n):
            folder = root / split / ("ants" if k % 2 else "bees")
            folder.mkdir(parents=True, exist_ok=True)
            image = np.broadcast_to(rows, (1000, 1500, 3)).copy()
            image[:, :, k % 3] = k  # every photo differs
            Image.fromarray(image).save(folder / f"{k:03d}.jpg", quality=90)
    decoded = 160 * 1000 * 1500 * 3
    tracemalloc.start()
    try:
        convert("imagefolder", root, tmp_path / "out", encode="jpg", workers=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # what is held at once: one decoding chunk (32 photos, 144 MB here) and the image being written
    assert peak < decoded / 3, f"held {peak / 1e6:.0f} MB at once for {decoded / 1e6:.0f} MB of decoded pixels"
    data = open_split(tmp_path / "out" / "tree", "train")
    assert len(data.labels) == 140 and data.manifest["image_shape"] == [1000, 1500, 3]
    ants = sorted((root / "train" / "ants").iterdir())  # class 0, in path order
    errors = [np.abs(data.images[2].astype(int) - np.asarray(Image.open(path))).mean() for path in ants[:4]]
    assert errors[2] < 1.5 and min(errors[:2] + errors[3:]) > 2 * errors[2]  # record 2 is the third ant photo
    assert not list(tmp_path.rglob(".decoded-*"))  # the spill file was never left behind under a name


def test_imagefolder_skips_bad_files_or_fails_strict(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "tree"
    write_imagefolder(root)
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    with pytest.warns(UserWarning, match="skipped 2"):
        out = convert("imagefolder", root, tmp_path / "out")
    manifest = load_manifest(out)
    assert list(manifest["skipped_files"]) == ["train/cat/broken.jpg", "train/dog/notes.txt"]
    assert manifest["skipped_files"]["train/cat/broken.jpg"] == "not an image PIL can read"
    assert manifest["splits"]["train"]["count"] == 24
    strict = ["imagefolder", "--src", str(root), "--out", str(tmp_path / "strict"), "--strict"]
    assert "train/dog/notes.txt is not an image file" in cli_fails(strict, capsys)
    (root / "train" / "dog" / "notes.txt").unlink()
    message = cli_fails(strict, capsys)
    assert "train/cat/broken.jpg is not an image PIL can read" in message and "--strict" in message
    assert not (tmp_path / "strict").exists()


# ---- val split, idempotency, atomicity ----

def test_val_split_is_stratified_and_seeded(tmp_path: Path) -> None:
    source = write_cifar10(tmp_path / "src", batch_size=40)  # 200 train, 20 per class
    first = convert("cifar10", source["folder"], tmp_path / "a", val_fraction=0.25, seed=3)
    again = convert("cifar10", source["folder"], tmp_path / "b", val_fraction=0.25, seed=3)
    other = convert("cifar10", source["folder"], tmp_path / "c", val_fraction=0.25, seed=4)
    train, val = open_split(first, "train"), open_split(first, "val")
    assert np.bincount(val.labels, minlength=10).tolist() == [5] * 10
    assert val.manifest["splits"]["val"]["histogram"] == [5] * 10
    assert train.manifest["splits"]["train"]["count"] == 150
    # val and train together are exactly the source's train set
    rows = {im.tobytes(): lab for im, lab in zip(*source["train"])}
    together = np.concatenate([train.images, val.images])
    assert len({im.tobytes() for im in together}) == 200
    assert all(rows[im.tobytes()] == lab for im, lab in zip(together, np.concatenate([train.labels, val.labels])))
    np.testing.assert_array_equal(open_split(again, "val").images, val.images)
    assert not np.array_equal(open_split(other, "val").images, val.images)
    # mean/std come from the train split after the val split is carved out
    assert train.mean == pytest.approx(tuple(train.images.reshape(-1, 3).mean(0) / 255))


def test_second_run_skips_and_force_rebuilds(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = write_cifar10(tmp_path / "src")
    argv = ["cifar10", "--src", str(source["folder"]), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    assert exc.value.code == 0 and "train 100, test 20" in capsys.readouterr().out
    manifest_path = tmp_path / "out" / "cifar10" / "manifest.json"
    before = manifest_path.stat().st_mtime_ns
    with pytest.raises(SystemExit):
        run_cli(main, argv)
    assert "up to date, skipping (use --force to rebuild)" in capsys.readouterr().out
    assert manifest_path.stat().st_mtime_ns == before
    # other options on the same output: refused without --force, nothing touched
    message = cli_fails([*argv, "--val-fraction", "0.2"], capsys)
    assert "--force" in message and manifest_path.stat().st_mtime_ns == before
    with pytest.raises(SystemExit):
        run_cli(main, [*argv, "--val-fraction", "0.2", "--force"])
    assert sorted(json.loads(manifest_path.read_text())["splits"]) == ["test", "train", "val"]
    # a damaged beton is not "up to date"
    with open(tmp_path / "out" / "cifar10" / "test.beton", "r+b") as fh:
        fh.seek(-10, 2)
        fh.write(b"0123456789")
    assert "--force" in cli_fails([*argv, "--val-fraction", "0.2"], capsys)


def test_failure_mid_write_leaves_nothing_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_cifar10(tmp_path / "src")
    real_write = build.write_beton

    def write_then_fail(path: Path, split, **kwargs) -> None:
        real_write(path, split, **kwargs)
        if len(split) == 20:  # the test split, after train was written
            raise OSError("disk full")

    monkeypatch.setattr(build, "write_beton", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        convert("cifar10", source["folder"], tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out" / "cifar10").iterdir()) == []
    with pytest.raises(UserError, match="manifest.json is missing"):
        open_split(tmp_path / "out" / "cifar10", "train")

    # a failed --force rebuild leaves the previous complete output usable
    monkeypatch.setattr(build, "write_beton", real_write)
    out = convert("cifar10", source["folder"], tmp_path / "out")
    monkeypatch.setattr(build, "write_beton", write_then_fail)
    with pytest.raises(OSError):
        convert("cifar10", source["folder"], tmp_path / "out", force=True)
    np.testing.assert_array_equal(open_split(out, "test").images, source["test"][0])


def test_verification_failure_removes_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_cifar10(tmp_path / "src")
    real_write = build.write_beton

    def write_other_pixels(path: Path, split, **kwargs) -> None:
        real_write(path, split.subset(np.arange(len(split))[::-1]), **kwargs)

    monkeypatch.setattr(build, "write_beton", write_other_pixels)
    with pytest.raises(UserError, match="verification of .*train.* failed"):
        convert("cifar10", source["folder"], tmp_path / "out")
    assert list((tmp_path / "out" / "cifar10").iterdir()) == []


# ---- bad input: one line, exit status 2, nothing written ----

def test_missing_source(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    message = cli_fails(["cifar10", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "out")], capsys)
    assert "does not exist" in message and "--src" in message
    assert not (tmp_path / "out").exists()


def test_cifar10_pointed_at_mnist_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_mnist(tmp_path / "mnist")
    message = cli_fails(["cifar10", "--src", str(tmp_path / "mnist"), "--out", str(tmp_path / "out")], capsys)
    assert "not a cifar10 source" in message and "beton-convert mnist" in message
    assert not (tmp_path / "out").exists()


def test_truncated_pickle(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = write_cifar10(tmp_path / "src")["folder"]
    batch = folder / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:1000])
    message = cli_fails(["cifar10", "--src", str(folder), "--out", str(tmp_path / "out")], capsys)
    assert "data_batch_3 is truncated or not a CIFAR pickle" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, expected", [
    ("magic", "IDX magic"),
    ("count", "header says 31 items"),
    ("lengths", "30 images but 25 labels"),
])
def test_bad_idx_files(tmp_path: Path, capsys: pytest.CaptureFixture, damage: str, expected: str) -> None:
    folder = tmp_path / "mnist"
    source = write_mnist(folder)
    images, labels = source["train"]
    if damage == "magic":
        write_idx(folder / "train-images-idx3-ubyte.gz", images, magic=b"\x00\x00\x09\x03")
    elif damage == "count":
        write_idx(folder / "train-images-idx3-ubyte.gz", images, dims=(31, 28, 28))
    else:
        write_idx(folder / "train-labels-idx1-ubyte.gz", labels[:25].astype(np.uint8))
    message = cli_fails(["mnist", "--src", str(folder), "--out", str(tmp_path / "out")], capsys)
    assert expected in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, expected", [
    ("no_classes", "split folder 'test' has no class folders"),
    ("empty_class", "test/dog has no usable images"),
    ("class_sets", "different classes"),
    ("no_test", "has a 'train' folder but no 'val' or 'test' folder"),
])
def test_bad_imagefolder(tmp_path: Path, capsys: pytest.CaptureFixture, damage: str, expected: str) -> None:
    root = tmp_path / "tree"
    write_imagefolder(root)
    if damage == "no_classes":
        shutil.rmtree(root / "test")
        (root / "test").mkdir()
    elif damage == "empty_class":
        shutil.rmtree(root / "test" / "dog")
        (root / "test" / "dog").mkdir()
    elif damage == "class_sets":
        (root / "test" / "frog").rename(root / "test" / "toad")
    else:
        shutil.rmtree(root / "test")
    message = cli_fails(["imagefolder", "--src", str(root), "--out", str(tmp_path / "out")], capsys)
    assert expected in message
    assert not (tmp_path / "out").exists()


def test_truncated_tarball(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_imagefolder(tmp_path / "tree")
    archive = tar_folder(tmp_path / "tree", tmp_path / "tree.tar.gz")
    archive.write_bytes(archive.read_bytes()[:3000])
    message = cli_fails(["imagefolder", "--src", str(archive), "--out", str(tmp_path / "out")], capsys)
    assert "tree.tar.gz is not a readable folder or tar archive" in message
    assert not (tmp_path / "out").exists()


def test_output_path_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = write_cifar10(tmp_path / "src")["folder"]
    (tmp_path / "out").write_text("a file")
    message = cli_fails(["cifar10", "--src", str(folder), "--out", str(tmp_path / "out")], capsys)
    assert "is a file" in message and (tmp_path / "out").read_text() == "a file"


def test_download_offline_says_how_to_fetch_by_hand(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    def offline(*_args, **_kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nName or service not known")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    message = cli_fails(["mnist", "--src", str(tmp_path / "dl"), "--out", str(tmp_path / "out"), "--download"],
                        capsys)
    assert "could not download mnist" in message and "pass --src" in message


def test_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_mnist(tmp_path / "mnist")
    base = ["mnist", "--src", str(tmp_path / "mnist"), "--out", str(tmp_path / "out")]
    assert "--val-fraction" in cli_fails([*base, "--val-fraction", "1.5"], capsys)
    assert "--encode jpg is for RGB" in cli_fails([*base, "--encode", "jpg"], capsys)
    assert "imagefolder only" in cli_fails([*base, "--max-side", "8"], capsys)
    assert not (tmp_path / "out").exists()


def test_a_full_disk_while_keeping_decoded_photos_is_one_line(tmp_path: Path, monkeypatch) -> None:
    """The spill file's write failing (ENOSPC) ends the conversion with one line naming the folder and the fix."""
    import errno

    from beton_trainer.convert import spill

    class FullDisk:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.file, name)

    write_imagefolder(tmp_path / "tree")
    fdopen = os.fdopen
    monkeypatch.setattr(spill.os, "fdopen", lambda fd, mode: FullDisk(fdopen(fd, mode)))
    with pytest.raises(UserError, match=f"decoded images in {tmp_path} .No space left on device.*decoded size"):
        convert("imagefolder", tmp_path / "tree", tmp_path / "out")
    assert not (tmp_path / "out").exists()
