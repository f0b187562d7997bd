"""The same data on every node: a dataset's identity is a checksum over its records, equal for two copies of
the same records even when their files differ (this project's writer and FFCV's parallel one), and different
when one label differs; ranks holding different copies at the same path all stop with one line naming host,
rank and path."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from beton_trainer.convert import convert_dataset
from beton_trainer.format.beton import FIELD, HEADER, BetonFile, metadata_type
from beton_trainer.format.dataset import dataset_identity
from beton_trainer.trainer import distributed
from beton_trainer.trainer.distributed import identity_cache, node_identity
from tests.loader_helpers import require

WORKER = Path(__file__).with_name("same_data_worker.py")


@pytest.fixture(scope="module")
def copies(real_data_root, tmp_path_factory) -> dict[str, Path]:
    """Real MNIST converted by this project, the same records rewritten by FFCV's parallel DatasetWriter
    (2 workers: another layout, other bytes), and a copy of the first with record 0's label changed in place
    (same size and record count: a stale copy only its records can tell apart)."""
    root = tmp_path_factory.mktemp("copies")
    one = convert_dataset("mnist", real_data_root / "mnist", root / "w1", workers=1, log=lambda _: None)
    two = Path(shutil.copytree(one, root / "w2" / "mnist"))
    rewrite_with_ffcv(two)
    changed = Path(shutil.copytree(one, root / "changed" / "mnist"))
    relabel_first_record(changed / "test.beton")
    return {"one_writer": one, "two_writers": two, "changed": changed}


def rewrite_with_ffcv(folder: Path) -> None:
    """Every split's records written again by stock FFCV with 2 workers; the manifest's sizes and sha256s
    follow the new files."""
    require("ffcv")
    from ffcv.fields import IntField, NDArrayField
    from ffcv.writer import DatasetWriter

    manifest = json.loads((folder / "manifest.json").read_text())
    for split, entry in manifest["splits"].items():
        path = folder / f"{split}.beton"
        beton = BetonFile(path)
        records = list(zip(beton.images(), beton.labels().tolist()))
        writer = DatasetWriter(str(path), {"image": NDArrayField(np.dtype("uint8"), beton.shape),
                                           "label": IntField()}, num_workers=2)
        writer.from_indexed_dataset(records, chunksize=500)
        entry.update(bytes=path.stat().st_size, sha256=sha256(path))
    (folder / "manifest.json").write_text(json.dumps(manifest))


def relabel_first_record(beton: Path) -> None:
    """Add 1 (mod 10) to record 0's label, in the metadata table right after the header and field table."""
    header = np.fromfile(beton, dtype=HEADER, count=1)[0]
    fields = np.fromfile(beton, dtype=FIELD, count=int(header["num_fields"]), offset=HEADER.itemsize)
    names = [bytes(f["name"]).split(b"\0")[0].decode() for f in fields]
    meta = metadata_type([int(t) for t in fields["type_id"]])
    dtype, offset = meta.fields[f"f{names.index('label')}"][:2]
    label = int(BetonFile(beton).labels()[0])
    with open(beton, "r+b") as f:
        f.seek(HEADER.itemsize + fields.nbytes + offset)
        f.write(np.array((label + 1) % 10, dtype=dtype).tobytes())
    assert BetonFile(beton).labels()[0] == (label + 1) % 10


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_identity_follows_the_records_not_the_file_bytes(copies):
    one, two = copies["one_writer"], copies["two_writers"]
    assert sha256(one / "train.beton") != sha256(two / "train.beton")  # different files ...
    assert dataset_identity(one) == dataset_identity(two)  # ... holding the same records
    assert (copies["changed"] / "test.beton").stat().st_size == (one / "test.beton").stat().st_size
    assert dataset_identity(copies["changed"]) != dataset_identity(one)  # one label differs


def test_a_node_hashes_each_dataset_version_once(copies, tmp_path, monkeypatch):
    """Every multi-process start checks the data; the records are read once per node and file state, and a
    file changed in place (same size) is hashed again. A garbled or unwritable cache only costs the time."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = Path(shutil.copytree(copies["one_writer"], tmp_path / "mnist"))
    first = node_identity(data)
    assert first == dataset_identity(data) and identity_cache().is_file()
    with monkeypatch.context() as patch:
        patch.setattr(distributed, "dataset_identity", lambda *_: pytest.fail("read the records again"))
        assert node_identity(data) == first
    relabel_first_record(data / "test.beton")
    assert node_identity(data) == dataset_identity(data) != first
    identity_cache().write_text("{not json")
    assert node_identity(data) == dataset_identity(data)
    monkeypatch.setenv("XDG_CACHE_HOME", str(data / "manifest.json"))  # a file: the cache cannot be made there
    assert node_identity(data) == dataset_identity(data)


def test_ranks_with_different_copies_all_stop_naming_host_rank_and_path(copies, tmp_path):
    """2 ranks, each in its own 'node' folder, as if each node held its own copies at the same paths:
    same/mnist holds the same records on both (written by one and by two writers) and passes; rank 1's
    data/mnist has one label changed, and rank 1 has no gone/mnist at all: both ranks stop with the
    same one line each time, naming rank 1's host, rank and the path."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    layout = {"same": ("one_writer", "two_writers"), "data": ("one_writer", "changed"), "gone": ("one_writer", None)}
    for folder, per_node in layout.items():
        for node, copy in zip(nodes, per_node):
            if copy:
                (node / folder).mkdir(parents=True)
                (node / folder / "mnist").symlink_to(copies[copy])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
               "--nodes", *map(str, nodes), "--data", *(f"{f}/mnist" for f in layout), "--out", str(tmp_path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank-{k}.json").read_text()) for k in (0, 1))
    assert rank0 == rank1
    assert rank0["same/mnist"] == "ok"
    host = re.escape(socket.gethostname())
    assert re.fullmatch(rf"error: rank 1 on host {host} reads a different dataset at data/mnist than rank 0 on host "
                        rf"{host} \(records checksum [0-9a-f]{{12}} vs [0-9a-f]{{12}}\); give every node the same "
                        r"conversion at data/mnist \(copy rank 0's, or convert again with the same command\)",
                        rank0["data/mnist"]), rank0["data/mnist"]
    assert rank0["gone/mnist"] == (f"error: rank 1 on host {socket.gethostname()}: no converted dataset at gone/mnist: "
                                   "manifest.json is missing; create it with `beton-convert <dataset> --src PATH "
                                   "--out DIR`")
