"""Every run says whether the device waited for data (metrics.csv, summary, a warning whose advice fits the
run), on CUDA apart from the input pipeline's device time, and --profile N leaves a trace and a table."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from beton_trainer.common.schema import from_dict
from beton_trainer.pipelines import BACKENDS
from beton_trainer.pipelines.augment import AugmentSpec
from beton_trainer.pipelines.base import LoaderOptions
from beton_trainer.pipelines.tensor_loader import TensorLoader
from beton_trainer.trainer.timing import STARVED, Feed, StepTimer, starvation_warning
from tests.loader_helpers import require
from tests.train_helpers import metrics, run_train

COLUMNS = ("data_wait_s", "step_s", "data_wait_fraction", "input_device_s", "loader_images_per_s")


def argv(data, run_dir, *extra: str) -> list[str]:
    return ["--recipe", "c10_cnn_smoke", "--data", str(data), "--run-dir", str(run_dir), "--cpu",
            "--set", "max_steps_per_epoch=15", "--set", "data.batch_size=16", *extra]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_wait_and_step_times_add_up_to_the_epoch(backend, tiny_rgb_data, tmp_path):
    """Waiting for batches plus stepping is the epoch, up to the loop's own bookkeeping (progress bar,
    logging steps): within 25% (a loaded shared machine stretches that bookkeeping) and never more than the epoch."""
    if BACKENDS[backend][2]:
        require(BACKENDS[backend][2])
    run_train(argv(tiny_rgb_data, tmp_path / "run", "--loader", backend))
    for row in metrics(tmp_path / "run"):
        wait, step, epoch = (float(row[k]) for k in ("data_wait_s", "step_s", "epoch_time_s"))
        assert 0.75 * epoch <= wait + step <= epoch
        assert float(row["data_wait_fraction"]) == pytest.approx(wait / epoch)
        assert float(row["loader_images_per_s"]) == pytest.approx(15 * 16 / wait, rel=0.01)
        assert row["input_device_s"] == ""  # on the CPU the input pipeline's time is the wait itself


def test_a_starved_step_is_reported_and_warned_about(tiny_rgb_data, tmp_path, monkeypatch, capsys):
    """A loader that sleeps 50 ms before each batch: the device waits most of the epoch, and the run says so."""
    real_iter = TensorLoader.__iter__

    def slow_iter(self):
        for batch in real_iter(self):
            time.sleep(0.05)
            yield batch

    monkeypatch.setattr(TensorLoader, "__iter__", slow_iter)
    summary = run_train(argv(tiny_rgb_data, tmp_path / "run"))
    rows = metrics(tmp_path / "run")
    assert all(float(r["data_wait_s"]) >= 15 * 0.05 for r in rows)
    assert summary["worst_data_wait_fraction"] > STARVED
    assert summary["worst_data_wait_fraction"] == max(float(r["data_wait_fraction"]) for r in rows)
    out = capsys.readouterr().out
    assert "warning: the device waited for data" in out
    line = next(line for line in out.splitlines() if line.startswith("warning: the device waited"))
    assert "(loader 'tensor'); likely fixes: a shorter augmentation chain (now flip, affine)" in line
    assert "data.batch_size, now 16" in line
    assert "--loader tensor" not in line and "num_workers" not in line  # nothing a tensor run already has or lacks


def feed(loader: str, device: str = "cpu", *, workers: int = 1, fixed_size: bool = True,
         augmentations: tuple[str, ...] = ("crop", "flip")) -> Feed:
    return Feed(loader, device, workers, 128, fixed_size, augmentations)


def test_the_warning_fires_only_above_five_percent():
    assert starvation_warning(STARVED, 3, feed("ffcv")) is None
    line = starvation_warning(0.2, 3, feed("ffcv"))
    assert line.startswith("warning: the device waited for data 20% of epoch 3 (loader 'ffcv')")
    assert "\n" not in line


@pytest.mark.parametrize("case, expected, absent", [
    (feed("tensor"), ["shorter augmentation chain (now crop, flip)", "data.batch_size"], ["--loader", "num_workers"]),
    (feed("tensor", "cuda"), ["data.batch_size"], ["--loader", "num_workers", "augmentation chain"]),
    (feed("tensor", augmentations=()), ["data.batch_size"], ["augmentation chain"]),
    (feed("ffcv"), ["data.num_workers, now 1 of", "--loader tensor", "augmentation chain"], ["--loader dali"]),
    (feed("ffcv", "cuda"), ["data.num_workers", "--loader tensor", "--loader dali"], ["augmentation chain"]),
    (feed("ffcv", "cuda", fixed_size=False), ["data.num_workers", "--loader dali"], ["--loader tensor"]),
    (feed("dali", "cuda", fixed_size=False), ["data.num_workers", "augmentation chain"], ["--loader"]),
    (feed("ffcv", workers=10_000), ["--loader tensor"], ["num_workers"]),  # every CPU already works for it
], ids=["tensor-cpu", "tensor-cuda", "tensor-no-chain", "ffcv-cpu", "ffcv-cuda", "ffcv-photos", "dali-photos",
        "ffcv-all-cpus"])
def test_the_advice_fits_the_run(case, expected, absent):
    """No run is told to switch to the backend it uses, to add workers it has none of (or more than its CPUs),
    to move to a backend that cannot hold its data, or to shorten a chain that runs on the GPU behind the step."""
    line = starvation_warning(0.3, 1, case)
    for words in expected:
        assert words in line
    for words in absent:
        assert words not in line


class FakeCudaEvent:
    """A CUDA event on a simulated stream: each `record()` lands after the device work queued so far."""

    device_clock = 0.0  # seconds of device work queued (all of it runs behind the host, never idle)

    def __init__(self, enable_timing: bool) -> None:
        self.at = 0.0

    def record(self) -> None:
        self.at = FakeCudaEvent.device_clock

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: FakeCudaEvent) -> float:
        return (end.at - self.at) * 1000


def test_on_cuda_device_side_augmentation_is_not_data_wait(monkeypatch):
    """The GPU runs a heavy augmentation chain (30 ms a batch, queued inside next() in no host time) behind a
    10 ms step: the host never waits, so no warning, and the chain's device time is reported apart."""
    monkeypatch.setattr("torch.cuda.Event", FakeCudaEvent)
    timer = StepTimer(torch.device("cuda"))
    start = time.perf_counter()
    for _ in range(5):
        timer.mark()
        FakeCudaEvent.device_clock += 0.030  # the loader enqueues its device ops and returns at once
        timer.mark()
        FakeCudaEvent.device_clock += 0.010  # the step
        timer.mark()
    times = timer.read()
    assert times.input_device_s == pytest.approx(0.150) and times.step_s == pytest.approx(0.050)
    assert times.data_wait_s <= time.perf_counter() - start < 0.05
    assert starvation_warning(times.data_wait_s / 0.2, 1, feed("tensor", "cuda")) is None


def test_on_cuda_a_loader_the_host_waits_for_is_data_wait(monkeypatch):
    """A loader that keeps the host waiting 20 ms for every batch (FFCV's workers behind) is data wait on CUDA too."""
    monkeypatch.setattr("torch.cuda.Event", FakeCudaEvent)
    timer = StepTimer(torch.device("cuda"))
    for _ in range(3):
        timer.mark()
        time.sleep(0.02)
        timer.mark()
        timer.mark()
    times = timer.read()
    assert times.data_wait_s >= 0.06 and times.loader_images_per_s is None


def test_a_heavy_chain_on_the_gpu_leaves_the_host_free(cuda_device):
    """On a real GPU (skipped without one): the tensor backend's full chain on big batches keeps the GPU busy for
    longer than the host spends in next(), and the input pipeline's device time says so."""
    from tests.test_tensor_loader import AUGMENT

    images = torch.randint(0, 256, (4096, 64, 64, 3), dtype=torch.uint8).numpy()
    options = LoaderOptions(data_dir=Path("."), split="train", batch_size=1024, train=True,
                            spec=from_dict(AugmentSpec, AUGMENT), device=cuda_device)
    loader = TensorLoader.from_arrays(images, np.arange(4096) % 10, mean=(0.5,) * 3, std=(0.25,) * 3,
                                      num_classes=10, options=options)
    list(loader)  # warm-up: allocator, kernels
    timer = StepTimer(cuda_device)
    batches = iter(loader)
    for _ in range(len(loader)):
        timer.mark()
        next(batches)
        timer.mark()
        timer.mark()
    times = timer.read()
    assert times.input_device_s > times.data_wait_s, times


def test_profile_writes_a_trace_and_a_table(mnist_data, tmp_path):
    run_dir = tmp_path / "run"
    run_train(["--recipe", "mnist_cnn_smoke", "--data", str(mnist_data), "--run-dir", str(run_dir), "--cpu",
               "--set", "max_steps_per_epoch=26", "--profile", "20"])
    trace = json.loads((run_dir / "profile-rank0.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"data", "forward", "backward", "optimizer"} <= names
    table = (run_dir / "profile.txt").read_text()
    assert table.startswith("profile: 20 steps after 5 warm-up")
    for label in ("data", "forward", "backward", "optimizer"):
        assert f"  {label} " in table
    assert "host syncs: none on the CPU" in table and "operators by self time:" in table
    assert "aten::convolution_backward" in table
