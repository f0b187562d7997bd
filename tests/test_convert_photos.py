"""Photo datasets through the ImageFolder converter: train/val and train/test layouts, JPEG with a maximum side
and FFCV's mixed mode, any PIL image mode to RGB with EXIF orientation, deterministic parallel decoding, and
every kind of bad file as a listed skip or a one-line error that writes nothing. Small generated trees; the
real hymenoptera tarball is converted once per session (tests/conftest.py)."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from beton_trainer.common.errors import UserError, run_cli
from beton_trainer.convert import convert_dataset
from beton_trainer.convert.cli import main
from beton_trainer.format import BetonFile, load_manifest
from tests.test_convert import cli_fails

SIZES = [(60, 80), (96, 72), (50, 50), (40, 120)]  # (H, W), cycled through the files
CLASSES = ("ants", "bees")
GIF = "hymenoptera_data/train/ants/imageNotFound.gif"


def quiet(*_: object) -> None:
    """A log function for convert_dataset that prints nothing."""


def convert(*args, **kwargs) -> Path:
    return convert_dataset(*args, log=quiet, **{"workers": 1, **kwargs})


def photo(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth gradients, different for every seed: compresses like a photo, so JPEG errors stay small."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    phase = np.random.default_rng(seed).uniform(0, 2 * np.pi, 3)
    pixels = [128 + 90 * np.sin(np.pi * (x + y * k) + phase[k]) for k in range(3)]
    return np.stack(pixels, axis=-1).round().astype(np.uint8)


def write_tree(root: Path, per_class: dict[str, int]) -> dict[str, tuple[list[np.ndarray], list[int]]]:
    """`root/<folder>/<class>/NNNN.png` of varied sizes; {folder: (images, labels)} in (class, file) order."""
    result = {}
    for f, (folder, n) in enumerate(per_class.items()):
        images, labels = [], []
        for label, cls in enumerate(CLASSES):
            for i in range(n):
                image = photo(*SIZES[(i + label) % len(SIZES)], seed=100 * f + 10 * label + i)
                path = root / folder / cls / f"{i:04d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(path)
                images.append(image)
                labels.append(label)
        result[folder] = (images, labels)
    return result


def records(out: Path, split: str) -> tuple[list[np.ndarray], list[int]]:
    beton = BetonFile(out / f"{split}.beton")
    return [np.array(beton.image(i)) for i in range(len(beton))], beton.labels().tolist()


def stored(out: Path, split: str) -> list[bytes]:
    beton = BetonFile(out / f"{split}.beton")
    return [beton.stored_bytes(i).tobytes() for i in range(len(beton))]


def is_jpeg(data: bytes, image: np.ndarray) -> bool:
    return data[:2] == b"\xff\xd8" and len(data) != image.size


def assert_same(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


# ---- layouts ----

@pytest.mark.parametrize("second", ["val", "test"])
def test_train_with_val_or_test_folder(tmp_path: Path, second: str) -> None:
    source = write_tree(tmp_path / "tree", {"train": 3, second: 2})
    out = convert("imagefolder", tmp_path / "tree", tmp_path / "out")
    manifest = load_manifest(out)
    assert sorted(manifest["splits"]) == ["test", "train"]
    assert manifest["split_folders"] == {"train": "train", "test": second}
    for split, folder in (("train", "train"), ("test", second)):
        images, labels = records(out, split)
        assert_same(images, source[folder][0])
        assert labels == source[folder][1] == [0] * (len(labels) // 2) + [1] * (len(labels) // 2)
    assert manifest["image_shape"] is None and manifest["classes"] == list(CLASSES)


def test_val_fraction_still_carves_from_train_and_three_folders_map_one_to_one(tmp_path: Path,
                                                                                capsys: pytest.CaptureFixture) -> None:
    write_tree(tmp_path / "tree", {"train": 4, "val": 2})
    manifest = load_manifest(convert("imagefolder", tmp_path / "tree", tmp_path / "out", val_fraction=0.25))
    assert {s: e["count"] for s, e in manifest["splits"].items()} == {"train": 6, "val": 2, "test": 4}
    assert manifest["split_folders"] == {"train": "train", "test": "val", "val": "train"}

    source = write_tree(tmp_path / "three", {"train": 3, "val": 2, "test": 1})
    out = convert("imagefolder", tmp_path / "three", tmp_path / "out")
    assert load_manifest(out)["split_folders"] == {"train": "train", "val": "val", "test": "test"}
    for split in ("train", "val", "test"):
        assert_same(records(out, split)[0], source[split][0])
    message = cli_fails(["imagefolder", "--src", str(tmp_path / "three"), "--out", str(tmp_path / "again"),
                         "--val-fraction", "0.2"], capsys)
    assert "already has a val folder" in message and not (tmp_path / "again").exists()


# ---- storage: JPEG with a maximum side, mixed mode, size distribution ----

def test_jpeg_with_max_side_is_within_jpeg_tolerance_and_records_sizes(tmp_path: Path) -> None:
    source = write_tree(tmp_path / "tree", {"train": 4, "val": 2})
    out = convert("imagefolder", tmp_path / "tree", tmp_path / "out", encode="jpg", max_side=64, quality=90)
    manifest = load_manifest(out)
    images, _ = records(out, "train")
    sizes = []
    for got, original, data in zip(images, source["train"][0], stored(out, "train")):
        h, w = original.shape[:2]
        scale = min(1.0, 64 / max(h, w))
        want = np.asarray(Image.fromarray(original).resize((round(w * scale), round(h * scale)),
                                                           Image.Resampling.LANCZOS))
        assert got.shape == want.shape and max(got.shape[:2]) <= 64 and is_jpeg(data, got)
        assert np.abs(got.astype(int) - want).mean() < 3
        sizes.append(got.shape[:2])
    heights, widths = np.array(sizes).T
    assert manifest["splits"]["train"]["image_size"] == {
        "height": {"min": int(heights.min()), "median": float(np.median(heights)), "max": int(heights.max())},
        "width": {"min": int(widths.min()), "median": float(np.median(widths)), "max": int(widths.max())}}
    assert manifest["storage"] == "jpg" and manifest["splits"]["train"]["jpeg_count"] == 8
    assert manifest["options"]["max_side"] == 64 and manifest["options"]["quality"] == 90


def test_mixed_mode_stores_a_seeded_fraction_as_jpeg(tmp_path: Path) -> None:
    source = write_tree(tmp_path / "tree", {"train": 20, "test": 2})
    mixed = {seed: convert("imagefolder", tmp_path / "tree", tmp_path / f"s{seed}", encode="mix",
                           compress_probability=0.5, seed=seed) for seed in (0, 0, 1)}
    manifest = load_manifest(mixed[0])
    images, _ = records(mixed[0], "train")
    kinds = [is_jpeg(data, im) for data, im in zip(stored(mixed[0], "train"), images)]
    assert manifest["storage"] == "mix" and manifest["splits"]["train"]["jpeg_count"] == sum(kinds)
    assert 5 <= sum(kinds) <= 35  # about half of 40
    for jpeg, got, want in zip(kinds, images, source["train"][0]):
        assert got.shape == want.shape
        if jpeg:
            assert 0 < np.abs(got.astype(int) - want).mean() < 3
        else:
            np.testing.assert_array_equal(got, want)
    again = convert("imagefolder", tmp_path / "tree", tmp_path / "again", encode="mix", seed=0)
    assert stored(again, "train") == stored(mixed[0], "train")  # seeded: the same records again
    assert stored(mixed[1], "train") != stored(mixed[0], "train")
    for p, expected in ((0.0, 0), (1.0, 40)):
        ends = convert("imagefolder", tmp_path / "tree", tmp_path / f"p{p}", encode="mix", compress_probability=p)
        assert load_manifest(ends)["splits"]["train"]["jpeg_count"] == expected


def test_parallel_decoding_gives_the_same_output_and_reports_images_per_second(tmp_path: Path) -> None:
    write_tree(tmp_path / "tree", {"train": 40, "val": 8})
    (tmp_path / "tree" / "train" / "ants" / "broken.jpg").write_bytes(b"not a jpeg")
    lines: list[str] = []
    with pytest.warns(UserWarning, match="skipped 1 file"):
        serial = convert_dataset("imagefolder", tmp_path / "tree", tmp_path / "one", workers=1, max_side=30,
                                 log=lines.append)
    with pytest.warns(UserWarning, match="skipped 1 file"):
        parallel = convert_dataset("imagefolder", tmp_path / "tree", tmp_path / "two", workers=2, max_side=30,
                                   log=lines.append)
    for split in ("train", "test"):
        assert stored(parallel, split) == stored(serial, split)
    assert load_manifest(parallel)["skipped_files"] == load_manifest(serial)["skipped_files"]
    assert all(" images/s" in line and "(train 80, test 16)" in line for line in lines)


# ---- any image PIL reads becomes RGB, upright ----

def _save(path: Path, image: Image.Image, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def test_every_image_mode_becomes_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "tree"
    rgba = rng.integers(0, 256, (12, 10, 4), dtype=np.uint8)
    indices = rng.integers(0, 4, (12, 10), dtype=np.uint8)
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 99, 199]], dtype=np.uint8)
    grey = rng.integers(0, 256, (12, 10), dtype=np.uint8)
    grey16 = rng.integers(0, 65536, (12, 10), dtype=np.uint16)
    rgb16 = rng.integers(0, 65536, (12, 10, 3), dtype=np.uint16)
    cls = root / "train" / "ants"
    _save(cls / "a_rgba.png", Image.fromarray(rgba, "RGBA"))
    paletted = Image.fromarray(indices, "P")
    paletted.putpalette(palette.ravel().tolist())
    _save(cls / "b_palette.png", paletted)
    _save(cls / "c_grey.png", Image.fromarray(grey, "L"))
    _save(cls / "d_grey_alpha.png", Image.fromarray(np.stack([grey, grey[::-1]], -1), "LA"))
    _save(cls / "e_grey16.png", Image.fromarray(grey16))
    assert Image.open(cls / "e_grey16.png").mode == "I;16"
    (cls / "f_rgb16.png").write_bytes(cv2.imencode(".png", rgb16[..., ::-1])[1].tobytes())  # cv2 writes BGR
    _save(cls / "g_cmyk.JPG", Image.new("CMYK", (10, 12), (0, 255, 255, 0)), quality=95)  # red, upper case
    _save(cls / "h_bilevel.PNG", Image.fromarray(grey > 127))
    for folder in ("train/bees", "val/ants", "val/bees"):
        _save(root / folder / "x.jpeg", Image.fromarray(photo(12, 10, 1)))
    out = convert("imagefolder", root, tmp_path / "out")
    got, labels = records(out, "train")
    grey3 = np.repeat(grey[..., None], 3, axis=-1)
    want = [rgba[..., :3], palette[indices], grey3, grey3, np.repeat((grey16 >> 8).astype(np.uint8)[..., None], 3, -1),
            (rgb16 >> 8).astype(np.uint8), None, np.where(grey3 > 127, 255, 0).astype(np.uint8)]
    assert labels[:8] == [0] * 8 and all(im.shape == (12, 10, 3) and im.dtype == np.uint8 for im in got)
    for i, expected in enumerate(want):
        if expected is not None:
            np.testing.assert_array_equal(got[i], expected, err_msg=f"file {i}")
    assert np.abs(got[6].astype(int) - [255, 0, 0]).max() <= 3  # CMYK red
    assert load_manifest(out)["skipped_files"] == {}


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    pixels = photo(20, 30, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    for folder in ("train/ants", "train/bees", "val/ants", "val/bees"):
        _save(root / folder / "turned.jpg", Image.fromarray(pixels), exif=exif, quality=95)
    as_stored = np.asarray(Image.open(root / "train/ants/turned.jpg").convert("RGB"))
    upright = np.rot90(as_stored, k=-1)
    assert upright.shape == (30, 20, 3)
    images, _ = records(convert("imagefolder", root, tmp_path / "out"), "train")
    np.testing.assert_array_equal(images[0], upright)
    small, _ = records(convert("imagefolder", root, tmp_path / "out", name="small", max_side=15), "train")
    assert small[0].shape == (15, 10, 3)
    reference = ImageOps.exif_transpose(Image.open(root / "train/ants/turned.jpg")).convert("RGB")
    want = np.asarray(reference.resize((10, 15), Image.Resampling.LANCZOS))
    assert np.abs(small[0].astype(int) - want).mean() < 3


# ---- bad input: a listed skip, or one line and nothing written ----

def _jpeg_bytes() -> bytes:
    out = io.BytesIO()
    Image.fromarray(photo(40, 50, 5)).save(out, "JPEG", quality=90)
    return out.getvalue()


def _gif_bytes() -> bytes:
    out = io.BytesIO()
    Image.fromarray(photo(10, 10, 6)).save(out, "GIF")
    return out.getvalue()


SKIPS = {
    "truncated.jpg": (lambda: _jpeg_bytes()[:-200], "a damaged image ("),
    "empty.jpg": (lambda: b"", "an empty file"),
    "notes.jpg": (lambda: b"shopping list: ants, bees\n", "not an image PIL can read"),
    "placeholder.gif": (_gif_bytes, "a .gif (not read, as in torchvision's ImageFolder)"),
    "labels.csv": (lambda: b"a,b\n", "not an image file (.bmp .jpeg .jpg"),
}


@pytest.mark.parametrize("name", list(SKIPS))
def test_bad_files_are_skipped_and_listed_or_fail_strict(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        name: str) -> None:
    make, reason = SKIPS[name]
    source = write_tree(tmp_path / "tree", {"train": 2, "val": 1})
    (tmp_path / "tree" / "val" / "bees" / name).write_bytes(make())
    with pytest.warns(UserWarning, match="skipped 1 file"):
        out = convert("imagefolder", tmp_path / "tree", tmp_path / "out")
    manifest = load_manifest(out)
    assert list(manifest["skipped_files"]) == [f"val/bees/{name}"]
    assert manifest["skipped_files"][f"val/bees/{name}"].startswith(reason)
    assert_same(records(out, "test")[0], source["val"][0])
    message = cli_fails(["imagefolder", "--src", str(tmp_path / "tree"), "--out", str(tmp_path / "strict"),
                         "--strict", "--workers", "1"], capsys)
    assert f"val/bees/{name} is {reason}" in message and "drop --strict" in message
    assert not (tmp_path / "strict").exists()


def test_hidden_files_are_ignored_and_listed_even_under_strict(tmp_path: Path) -> None:
    source = write_tree(tmp_path / "tree", {"train": 2, "val": 1})
    hidden = ["train/.DS_Store", "train/ants/._0000.png", "train/bees/.ipynb_checkpoints/0000-checkpoint.png"]
    for path in hidden:
        (tmp_path / "tree" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "tree" / path).write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    manifest = load_manifest(out := convert("imagefolder", tmp_path / "tree", tmp_path / "out", strict=True))
    assert manifest["ignored_files"] == sorted(hidden) and manifest["skipped_files"] == {}
    assert_same(records(out, "train")[0], source["train"][0])


def test_upper_case_extensions_are_images(tmp_path: Path) -> None:
    source = write_tree(tmp_path / "tree", {"train": 2, "val": 1})
    pixels = photo(30, 40, 9)
    for name, fmt in (("UPPER.JPG", "JPEG"), ("upper.JPEG", "JPEG"), ("UPPER.PNG", "PNG")):
        Image.fromarray(pixels).save(tmp_path / "tree" / "train" / "bees" / name, fmt, quality=95)
    manifest = load_manifest(convert("imagefolder", tmp_path / "tree", tmp_path / "out"))
    assert manifest["splits"]["train"]["histogram"] == [2, 5] and manifest["skipped_files"] == {}
    assert len(source["train"][0]) == 4


@pytest.mark.filterwarnings("ignore:skipped 1 file")
@pytest.mark.parametrize("damage, expected", [
    ("empty_class", "class folder val/bees has no usable images"),
    ("unreadable_class", "class folder val/bees has no usable images"),
    ("only_in_train", "train and val have different classes (only in train: ['wasps'], only in val: [])"),
    ("only_in_val", "train and val have different classes (only in train: [], only in val: ['wasps'])"),
    ("no_eval_folder", "has a 'train' folder but no 'val' or 'test' folder"),
    ("no_train_folder", "has no 'train' folder"),
])
def test_layout_mistakes_are_one_line_and_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        damage: str, expected: str) -> None:
    root = tmp_path / "tree"
    write_tree(root, {"train": 2, "val": 1})
    good = convert("imagefolder", root, tmp_path / "out")  # a good earlier output must survive a failed --force
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    if damage in ("empty_class", "unreadable_class"):
        shutil.rmtree(root / "val" / "bees")
        (root / "val" / "bees").mkdir()
        if damage == "unreadable_class":
            (root / "val" / "bees" / "0000.jpg").write_bytes(b"")
    elif damage == "only_in_train":
        shutil.copytree(root / "train" / "bees", root / "train" / "wasps")
    elif damage == "only_in_val":
        shutil.copytree(root / "val" / "bees", root / "val" / "wasps")
    elif damage == "no_eval_folder":
        shutil.rmtree(root / "val")
    else:
        shutil.rmtree(root / "train")
    message = cli_fails(["imagefolder", "--src", str(root), "--out", str(tmp_path / "out"), "--force",
                         "--workers", "1"], capsys)
    assert expected in message
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before


def test_bad_photo_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_tree(tmp_path / "tree", {"train": 1, "val": 1})
    base = ["imagefolder", "--src", str(tmp_path / "tree"), "--out", str(tmp_path / "out")]
    assert "--compress-probability must be in [0, 1]" in cli_fails([*base, "--compress-probability", "2"], capsys)
    assert "--workers must be at least 1" in cli_fails([*base, "--workers", "0"], capsys)
    assert "--max-pixels must be a positive" in cli_fails([*base, "--max-pixels", "0"], capsys)
    with pytest.raises(SystemExit) as exc:
        run_cli(main, [*base, "--encode", "webp"])
    assert exc.value.code == 2 and "invalid choice: 'webp'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="--encode mix is for RGB images"):
        convert("mnist", tmp_path, tmp_path / "out", encode="mix")


# ---- the real photos ----

def test_hymenoptera_tarball_converts_with_its_train_val_layout(hymenoptera_data: Path, real_data_root: Path) -> None:
    """244 train (the one GIF skipped, as torchvision's ImageFolder does) and 153 val -> test, JPEG quality 90
    with a 500 px max side; class counts, sizes and pixels checked against the tarball read independently."""
    manifest = load_manifest(hymenoptera_data)
    assert manifest["classes"] == ["ants", "bees"] and manifest["split_folders"] == {"train": "train", "test": "val"}
    assert manifest["skipped_files"] == {GIF: "a .gif (not read, as in torchvision's ImageFolder)"}
    assert "torchvision" in manifest["gif"] and ".gif" not in manifest["image_suffixes"]
    assert manifest["storage"] == "jpg" and manifest["options"]["max_side"] == 500
    with tarfile.open(real_data_root / "hymenoptera_data.tar") as tar:
        files = sorted(m.name for m in tar if m.isfile() and m.name.lower().endswith((".jpg", ".jpeg", ".png")))
        for split, folder, count in (("train", "train", 244), ("test", "val", 153)):
            entry = manifest["splits"][split]
            names = [n for n in files if n.split("/")[1] == folder]
            assert entry["count"] == len(names) == count == entry["jpeg_count"]
            assert entry["histogram"] == [sum(n.split("/")[2] == c for n in names) for c in ("ants", "bees")]
            images, labels = records(hymenoptera_data, split)
            assert max(max(im.shape[:2]) for im in images) == 500 == entry["image_size"]["width"]["max"]
            heights = [im.shape[0] for im in images]
            assert entry["image_size"]["height"] == {"min": min(heights), "median": float(np.median(heights)),
                                                     "max": max(heights)}
            for k in (0, count - 1):  # first ant and last bee, decoded independently from the tarball
                reference = ImageOps.exif_transpose(Image.open(tar.extractfile(names[k]))).convert("RGB")
                scale = min(1.0, 500 / max(reference.size))
                size = (round(reference.width * scale), round(reference.height * scale))
                want = np.asarray(reference.resize(size, Image.Resampling.LANCZOS))
                assert images[k].shape == want.shape
                assert np.abs(images[k].astype(int) - want).mean() < 4
                assert labels[k] == (0 if k == 0 else 1)
