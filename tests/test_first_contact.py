"""benchmarks/device/first_contact.py on the CPU: its first steps end to end on a subset of the real CIFAR-10
tarball, a JSON and a log per step plus the summary in the out folder, and a step cut at its limit costs that
step alone. (The whole script, in a virtual environment holding only the bare GPU image's packages, is run by
hand: benchmarks/device/README.md.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def first_contact(real_data_root: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "benchmarks.device.first_contact", "--device", "cpu", "--smoke",
               "--tarball", str(real_data_root / "cifar10-jpeg.tar.xz"), "--out", str(tmp_path / "out"),
               "--work", str(tmp_path / "work"), "--workers", "2", *extra]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_first_steps_write_their_results_as_they_end(real_data_root, tmp_path):
    proc = first_contact(real_data_root, tmp_path, "--only", "versions", "convert", "loaders")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert {"01-versions.json", "01-versions.log", "02-convert.json", "02-convert.log", "03-loaders.json",
            "03-loaders.log", "check_cuda.md", "summary.md"} <= names
    steps = {n: json.loads((out / n).read_text()) for n in names if n.endswith(".json")}
    assert all(s["status"] == "ok" and s["seconds"] <= s["limit_s"] for s in steps.values())
    versions = steps["01-versions.json"]["results"]
    assert versions["cuda_available"] is False and {"torch", "python", "installed", "compilers"} <= set(versions)
    assert steps["02-convert.json"]["results"]["splits"] == {"train": 360, "val": 40, "test": 100}
    loaders = steps["03-loaders.json"]["results"]
    assert loaders["passed"] == 3 and loaders["failed"] == 0  # identity, crop+flip, erase of the tensor backend
    summary = (out / "summary.md").read_text()
    assert "- status: finished" in summary
    rows = [line.split(" | ")[1:3] for line in summary.splitlines() if line.startswith("| ")][1:]  # after the header
    assert rows == [["versions", "ok"], ["convert", "ok"], ["loaders", "ok"]]


def test_a_step_cut_at_its_limit_costs_that_step_alone(real_data_root, tmp_path):
    """Conversion killed at once (the smoke subset alone outlasts its 0.1 s): its JSON says timeout with the
    command, the next step still runs (and fails for want of data), the summary holds both, the exit status is 1."""
    proc = first_contact(real_data_root, tmp_path, "--only", "convert", "loaders", "--limit", "convert=0.1")
    assert proc.returncode == 1
    out = tmp_path / "out"
    convert = json.loads((out / "02-convert.json").read_text())
    assert convert["status"] == "timeout" and convert["commands"][0]["error"].startswith("timeout after")
    assert "-m convert imagefolder" in convert["commands"][0]["command"]
    assert json.loads((out / "03-loaders.json").read_text())["status"] == "failed"
    summary = (out / "summary.md").read_text()
    assert "| 2 | convert | timeout |" in summary and "| 3 | loaders | failed |" in summary
