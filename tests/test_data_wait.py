"""Every run says whether the device waited for data (metrics.csv, summary, warning), and --profile N
leaves a trace and a table."""

from __future__ import annotations

import json
import time

import pytest

from pipelines import BACKENDS
from pipelines.tensor_loader import TensorLoader
from tests.loader_helpers import require
from tests.train_helpers import metrics, run_train
from trainer.timing import STARVED, starvation_warning

COLUMNS = ("data_wait_s", "step_s", "data_wait_fraction", "loader_images_per_s")


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
    assert "(loader 'tensor'); likely fixes: more loader workers" in out


def test_the_warning_fires_only_above_five_percent():
    assert starvation_warning(STARVED, 3, "ffcv") is None
    line = starvation_warning(0.2, 3, "ffcv")
    assert line.startswith("warning: the device waited for data 20% of epoch 3 (loader 'ffcv')")
    assert "\n" not in line


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
