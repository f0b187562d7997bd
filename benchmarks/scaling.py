"""`python -m benchmarks.scaling`: images/s per rank at 1, 2, 4 ... data-parallel ranks here (torchrun,
gloo, CPU), and the expected cost of the gradient all-reduce on GPUs, worked out on paper.

The measured part runs `train.py` under `torchrun --standalone --nproc_per_node N` for each N, in turn,
`--repeats` times, and reads images/s from each run's summary.json. The paper part counts the model's
parameters and training FLOPs (benchmarks.flops) and sets them against published link bandwidths and
an ASSUMED compute rate; nothing on the GPU side is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

from benchmarks.fault_harness import write_section
from benchmarks.flops import flops_per_image, peak_flops
from beton_trainer.common.errors import UserError, run_cli
from beton_trainer.format.dataset import load_manifest
from beton_trainer.models import build_model, count_parameters

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SETTINGS = ("phases.0.epochs=1", "max_steps_per_epoch=60", "tensorboard=false")

# Published bandwidths, per GPU and per direction. NVLink 4 (H100/H200 SXM): 900 GB/s per GPU counting
# both directions. InfiniBand NDR: 400 Gb/s per port and direction, typically 8 ports per node (one per GPU).
NVLINK_BYTES_PER_S = 900e9 / 2
NDR_BYTES_PER_S = 400e9 / 8
# ASSUMPTION, not a measurement: a ResNet34-CIFAR training step reaches 40% of the H100's dense bf16 peak.
ASSUMED_MFU = 0.4
GPU = "H100"
# (setting, GPUs, bandwidth of the slowest link in the ring)
TOPOLOGIES = (("1 node, 8 GPUs (NVLink)", 8, NVLINK_BYTES_PER_S),
              ("2 nodes, 16 GPUs (NDR, 8 ports/node)", 16, NDR_BYTES_PER_S),
              ("16 nodes, 128 GPUs (NDR, 8 ports/node)", 128, NDR_BYTES_PER_S))
BATCHES = (128, 512)  # per-GPU batch: c10_finetune's, and c10_fast's


def measure(data: Path, recipe: str, settings: list[str], nproc: int, run_dir: Path) -> float:
    """Images/s of all ranks together, from one torchrun job of `nproc` CPU processes."""
    sets = [arg for s in settings for arg in ("--set", s)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "train.py"), "--recipe", recipe, "--data", str(data), "--cpu", "--run-dir", str(run_dir),
               *sets]
    log = run_dir.with_suffix(".log")
    with open(log, "w") as out:
        code = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
    if code != 0:
        raise UserError(f"the {nproc}-process run failed (status {code}); see {log}")
    return json.loads((run_dir / "summary.json").read_text())["images_per_s"]


def measured_table(results: dict[int, list[float]]) -> list[str]:
    base = statistics.median(results[min(results)]) / min(results)
    rows = ["| ranks | images/s, all ranks (each run) | images/s per rank (median) | per rank vs 1 rank |",
            "|---:|---|---:|---:|"]
    for n, values in results.items():
        per_rank = statistics.median(values) / n
        rows.append(f"| {n} | {', '.join(f'{v:,.0f}' for v in values)} | {per_rank:,.0f} | {per_rank / base:.2f}x |")
    return rows


def paper_table(params: int, train_flops: float) -> list[str]:
    """Ring all-reduce time of fp32 gradients per step, against the step's compute at the assumed rate."""
    grad_bytes = 4 * params
    rate = ASSUMED_MFU * peak_flops(GPU)
    rows = ["| setting | bytes sent per GPU per step | all-reduce (bandwidth term) | "
            + " | ".join(f"compute at batch {b}/GPU" for b in BATCHES) + " | batch/GPU where they are equal |",
            "|---|---:|---:|" + "---:|" * len(BATCHES) + "---:|"]
    for name, gpus, bandwidth in TOPOLOGIES:
        sent = 2 * (gpus - 1) / gpus * grad_bytes
        comm = sent / bandwidth
        computes = [f"{b * train_flops / rate * 1e3:.2f} ms ({comm / (b * train_flops / rate):.0%})" for b in BATCHES]
        rows.append(f"| {name} | {sent / 1e6:,.0f} MB | {comm * 1e3:.2f} ms | " + " | ".join(computes)
                    + f" | {comm * rate / train_flops:,.0f} |")
    return rows


def section(command: str, recipe: str, settings: list[str], results: dict[int, list[float]]) -> str:
    model = build_model("resnet34_cifar", num_classes=10, image_shape=(32, 32, 3))
    params, train_flops = count_parameters(model), flops_per_image(model, (32, 32, 3), train=True)
    rate = ASSUMED_MFU * peak_flops(GPU)
    _, gpus, bandwidth = TOPOLOGIES[1]
    even = 2 * (gpus - 1) / gpus * 4 * params / bandwidth * rate / train_flops  # batch/GPU: all-reduce = compute
    return "\n".join([
        "## Scaling across ranks, and on paper", "",
        f"`{command}` ({date.today().isoformat()}, CPU-2): recipe `{recipe}` with `{' '.join(settings)}`, one "
        "`torchrun --standalone --nproc_per_node N train.py ... --cpu` job per row and repeat (gloo, "
        "`OMP_NUM_THREADS=1`, per-rank batch fixed, so the global batch grows with N). Two cores, shared with "
        "other jobs: noisy, and 4 ranks share 2 cores, so read the ratios only.", "",
        *measured_table(results), "",
        f"On paper, for ResNet34-CIFAR (`resnet34_cifar`, 10 classes: {params / 1e6:.2f}M parameters counted "
        "from the model; the 21.8M often quoted is torchvision's 1000-class head; "
        f"{train_flops / 1e9:.2f} GFLOP per image per training step, forward and backward, counted by "
        f"benchmarks.flops). DDP all-reduces fp32 gradients ({4 * params / 1e6:.1f} MB, also under bf16 autocast); "
        "a ring all-reduce sends 2(N-1)/N of them from every GPU, at the bandwidth of the slowest link in the "
        f"ring: NVLink 4 inside an H100/H200 node (900 GB/s per GPU both directions: {NVLINK_BYTES_PER_S / 1e9:.0f} "
        "GB/s each way), InfiniBand NDR between nodes (400 Gb/s per port and direction: "
        f"{NDR_BYTES_PER_S / 1e9:.0f} GB/s, one port per GPU). **Assumption, not a measurement:** a step runs at "
        f"{ASSUMED_MFU:.0%} of the {GPU}'s dense bf16 peak ({peak_flops(GPU) / 1e12:.0f} TFLOP/s). Latency terms, "
        "NCCL's algorithm choice (trees, NVLS) and protocol overheads are left out; the percentages are "
        "all-reduce time over compute time.", "",
        *paper_table(params, train_flops), "",
        "Inside one node the all-reduce is a small fraction of a step, and DDP hides most of it under the "
        "backward pass (it reduces each 25 MB bucket as soon as its gradients are ready). Between nodes each "
        f"GPU's NIC is {NVLINK_BYTES_PER_S / NDR_BYTES_PER_S:.0f}x slower than NVLink and the all-reduce hardly "
        f"depends on the number of nodes: below about {even:,.0f} images per GPU it takes longer than the "
        "step's compute and communication dominates. What the loop does: it keeps DDP's defaults (25 MB "
        "buckets, all-reduce overlapped with backward); each recipe sets the per-GPU batch (`data.batch_size`; "
        "the global batch is N times larger); it has no gradient accumulation, so no `no_sync` micro-steps "
        "either. For ResNet34-CIFAR on several nodes the levers are, in order: a larger per-GPU batch "
        "(c10_fast's 512, with the learning rate scaled), gradient accumulation under `no_sync` (one "
        "all-reduce per k micro-batches), and larger DDP buckets (`bucket_cap_mb`) so fewer, longer transfers "
        "reach the NIC's bandwidth.", ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/mnist"), help="a converted dataset folder")
    parser.add_argument("--recipe", default="mnist_cnn")
    parser.add_argument("--set", dest="settings", action="append", default=None, metavar="KEY=VALUE",
                        help=f"recipe overrides (default: {' '.join(DEFAULT_SETTINGS)})")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=2, help="runs per rank count, interleaved")
    parser.add_argument("--work", type=Path, help="folder for the runs (default: a temporary folder)")
    parser.add_argument("--results", type=Path, help="also write the section into this markdown file")
    args = parser.parse_args(argv)
    load_manifest(args.data)
    settings = args.settings or list(DEFAULT_SETTINGS)
    work = args.work or Path(tempfile.mkdtemp(prefix="scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[int, list[float]] = {n: [] for n in args.ranks}
    for repeat in range(args.repeats):
        for n in args.ranks:
            results[n].append(measure(args.data, args.recipe, settings, n, work / f"ranks-{n}-{repeat}"))
            print(f"{n} rank(s): {results[n][-1]:,.0f} images/s", flush=True)
    command = "python -m benchmarks.scaling " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = section(command, args.recipe, settings, results)
    print(text)
    if args.results:
        write_section(args.results, text)
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
