"""`python -m benchmarks.smoke_times --data-root ../shared/data`: every `*_smoke` recipe end to end on the real
data, each as a fresh `train.py --cpu` process, with its wall time; prints a Markdown table.

The shared data is converted once into --work (reused when up to date): MNIST, CIFAR-10 from the JPEG
tarball with a 10% val split (c10_finetune validates on it) and the hymenoptera photos. There is no
CIFAR-100 copy, so c100_scratch_smoke runs on CIFAR-10 (its model takes its class count from the data).
"wall s" is the whole command as a user waits for it (imports, FFCV's JIT, data to the device, training,
evaluation, reports); "CPU s" is that process's user + system time (less sensitive to other jobs on the
machine than the wall time); "run s" is summary.json's wall_s (training, evaluation and the final test).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from beton_trainer.common.errors import UserError, run_cli
from beton_trainer.convert import convert_dataset
from beton_trainer.trainer.config import RECIPES_DIR, load_recipe

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {  # dataset name -> (converter, file under --data-root, options)
    "mnist": ("mnist", "mnist", {}),
    "cifar10": ("imagefolder", "cifar10-jpeg.tar.xz", {"name": "cifar10", "val_fraction": 0.1}),
    "hymenoptera": ("imagefolder", "hymenoptera_data.tar", {"name": "hymenoptera"}),
}
DATA_FOR = {"mnist_": "mnist", "c10_": "cifar10", "c100_": "cifar10", "hymenoptera_": "hymenoptera",
            "imagenet_": "hymenoptera"}


def smoke_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*_smoke.toml"))


def dataset_for(recipe: str) -> str:
    for prefix, name in DATA_FOR.items():
        if recipe.startswith(prefix):
            return name
    raise UserError(f"no real dataset is known for recipe '{recipe}'; add its prefix to DATA_FOR in {__file__}")


def timed_run(recipe: str, data: Path, run_dir: Path) -> tuple[float, float, dict]:
    """Wall and CPU seconds of one `train.py` process, and its summary.json. A distillation recipe trains
    its teacher first, into a fresh folder beside the run (so the time includes it)."""
    command = [sys.executable, "train.py", "--recipe", recipe, "--data", str(data), "--run-dir", str(run_dir),
               "--cpu"]
    if load_recipe(recipe).loss.distill.teacher:
        command += ["--set", f"loss.distill.teacher={json.dumps(str(run_dir.parent / 'teacher'))}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise UserError(f"{recipe} failed (exit status {out.returncode}): {out.stderr.strip()[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, json.loads((run_dir / "summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="the shared data folder (mnist/, the two tarballs)")
    parser.add_argument("--work", default="runs/smoke-times", help="converted data and run folders go here")
    parser.add_argument("--recipes", nargs="*", default=None, help="a subset of the smoke recipes (default: all)")
    args = parser.parse_args(argv)
    recipes = args.recipes or smoke_recipes()
    work, root = Path(args.work), Path(args.data_root)
    data = {}
    for name in sorted({dataset_for(r) for r in recipes}):
        converter, source, options = SOURCES[name]
        data[name] = convert_dataset(converter, root / source, work / "data", log=lambda _: None, **options)
    print(f"load average at start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)\n")
    print("| recipe | data | epochs | test images | wall s | CPU s | run s |\n|---|---|---:|---:|---:|---:|---:|")
    for recipe in recipes:
        run_dir = work / "runs" / recipe / "run"
        shutil.rmtree(run_dir.parent, ignore_errors=True)
        wall, cpu, summary = timed_run(recipe, data[dataset_for(recipe)], run_dir)
        print(f"| {recipe} | {dataset_for(recipe)} | {summary['epochs']} | {summary['test_samples']:,} | "
              f"{wall:.1f} | {cpu:.1f} | {summary['wall_s']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
