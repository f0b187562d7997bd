"""Reproducibility on the CPU: the same recipe and seed give the same metrics and weights; the run folder
records what it takes to repeat a run; --deterministic turns on torch's deterministic algorithms."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks.fault_harness import WALL_COLUMNS, outputs
from tests.train_helpers import metrics, run_train
from trainer.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "c10_cnn_smoke"  # random affine and flip augmentation, 2 epochs


def train_argv(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--recipe", RECIPE, "--data", str(data), "--run-dir", str(run_dir), "--cpu",
            "--set", "tensorboard=false", *extra]


@pytest.fixture(scope="module")
def runs(tiny_rgb_data, tmp_path_factory) -> dict[str, Path]:
    """Two runs with seed 7 and one with seed 8."""
    root = tmp_path_factory.mktemp("repro")
    found = {}
    for name, seed in (("first", 7), ("second", 7), ("other_seed", 8)):
        found[name] = root / name
        run_train(train_argv(tiny_rgb_data, found[name], "--set", f"seed={seed}"))
    return found


def test_same_recipe_and_seed_give_identical_metrics_and_weights(runs):
    first, second, other = (outputs(runs[k]) for k in ("first", "second", "other_seed"))
    assert first == second
    assert first["metrics"] != other["metrics"] and first["model_sha256"] != other["model_sha256"]
    # only the measured wall-time columns were left out of the comparison
    columns = set(metrics(runs["first"])[0])
    assert set(WALL_COLUMNS) < columns and {"train_loss", "test_accuracy", "grad_norm", "lr_base"} <= columns


def test_run_folder_records_config_seed_versions_commit_and_data_checksums(runs, tiny_rgb_data):
    run_dir = runs["first"]
    resolved = load_recipe(str(run_dir / "config.toml"))
    assert resolved == load_recipe(RECIPE, [f"data.path={json.dumps(str(tiny_rgb_data))}", "seed=7",
                                            "tensorboard=false"])
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["seed"] == 7 and env["num_processes"] == 1 and env["device"] == "cpu"
    for package in ("torch", "torchvision", "accelerate", "numpy"):
        assert env["packages"][package] == importlib.metadata.version(package)
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    head = git.stdout.strip()
    assert env["git_commit"] == head and len(head) == 40
    for split in ("train", "test"):  # the recorded checksums are those of the files the run read
        beton = hashlib.sha256((tiny_rgb_data / f"{split}.beton").read_bytes()).hexdigest()
        assert env["data"]["splits"][split] == beton


def test_deterministic_flag_sets_torch_deterministic_algorithms(tiny_rgb_data, tmp_path):
    """--deterministic turns on torch's deterministic algorithms (warning, not failing, where an op has none)
    and turns off cuDNN's autotuning (which a plain run turns on)."""
    assert not torch.are_deterministic_algorithms_enabled()
    try:
        torch.backends.cudnn.benchmark = True
        run_train(train_argv(tiny_rgb_data, tmp_path / "run", "--deterministic"))
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = False
