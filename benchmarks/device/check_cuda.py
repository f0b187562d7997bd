"""`python -m benchmarks.device.check_cuda`: does every loader backend yield correct batches on the device,
and how fast and how well does train.py train there in each precision / memory-format / compile setting?

Loader checks, per installed backend: identity (an empty spec gives back the stored pixels and labels, as
float32 channels-last tensors on the device, for the test split in eval mode and the first train batches),
augmentation statistics on position-coded images (crop offsets uniform, flip and erase rates within five
sigma; the helpers of the CPU tests), FFCV batches equal to the tensor backend's for the same seed, and that
DALI's graph ran on the requested device (GPU ops on CUDA). Training: train.py in a subprocess, one short run
per setting; test accuracy from summary.json, images/s of the last epoch (after any compile warm-up) from
metrics.csv; each run has --run-timeout seconds, and one that runs out is a FAIL row. The markdown report is
rewritten to --out ($OUT/check_cuda.md when the device tool sets OUT) after every check and run, so a hang or
a lost machine keeps what came before; it is printed at the end, and the exit status is 1 when any check failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from benchmarks.loaders import environment
from beton_trainer.common.errors import UserError, run_cli
from beton_trainer.common.schema import from_dict
from beton_trainer.format.dataset import open_split
from beton_trainer.pipelines import BACKENDS, build_loader
from beton_trainer.pipelines.augment import AugmentSpec
from beton_trainer.pipelines.base import LoaderOptions, rank_indices
from tests.loader_helpers import (
    UNIT,
    as_pixels,
    check_uniform_offsets,
    crop_flip_draws,
    erased_fractions,
    five_sigma,
    installed,
    position_images,
)

ROOT = Path(__file__).resolve().parents[2]
CHAIN = {"crop": {"padding": 4}, "flip": {"p": 0.5}, "jitter": {"brightness": 0.3, "contrast": 0.3},
         "erase": {"p": 0.5}, "mix": {"mixup_alpha": 0.4, "cutmix_alpha": 1.0}}


@dataclass(frozen=True)
class Setting:
    name: str
    precision: str  # train.py's precision: no | bf16 | fp16
    channels_last: bool
    compile: bool

    @property
    def needs_cuda(self) -> bool:
        return self.precision == "fp16" or self.compile


SETTINGS = (Setting("fp32", "no", True, False), Setting("bf16", "bf16", True, False),
            Setting("fp16", "fp16", True, False), Setting("bf16 NCHW", "bf16", False, False),
            Setting("bf16 compile", "bf16", True, True), Setting("fp16 compile", "fp16", True, True))


@dataclass
class Check:
    backend: str
    name: str
    ok: bool
    detail: str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.device.check_cuda",
                                     description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--data", type=Path, required=True,
                        help="a converted RGB dataset (train and test splits)")
    parser.add_argument("--grey-data", type=Path,
                        help="a converted 1-channel dataset (MNIST): identity checks on it too")
    parser.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=list(BACKENDS))
    parser.add_argument("--recipe", default="c10_cnn", help="train.py recipe for the training runs")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per training run")
    parser.add_argument("--settings", nargs="+", choices=[s.name for s in SETTINGS],
                        help="training settings to run (default: all that the device supports)")
    parser.add_argument("--train-loaders", nargs="+", choices=list(BACKENDS), default=["tensor"],
                        help="loaders to train with (each setting once per loader)")
    parser.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra train.py --set overrides, e.g. model.name=resnet18_cifar")
    parser.add_argument("--run-timeout", type=float, default=600, metavar="S",
                        help="seconds per train.py run; a run still going then is killed and reported as a FAIL")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--out", type=Path, help="markdown report (default: $OUT/check_cuda.md, else runs/)")
    parser.add_argument("--run-root", type=Path,
                        help="folder for the training runs (default runs/check_cuda-DATE)")
    parser.add_argument("--smoke", action="store_true",
                        help="a quick pass: few batches, the smoke recipe for 1 epoch, the first setting")
    return parser


def options(data: Path, split: str, device: torch.device, *, train: bool, spec: dict | None = None,
            batch_size: int = 256, seed: int = 0) -> LoaderOptions:
    return LoaderOptions(data_dir=data, split=split, batch_size=batch_size, train=train, seed=seed,
                         spec=from_dict(AugmentSpec, spec or {}), device=device)


def _on_device(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> None:
    assert x.device.type == device.type and y.device.type == device.type, f"batch on {x.device}/{y.device}"
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last), "not float32 NHWC"
    assert y.dtype == torch.int64 and y.dim() == 1, f"labels {y.dtype} {tuple(y.shape)}"


def check_identity(backend: str, data: Path, device: torch.device, max_batches: int | None) -> str:
    """Eval over the test split, then the first train batches: exactly the stored pixels and labels."""
    test = open_split(data, "test")
    seen = 0
    for b, (x, y) in enumerate(build_loader(backend, options(data, "test", device, train=False))):
        if max_batches is not None and b == max_batches:
            break
        _on_device(x, y, device)
        n = len(y)
        np.testing.assert_array_equal(as_pixels(x.cpu(), test.mean, test.std), test.images[seen:seen + n])
        np.testing.assert_array_equal(y.cpu().numpy(), test.labels[seen:seen + n])
        seen += n
    train = open_split(data, "train")
    loader = build_loader(backend, options(data, "train", device, train=True, seed=5))
    order = rank_indices(len(train.labels), epoch=0, seed=5, rank=0, world_size=1, train=True, batch_size=256)
    checked = 0
    for b, (x, y) in enumerate(loader):
        if b == (max_batches or 4):
            break
        _on_device(x, y, device)
        idx = order[checked:checked + len(y)]
        np.testing.assert_array_equal(as_pixels(x.cpu(), train.mean, train.std), train.images[idx])
        np.testing.assert_array_equal(y.cpu().numpy(), train.labels[idx])
        checked += len(y)
    return f"{seen:,} test + {checked:,} train images equal the stored ones, on {x.device}"


def check_grey_refused(data: Path, device: torch.device) -> str:
    """The photo backend decodes RGB records only: one-channel arrays stop it with one line naming the tensor
    backend."""
    try:
        build_loader("photo", options(data, "train", device, train=True))
    except UserError as exc:
        assert "--loader tensor" in str(exc) and "\n" not in str(exc), str(exc)
        return f"refused in one line: {exc}"
    raise AssertionError("the photo backend took one-channel arrays")


def _position_batches(backend: str, device: torch.device, spec: dict) -> list:
    """One train epoch over 2,000 position-coded images (the CPU tests' `run_arrays`, on `device`)."""
    from beton_trainer.pipelines.dali_loader import DaliLoader
    from beton_trainer.pipelines.tensor_loader import TensorLoader

    cls = {"tensor": TensorLoader, "dali": DaliLoader}[backend]
    images = position_images(2000)
    opts = options(Path("."), "train", device, train=True, spec=spec, batch_size=500)
    return list(cls.from_arrays(images, np.arange(len(images)) % 10, **UNIT, num_classes=10, options=opts))


def check_crop_flip(backend: str, device: torch.device) -> str:
    padding, p = 4, 0.3
    batches = _position_batches(backend, device, {"crop": {"padding": padding}, "flip": {"p": p}})
    assert batches[0][0].device.type == device.type, f"batch on {batches[0][0].device}"
    pixels = np.concatenate([as_pixels(x.cpu(), **UNIT) for x, _ in batches])
    dy, dx, flipped = crop_flip_draws(pixels, padding)
    check_uniform_offsets(dy, padding)
    check_uniform_offsets(dx, padding)
    rate = flipped.mean()
    assert abs(rate - p) < five_sigma(len(flipped), p), f"flip rate {rate:.3f}, spec {p}"
    return f"offsets uniform in [0, {2 * padding}], flip rate {rate:.3f} (spec {p}), {len(dy):,} images"


def check_erase(backend: str, device: torch.device) -> str:
    p = 0.4
    batches = _position_batches(backend, device, {"erase": {"p": p, "scale": [0.05, 0.25], "value": 7.0}})
    f = erased_fractions([(x.cpu(), y) for x, y in batches], 7.0)
    rate = (f > 0).mean()
    assert abs(rate - p) < five_sigma(len(f), p), f"erase rate {rate:.3f}, spec {p}"
    erased = f[f > 0]
    assert erased.min() > 0.05 * 0.7 and erased.max() < 0.25 * 1.3, "erased area outside the spec's scale"
    return f"erase rate {rate:.3f} (spec {p}), area {erased.min():.3f}-{erased.max():.3f} (spec 0.05-0.25)"


def check_same_as_tensor(backend: str, data: Path, device: torch.device, max_batches: int) -> str:
    """FFCV and the photo backend apply the shared device ops (and cut fixed-size images whole): with one seed their
    batches are the tensor backend's, bit for bit."""
    opts = options(data, "train", device, train=True, spec=CHAIN, seed=11)
    pairs = zip(build_loader(backend, opts), build_loader("tensor", opts))
    count = 0
    for (x, y), (x_ref, y_ref) in pairs:
        torch.testing.assert_close(x, x_ref, rtol=0, atol=0)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
        count += 1
        if count == max_batches:
            break
    return f"{count} batches of the full chain (crop, flip, jitter, erase, MixUp/CutMix) identical"


def check_dali_device(device: torch.device) -> str:
    """Run the DALI graph once and look at where its output lives: GPU ops give a TensorListGPU."""
    from beton_trainer.pipelines.dali_loader import DaliLoader

    images = position_images(64)
    opts = options(Path("."), "train", device, train=True, spec=CHAIN, batch_size=64)
    loader = DaliLoader.from_arrays(images, np.arange(64) % 10, **UNIT, num_classes=10, options=opts)
    def source():  # the generator function DALI's external_source cycles over: one batch
        yield images

    pipe = loader.pipeline(source, seed=1)
    pipe.build()
    (out,) = pipe.run()
    kind = type(out).__name__
    expected = "TensorListGPU" if device.type == "cuda" else "TensorListCPU"
    assert kind == expected, f"the graph's output is a {kind}, expected {expected}"
    return f"the full chain's graph outputs a {kind} (device_id {loader.device_id})"


def run_check(backend: str, name: str, fn: Callable[[], str]) -> Check:
    start = time.perf_counter()
    try:
        detail = fn()
        ok = True
    except Exception as exc:  # a failed check is a row of the report, not the end of the run
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        detail, ok = f"{type(exc).__name__}: {message} ({Path(frame.filename).name}:{frame.lineno})", False
    check = Check(backend, name, ok, f"{detail} [{time.perf_counter() - start:.1f}s]")
    print(f"{'PASS' if ok else 'FAIL'} {backend:<7} {name}: {check.detail}", flush=True)
    return check


class Report:
    """What has run so far, rewritten to `path` after every check or run (a hang later loses nothing)."""

    def __init__(self, path: Path, header: dict[str, str]) -> None:
        self.path, self.header = path, header
        self.checks: list[Check] = []
        self.notes: list[str] = []
        self.rows: list[dict] = []

    def add(self, item: Check | dict | str) -> None:
        {Check: self.checks, dict: self.rows, str: self.notes}[type(item)].append(item)
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(self.text())

    def text(self) -> str:
        return report(self.header, self.checks, self.notes, self.rows)

    @property
    def failed(self) -> bool:
        return any(not c.ok for c in self.checks) or any(r.get("error", "skipped").startswith("FAIL")
                                                         for r in self.rows)


def loader_checks(args: argparse.Namespace, device: torch.device, out: Report) -> None:
    batches = 2 if args.smoke else None
    for backend in args.backends:
        package = BACKENDS[backend][2]
        if package and not installed(package):
            out.add(f"{backend}: not checked, {package} is not installed (source /tmp/pydeps/env.sh?)")
            continue
        for name, data in (("identity", args.data), ("identity, grey", args.grey_data)):
            if data and backend == "photo" and name == "identity, grey":  # RGB only: its one-line refusal
                out.add(run_check(backend, "grey refused", lambda d=data: check_grey_refused(d, device)))
            elif data:
                out.add(run_check(backend, name, lambda b=backend, d=data: check_identity(b, d, device, batches)))
        if backend in ("ffcv", "photo"):
            out.add(run_check(backend, "same batches as tensor",
                              lambda b=backend: check_same_as_tensor(b, args.data, device, 2 if args.smoke else 20)))
        else:
            out.add(run_check(backend, "crop+flip statistics", lambda b=backend: check_crop_flip(b, device)))
            out.add(run_check(backend, "erase statistics", lambda b=backend: check_erase(b, device)))
        if backend == "dali":
            out.add(run_check(backend, f"DALI ops on {device.type}", lambda: check_dali_device(device)))


def train_once(args: argparse.Namespace, setting: Setting, loader: str, run_dir: Path) -> dict:
    """One train.py run in a subprocess; its summary and last-epoch throughput, or the error it printed.
    On CUDA `--check-syncs` runs its steady-state steps under torch.cuda.set_sync_debug_mode("error")."""
    recipe, epochs = ("c10_cnn_smoke", 1) if args.smoke else (args.recipe, args.epochs)
    sets = [f"precision={setting.precision}", f"channels_last={str(setting.channels_last).lower()}",
            f"compile={str(setting.compile).lower()}", "tensorboard=false", f"phases.0.epochs={epochs}",
            *args.train_set]
    command = [sys.executable, "train.py", "--recipe", recipe, "--data", str(args.data), "--loader", loader,
               "--run-dir", str(run_dir), *[a for s in sets for a in ("--set", s)]]
    # on CUDA, --check-syncs is CUDA's sync debug mode (free); the CPU's operation recorder is for the test suite
    command.append("--cpu" if args.device == "cpu" else "--check-syncs")
    row = {"loader": loader, "setting": setting, "recipe": recipe, "epochs": epochs}
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=args.run_timeout)
    except subprocess.TimeoutExpired as exc:  # a hang is a result: the run is killed, the next one starts
        output = [line for part in (exc.stderr, exc.stdout) if part
                  for line in (part.decode() if isinstance(part, bytes) else part).splitlines() if line.strip()]
        last = f" (last output: {output[-1]})" if output else ""
        row["error"] = f"FAIL: timeout after {args.run_timeout:g} s{last}"
        return row
    row["wall_s"] = time.perf_counter() - start
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith(("error:", "RuntimeError", "Error"))]
        row["error"] = "FAIL: " + (errors or lines or [f"exit status {proc.returncode}"])[-1]
        return row
    summary = json.loads((run_dir / "summary.json").read_text())
    with open(run_dir / "metrics.csv", newline="") as fh:
        last = list(csv.DictReader(fh))[-1]
    row.update(accuracy=summary["test_accuracy"], images_per_s=float(last["images_per_s"] or "nan"),
               epoch_s=float(last["epoch_time_s"]), peak_mem_mb=float(last["peak_mem_mb"]))
    return row


def training_runs(args: argparse.Namespace, device: torch.device, run_root: Path, out: Report) -> None:
    chosen = [s for s in SETTINGS if s.name in args.settings] if args.settings else list(SETTINGS)
    if args.smoke and not args.settings:
        chosen = chosen[:1]
    for loader in args.train_loaders:
        for setting in chosen:
            if setting.needs_cuda and device.type != "cuda":
                out.add({"loader": loader, "setting": setting, "error": "skipped: needs CUDA"})
                continue
            row = train_once(args, setting, loader, run_root / f"{loader}-{setting.name.replace(' ', '-')}")
            out.add(row)
            print(f"train {loader:<7} {setting.name:<13} " + (row["error"] if "error" in row else
                  f"accuracy {row['accuracy']:.4f}, {row['images_per_s']:,.0f} images/s"), flush=True)


def report(header: dict[str, str], checks: list[Check], notes: list[str], rows: list[dict]) -> str:
    lines = ["# check_cuda", "", *(f"- {k}: {v}" for k, v in header.items()), "", "## Loader checks", "",
             "| backend | check | result | detail |", "|---|---|---|---|"]
    lines += [f"| {c.backend} | {c.name} | {'PASS' if c.ok else '**FAIL**'} | {c.detail} |" for c in checks]
    lines += [f"- {note}" for note in notes]
    if rows:
        lines += ["", "## Training runs (train.py)", "",
                  "| loader | setting | precision | channels_last | compile | test accuracy "
                  "| images/s, last epoch | last epoch s | peak MiB | wall s |",
                  "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            s = r["setting"]
            lead = f"| {r['loader']} | {s.name} | {s.precision} | {s.channels_last} | {s.compile} |"
            if "error" in r:
                lines.append(f"{lead} {r['error'].replace('FAIL', '**FAIL**', 1)} | | | | |")
            else:
                lines.append(f"{lead} {r['accuracy']:.4f} | {r['images_per_s']:,.0f} | {r['epoch_s']:.1f} | "
                             f"{r['peak_mem_mb']:,.0f} | {r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    for folder in filter(None, (args.data, args.grey_data)):
        if not (folder / "manifest.json").is_file():
            raise UserError(f"no converted dataset at {folder}; create it with `python -m convert ...` "
                            "(benchmarks/device/README.md)")
    device = torch.device(args.device)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "runs") / "check_cuda.md"
    command = " ".join(sys.argv[1:] if argv is None else argv)
    header = {**environment(device), "data": str(args.data),
              "command": f"python -m benchmarks.device.check_cuda {command}",
              "status": "cut short (this report is rewritten after every check and run; the last one is below)"}

    results = Report(out, header)
    loader_checks(args, device, results)
    run_root = args.run_root or ROOT / "runs" / f"check_cuda-{stamp}"
    if not args.skip_training:
        training_runs(args, device, run_root, results)
    header["status"] = "finished"
    results.write()
    print("\n" + results.text())
    print(f"wrote {out}")
    return 1 if results.failed else 0


if __name__ == "__main__":
    run_cli(main)
