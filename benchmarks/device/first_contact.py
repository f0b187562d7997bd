"""`python -m benchmarks.device.first_contact`: the first call on a bare GPU machine, prepared as one script.

A bare machine has Python 3.12, torch (cu130), torchvision, accelerate, timm, numpy and pillow; no ffcv, no
DALI, no compilers, no network, no matplotlib, tensorboard or torchmetrics. The call carries only the CIFAR-10
JPEG tarball (`.device-data/`, git-ignored) and runs these steps in order, each as subprocesses under its own
time limit (a hang or a crash costs that step alone; the whole stays within --budget-s):

1. versions: the Python packages, CUDA, the compilers found, `nvidia-smi`;
2. convert: CIFAR-10 with a val split (`python -m convert imagefolder ... --val-fraction 0.1`);
3. loaders: the tensor backend's identity and augmentation statistics on the device (check_cuda.py's checks);
4. syncs: c10_finetune, c100_scratch (on CIFAR-10) and c10_fast, 20 steady-state steps each under --check-syncs;
5. throughput: benchmarks.train_throughput for ResNet34-CIFAR (bf16 + channels-last + compiled ceiling, its
   ablations, the tensor backend, the torchvision DataLoader baseline, MFU);
6. time_to_94: c10_fast's time to 94% test accuracy (benchmarks.time_to_accuracy);
7. reduce_overhead: c10_fast with compile_mode "reduce-overhead" and flip TTA;
8. finetune: c10_finetune from scratch for whatever time is left, images/s per epoch.

Every step writes `NN-name.json` (status, seconds, commands with their exit status and last lines, results)
and `NN-name.log` (its whole output) to $OUT as soon as it ends, and `summary.md` is rewritten after each one.
`--smoke` shrinks everything (a 500-image subset of the tarball, a few steps, no compile on the CPU) so the
script runs end to end in a few minutes on a CPU. The exit status is 1 when any step failed or ran out of time.
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

from benchmarks.time_to_accuracy import read_run
from beton_trainer.common.errors import UserError, run_cli
from beton_trainer.common.files import write_json, write_text

ROOT = Path(__file__).resolve().parents[2]
TARBALL = ROOT / ".device-data" / "cifar10-jpeg.tar.xz"
SYNC_RECIPES = {"c10_finetune": ["pretrained=false", "phases.0.epochs=1", "phases.1.epochs=1"],
                "c100_scratch": ["phases.0.epochs=1"], "c10_fast": ["phases.0.epochs=1"]}
STEADY_STEPS = 20  # per epoch under --check-syncs: train.py leaves the first 2 and the last (logging) step alone
SMOKE_PER_CLASS = {"train": 40, "test": 10}  # 500 images
COMPILE_NOTE = "compile=false: on the CPU torch.compile needs a C++ compiler, which the bare image lacks"


@dataclass
class Context:
    """What every step reads: the options, the folders, the time left."""

    args: argparse.Namespace
    out: Path
    work: Path
    deadline: float  # time.monotonic() when the budget is spent
    limit: float = 0.0  # this step's seconds
    started: float = 0.0
    commands: list[dict] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.args.device == "cuda"

    @property
    def data(self) -> Path:
        return self.work / "data" / "cifar10"

    def left(self) -> float:
        return min(self.started + self.limit, self.deadline) - time.monotonic()

    def overrides(self, sets: list[str], smoke_sets: list[str]) -> list[str]:
        """--set arguments: `sets`, then under --smoke `smoke_sets`; on the CPU never compiled."""
        sets = [*sets, "tensorboard=false", *(smoke_sets if self.args.smoke else [])]
        if not self.cuda:
            sets.append("compile=false")
        return [a for s in sets for a in ("--set", s)] + ([] if self.cuda else ["--cpu"])

    def train_args(self, recipe: str, run: str, sets: list[str], *, smoke_sets: list[str]) -> list[str]:
        """train.py's arguments for `recipe` on the converted data, in run folder `run`."""
        return ["--recipe", recipe, "--data", str(self.data), "--run-dir", str(self.work / "runs" / run),
                *self.overrides(sets, smoke_sets)]

    def run(self, *command: str, log: Path, timeout: float | None = None) -> dict:
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
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
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
    """What the machine has, in a child process (a CUDA initialisation that hangs costs this step alone): the
    versions, the packages present or absent and the compilers, which explain what the later steps do."""
    probe = ("import json, shutil, sys, importlib.util as u, torch\n"
             "from benchmarks.loaders import environment\n"
             "mods = ['torchvision', 'accelerate', 'timm', 'numpy', 'PIL', 'triton', 'ffcv', 'nvidia.dali',\n"
             "        'matplotlib', 'tensorboard', 'torchmetrics', 'numba']\n"
             "def has(m):\n"
             "    try: return u.find_spec(m) is not None\n"
             "    except ModuleNotFoundError: return False\n"
             f"device = torch.device('{ctx.args.device}')\n"
             "print(json.dumps({**environment(device), 'python': sys.version.split()[0], 'torch': torch.__version__,\n"
             "    'cuda': torch.version.cuda, 'cuda_available': torch.cuda.is_available(),\n"
             "    'cudnn': torch.backends.cudnn.version(), 'installed': {m: has(m) for m in mods},\n"
             "    'compilers': {c: shutil.which(c) for c in ('cc', 'gcc', 'g++', 'clang', 'nvcc')}}))\n")
    result = ctx.run("-c", probe, log=log)
    found = json.loads(result["tail"][-1]) if not result.get("error") else {}
    smi = ctx.run("nvidia-smi", log=log, timeout=30)
    if not ctx.cuda and smi.get("error"):  # no driver on a CPU machine is no failure
        ctx.commands.remove(smi)
    if ctx.cuda and not found.get("cuda_available"):
        raise StepFailed("torch sees no CUDA device")
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
    source = ctx.args.tarball
    if ctx.args.smoke:
        ctx.work.mkdir(parents=True, exist_ok=True)
        source = subset_tarball(source, ctx.work / "cifar10-smoke.tar", SMOKE_PER_CLASS)
    ctx.run("-m", "convert", "imagefolder", "--src", str(source), "--out", str(ctx.work / "data"), "--name",
            "cifar10", "--val-fraction", "0.1", "--workers", str(ctx.args.workers), "--force", log=log)
    manifest = json.loads((ctx.data / "manifest.json").read_text()) if (ctx.data / "manifest.json").is_file() else {}
    return {"splits": {k: v["count"] for k, v in manifest.get("splits", {}).items()}}


def loaders(ctx: Context, log: Path) -> dict:
    """check_cuda.py's loader checks for the tensor backend: the only one a bare machine has."""
    report = ctx.out / "check_cuda.md"
    ctx.run("-m", "benchmarks.device.check_cuda", "--device", ctx.args.device, "--data", str(ctx.data),
            "--backends", "tensor", "--skip-training", "--out", str(report), *(["--smoke"] if ctx.args.smoke else []),
            log=log)
    rows = report.read_text().splitlines() if report.is_file() else []
    return {"passed": sum("| PASS |" in r for r in rows), "failed": sum("**FAIL**" in r for r in rows),
            "report": report.name}


def summary_of(run_dir: Path) -> dict:
    """What a train.py run folder says: summary.json's numbers, else how many epochs it logged."""
    if (run_dir / "summary.json").is_file():
        s = json.loads((run_dir / "summary.json").read_text())
        keys = ("test_accuracy", "images_per_s", "sync_checked_steps", "worst_data_wait_fraction", "wall_s")
        return {k: s.get(k) for k in keys}
    return {"epochs": len(epochs_of(run_dir))}


def epochs_of(run_dir: Path) -> list[dict]:
    """Per epoch: images/s, seconds, accuracy (metrics.csv is rewritten whole after every epoch)."""
    if not (run_dir / "metrics.csv").is_file():
        return []
    with open(run_dir / "metrics.csv", newline="") as fh:
        return [{k: r.get(k) for k in ("epoch", "phase", "images_per_s", "epoch_time_s", "data_wait_fraction",
                                       "input_device_s", "val_accuracy", "test_accuracy")} for r in csv.DictReader(fh)]


def syncs(ctx: Context, log: Path) -> dict:
    """Each recipe one short epoch per phase under --check-syncs: a host sync in a steady step ends its run."""
    found = {}
    for recipe, sets in SYNC_RECIPES.items():
        steps = 4 if ctx.args.smoke else STEADY_STEPS + 3
        ctx.run("train.py", *ctx.train_args(recipe, f"syncs-{recipe}", [*sets, f"max_steps_per_epoch={steps}",
                                                                         "max_eval_batches=2"],
                                            smoke_sets=["data.batch_size=16", "data.eval_batch_size=64"]),
                "--check-syncs", log=log)
        found[recipe] = summary_of(ctx.work / "runs" / f"syncs-{recipe}")
    return found


def throughput(ctx: Context, log: Path) -> dict:
    """The step's ceiling and what each part of the feed costs against it, for the model of c10_finetune."""
    csv_path = ctx.out / "train_throughput.csv"
    size = ["--smoke"] if ctx.args.smoke else ["--steps", "30", "--warmup", "10"]
    # compiles: the ceiling's graph is cached for the two loader rows, so three in all (ceiling, NCHW, fp32)
    ctx.run("-m", "benchmarks.train_throughput", "--device", ctx.args.device, "--data", str(ctx.data),
            "--model", "resnet34_cifar", "--backends", "tensor", "torchvision", "--workers", str(ctx.args.workers),
            "--out", str(csv_path), *size, log=log)
    if not csv_path.is_file():
        return {}
    with open(csv_path, newline="") as fh:
        return {r["name"]: {k: r[k] for k in ("config", "images_per_s", "data_wait_fraction", "mfu", "peak_mem_mb")}
                for r in csv.DictReader(fh)}


def time_to_94(ctx: Context, log: Path) -> dict:
    """c10_fast's whole recipe: the train seconds at which each threshold is first met."""
    run_dir = ctx.work / "runs" / "time_to_94"
    sets = ctx.overrides([], ["phases.0.epochs=1", "max_steps_per_epoch=3", "data.batch_size=32",
                              "max_eval_batches=1"])
    ctx.run("-m", "benchmarks.time_to_accuracy", "--recipe", "c10_fast", "--data", str(ctx.data), "--run-dir",
            str(run_dir), "--out", str(ctx.out / "time_to_accuracy.md"), *sets, log=log)
    if not (run_dir / "summary.json").is_file():
        return summary_of(run_dir)
    times = read_run(run_dir, [0.90, 0.93, 0.94])
    return {"test_accuracy": times.test_accuracy, "train_s": times.train_s, "first_epoch_s": times.first_epoch_s,
            "reached_train_s": {f"{t:.0%}": "not reached" if s is None else s
                                for t, s in times.reached.items()}, "epochs": times.epochs}


def reduce_overhead(ctx: Context, log: Path) -> dict:
    """CUDA graphs in training with eager (flip-TTA) evaluation beside them: only a GPU records graphs."""
    ctx.run("train.py", *ctx.train_args("c10_fast", "reduce_overhead", ["compile_mode=reduce-overhead", "tta_flip=true",
                                                                        "phases.0.epochs=2"],
                                        smoke_sets=["max_steps_per_epoch=3", "data.batch_size=32",
                                                    "max_eval_batches=1"]), log=log)
    run_dir = ctx.work / "runs" / "reduce_overhead"
    return {**summary_of(run_dir), "epochs": epochs_of(run_dir)}


def finetune(ctx: Context, log: Path) -> dict:
    """As long as the budget lasts: running out of time is this step's normal end, not a failure."""
    run_dir = ctx.work / "runs" / "finetune"
    result = ctx.run("train.py", *ctx.train_args("c10_finetune", "finetune", ["pretrained=false"],
                                                 smoke_sets=["phases.0.epochs=1", "phases.1.epochs=1",
                                                             "max_steps_per_epoch=3", "data.batch_size=16",
                                                             "max_eval_batches=1"]), log=log)
    if result.get("error", "").startswith("timeout") and epochs_of(run_dir):
        result["note"] = result.pop("error").replace("timeout", "stopped at the budget")
    return {"epochs": epochs_of(run_dir)}


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Context, Path], dict]
    limit_s: float  # on a GPU; the budget cuts it shorter when time runs out


STEPS = (Step("versions", versions, 60), Step("convert", convert, 120), Step("loaders", loaders, 90),
         Step("syncs", syncs, 180), Step("throughput", throughput, 180), Step("time_to_94", time_to_94, 150),
         Step("reduce_overhead", reduce_overhead, 120), Step("finetune", finetune, float("inf")))
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
    ctx = Context(args, out, args.work, time.monotonic() + args.budget_s)
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
