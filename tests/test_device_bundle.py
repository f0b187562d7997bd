"""GPU bring-up tooling, checked on the CPU: the bundle's split/join and group packing, install.sh refusing a
corrupt part, and check_cuda's smoke pass on CPU (every installed backend, one short train.py run)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.device.bundle import assign_groups, join_parts, pack, sha256_file, split_file, stash, unpack
from beton_trainer.common.errors import UserError
from tests.doc_commands import check_command, markdown_commands
from tests.loader_helpers import installed

ROOT = Path(__file__).resolve().parents[1]
MB = 1_000_000


def test_split_and_join_round_trip(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 5 * MB + 123, dtype=np.uint8).tobytes()
    source = tmp_path / "big.whl"
    source.write_bytes(data)
    parts = split_file(source, tmp_path / "parts", MB)
    assert len(parts) == 6 and all(p.stat().st_size <= MB for p in parts)
    assert sum(p.stat().st_size for p in parts) == len(data)
    joined = join_parts(parts, tmp_path / "out" / "big.whl")
    assert sha256_file(joined) == hashlib.sha256(data).hexdigest() == sha256_file(source)


def test_groups_respect_the_limit():
    sizes = {"a": 55, "b": 55, "c": 34, "d": 28, "e": 25, "f": 18, "g": 6, "h": 1}
    groups = assign_groups(sizes, 60)
    loads = {g: sum(sizes[n] for n in sizes if groups[n] == g) for g in set(groups.values())}
    assert set(groups) == set(sizes) and max(loads.values()) <= 60
    assert len(loads) == 4  # 222 bytes need at least four groups of 60; first-fit decreasing finds four
    with pytest.raises(ValueError):
        assign_groups({"huge": 61}, 60)


def _fake_bundle(tmp_path: Path) -> tuple[Path, dict]:
    """A payload of three files (one split in three parts) packed into groups of at most 2.5 MB."""
    rng = np.random.default_rng(1)
    payload = tmp_path / "payload"
    files = {"wheels/a.whl": 2 * MB + 5, "wheels/if-missing/b.whl": 700_000, "data/c.tar.xz": 10}
    for rel, size in files.items():
        (payload / rel).parent.mkdir(parents=True, exist_ok=True)
        (payload / rel).write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    out = tmp_path / "bundle-out"
    return out, pack(payload, out, part_bytes=MB, group_bytes=int(2.5 * MB))


def test_pack_stash_unpack(tmp_path):
    out, manifest = _fake_bundle(tmp_path)
    assert manifest["groups"] == 2 and max(manifest["group_sizes"].values()) <= 2.5 * MB
    assert [len(f["parts"]) for f in manifest["files"]] == [1, 3, 1]  # data/c, wheels/a, wheels/if-missing/b
    there = tmp_path / "there"
    assert stash(out / "group1", there) == [2]
    with pytest.raises(UserError, match="group"):
        unpack(there, there / "files")
    assert stash(out / "group2", there) == []
    for entry, path in zip(manifest["files"], unpack(there, there / "files")):
        assert sha256_file(path) == sha256_file(tmp_path / "payload" / entry["path"])


def test_install_rejects_a_corrupt_part(tmp_path):
    out, manifest = _fake_bundle(tmp_path)
    part = next(p for f in manifest["files"] for p in f["parts"] if p["name"].endswith("a.whl.part001"))
    victim = out / f"group{part['group']}" / part["name"]
    data = bytearray(victim.read_bytes())
    data[1000] ^= 0xFF
    victim.write_bytes(bytes(data))
    env = {**os.environ, "PYTHON": sys.executable}
    command = ["bash", str(ROOT / "benchmarks/device/install.sh"), "--bundle", str(tmp_path / "there"),
               "--prefix", str(tmp_path / "pydeps")]
    groups = [a for g in range(1, manifest["groups"] + 1) for a in ("--stash", str(out / f"group{g}"))]
    proc = subprocess.run(command + groups, capture_output=True, text=True, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    error = proc.stderr.strip().splitlines()
    assert len(error) == 1 and "Traceback" not in proc.stderr
    assert error[0].startswith(f"error: part wheels/a.whl.part001 of group {part['group']} is corrupt")
    assert f"carry .device-bundle/group{part['group']}" in error[0]
    assert not (tmp_path / "pydeps" / "env.sh").exists()  # nothing was installed


def test_check_cuda_smoke_on_cpu(tiny_rgb_data, mnist_data, tmp_path):
    report = tmp_path / "check.md"
    command = [sys.executable, "-m", "benchmarks.device.check_cuda", "--device", "cpu", "--smoke", "--data",
               str(tiny_rgb_data), "--grey-data", str(mnist_data), "--out", str(report), "--run-root",
               str(tmp_path / "runs")]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = report.read_text()
    assert text in proc.stdout and "FAIL" not in text
    rows = {tuple(line.split(" | ")[:3]) for line in text.splitlines()}
    expected = {("| tensor", "identity", "PASS"), ("| tensor", "identity, grey", "PASS"),
                ("| tensor", "crop+flip statistics", "PASS"), ("| tensor", "erase statistics", "PASS"),
                ("| photo", "identity", "PASS"), ("| photo", "same batches as tensor", "PASS"),
                ("| photo", "grey refused", "PASS")}
    if installed("ffcv"):
        expected |= {("| ffcv", "identity", "PASS"), ("| ffcv", "same batches as tensor", "PASS")}
    if installed("nvidia.dali"):
        expected |= {("| dali", "identity", "PASS"), ("| dali", "DALI ops on cpu", "PASS")}
    assert expected <= rows
    train = [line.split(" | ") for line in text.splitlines() if line.startswith("| tensor | fp32 |")]
    assert len(train) == 1
    accuracy, images_per_s = float(train[0][5]), float(train[0][6].replace(",", ""))
    assert 0 <= accuracy <= 1 and images_per_s > 0
    assert (tmp_path / "runs" / "tensor-fp32" / "model.safetensors").is_file()  # a real train.py run


def test_a_training_run_that_hangs_is_a_fail_row_and_the_report_keeps_what_came_before(tiny_rgb_data, tmp_path):
    """Each train.py run has --run-timeout seconds; a run still going then is killed and reported, and the report
    on disk already holds every earlier result (it is rewritten after each check and run)."""
    from benchmarks.device import check_cuda

    args = check_cuda.build_parser().parse_args(["--device", "cpu", "--smoke", "--data", str(tiny_rgb_data),
                                                 "--run-timeout", "0.5"])
    out = check_cuda.Report(tmp_path / "check.md", {"status": "cut short"})
    out.add(check_cuda.Check("tensor", "identity", True, "all equal"))
    assert "| tensor | identity | PASS | all equal |" in out.path.read_text()
    check_cuda.training_runs(args, torch.device("cpu"), tmp_path / "runs", out)
    text = out.path.read_text()
    assert "| tensor | identity | PASS | all equal |" in text and "status: cut short" in text
    (row,) = [line for line in text.splitlines() if line.startswith("| tensor | fp32 |")]
    assert "**FAIL**: timeout after 0.5 s" in row
    assert out.failed


def test_every_command_in_the_device_readme_parses(monkeypatch):
    """A command the GPU session copies from the device README must not stop at argparse (exit status 2):
    each `python -m MODULE` and train.py line goes through its own parser, each script and test file exists."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # parsers whose defaults look for CUDA
    checked = [words for words in markdown_commands(ROOT / "benchmarks" / "device" / "README.md")
               if check_command(words)]
    modules = {w[2] for w in checked if w[1:2] == ["-m"]}
    assert {"benchmarks.device.first_contact", "benchmarks.device.check_cuda", "benchmarks.loaders", "convert",
            "pytest"} <= modules
