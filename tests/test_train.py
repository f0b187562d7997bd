"""train.py end to end: every smoke recipe, distillation, reports, multi-process, and bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from beton_trainer.convert import convert_dataset
from beton_trainer.format.dataset import open_split
from beton_trainer.trainer.config import load_recipe
from beton_trainer.trainer.modelio import make_model
from tests.data_fixtures import write_cifar10, write_cifar100
from tests.train_helpers import metrics, run_train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rgb_val_data(tmp_path_factory) -> Path:
    """CIFAR-10-like synthetic data with a stratified val split (c10_finetune validates on it)."""
    source = write_cifar10(tmp_path_factory.mktemp("c10src"), batch_size=64, n_test=100, seed=3)
    return convert_dataset("cifar10", source["folder"], tmp_path_factory.mktemp("c10"), val_fraction=0.2,
                           log=lambda _: None)


@pytest.fixture(scope="module")
def c100_data(tmp_path_factory) -> Path:
    source = write_cifar100(tmp_path_factory.mktemp("c100src"), n_train=200, n_test=100, seed=5)
    return convert_dataset("cifar100", source["folder"], tmp_path_factory.mktemp("c100"), log=lambda _: None)


SMOKE = {
    "mnist_cnn_smoke": "mnist", "mnist_mlp_smoke": "mnist", "mnist_resmlp_smoke": "mnist",
    "c10_cnn_smoke": "rgb", "c10_rescnn_smoke": "rgb", "c10_finetune_smoke": "rgb_val",
    "c100_scratch_smoke": "c100", "c10_fast_smoke": "rgb",
}


def test_every_smoke_recipe_is_listed():
    smoke = {p.stem for p in (ROOT / "recipes").glob("*_smoke.toml")}
    photos = {"hymenoptera_finetune_smoke", "imagenet_rn18_16_smoke", "imagenet_rn50_88_smoke"}  # test_photos_train
    assert smoke == set(SMOKE) | {"c10_kd_smoke"} | photos


@pytest.mark.parametrize("recipe", sorted(SMOKE))
def test_smoke_recipe_end_to_end(recipe, request, tmp_path):
    data = {"mnist": "mnist_data", "rgb": "tiny_rgb_data", "rgb_val": "rgb_val_data", "c100": "c100_data"}
    data_dir = request.getfixturevalue(data[SMOKE[recipe]])
    run_dir = tmp_path / "run"
    summary = run_train(["--recipe", recipe, "--data", str(data_dir), "--run-dir", str(run_dir), "--cpu"])
    resolved = load_recipe(str(run_dir / "config.toml"))
    assert resolved == load_recipe(recipe, [f"data.path={json.dumps(str(data_dir))}"])
    rows = metrics(run_dir)
    assert len(rows) == resolved.total_epochs == summary["epochs"]
    assert [r["phase"] for r in rows] == [p.name for p in resolved.phases for _ in range(p.epochs)]
    manifest = json.loads((data_dir / "manifest.json").read_text())
    count = manifest["splits"]["test"]["count"]
    capped = resolved.max_eval_batches * resolved.data.eval_batch_size
    assert summary["test_samples"] == (min(count, capped) if capped else count)
    assert math.isfinite(summary["test_loss"])
    assert summary["images_per_s"] > 0 and summary["parameters"] > 0
    for name in ("model.safetensors", "model.json", "environment.json", "classification_report.txt",
                 "confusion_matrix.png", "confusion_matrix.csv", "learning_curves.png", "lr_schedule.png"):
        assert (run_dir / name).is_file(), name
    if resolved.data.val_split:
        assert all(r["val_loss"] for r in rows)
    lrs = [float(r[k]) for r in rows for k in r if k.startswith("lr_") and r[k]]
    assert lrs and all(lr >= 0 for lr in lrs)


def test_finetune_phases_freeze_and_group_lrs(rgb_val_data, tmp_path):
    """Seed 000's phases: head-only first (one group at 0.01), then backbone 1e-3 and head 1e-2 (cosine)."""
    run_dir = tmp_path / "run"
    run_train(["--recipe", "c10_finetune_smoke", "--data", str(rgb_val_data), "--run-dir", str(run_dir), "--cpu"])
    rows = metrics(run_dir)
    assert rows[0]["phase"] == "warmup_head" and float(rows[0]["lr_base"]) == 0.01 and not rows[0]["lr_fc"]
    fine = rows[1]
    assert fine["phase"] == "finetune"
    assert float(fine["lr_fc"]) / float(fine["lr_base"]) == pytest.approx(10.0, rel=1e-2)  # both decay to 1e-6
    # the exported weights load into a plain torchvision resnet34 given the same surgery
    plain = torchvision.models.resnet34(num_classes=10)
    plain.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    plain.maxpool = nn.Identity()
    plain.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(512, 10))
    plain.load_state_dict(load_file(run_dir / "model.safetensors"), strict=True)


def test_compile_and_ema_export_plain_weights(mnist_data, tmp_path):
    """torch.compile and the EMA wrapper must not leak into the exported state dict."""
    run_dir = tmp_path / "run"
    summary = run_train(["--recipe", "mnist_mlp_smoke", "--data", str(mnist_data), "--run-dir", str(run_dir),
                         "--cpu", "--set", "compile=true", "--set", "ema_decay=0.9"])
    model = make_model(json.loads((run_dir / "model.json").read_text()))
    model.load_state_dict(load_file(run_dir / "model.safetensors"), strict=True)
    assert summary["test_accuracy"] > 0.3  # 5 steps of an MLP on MNIST; chance is 0.10


def test_mnist_cnn_learns_real_mnist(mnist_data, tmp_path):
    run_dir = tmp_path / "run"
    summary = run_train(["--recipe", "mnist_cnn_smoke", "--data", str(mnist_data), "--run-dir", str(run_dir),
                         "--cpu", "--set", "max_steps_per_epoch=60"])
    assert summary["test_accuracy"] > 0.7  # 60 steps of 128 images (~0.8 here); chance is 0.10


def test_distillation_trains_its_teacher_first_and_logs_both_losses(tiny_rgb_data, tmp_path):
    teacher = tmp_path / "teacher"
    student = tmp_path / "student"
    run_train(["--recipe", "c10_kd_smoke", "--data", str(tiny_rgb_data), "--run-dir", str(student), "--cpu",
               "--set", f"loss.distill.teacher={json.dumps(str(teacher))}"])
    assert load_recipe(str(teacher / "config.toml")).name == "c10_rescnn_smoke"
    assert json.loads((teacher / "model.json").read_text())["name"] == "residual_cnn"
    rows = metrics(student)
    assert all(float(r["kd_soft_loss"]) >= 0 and float(r["kd_hard_loss"]) > 0 for r in rows)
    assert (student / "distill_losses.png").is_file()
    # a second student reuses the finished teacher instead of training it again
    before = (teacher / "summary.json").read_text()
    run_train(["--recipe", "c10_kd_smoke", "--data", str(tiny_rgb_data), "--run-dir", str(tmp_path / "again"),
               "--cpu", "--set", f"loss.distill.teacher={json.dumps(str(teacher))}"])
    assert (teacher / "summary.json").read_text() == before


def test_two_processes_count_every_test_sample_once(mnist_data, tmp_path):
    """2-process gloo DDP on the CPU: the test metric covers each sample once and equals a 1-process eval."""
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
                          "train.py", "--recipe", "mnist_cnn_smoke", "--data", str(mnist_data), "--cpu",
                          "--run-dir", str(run_dir)], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["test_samples"] == 10_000
    # the exported weights, evaluated here by one process over the whole test split, give the same accuracy
    spec = json.loads((run_dir / "model.json").read_text())
    model = make_model(spec)
    model.load_state_dict(load_file(run_dir / "model.safetensors"))
    model.eval()
    split = open_split(mnist_data, "test")
    images = torch.from_numpy(split.images).permute(0, 3, 1, 2).float().div(255)
    images = (images - torch.tensor(split.mean).view(1, -1, 1, 1)) / torch.tensor(split.std).view(1, -1, 1, 1)
    with torch.no_grad():
        preds = torch.cat([model(chunk).argmax(1) for chunk in images.split(1000)])
    accuracy = (preds == torch.from_numpy(split.labels)).double().mean().item()
    assert summary["test_accuracy"] == pytest.approx(accuracy, abs=1e-4)
