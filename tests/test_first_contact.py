"""benchmarks/device/first_contact.py on the CPU: its first steps end to end on a subset of the real CIFAR-10
tarball, a JSON and a log per step plus the summary in the out folder, a step cut at its limit costs that step
alone, a second call on the same work folder reports only what it ran itself, and a failed compile probe turns
compilation off for the later steps instead of failing them one after another. (The whole script, in a virtual
environment holding only the bare GPU image's packages, is run by hand: benchmarks/device/README.md.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def first_contact(real_data_root: Path, tmp_path: Path, *extra: str, env: dict | None = None
                  ) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "benchmarks.device.first_contact", "--device", "cpu", "--smoke",
               "--tarball", str(real_data_root / "cifar10-jpeg.tar.xz"), "--out", str(tmp_path / "out"),
               "--work", str(tmp_path / "work"), "--workers", "2", *extra]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_the_first_steps_write_their_results_as_they_end(real_data_root, tmp_path):
    proc = first_contact(real_data_root, tmp_path, "--only", "versions", "convert", "loaders", "photo")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert {"01-versions.json", "01-versions.log", "02-convert.json", "02-convert.log", "06-loaders.json",
            "06-loaders.log", "check_cuda.md", "08-photo.json", "08-photo.log", "photo_loaders.md",
            "summary.md"} <= names
    steps = {n: json.loads((out / n).read_text()) for n in names if n.endswith(".json")}
    assert all(s["status"] == "ok" and s["seconds"] <= s["limit_s"] for s in steps.values())
    versions = steps["01-versions.json"]["results"]
    assert versions["cuda_available"] is False and {"torch", "python", "installed", "compilers"} <= set(versions)
    assert versions["python_h"] is True and versions["compile_probe"].startswith("ok in ")
    assert steps["02-convert.json"]["results"]["splits"] == {"cifar10": {"train": 360, "val": 40, "test": 100},
                                                              "cifar10-full": {"train": 400, "test": 100}}
    loaders = steps["06-loaders.json"]["results"]
    assert loaders["passed"] == 3 and loaders["failed"] == 0  # identity, crop+flip, erase of the tensor backend
    photo = steps["08-photo.json"]["results"]  # the photo backend and its Pillow threads beside the baseline
    assert len(photo["rows"]) == 1 and photo["rows"][0].startswith("| generated_40 | 64 | ")
    summary = (out / "summary.md").read_text()
    assert "- status: finished" in summary
    rows = [line.split(" | ")[1:3] for line in summary.splitlines() if line.startswith("| ")][1:]  # after the header
    assert rows == [["versions", "ok"], ["convert", "ok"], ["loaders", "ok"], ["photo", "ok"]]


def test_a_step_cut_at_its_limit_costs_that_step_alone(real_data_root, tmp_path):
    """Conversion killed at once (the smoke subset alone outlasts its 0.1 s): its JSON says timeout with the
    command, the next step still runs (and fails for want of data), the summary holds both, the exit status is 1."""
    proc = first_contact(real_data_root, tmp_path, "--only", "convert", "loaders", "--limit", "convert=0.1")
    assert proc.returncode == 1
    out = tmp_path / "out"
    convert = json.loads((out / "02-convert.json").read_text())
    assert convert["status"] == "timeout" and convert["commands"][0]["error"].startswith("timeout after")
    assert "-m convert imagefolder" in convert["commands"][0]["command"]
    assert json.loads((out / "06-loaders.json").read_text())["status"] == "failed"
    summary = (out / "summary.md").read_text()
    assert "| 2 | convert | timeout |" in summary and "| 6 | loaders | failed |" in summary


def test_a_second_call_on_the_same_work_folder_reports_only_its_own_results(real_data_root, tmp_path):
    """A warm machine keeps the work folder between calls: the second call must train into run folders of its
    own, not fail on the first call's, and report what it ran, not what the first call left."""
    steps = ("--only", "convert", "time_to_94", "reduce_overhead")
    reports = []
    for _ in range(2):
        proc = first_contact(real_data_root, tmp_path, *steps)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        reports.append({n: json.loads((tmp_path / "out" / f"{n}.json").read_text())
                        for n in ("05-time_to_94", "07-reduce_overhead")})
    first, second = (r["07-reduce_overhead"]["results"] for r in reports)
    assert all(r[n]["status"] == "ok" for r in reports for n in r)
    assert first["run_dir"] != second["run_dir"] and Path(second["run_dir"]).is_dir()
    assert Path(second["run_dir"]).parent.parent == tmp_path / "work" / "runs"
    assert second["test_accuracy"] == json.loads((Path(second["run_dir"]) / "summary.json").read_text())[
        "test_accuracy"]
    commands = [c["command"] for c in reports[1]["05-time_to_94"]["commands"]]
    assert str(Path(second["run_dir"]).parent / "time_to_94") in commands[0]
    assert reports[1]["05-time_to_94"]["results"]["train_images"] == 400  # the conversion without a val split


def test_a_failed_compile_probe_turns_compilation_off_for_what_follows(real_data_root, tmp_path):
    """No working C++ compiler (as inductor looks for it): the probe says so in step 1's results, which is not a
    failure of that step, and the later steps' train.py commands then carry compile=false."""
    proc = first_contact(real_data_root, tmp_path, "--only", "versions", env={"CXX": "/nonexistent/c++"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    versions = json.loads((tmp_path / "out" / "01-versions.json").read_text())
    assert versions["status"] == "ok"
    assert versions["results"]["compile_probe"].startswith("failed (exit status 1")
    assert "the later steps run uncompiled" in versions["results"]["compile_probe"]


def test_the_probes_verdict_decides_whether_recipes_compile_on_cuda():
    from benchmarks.device import first_contact as fc

    args = fc.build_parser().parse_args(["--device", "cuda"])
    context = fc.Context(args, Path("out"), Path("work"), 0.0, "call")
    assert "compile=false" not in context.overrides([], [])  # not probed: as the recipe says
    context.compiles = True
    assert "compile=false" not in context.overrides([], []) and context.uncompiled_note() == {}
    context.compiles = False
    assert "compile=false" in context.overrides([], [])
    assert context.uncompiled_note() == {"note": "uncompiled: the compile probe of step 1 failed"}
