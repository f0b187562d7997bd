"""Reproducibility on the CPU: the same recipe and seed give the same metrics and weights; the run folder
records what it takes to repeat a run; --deterministic turns on torch's deterministic algorithms; a
dataset is named by its records, whichever way FFCV's writers laid out the files."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import subprocess
from pathlib import Path

import pytest
import torch

from beton_trainer.convert import convert_dataset
from beton_trainer.format.dataset import dataset_identity
from beton_trainer.trainer.config import load_recipe
from beton_trainer.trainer.loop import cpu_threads
from beton_trainer.trainer.runlog import run_environment
from tests.data_fixtures import write_cifar10
from tests.fault_helpers import WALL_COLUMNS, outputs
from tests.train_helpers import metrics, run_train

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
    assert env["data"]["identity"] == dataset_identity(tiny_rgb_data)  # what the records are
    for split in ("train", "test"):  # and the checksums of the files the run read
        beton = hashlib.sha256((tiny_rgb_data / f"{split}.beton").read_bytes()).hexdigest()
        assert env["data"]["file_sha256"][split] == beton


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


def test_a_run_sets_torchs_cpu_threads_whatever_the_process_did_before(tiny_rgb_data, tmp_path):
    """Importing FFCV (every .beton reader does) drops torch to one CPU thread, and each FFCV epoch sets
    its worker count; a run sets its own (OMP_NUM_THREADS, else every CPU it may use), so an in-process
    run (tests, the notebook API) computes what a fresh process does, to the last bit."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(cpu_threads() + 1)
        run_train(train_argv(tiny_rgb_data, tmp_path / "run", "--set", "max_steps_per_epoch=2"))
        env = json.loads((tmp_path / "run" / "environment.json").read_text())
        assert env["torch_threads"] == cpu_threads() == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_conversions_of_one_source_are_the_same_bytes_and_identity_whatever_the_workers(tmp_path):
    """One worker or two: the writer lays records out in sample order, so the files are byte-identical and the
    identity and checksums a run records agree (a copy in FFCV's own layout: tests/test_same_data.py)."""
    source = write_cifar10(tmp_path / "source", batch_size=400, n_test=100, seed=4)["folder"]  # 2,000 train
    one = convert_dataset("cifar10", source, tmp_path / "one", workers=1, log=lambda _: None)
    two = convert_dataset("cifar10", source, tmp_path / "two", workers=2, log=lambda _: None)
    assert (one / "train.beton").read_bytes() == (two / "train.beton").read_bytes()
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (one, two)]
    assert manifests[0]["identity"] == manifests[1]["identity"] == dataset_identity(one) == dataset_identity(two)
    envs = [run_environment(0, m, 1, "cpu")["data"] for m in manifests]
    assert envs[0]["identity"] == envs[1]["identity"] and envs[0]["file_sha256"] == envs[1]["file_sha256"]
