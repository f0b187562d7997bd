"""No host-device sync in steady state, proven on the CPU.

Every recipe's smoke twin runs at least 20 steady-state steps under `--check-syncs` (the dispatch and
function modes of `trainer.syncs` that see what would make a CUDA host wait: `.item()`, `.tolist()`,
`.cpu()`, tensors built from host data, boolean masks, copies from pageable memory), and every loader
backend produces batches under the same check. A step with one `.item()` added must fail it, and fail pytest like
any failing test (no loader thread left running into the interpreter's exit).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from beton_trainer.convert import convert_dataset
from beton_trainer.pipelines import BACKENDS, build_loader
from beton_trainer.pipelines.base import ResolutionSchedule
from beton_trainer.pipelines.photo_loader import PhotoLoader
from beton_trainer.trainer.config import RECIPES_DIR, OptimizerConfig, load_recipe
from beton_trainer.trainer.optim import build_optimizer, param_groups
from beton_trainer.trainer.step import TrainStep
from beton_trainer.trainer.syncs import HostSyncError, no_host_sync
from tests.data_fixtures import write_cifar10
from tests.loader_helpers import installed, options, require, require_crop_library
from tests.train_helpers import run_train

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]
STEPS = 24  # per epoch: 2 warm-up steps and the epoch's last (a logging step) are not checked
PHOTO_RECIPES = ("imagenet", "hymenoptera")  # photos of varied sizes: checked through their loaders below
SMOKE = sorted(p.stem for p in RECIPES_DIR.glob("*_smoke.toml") if not p.stem.startswith(PHOTO_RECIPES))


@pytest.fixture(scope="module")
def cifar_like_with_val(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic CIFAR-10 layout with a val split (recipes that early-stop on val_loss need one)."""
    source = write_cifar10(tmp_path_factory.mktemp("sync-src"), batch_size=128, n_test=200, seed=3)
    return convert_dataset("cifar10", source["folder"], tmp_path_factory.mktemp("sync-data"), val_fraction=0.2)


@pytest.fixture(scope="module")
def teacher(cifar_like_with_val: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sync-teacher") / "run"
    run_train(["--recipe", "c10_rescnn_smoke", "--data", str(cifar_like_with_val), "--run-dir", str(folder), "--cpu"])
    return folder


def smoke_argv(recipe: str, data: Path, run_dir: Path, *extra: str) -> list[str]:
    """The smoke twin, one epoch per phase of STEPS steps of 8 images (the step is the same at any size)."""
    one_epoch = [f"--set=phases.{i}.epochs=1" for i in range(len(load_recipe(recipe).phases))]
    return ["--recipe", recipe, "--data", str(data), "--run-dir", str(run_dir), "--cpu", "--check-syncs",
            "--set", f"max_steps_per_epoch={STEPS}", "--set", "data.batch_size=8", *one_epoch, *extra]


@pytest.mark.parametrize("recipe", SMOKE)
def test_smoke_recipe_steps_never_sync(recipe, request, tmp_path):
    mnist = recipe.startswith("mnist")
    data = request.getfixturevalue("mnist_data" if mnist else "cifar_like_with_val")
    extra = []
    if load_recipe(recipe).loss.distill.teacher:
        extra = ["--set", f"loss.distill.teacher={json.dumps(str(request.getfixturevalue('teacher')))}"]
    summary = run_train(smoke_argv(recipe, data, tmp_path / "run", *extra))
    assert summary["sync_checked_steps"] >= 20


def plant_item(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real step plus one `.item()`: a host sync in every steady-state step."""
    real_step = TrainStep.__call__

    def step_with_item(self, images, targets, sums, *, log):
        real_step(self, images, targets, sums, log=log)
        sums.values["loss_sum"].item()

    monkeypatch.setattr(TrainStep, "__call__", step_with_item)


def test_a_step_that_calls_item_fails_the_check(mnist_data, tmp_path, monkeypatch):
    """The check is not vacuous: the real step plus one `.item()` stops the run at the first checked step."""
    plant_item(monkeypatch)
    with pytest.raises(HostSyncError, match=r"Tensor\.item\(\) at tests/test_syncs\.py"):
        run_train(smoke_argv("mnist_cnn_smoke", mnist_data, tmp_path / "run"))


def test_the_check_sees_each_kind_of_sync():
    x = torch.randn(8)
    cases = {"Tensor.item": lambda: x[0].item(), "Tensor.tolist": x.tolist, "Tensor.cpu": x.cpu,
             "built from host data": lambda: torch.tensor([1.0, 2.0]), "boolean-mask": lambda: x[x > 0],
             "nonzero": x.nonzero}
    for what, op in cases.items():
        with pytest.raises(HostSyncError, match=what), no_host_sync(CPU):
            op()
    with no_host_sync(CPU):  # device-side work, fills and dtype changes are fine
        (x * 2).sum(), x.new_full((), 3.0), x.to(torch.float64), torch.arange(3.0)


def test_a_cpu_run_is_checked_on_the_cpu_where_cuda_is_initialised(monkeypatch):
    """FFCV initialises CUDA even in a --cpu run on a GPU machine: the check follows the run's device, so it
    still sees a CPU `.item()` (CUDA's sync debug mode would watch the unused GPU and let it pass)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    modes = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    with pytest.raises(HostSyncError, match=r"Tensor\.item"), no_host_sync(CPU):
        torch.ones(2).sum().item()
    assert modes == []


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop"])
def test_every_optimizer_a_recipe_can_name_steps_without_a_sync(name):
    """After the first step (which builds the state), a step of each optimizer passes the check; torch's own
    host-side bookkeeping (foreach RMSprop's CPU step counts) is not a device sync."""
    model = torch.nn.Linear(4, 2)
    optimizer = build_optimizer(param_groups(model, load_recipe("mnist_mlp_smoke").phases[0]),
                                OptimizerConfig(name=name), "cpu")
    for step in range(3):
        model(torch.randn(3, 4)).square().sum().backward()
        with no_host_sync(CPU) if step else contextlib.nullcontext():
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)


FULL_CHAIN = {"crop": {"padding": 4}, "flip": {"p": 0.5}, "affine": {"degrees": 10.0},
              "jitter": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.1},
              "erase": {"p": 0.5}, "mix": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_loader_batches_never_sync(backend, train, tiny_rgb_data):
    """After the epoch's first batch (which sets the epoch up), five batches of the full augmentation chain
    come out without a sync."""
    if BACKENDS[backend][2]:
        require(BACKENDS[backend][2])
    loader = build_loader(backend, options(tiny_rgb_data, "train" if train else "test", CPU, train=train,
                                           spec=FULL_CHAIN, batch_size=32, num_workers=1))
    loader.set_epoch(1)
    batches = iter(loader)
    next(batches)
    for _ in range(5):
        with no_host_sync(CPU):
            images, targets = next(batches)
    assert images.shape[0] == 32 and targets.shape[0] == 32


def test_a_failed_check_leaves_no_loader_thread_running(mnist_data, tmp_path, monkeypatch):
    """A sync planted in the step, on the ffcv loader: when the error reaches the caller, FFCV's epoch thread has
    stopped. It used to run on, held by the traceback pytest keeps of a failed test; a daemon thread still inside
    torch when the interpreter exits aborts it (`terminate called without an active exception`, SIGABRT), and a
    piped report is lost. The epoch's batches are closed on the way out, and closing an epoch waits for its thread."""
    require("ffcv")
    from ffcv.loader.epoch_iterator import EpochIterator

    plant_item(monkeypatch)
    with pytest.raises(HostSyncError, match=r"Tensor\.item\(\) at tests/test_syncs\.py"):
        run_train(smoke_argv("mnist_cnn_smoke", mnist_data, tmp_path / "run", "--set", "data.loader=ffcv"))
    assert not [t for t in threading.enumerate() if isinstance(t, EpochIterator) and t.is_alive()]


PLANTED = '''
from tests.test_syncs import plant_item, smoke_argv
from tests.train_helpers import run_train


def test_planted(monkeypatch, tmp_path):
    plant_item(monkeypatch)
    run_train(smoke_argv("mnist_cnn_smoke", {data!r}, tmp_path / "run", "--set", "data.loader={loader}",
                         "--set", "data.num_workers=2"))
'''


@pytest.mark.parametrize("loader", [b for b in BACKENDS if b != "photo" and (not BACKENDS[b][2]
                                                                            or installed(BACKENDS[b][2]))])
def test_a_planted_sync_fails_pytest_like_a_test(mnist_data, tmp_path, loader):
    """pytest on a test with a host sync planted in the step, each loader that reads MNIST (the photo backend reads
    photo sets: test_photo_batches_never_sync), its output piped: exit status 1 and the failure report with
    HostSyncError, not SIGABRT."""
    (tmp_path / "test_planted.py").write_text(PLANTED.format(data=str(mnist_data), loader=loader))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
                          str(tmp_path / "test_planted.py")], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 1, (run.returncode, run.stdout[-2000:], run.stderr[-2000:])
    assert "HostSyncError: host-device sync in a steady-state step: Tensor.item()" in run.stdout
    assert run.stdout.rstrip().splitlines()[-1].startswith("1 failed")
    assert "terminate called" not in run.stderr


@pytest.mark.parametrize("decoder", ["library", "pillow", "device"])
def test_photo_batches_never_sync(decoder, hymenoptera_data):
    """The photo backend on real photos of varied sizes, with each of its decoders (the device path run on the CPU):
    after the first batch, five batches of the full chain come out without a sync in the loop's thread."""
    if decoder == "library":
        require_crop_library()
    opts = replace(options(hymenoptera_data, "train", CPU, train=True, spec=FULL_CHAIN, batch_size=16, num_workers=2),
                   resolution=ResolutionSchedule(train=64))
    batches = iter(PhotoLoader(opts, decoder))
    next(batches)
    for _ in range(5):
        with no_host_sync(CPU):
            images, targets = next(batches)
    assert images.shape == (16, 3, 64, 64) and targets.shape == (16, 2)
