"""`python -m benchmarks.device.first_contact`: the first call on a bare GPU machine, prepared as one script.

The GPU image (the device tool's KINDS.md) has Python 3.12, torch 2.11 (cu130), torchvision 0.26, triton 3.6,
accelerate 1.15, timm, numpy, pillow, matplotlib, tensorboard, torchmetrics, numba, opencv-python-headless, gcc
and nvcc; no ffcv, no DALI, no network. The call carries only the CIFAR-10 JPEG tarball (`.device-data/`,
git-ignored) and runs these steps in order of value, each as subprocesses under its own time limit (a hang or
a crash costs that step alone; the whole stays within --budget-s, counted from the script's first line):

1. versions: the Python packages, CUDA, the compilers, `Python.h`, `nvidia-smi`, and a one-kernel
   torch.compile probe in a child process; if the probe fails, every later step runs uncompiled and says so;
2. convert: CIFAR-10 twice, with a val split (c10_finetune validates) and without (c10_fast trains on 50,000);
3. syncs: c10_fast (compiled, as users run it), c10_finetune and c100_scratch (on CIFAR-10), 20 steady-state
   steps each under --check-syncs;
4. throughput: benchmarks.train_throughput for ResNet34-CIFAR: the bf16 + channels-last + compiled ceiling,
   compile off, the tensor backend and the torchvision DataLoader baseline (each loader timed over at least
   ten times the batches it holds ready), MFU; `--ablations` adds channels-last off and fp32;
5. time_to_94: c10_fast's time to 94% test accuracy (benchmarks.time_to_accuracy) on all 50,000 images;
6. loaders: the tensor backend's identity and augmentation statistics on the device (check_cuda.py's checks);
7. reduce_overhead: c10_fast with compile_mode "reduce-overhead" and flip TTA, inductor's cudagraph skips counted;
8. photo: the photo backend on the device (one batched nvJPEG decode a batch, batched resizes) beside its Pillow
   threads and torchvision's ImageFolder + PIL, on photos generated on the machine (none is carried), at 224 px;
9. finetune: c10_finetune from scratch (one head-only epoch) for whatever time is left, images/s per epoch.

Each call trains into run folders of its own (`<work>/runs/<call>/`), and a step deletes what it reports from
before reading it, so a rerun on a warm machine never reports an earlier call's numbers. Every step writes
`NN-name.json` (status, seconds, commands with their exit status and last lines, results) and `NN-name.log`
(its whole output) to $OUT as soon as it ends, and `summary.md` is rewritten after each one. `--smoke`
shrinks everything (a 500-image subset of the tarball, a few steps, no compile on the CPU) so the script runs
end to end in a few minutes on a CPU. The exit status is 1 when any step failed or ran out of time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from beton_trainer.common.errors import UserError, run_cli
from beton_trainer.common.files import write_json, write_text

START = time.monotonic()  # the budget counts from here: above, only the standard library and beton_trainer's
# errors and files modules (no torch); the steps import torch in their own processes or inside the step
ROOT = Path(__file__).resolve().parents[2]
TARBALL = ROOT / ".device-data" / "cifar10-jpeg.tar.xz"
SYNC_RECIPES = {"c10_fast": ["phases.0.epochs=1"],
                "c10_finetune": ["pretrained=false", "phases.0.epochs=1", "phases.1.epochs=1"],
                "c100_scratch": ["phases.0.epochs=1"]}
COMPILE_PROBE_S = 30  # a child that imports torch, starts CUDA and compiles one Triton kernel (a C stub, PTX)
STEADY_STEPS = 20  # per epoch under --check-syncs: train.py leaves the first 2 and the last (logging) step alone
SMOKE_PER_CLASS = {"train": 40, "test": 10}  # 500 images
CPU_NOTE = "compile=false on the CPU: the smoke run proves the script, not the compiled path"
# the one-kernel probe: Triton builds its launcher with a C compiler ($CC, gcc, clang) and Python.h at the
# first kernel launch, and inductor's CPU path compiles C++; a failure here means every compiled step would fail
COMPILE_PROBE = ("import sys, torch\n"
                 "f = torch.compile(lambda x: torch.sin(x) * 2 + 1)\n"
                 "x = torch.ones(64, device=sys.argv[1])\n"
                 "assert torch.allclose(f(x), torch.sin(x) * 2 + 1)\n"
                 "print('compile probe: ok')\n")


@dataclass
class Context:
    """What every step reads: the options, the folders, the time left."""

    args: argparse.Namespace
    out: Path
    work: Path
    deadline: float  # time.monotonic() when the budget is spent
    call: str  # this call's name: its run folders are <work>/runs/<call>/
    compiles: bool | None = None  # the probe's verdict (None: not probed in this call; then assumed to work)
    limit: float = 0.0  # this step's seconds
    started: float = 0.0
    commands: list[dict] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.args.device == "cuda"

    @property
    def data(self) -> Path:
        """CIFAR-10 with a val split carved out of train (45,000 / 5,000 / 10,000)."""
        return self.work / "data" / "cifar10"

    @property
    def full_data(self) -> Path:
        """CIFAR-10 as published (50,000 / 10,000): what a time-to-94% claim trains on."""
        return self.work / "data" / "cifar10-full"

    def run_dir(self, name: str) -> Path:
        return self.work / "runs" / self.call / name

    @property
    def compiled(self) -> bool:
        """Whether recipes run compiled: on CUDA, unless the probe failed."""
        return self.cuda and self.compiles is not False

    def fresh(self, *paths: Path) -> None:
        """Delete what a step is about to write and report, so that only this call's results are read."""
        for path in paths:
            path.unlink(missing_ok=True)

    def left(self) -> float:
        return min(self.started + self.limit, self.deadline) - time.monotonic()

    def overrides(self, sets: list[str], smoke_sets: list[str]) -> list[str]:
        """--set arguments: `sets`, then under --smoke `smoke_sets`; uncompiled on the CPU or when the probe
        failed."""
        sets = [*sets, "tensorboard=false", *(smoke_sets if self.args.smoke else [])]
        if not self.compiled:
            sets.append("compile=false")
        return [a for s in sets for a in ("--set", s)] + ([] if self.cuda else ["--cpu"])

    def train_args(self, recipe: str, run: str, sets: list[str], *, smoke_sets: list[str],
                   data: Path | None = None) -> list[str]:
        """train.py's arguments for `recipe` on the converted data (`data`, else the one with a val split), in
        this call's run folder `run`."""
        return ["--recipe", recipe, "--data", str(data or self.data), "--run-dir", str(self.run_dir(run)),
                *self.overrides(sets, smoke_sets)]

    def uncompiled_note(self) -> dict:
        """What a step's results say about compilation when it did not run compiled."""
        if self.compiled:
            return {}
        return {"note": CPU_NOTE if not self.cuda else "uncompiled: the compile probe of step 1 failed"}

    def run(self, *command: str, log: Path, timeout: float | None = None, env: dict | None = None) -> dict:
        """Run a command (with this Python when it starts with -m or -c or names a .py) in its own process
        group, its output appended to `log`, killed with its children at the step's limit."""
        python = command[0] in ("-m", "-c") or command[0].endswith(".py")
        argv = [sys.executable, *command] if python else list(command)
        budget = max(0.1, min(self.left(), timeout or float("inf")))
        start = time.monotonic()
        with open(log, "a") as fh:
            fh.write(f"$ {shlex.join(argv)}\n")
            fh.flush()
            try:
                proc = subprocess.Popen(argv, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
            except FileNotFoundError:
                result = {"command": shlex.join(argv), "returncode": None, "seconds": 0.0, "error": "not found"}
                self.commands.append(result)
                return result
            try:
                code, error = proc.wait(timeout=budget), None
            except subprocess.TimeoutExpired:  # the whole group: torch.compile's workers too
                os.killpg(proc.pid, signal.SIGKILL)
                code, error = proc.wait(), f"timeout after {budget:.0f} s"
        result = {"command": shlex.join(argv), "returncode": code, "seconds": round(time.monotonic() - start, 1),
                  "tail": tail(log, 15)}
        if error:
            result["error"] = error
        elif code:
            result["error"] = f"exit status {code}"
        self.commands.append(result)
        return result


class StepFailed(Exception):
    """A step whose commands ran but whose result is wrong."""


def tail(path: Path, lines: int) -> list[str]:
    """The last non-blank lines of a log: what a failed command's JSON shows without the whole log."""
    return [line for line in path.read_text(errors="replace").splitlines() if line.strip()][-lines:]


def versions(ctx: Context, log: Path) -> dict:
    """What the machine has, in child processes (a CUDA initialisation that hangs costs this step alone): the
    versions, the packages present or absent, the compilers and Python.h, which explain what the later steps
    do; then a one-kernel torch.compile probe, whose verdict decides whether the later steps compile."""
    probe = ("import json, os, shutil, sys, sysconfig, importlib.util as u, torch\n"
             "from benchmarks.loaders import environment\n"
             "mods = ['torchvision', 'accelerate', 'timm', 'numpy', 'PIL', 'triton', 'ffcv', 'nvidia.dali',\n"
             "        'matplotlib', 'tensorboard', 'torchmetrics', 'numba', 'cv2']\n"
             "def has(m):\n"
             "    try: return u.find_spec(m) is not None\n"
             "    except ModuleNotFoundError: return False\n"
             "def version(m):\n"
             "    try: return __import__(m).__version__\n"
             "    except Exception: return None\n"
             f"device = torch.device('{ctx.args.device}')\n"
             "include = sysconfig.get_paths()['include']\n"
             "print(json.dumps({**environment(device), 'python': sys.version.split()[0], 'torch': torch.__version__,\n"
             "    'cuda': torch.version.cuda, 'cuda_available': torch.cuda.is_available(),\n"
             "    'cudnn': torch.backends.cudnn.version(), 'installed': {m: has(m) for m in mods},\n"
             "    'package_versions': {m: version(m) for m in ('torchvision', 'triton', 'accelerate', 'timm')},\n"
             "    'compilers': {c: shutil.which(c) for c in ('cc', 'gcc', 'g++', 'clang', 'nvcc')},\n"
             "    'CC': os.environ.get('CC'), 'python_h': os.path.isfile(os.path.join(include, 'Python.h'))}))\n")
    result = ctx.run("-c", probe, log=log)
    found = json.loads(result["tail"][-1]) if not result.get("error") else {}
    smi = ctx.run("nvidia-smi", log=log, timeout=30)
    if not ctx.cuda and smi.get("error"):  # no driver on a CPU machine is no failure
        ctx.commands.remove(smi)
    if ctx.cuda and not found.get("cuda_available"):
        raise StepFailed("torch sees no CUDA device")
    compiled = ctx.run("-c", COMPILE_PROBE, ctx.args.device, log=log, timeout=COMPILE_PROBE_S)
    ctx.compiles = not compiled.get("error")
    if not ctx.compiles:  # a result, not a failure of this step: the later steps run uncompiled
        ctx.commands.remove(compiled)
        found["compile_probe"] = f"failed ({compiled['error']}: {(compiled.get('tail') or [''])[-1]}); " \
                                 "the later steps run uncompiled"
    else:
        found["compile_probe"] = f"ok in {compiled['seconds']} s"
    return found


def subset_tarball(source: Path, target: Path, per_class: dict[str, int]) -> Path:
    """The first images of every class and split of an ImageFolder tarball, as a plain tar (--smoke)."""
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(source) as src, tarfile.open(target, "w") as dst:
        for member in src:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 4 and parts[1] in per_class:
                key = (parts[1], parts[2])
                if counts.get(key, 0) < per_class[parts[1]]:
                    counts[key] = counts.get(key, 0) + 1
                    dst.addfile(member, src.extractfile(member))
    return target


def convert(ctx: Context, log: Path) -> dict:
    """Both conversions, each --force (a warm machine's earlier data is replaced, never reported)."""
    source = ctx.args.tarball
    if ctx.args.smoke:
        ctx.work.mkdir(parents=True, exist_ok=True)
        source = subset_tarball(source, ctx.work / "cifar10-smoke.tar", SMOKE_PER_CLASS)
    found = {}
    for data, val in ((ctx.data, ["--val-fraction", "0.1"]), (ctx.full_data, [])):
        ctx.fresh(data / "manifest.json")
        ctx.run("-m", "convert", "imagefolder", "--src", str(source), "--out", str(data.parent), "--name", data.name,
                *val, "--workers", str(ctx.args.workers), "--force", log=log)
        manifest = json.loads((data / "manifest.json").read_text()) if (data / "manifest.json").is_file() else {}
        found[data.name] = {k: v["count"] for k, v in manifest.get("splits", {}).items()}
    return {"splits": found}


def loaders(ctx: Context, log: Path) -> dict:
    """check_cuda.py's loader checks for the tensor backend: the only one a bare machine has."""
    report = ctx.out / "check_cuda.md"
    ctx.fresh(report)
    ctx.run("-m", "benchmarks.device.check_cuda", "--device", ctx.args.device, "--data", str(ctx.data),
            "--backends", "tensor", "--skip-training", "--out", str(report), *(["--smoke"] if ctx.args.smoke else []),
            log=log)
    rows = report.read_text().splitlines() if report.is_file() else []
    return {"passed": sum("| PASS |" in r for r in rows), "failed": sum("**FAIL**" in r for r in rows),
            "report": report.name}


def summary_of(run_dir: Path) -> dict:
    """What a train.py run folder of this call says: summary.json's numbers, else how many epochs it logged."""
    if (run_dir / "summary.json").is_file():
        s = json.loads((run_dir / "summary.json").read_text())
        keys = ("test_accuracy", "images_per_s", "steady_images_per_s", "sync_checked_steps",
                "worst_data_wait_fraction", "wall_s")
        return {"run_dir": str(run_dir), **{k: s.get(k) for k in keys}}
    return {"run_dir": str(run_dir), "epochs": len(epochs_of(run_dir))}


def epochs_of(run_dir: Path) -> list[dict]:
    """Per epoch: images/s, seconds, accuracy (metrics.csv is rewritten whole after every epoch)."""
    if not (run_dir / "metrics.csv").is_file():
        return []
    with open(run_dir / "metrics.csv", newline="") as fh:
        return [{k: r.get(k) for k in ("epoch", "phase", "images_per_s", "epoch_time_s", "data_wait_fraction",
                                       "input_device_s", "val_accuracy", "test_accuracy")} for r in csv.DictReader(fh)]


def syncs(ctx: Context, log: Path) -> dict:
    """Each recipe one short epoch per phase under --check-syncs: a host sync in a steady step ends its run.
    c10_fast first, compiled as users run it (its compiled graphs then wait in inductor's cache for step 5);
    the other two as their recipes say (uncompiled)."""
    found = {}
    for recipe, sets in SYNC_RECIPES.items():
        steps = 4 if ctx.args.smoke else STEADY_STEPS + 3
        ctx.run("train.py", *ctx.train_args(recipe, f"syncs-{recipe}", [*sets, f"max_steps_per_epoch={steps}",
                                                                         "max_eval_batches=2"],
                                            smoke_sets=["data.batch_size=16", "data.eval_batch_size=64"]),
                "--check-syncs", log=log)
        found[recipe] = summary_of(ctx.run_dir(f"syncs-{recipe}"))
    return {**found, **ctx.uncompiled_note()}


def throughput(ctx: Context, log: Path) -> dict:
    """The step's ceiling and what each part of the feed costs against it, for the model of c10_finetune: every
    row is written the moment it is measured (a row that fails says why), so a step cut short keeps its rows."""
    csv_path = ctx.out / "train_throughput.csv"
    ctx.fresh(csv_path, csv_path.with_suffix(".md"))
    size = ["--smoke"] if ctx.args.smoke else ["--steps", "30", "--warmup", "10"]
    ctx.run("-m", "benchmarks.train_throughput", "--device", ctx.args.device, "--data", str(ctx.data),
            "--model", "resnet34_cifar", "--backends", "tensor", "torchvision", "--workers", str(ctx.args.workers),
            "--out", str(csv_path), *size, *([] if ctx.compiled or ctx.args.smoke else ["--no-compile"]),
            *(["--ablations"] if ctx.args.ablations else []), log=log)
    if not csv_path.is_file():
        return {}
    keys = ("config", "images_per_s", "data_wait_fraction", "timed_steps", "prefetched_batches", "mfu",
            "peak_mem_mb", "error")
    with open(csv_path, newline="") as fh:
        rows = {r["name"]: {k: r[k] for k in keys if r.get(k)} for r in csv.DictReader(fh)}
    return {**rows, **ctx.uncompiled_note()}


def time_to_94(ctx: Context, log: Path) -> dict:
    """c10_fast's whole recipe on all 50,000 training images: the train seconds at which each threshold is
    first met."""
    from benchmarks.time_to_accuracy import read_run  # here: its imports (torch) count against this step

    run_dir = ctx.run_dir("time_to_94")
    report = ctx.out / "time_to_accuracy.md"
    ctx.fresh(report)
    sets = ctx.overrides([], ["phases.0.epochs=1", "max_steps_per_epoch=3", "data.batch_size=32",
                              "max_eval_batches=1"])
    ctx.run("-m", "benchmarks.time_to_accuracy", "--recipe", "c10_fast", "--data", str(ctx.full_data), "--run-dir",
            str(run_dir), "--out", str(report), *sets, log=log)
    if not (run_dir / "summary.json").is_file():
        return summary_of(run_dir)
    times = read_run(run_dir, [0.90, 0.93, 0.94])
    return {"test_accuracy": times.test_accuracy, "train_s": times.train_s, "first_epoch_s": times.first_epoch_s,
            "reached_train_s": {f"{t:.0%}": "not reached" if s is None else s
                                for t, s in times.reached.items()}, "epochs": times.epochs,
            "train_images": json.loads((ctx.full_data / "manifest.json").read_text())["splits"]["train"]["count"],
            **ctx.uncompiled_note()}


def cudagraph_skips(log: Path) -> list[str]:
    """Inductor's reasons for not recording CUDA graphs (TORCH_LOGS=perf_hints prints 'skipping cudagraphs due
    to ...'): none means the graphs were used."""
    return [line.split("skipping cudagraphs", 1)[1].strip(" :") for line in log.read_text(errors="replace").splitlines()
            if "skipping cudagraphs" in line]


def reduce_overhead(ctx: Context, log: Path) -> dict:
    """CUDA graphs in training with eager (flip-TTA) evaluation beside them: only a GPU records graphs."""
    run_dir = ctx.run_dir("reduce_overhead")
    ctx.run("train.py", *ctx.train_args("c10_fast", "reduce_overhead", ["compile_mode=reduce-overhead", "tta_flip=true",
                                                                        "phases.0.epochs=2"],
                                        smoke_sets=["max_steps_per_epoch=3", "data.batch_size=32",
                                                    "max_eval_batches=1"], data=ctx.full_data),
            log=log, env={"TORCH_LOGS": "perf_hints"})
    skips = cudagraph_skips(log)
    graphs = ("used: no cudagraph skips logged" if not skips else f"skipped: {'; '.join(skips[:3])}") \
        if ctx.compiled else "n/a: uncompiled"
    return {**summary_of(run_dir), "epochs": epochs_of(run_dir), "cudagraphs": graphs, **ctx.uncompiled_note()}


def photo(ctx: Context, log: Path) -> dict:
    """benchmarks.photo_loaders on 300 generated photos of 240-500 px (JPEG, and half raw): images/s of each
    loader and the ratios, the photo backend's CUDA path measured for the first time (issue 38)."""
    work = ctx.work / "photo"
    report = ctx.out / "photo_loaders.md"
    ctx.fresh(report, work / "photo_loaders.md")
    size = ["--smoke"] if ctx.args.smoke else ["--generated", "300", "--resolutions", "224", "--rounds", "1",
                                               "--epochs", "2"]
    ctx.run("-m", "benchmarks.photo_loaders", "--device", ctx.args.device, "--datasets", "generated", "--backends",
            "photo", "photo-Pillow", "--workers", str(ctx.args.workers), "--work", str(work), *size, log=log)
    if not (work / "photo_loaders.md").is_file():  # cut short: the rows it printed as each was measured
        return {"printed": [line for line in log.read_text(errors="replace").splitlines()
                            if line.startswith("generated_")]}
    table = (work / "photo_loaders.md").read_text()
    write_text(report, table)
    return {"rows": [line for line in table.splitlines() if line.startswith("| generated")], "report": report.name}


def finetune(ctx: Context, log: Path) -> dict:
    """As long as the budget lasts: running out of time is this step's normal end, not a failure. From scratch
    (no network for ImageNet weights), so the head-only phase gets one epoch, not eight."""
    run_dir = ctx.run_dir("finetune")
    result = ctx.run("train.py", *ctx.train_args("c10_finetune", "finetune", ["pretrained=false", "phases.0.epochs=1"],
                                                 smoke_sets=["phases.1.epochs=1", "max_steps_per_epoch=3",
                                                             "data.batch_size=16", "max_eval_batches=1"]), log=log)
    if result.get("error", "").startswith("timeout") and epochs_of(run_dir):
        result["note"] = result.pop("error").replace("timeout", "stopped at the budget")
    return {"epochs": epochs_of(run_dir), **ctx.uncompiled_note()}


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Context, Path], dict]
    limit_s: float  # on a GPU; the budget cuts it shorter when time runs out


# limits on a GPU (the device README's budget table: what each step cost on the CPU, and the GPU estimate);
# they sum to 450 s, the default budget: the finetune step runs on what the steps before it leave unused
STEPS = (Step("versions", versions, 40), Step("convert", convert, 40), Step("syncs", syncs, 100),
         Step("throughput", throughput, 120), Step("time_to_94", time_to_94, 60), Step("loaders", loaders, 20),
         Step("reduce_overhead", reduce_overhead, 40), Step("photo", photo, 30),
         Step("finetune", finetune, float("inf")))
NAMES = [s.name for s in STEPS]
MIN_STEP_S = 15  # a step with less time left than this is skipped


def run_step(ctx: Context, number: int, step: Step, limit: float) -> dict:
    """One step: its commands under `limit` seconds; its JSON written the moment it ends."""
    ctx.limit, ctx.started, ctx.commands = limit, time.monotonic(), []
    log = ctx.out / f"{number:02d}-{step.name}.log"
    log.write_text("")
    record = {"number": number, "step": step.name, "limit_s": None if limit == float("inf") else round(limit)}
    try:
        record["results"] = step.run(ctx, log)
        failed = [c for c in ctx.commands if c.get("error")]
        record["status"] = "ok" if not failed else ("timeout" if failed[0]["error"].startswith("timeout")
                                                    else "failed")
    except Exception as exc:  # a broken step is a result: the next one still runs
        record["status"], record["error"] = "failed", f"{type(exc).__name__}: {exc}"
    record["seconds"] = round(time.monotonic() - ctx.started, 1)
    record["commands"] = ctx.commands
    write_json(ctx.out / f"{number:02d}-{step.name}.json", record)
    return record


def compact(value: object) -> object:
    """Numbers to 4 significant digits and no empty values: a summary row a person can read."""
    if isinstance(value, dict):
        return {k: compact(v) for k, v in value.items() if v not in (None, "", [], {})}
    if isinstance(value, list):
        return [compact(v) for v in value]
    if isinstance(value, str):
        try:
            return compact(float(value))
        except ValueError:
            return value
    return float(f"{value:.4g}") if isinstance(value, float) else value


def summary(records: list[dict], header: dict[str, str]) -> str:
    lines = ["# first_contact", "", *(f"- {k}: {v}" for k, v in header.items()), "",
             "| # | step | status | s | limit s | result |", "|---:|---|---|---:|---:|---|"]
    for r in records:
        failed = [c for c in r.get("commands", []) if c.get("error")]
        detail = r.get("error") or (f"{failed[0]['error']}: {(failed[0].get('tail') or [''])[-1]}" if failed else
                                    json.dumps(compact(r.get("results", {})), default=str))
        lines.append(f"| {r['number']} | {r['step']} | {r['status']} | {r.get('seconds', '')} "
                     f"| {r.get('limit_s') or ''} | {detail.replace('|', '/')[:1000]} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.device.first_contact",
                                     description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: a 500-image subset, a few steps")
    parser.add_argument("--tarball", type=Path, default=TARBALL, help="the CIFAR-10 JPEG tarball")
    parser.add_argument("--out", type=Path, help="results folder (default: $OUT, else runs/first_contact/out)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "first_contact",
                        help="converted data and run folders (not sent back)")
    parser.add_argument("--budget-s", type=float, default=450, help="seconds for all steps together")
    parser.add_argument("--limit", action="append", default=[], metavar="STEP=SECONDS",
                        help=f"one step's time limit (repeatable); steps: {', '.join(NAMES)}")
    parser.add_argument("--only", nargs="+", choices=NAMES, help="run these steps only (in the usual order)")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                        help="conversion processes and loader workers (default: 16, or the CPU count if lower)")
    parser.add_argument("--ablations", action="store_true",
                        help="the throughput step also times channels-last off and fp32 (two more compiles: not "
                             "in the first call's budget)")
    return parser


def step_limits(args: argparse.Namespace) -> dict[str, float]:
    """The default limits with --limit's changes, refused with one line when a step name or number is wrong."""
    limits = {s.name: s.limit_s for s in STEPS}
    for item in args.limit:
        name, _, seconds = item.partition("=")
        if name not in limits or not seconds.replace(".", "", 1).isdigit():
            raise UserError(f"--limit {item!r} is not STEP=SECONDS with a step of {', '.join(NAMES)}; "
                            "e.g. --limit throughput=120")
        limits[name] = float(seconds)
    return limits


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    limits = step_limits(args)
    if not args.tarball.is_file():
        raise UserError(f"no CIFAR-10 tarball at {args.tarball}; copy it there first: "
                        "mkdir -p .device-data && cp ../shared/data/cifar10-jpeg.tar.xz .device-data/")
    out = args.out or Path(os.environ.get("OUT") or ROOT / "runs" / "first_contact" / "out")
    out.mkdir(parents=True, exist_ok=True)
    call = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    ctx = Context(args, out, args.work, START + args.budget_s, call)
    command = "python -m benchmarks.device.first_contact " + shlex.join(sys.argv[1:] if argv is None else argv)
    header = {"command": command, "budget": f"{args.budget_s:g} s", "status": "running (rewritten after each step)"}
    records: list[dict] = []
    for number, step in enumerate(STEPS, 1):
        left = ctx.deadline - time.monotonic()
        if args.only and step.name not in args.only:
            continue
        if left < MIN_STEP_S:
            records.append({"number": number, "step": step.name, "status": "skipped",
                            "error": f"budget spent ({left:.0f} s left)"})
        else:
            records.append(run_step(ctx, number, step, min(limits[step.name], left)))
        print(f"{step.name}: {records[-1]['status']} ({records[-1].get('seconds', 0)} s)", flush=True)
        write_text(out / "summary.md", summary(records, header))
    header["status"] = "finished"
    write_text(out / "summary.md", summary(records, header))
    print((out / "summary.md").read_text())
    return 1 if any(r["status"] in ("failed", "timeout") for r in records) else 0


if __name__ == "__main__":
    run_cli(main)
