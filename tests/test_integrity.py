"""Data that changed since it was converted (issue 40, finding 5): the converter writes each page's sha256 into the
manifest, and every loader checks the pages it reads when it opens the split (`format.integrity`): flipped labels
and damaged JPEG data are refused with one line naming the file, the page and the command that converts again. A
JPEG record that does not decode stops an FFCV run with one line naming it."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from beton_trainer.common.errors import UserError, run_cli
from beton_trainer.format.beton import BetonFile
from beton_trainer.format.dataset import load_manifest, open_beton, open_split
from beton_trainer.format.integrity import check_integrity, page_checksums
from beton_trainer.pipelines import build_loader
from beton_trainer.pipelines.base import ResolutionSchedule
from beton_trainer.trainer.cli import main as train_main
from beton_trainer.trainer.config import load_recipe
from tests.loader_helpers import installed, options, require
from tests.test_crafted_beton import Layout, refused_everywhere

CPU = torch.device("cpu")
PHOTO_BACKENDS = [b for b, module in (("ffcv", "ffcv"), ("dali", "nvidia.dali")) if installed(module)]


def copy(data: Path, dest: Path) -> Path:
    return Path(shutil.copytree(data, dest))


def flip_labels(data: Path, split: str = "train") -> None:
    """Every label of the split becomes another class (9 - label), in place; the manifest is left as it was."""
    layout = Layout(data / f"{split}.beton")
    for i, label in enumerate(BetonFile(data / f"{split}.beton").labels().tolist()):
        layout.sample_field(i, "label", 9 - label)


def damage_scans(data: Path, records: list[int], split: str = "train") -> None:
    """The entropy-coded data of JPEG records `records` overwritten with 0xFF bytes (a marker where the first block
    should be: libjpeg warns whatever rows a crop decodes), their headers (up to the scan) left intact."""
    beton = BetonFile(data / f"{split}.beton")
    with open(beton.path, "r+b") as fh:
        for i in records:
            raw = bytes(beton.stored_bytes(i))
            sos = raw.find(b"\xff\xda")
            start = sos + 2 + int.from_bytes(raw[sos + 2:sos + 4], "big")
            fh.seek(int(beton.pointers()[i]) + start)
            fh.write(b"\xff" * (len(raw) - start - 2))  # the EOI marker stays


def test_the_converter_writes_each_pages_sha256(tiny_rgb_data: Path) -> None:
    manifest = load_manifest(tiny_rgb_data)
    for split, entry in manifest["splits"].items():
        path = tiny_rgb_data / f"{split}.beton"
        page_size = BetonFile(path).page_size
        assert len(entry["page_sha256"]) == -(-path.stat().st_size // page_size) >= 2  # metadata + data + table
        assert entry["page_sha256"] == page_checksums(path, page_size)
    assert manifest["converter_version"] == "1.2"


def test_every_training_label_flipped_is_refused_by_every_backend(tiny_rgb_data: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """All three loaders trained on it silently (test accuracy 0.08 against 0.655): the labels live in the pages
    before the records, which every loader reads."""
    data = copy(tiny_rgb_data, tmp_path / "flipped")
    flip_labels(data)
    source = load_manifest(data)["source"]["path"]
    refused_everywhere(data, rf"^{data}/train.beton: page 0 of \d+ \(the header and each record's label, size and "
                             r"place; bytes 0 to 2,097,151\) is not the page that was converted \(its sha256 differs "
                             r"from the manifest's\): the file changed since; convert the dataset again with --force "
                             rf"\(beton-convert cifar10 --src {source} --out {tmp_path} --name flipped --force, with "
                             r"the options its manifest lists\)$")
    with pytest.raises(SystemExit) as stop:  # the command line: exit 2, one line, no run folder
        run_cli(train_main, ["--recipe", "c10_cnn_smoke", "--data", str(data), "--cpu", "--run-dir",
                             str(tmp_path / "run")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {data}/train.beton: page 0 of ")
    assert not (tmp_path / "run").exists()
    # the control: with the check off, every backend opens the flipped split as it did before
    flipped = open_split(data, "train", verify="off").labels
    np.testing.assert_array_equal(flipped, 9 - open_split(tiny_rgb_data, "train").labels)
    build_loader("tensor", options(data, "train", CPU, train=True, verify="off"))


@pytest.mark.parametrize("backend", PHOTO_BACKENDS)
def test_jpeg_records_with_damaged_data_are_refused_at_start_up(hymenoptera_data: Path, tmp_path: Path,
                                                                backend: str) -> None:
    """Eight records' entropy data damaged, headers intact: FFCV trained with no message, DALI printed a libjpeg
    warning and went on. The page holding them is refused before either decodes anything."""
    data = copy(hymenoptera_data, tmp_path / "damaged")
    damage_scans(data, list(range(8)))
    pages = BetonFile(data / "train.beton").pointers()[:8] // BetonFile(data / "train.beton").page_size
    first = int(pages.min())
    with pytest.raises(UserError, match=rf"^{data}/train.beton: page {first} of \d+ \(records 0 to \d+; bytes "
                                        r"[\d,]+ to [\d,]+\) is not the page that was converted") as caught:
        build_loader(backend, options(data, "train", CPU, train=True, batch_size=16,
                                      resolution=ResolutionSchedule(train=64, eval=64)))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_a_jpeg_record_that_does_not_decode_stops_an_ffcv_run_naming_it(hymenoptera_data: Path, tmp_path: Path,
                                                                        capfd: pytest.CaptureFixture,
                                                                        train: bool) -> None:
    """With the page check off (or a file converted before it), a record libjpeg decodes only with a warning (its
    data overwritten) stopped nothing: FFCV's decoders ignore the decoder's status. Now the epoch stops with one line
    naming the record, and no traceback."""
    require("ffcv")
    data = copy(hymenoptera_data, tmp_path / "damaged")
    damage_scans(data, [5])
    loader = build_loader("ffcv", options(data, "train", CPU, train=train, batch_size=16, num_workers=2,
                                          resolution=ResolutionSchedule(train=64, eval=64), verify="off"))
    loader.set_epoch(0)
    with pytest.raises(UserError) as caught:
        for _ in loader:
            pass
    assert str(caught.value) == (f"{data}/train.beton: record 5 is not a readable JPEG (libjpeg reported an error or "
                                 "corrupt data decoding it); convert the dataset again with --force")
    assert "Traceback" not in capfd.readouterr().err


def test_a_fixed_size_jpeg_record_that_does_not_decode_stops_an_ffcv_run(tmp_path: Path) -> None:
    """Images of one size stored as JPEG (--encode jpg) go through FFCV's whole-image decoder, which ignored its
    status too."""
    require("ffcv")
    from beton_trainer.convert import convert_dataset
    from tests.data_fixtures import write_cifar10

    source = write_cifar10(tmp_path / "src", batch_size=64, n_test=64, seed=3)
    data = convert_dataset("cifar10", source["folder"], tmp_path / "out", encode="jpg", log=lambda _: None)
    damage_scans(data, [37], split="test")
    loader = build_loader("ffcv", options(data, "test", CPU, train=False, batch_size=16, verify="off"))
    with pytest.raises(UserError, match=r"test.beton: record 37 is not a readable JPEG"):
        list(loader)
    with pytest.raises(UserError, match=r"test.beton: page \d+ of \d+ \(records 0 to 63; "):
        build_loader("ffcv", options(data, "test", CPU, train=False, batch_size=16))


def test_a_dataset_converted_before_page_checksums_still_loads_and_says_so_once(tiny_rgb_data: Path,
                                                                              tmp_path: Path) -> None:
    """Without page_sha256, "pages" checks the size alone (said once per file) and "full" the whole file's sha256."""
    data = copy(tiny_rgb_data, tmp_path / "old")
    path = data / "manifest.json"
    manifest = json.loads(path.read_text())
    for entry in manifest["splits"].values():
        del entry["page_sha256"]
    path.write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match=r"train.beton was converted without page checksums, so its size alone is "
                                         r"checked when training starts; data.verify = \"full\" checks its sha256"):
        build_loader("tensor", options(data, "train", CPU, train=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        build_loader("tensor", options(data, "train", CPU, train=True))
        build_loader("tensor", options(data, "train", CPU, train=True, verify="full"))
    flip_labels(data)
    with pytest.raises(UserError, match=r"train.beton is not the file that was converted \(its sha256 differs from "
                                        r"the manifest's\): it changed since; convert the dataset again"):
        build_loader("tensor", options(data, "train", CPU, train=True, verify="full"))


def test_pages_checks_what_the_loader_reads_and_full_every_page(mnist_data: Path, tmp_path: Path) -> None:
    """An evaluation subset (max_eval_batches) reads the pages of its records only: a damaged page it never reads
    passes "pages" on FFCV and is refused by "full"; the tensor loader reads every record, so every page."""
    data = copy(mnist_data, tmp_path / "mnist")
    beton = BetonFile(data / "train.beton")
    subset = dict(train=False, batch_size=8, max_batches=1)
    records = build_loader("tensor", options(data, "train", CPU, **subset)).records_read()
    record_page = beton.pointers() // beton.page_size
    unread = min(set(record_page.tolist()) - set(record_page[records].tolist()))
    with open(beton.path, "r+b") as fh:  # one pixel of a record in a page the subset never reads
        fh.seek(unread * beton.page_size + 100)
        pixel = fh.read(1)
        fh.seek(unread * beton.page_size + 100)
        fh.write(bytes([pixel[0] ^ 1]))
    manifest = load_manifest(data)
    check_integrity(open_beton(data, "train", manifest, verify="off"), manifest, "train", "pages", records)
    page = rf"train.beton: page {unread} of \d+ \(records [\d,]+ to [\d,]+;"
    with pytest.raises(UserError, match=page):
        build_loader("tensor", options(data, "train", CPU, **subset))  # reads every record: checks every page
    if installed("ffcv"):
        build_loader("ffcv", options(data, "train", CPU, **subset))
        with pytest.raises(UserError, match=page):
            build_loader("ffcv", options(data, "train", CPU, verify="full", **subset))
        with pytest.raises(UserError, match=page):
            build_loader("ffcv", options(data, "train", CPU, train=True, batch_size=8))
    build_loader("tensor", options(data, "train", CPU, verify="off", **subset))


def test_data_verify_is_a_recipe_key_with_three_values() -> None:
    assert load_recipe("mnist_cnn_smoke").data.verify == "pages"
    assert load_recipe("mnist_cnn_smoke", ["data.verify=full"]).data.verify == "full"
    with pytest.raises(UserError, match=r"^'data.verify' must be one of \['pages', 'full', 'off'\], got 'fast'$"):
        load_recipe("mnist_cnn_smoke", ["data.verify=fast"])
