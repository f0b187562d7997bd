"""The reading layer: what every loader sees, and the one-line errors for missing, truncated or
mismatched files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from beton_trainer.common.errors import UserError
from beton_trainer.format import BetonFile, load_manifest, open_split


@pytest.fixture
def copy_of_tiny(tiny_rgb_data: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny dataset that a test may damage."""
    return Path(shutil.copytree(tiny_rgb_data, tmp_path / "tiny"))


def edit_manifest(data_dir: Path, edit) -> None:
    path = data_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_open_split_gives_arrays_and_properties(tiny_rgb_data: Path) -> None:
    train = open_split(tiny_rgb_data, "train")
    assert train.images.shape == (640, 32, 32, 3) and train.images.dtype == np.uint8
    assert train.labels.shape == (640,) and train.labels.dtype == np.int64
    assert train.num_classes == 10 and train.classes[0] == "airplane"
    assert train.image_shape == (32, 32, 3) and train.path == tiny_rgb_data / "train.beton"
    assert len(train.mean) == len(train.std) == 3
    assert train.mean == pytest.approx(tuple(train.images.reshape(-1, 3).mean(0) / 255))
    assert all(0.1 < s < 0.4 for s in train.std)
    assert train.coarse_labels is None
    assert len(open_split(tiny_rgb_data, "test").labels) == 200


def test_beton_file_gives_views_per_record(tiny_rgb_data: Path) -> None:
    beton = BetonFile(tiny_rgb_data / "train.beton")
    images = open_split(tiny_rgb_data, "train").images
    assert len(beton) == 640 and beton.storage == "raw"
    record = beton.image(17)
    assert isinstance(record.base, np.memmap) or isinstance(record, np.memmap)
    np.testing.assert_array_equal(record, images[17])


def test_missing_manifest_says_how_to_convert(tiny_rgb_data: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="manifest.json is missing.*beton-convert"):
        load_manifest(tmp_path)
    # pointing at the --out folder instead of --out/NAME gets a hint
    shutil.copytree(tiny_rgb_data, tmp_path / "out" / "tiny")
    with pytest.raises(UserError, match=r"did you mean .*out/tiny"):
        open_split(tmp_path / "out", "train")


def test_unreadable_manifest(copy_of_tiny: Path) -> None:
    (copy_of_tiny / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable.*--force"):
        open_split(copy_of_tiny, "train")


def test_missing_split_lists_present_ones(tiny_rgb_data: Path) -> None:
    with pytest.raises(UserError, match=r"no 'val' split \(convert with --val-fraction.*present: test, train"):
        open_split(tiny_rgb_data, "val")


def test_missing_beton(copy_of_tiny: Path) -> None:
    (copy_of_tiny / "test.beton").unlink()
    with pytest.raises(UserError, match="test.beton is missing"):
        open_split(copy_of_tiny, "test")


def test_truncated_beton_is_caught_by_size(copy_of_tiny: Path) -> None:
    path = copy_of_tiny / "train.beton"
    path.write_bytes(path.read_bytes()[:-5000])
    with pytest.raises(UserError, match="manifest says .*truncated"):
        open_split(copy_of_tiny, "train")


@pytest.mark.parametrize("keep", [0, 40, 100_000, -10])
def test_truncated_beton_is_caught_by_its_tables(copy_of_tiny: Path, keep: int) -> None:
    """Even when the manifest was edited to match, a cut file is detected from its header and tables."""
    path = copy_of_tiny / "train.beton"
    path.write_bytes(path.read_bytes()[:keep])
    size = path.stat().st_size
    edit_manifest(copy_of_tiny, lambda m: m["splits"]["train"].update(bytes=size))
    with pytest.raises(UserError, match="truncated or not a .beton"):
        open_split(copy_of_tiny, "train")


def test_record_count_mismatch(copy_of_tiny: Path) -> None:
    edit_manifest(copy_of_tiny, lambda m: m["splits"]["test"].update(count=199))
    with pytest.raises(UserError, match="holds 200 records but the manifest says 199"):
        open_split(copy_of_tiny, "test")


def test_beton_swapped_for_another_split(copy_of_tiny: Path) -> None:
    shutil.copy(copy_of_tiny / "train.beton", copy_of_tiny / "test.beton")
    with pytest.raises(UserError, match="bytes but the manifest says"):
        open_split(copy_of_tiny, "test")
