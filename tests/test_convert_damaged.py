"""Converting over an output of the same source and options that was damaged (truncated, altered, cut short):
the converter says it is damaged and how to rebuild it, touches nothing, and --force rebuilds the same records."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from beton_trainer.common.errors import UserError
from beton_trainer.convert import convert_dataset
from tests.data_fixtures import write_cifar10


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp("source"), batch_size=40, n_test=40, seed=2)["folder"]


def truncate(dest: Path) -> str:
    train = dest / "train.beton"
    size = train.stat().st_size
    train.write_bytes(train.read_bytes()[: size // 2])
    return rf"train\.beton is {size // 2:,} bytes, {size:,} were written"


def alter(dest: Path) -> str:
    train = dest / "train.beton"
    data = bytearray(train.read_bytes())
    data[-100] ^= 0xFF
    train.write_bytes(bytes(data))
    return r"train\.beton does not match its sha256 in manifest\.json"


def cut_short(dest: Path) -> str:  # killed after the betons were renamed into place, before the manifest
    (dest / "manifest.json").unlink()
    return r"there are \.beton files but no manifest\.json: an interrupted conversion"


def lose_a_split(dest: Path) -> str:
    (dest / "test.beton").unlink()
    return r"test\.beton is missing"


@pytest.mark.parametrize("damage", [truncate, alter, cut_short, lose_a_split])
def test_a_damaged_output_is_called_damaged_and_rebuilt_with_force(damage, source, tmp_path):
    dest = convert_dataset("cifar10", source, tmp_path, log=lambda _: None)
    identity = json.loads((dest / "manifest.json").read_text())["identity"]
    why = damage(dest)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    with pytest.raises(UserError) as info:
        convert_dataset("cifar10", source, tmp_path, log=lambda _: None)
    assert re.fullmatch(rf"\S+ holds a damaged conversion of this source \({why}\); rebuild it with the same "
                        r"command and --force", str(info.value)), str(info.value)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    convert_dataset("cifar10", source, tmp_path, force=True, log=lambda _: None)
    assert json.loads((dest / "manifest.json").read_text())["identity"] == identity


def test_other_options_are_still_a_different_conversion(source, tmp_path):
    convert_dataset("cifar10", source, tmp_path, log=lambda _: None)
    with pytest.raises(UserError, match="already holds a different conversion"):
        convert_dataset("cifar10", source, tmp_path, val_fraction=0.2, log=lambda _: None)
