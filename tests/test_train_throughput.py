"""The training-throughput benchmark and the time-to-accuracy tooling, at CPU scale: FLOP counting,
the --smoke table, the H100 target checks, the c10_fast recipe through train.py, and run-folder parsing."""

from __future__ import annotations

import csv
from itertools import accumulate
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import time_to_accuracy as tta
from benchmarks import train_throughput as tt
from benchmarks.flops import flops_per_image, peak_flops
from beton_trainer.common.errors import UserError
from beton_trainer.models import build_model
from beton_trainer.pipelines import BACKENDS
from beton_trainer.trainer.config import load_recipe
from beton_trainer.trainer.distributed import isolated_state
from tests.loader_helpers import installed
from tests.train_helpers import metrics, run_train

H100 = "cuda: NVIDIA H100 80GB HBM3 (16 CPU cores)"


@pytest.fixture(autouse=True)
def no_leftover_accelerator():
    """The benchmark builds one Accelerator per row in this process: leave no state for the next test's."""
    with isolated_state():
        yield


def test_flops_match_a_hand_count():
    """conv 3->8 (3x3, 32x32) then linear 8192->10: forward 2 x MACs; training adds the weight gradients of
    both and the input gradient of the linear only (the image needs no gradient)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(8 * 32 * 32, 10))
    conv, linear = 2 * 3 * 8 * 9 * 32 * 32, 2 * 8 * 32 * 32 * 10
    assert flops_per_image(model, (32, 32, 3), train=False) == conv + linear
    assert flops_per_image(model, (32, 32, 3), train=True) == 2 * conv + 3 * linear


def test_resnet34_cifar_flops():
    model = build_model("resnet34_cifar", num_classes=10, image_shape=(32, 32, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forward = flops_per_image(model, (32, 32, 3), train=False)
    training = flops_per_image(model, (32, 32, 3), train=True)
    assert forward == pytest.approx(2.32e9, rel=0.02)  # the published 1.16 GMACs of ResNet34 at 32x32
    assert training / forward == pytest.approx(3.0, rel=0.02)
    assert all(p.grad is None for p in model.parameters())  # counted on a copy
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_smoke_table(tiny_rgb_data, tmp_path):
    out = tmp_path / "bench" / "tt.csv"
    assert tt.main(["--smoke", "--device", "cpu", "--data", str(tiny_rgb_data), "--out", str(out),
                    "--ablations"]) == 0
    with open(out, newline="") as f:
        rows = {row["name"]: row for row in csv.DictReader(f)}
    backends = {backend for backend, (*_, package) in BACKENDS.items() if not package or installed(package)}
    assert {"tensor", "photo"} <= backends
    # --smoke is eager, so the compile ablation does not apply; the other two do
    assert set(rows) == {"ceiling", "torchvision", *backends, "ceiling, channels-last off", "ceiling, fp32"}
    rates = {name: float(row["images_per_s"]) for name, row in rows.items()}
    assert all(rate > 0 for rate in rates.values())
    for name, row in rows.items():
        # the CSV rounds both the rates and the ratios
        assert float(row["ratio_vs_ceiling"]) == pytest.approx(rates[name] / rates["ceiling"], rel=2e-3, abs=2e-3)
        assert float(row["ratio_vs_torchvision"]) == pytest.approx(rates[name] / rates["torchvision"],
                                                                   rel=2e-3, abs=2e-3)
        assert row["mfu"] == "n/a" and row["model"] == "simple_cnn" and row["batch_size"] == "32"
    waits = {name: float(row["data_wait_fraction"]) for name, row in rows.items()}
    assert all(0 <= w < 1 for w in waits.values())
    assert waits["ceiling"] < 0.05 < waits["torchvision"]  # batches already on the device vs. a PIL DataLoader
    assert rows["ceiling, fp32"]["config"] == "fp32, eager, channels-last"
    assert rows["ceiling, channels-last off"]["config"] == "bf16, eager, contiguous"
    table = out.with_suffix(".md").read_text()
    assert "not applicable on cpu" in table and "--smoke" in table and "crop, flip, erase" in table


def test_each_row_is_written_when_measured_and_a_failed_row_records_its_error(tiny_rgb_data, tmp_path,
                                                                             monkeypatch):
    """A row that fails (here the tensor backend's, as a compile error or an out-of-memory would) is a row with
    its error; the rows before and after it are measured and on disk, and the exit status says one failed.
    The loader rows are timed over ten times what their loader holds ready (the baseline's workers x
    prefetch_factor), not over --steps alone, and say so."""
    out = tmp_path / "tt.csv"
    real, rows_seen, written = tt.images_per_second, [], []

    def measure(step, sums, batches, device, warmup, steps):
        rows_seen.append(steps)
        if len(rows_seen) == 2:  # the tensor backend's row: the ceiling's is on disk already
            written.append(out.read_text())
            raise RuntimeError("planted: out of memory")
        return real(step, sums, batches, device, warmup, steps)

    monkeypatch.setattr(tt, "images_per_second", measure)
    code = tt.main(["--smoke", "--device", "cpu", "--data", str(tiny_rgb_data), "--out", str(out), "--workers", "2",
                    "--backends", "tensor", "torchvision"])
    assert code == 1
    assert written and "ceiling" in written[0] and "tensor" not in written[0]
    with open(out, newline="") as f:
        rows = {row["name"]: row for row in csv.DictReader(f)}
    assert list(rows) == ["ceiling", "tensor", "torchvision"]
    assert rows["tensor"]["error"] == "RuntimeError: planted: out of memory" and rows["tensor"]["images_per_s"] == ""
    assert float(rows["torchvision"]["images_per_s"]) > 0 and rows["ceiling"]["error"] == ""
    assert rows["torchvision"]["prefetched_batches"] == "2"  # --smoke's 1 worker x prefetch_factor 2
    assert int(rows["torchvision"]["timed_steps"]) == 20 == rows_seen[2]  # 10x what was ready, not --steps (3)
    assert rows["ceiling"]["timed_steps"] == "3"
    assert "RuntimeError: planted" in out.with_suffix(".md").read_text()


def test_a_rows_model_is_freed_before_the_next_rows_peak_is_counted():
    """Accelerate's prepared model holds a reference cycle (its forward, patched for mixed precision): without a
    collection the previous row's model would still be allocated when the next row's peak memory starts
    counting."""
    import gc
    import weakref

    gc.disable()
    try:
        step, _ = tt.shared_step(nn.Linear(4, 2), load_recipe("c10_finetune"), tt.StepConfig("bf16", False, False),
                                 torch.device("cpu"), "default")
        model = weakref.ref(step.model)
        del step, _
        assert model() is not None  # kept alive by the cycle
        tt.fresh_row_memory(torch.device("cpu"))
        assert model() is None
    finally:
        gc.enable()


def test_targets_and_mfu_on_an_h100():
    config = tt.StepConfig("bf16", True, True)
    results = {name: tt.Result(name, config, rate, 0.0, 1000.0) for name, rate in
               (("ceiling", 60_000), ("torchvision", 10_000), ("tensor", 58_000), ("ffcv", 40_000))}
    lines = tt.target_lines(results, H100)
    assert lines[0] == "ceiling >= 50,000 images/s: met (60,000)"
    assert "tensor >= 0.95 x ceiling: met (0.967x)" in lines
    assert "ffcv >= 0.95 x ceiling: NOT met (0.667x)" in lines
    assert "ffcv >= 3 x torchvision: met (4.00x)" in lines
    assert tt.target_lines(results, "cpu: Xeon") == ["targets (H100/H200): not applicable on cpu: Xeon"]
    assert peak_flops(H100) == 989e12 and peak_flops("cuda: NVIDIA H100 PCIe") == 756e12
    assert peak_flops("cuda: NVIDIA H200") == 989e12 and peak_flops("cuda: Tesla T4") is None
    rows = tt.table_rows(results, train_flops=6e9, peak=peak_flops(H100))
    assert rows[0]["mfu"] == f"{60_000 * 6e9 / 989e12:.3f}"


@pytest.fixture(scope="module")
def fast_smoke_run(tiny_rgb_data, tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("c10_fast_smoke") / "run"
    summary = run_train(["--recipe", "c10_fast_smoke", "--data", str(tiny_rgb_data),
                         "--run-dir", str(run_dir), "--cpu"])
    return run_dir, summary


def test_c10_fast_smoke_trains_end_to_end(fast_smoke_run):
    run_dir, summary = fast_smoke_run
    resolved = load_recipe(str(run_dir / "config.toml"))
    fast = load_recipe("c10_fast")
    assert (resolved.data.loader, resolved.tta_flip, resolved.loss.label_smoothing) == ("tensor", True, 0.2)
    assert (fast.precision, fast.compile, fast.channels_last) == ("bf16", True, True)
    assert summary["epochs"] == 2 and 0 <= summary["test_accuracy"] <= 1
    assert (run_dir / "model.safetensors").is_file()


def test_time_to_accuracy_reads_the_run(fast_smoke_run, tmp_path):
    run_dir, summary = fast_smoke_run
    rows = metrics(run_dir)
    accuracies = [float(r["test_accuracy"]) for r in rows]
    elapsed = list(accumulate(float(r["epoch_time_s"]) for r in rows))
    best = max(accuracies)
    times = tta.read_run(run_dir, [0.0, best, 1.01])
    assert times.reached == {0.0: elapsed[0], best: elapsed[accuracies.index(best)], 1.01: None}
    assert (times.test_accuracy, times.wall_s) == (summary["test_accuracy"], summary["wall_s"])
    assert (times.train_s, times.first_epoch_s, times.epochs) == (elapsed[-1], elapsed[0], 2)

    out = tmp_path / "tta.md"
    env = {"date": "today", "device": "cpu: test", "versions": "torch x"}
    for _ in range(2):
        tta.append_row(out, tta.markdown_row(times, env, "python -m benchmarks.time_to_accuracy --recipe x"))
    lines = out.read_text().splitlines()
    assert lines[0].startswith("| date |") and len(lines) == 4 and lines[2] == lines[3]
    assert "101%: not reached" in lines[2] and f"{summary['test_accuracy']:.2%}" in lines[2]


def test_time_to_accuracy_rejects_unfinished_runs_and_bad_thresholds(tmp_path):
    with pytest.raises(UserError, match="did not finish"):
        tta.read_run(tmp_path, [0.9])
    with pytest.raises(UserError, match="percentages"):
        tta.main(["--recipe", "c10_fast", "--data", str(tmp_path), "--thresholds", "0.9", "940"])
