"""The photo recipes end to end on the real hymenoptera photos: the command line a user types, the imagenet
smoke twins (progressive resizing, BlurPool, triangular schedule, flip TTA), and hymenoptera_finetune
learning from scratch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from beton_trainer.trainer.config import load_recipe
from tests.train_helpers import metrics, run_train

ROOT = Path(__file__).resolve().parents[1]


def expected_test_samples(recipe: str) -> int:
    """The 153 val photos, or the first batches of them when the smoke recipe caps evaluation."""
    r = load_recipe(recipe)
    return min(153, r.max_eval_batches * r.data.eval_batch_size) if r.max_eval_batches else 153


def test_hymenoptera_finetune_smoke_from_the_command_line(hymenoptera_data, tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "train.py", "--recipe", "hymenoptera_finetune_smoke",
                          "--data", str(hymenoptera_data), "--run-dir", str(run_dir), "--cpu"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["test_samples"] == expected_test_samples("hymenoptera_finetune_smoke")
    info = json.loads((run_dir / "model.json").read_text())
    assert (info["name"], info["image_shape"], info["classes"]) == ("resnet18", [64, 64, 3], ["ants", "bees"])


@pytest.mark.parametrize("recipe", ["imagenet_rn18_16_smoke", "imagenet_rn50_88_smoke"])
def test_imagenet_smoke_twins_run(recipe, hymenoptera_data, tmp_path):
    summary = run_train(["--recipe", recipe, "--data", str(hymenoptera_data), "--run-dir", str(tmp_path / "run"),
                         "--cpu"])
    rows = metrics(tmp_path / "run")
    assert len(rows) == summary["epochs"] == 3 and summary["test_samples"] == expected_test_samples(recipe)
    lrs = [float(r["lr_base"]) for r in rows]  # each epoch's last step: up to the peak at epoch 1, then down
    assert lrs[0] < lrs[1] and lrs[1] > lrs[2] > 0


def test_hymenoptera_finetune_learns_from_scratch(hymenoptera_data, tmp_path):
    """The tutorial's recipe without ImageNet weights, shortened to 6 epochs of 64 px crops. Its small LR and
    batches of 4 let the training loss wander above its start for a few epochs before it falls, so the
    check is on the last epoch against the first. The dali backend draws its crops from the recipe's seed
    (FFCV's generator cannot be seeded), so every run sees the same crops."""
    run_train(["--recipe", "hymenoptera_finetune", "--data", str(hymenoptera_data), "--loader", "dali",
               "--run-dir", str(tmp_path / "run"), "--cpu", "--set", "phases.0.epochs=6",
               "--set", "data.resolution=64", "--set", "data.eval_resolution=64"])
    losses = [float(r["train_loss"]) for r in metrics(tmp_path / "run")]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.05, losses
