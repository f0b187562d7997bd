"""What the training loop does, each checked against an independent computation or an uninterrupted run:
early stopping and the weights that decide the result, the EMA, the distillation loss, flip TTA, gradient
clipping and the logged gradient norm, resuming across a phase boundary, mixed precision, model.json's
preprocessing and atomic writes."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn

from beton_trainer.common.errors import UserError
from beton_trainer.format.dataset import open_split
from beton_trainer.pipelines.augment import AugmentSpec
from beton_trainer.pipelines.base import LoaderOptions, stratified_subset
from beton_trainer.pipelines.tensor_loader import TensorLoader
from beton_trainer.trainer import checkpoint, loop
from beton_trainer.trainer.config import OptimizerConfig, load_recipe
from beton_trainer.trainer.distributed import isolated_state
from beton_trainer.trainer.losses import loss_terms
from beton_trainer.trainer.modelio import make_model
from beton_trainer.trainer.optim import build_optimizer, param_groups
from beton_trainer.trainer.step import EpochSums, TrainStep
from tests.fault_helpers import outputs
from tests.train_helpers import metrics, run_train


def recipe_file(folder: Path, base: str, *settings: str) -> str:
    """A recipe file deriving from `base` with `settings` (e.g. phases written as inline tables)."""
    path = folder / "recipe.toml"
    path.write_text(f"extends = {json.dumps(base)}\nset = {json.dumps(list(settings))}\n")
    return str(path)


def split_arrays(data_dir: Path, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """A split's images normalised as model.json says, and its labels (read without the loaders)."""
    s = open_split(data_dir, split)
    images = torch.from_numpy(s.images).permute(0, 3, 1, 2).float().div(255)
    images = (images - torch.tensor(s.mean).view(1, -1, 1, 1)) / torch.tensor(s.std).view(1, -1, 1, 1)
    return images, torch.from_numpy(s.labels)


def loss_of(run_dir: Path, weights: dict, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean cross-entropy of `weights` (for the model in run_dir/model.json) on the given images."""
    model = make_model(json.loads((run_dir / "model.json").read_text()))
    model.load_state_dict(weights)
    with torch.no_grad():
        return F.cross_entropy(model.eval()(images), labels).item()


# -- early stopping and the weights that decide the result ---------------------------------------------------

# early stopping that fires at the second epoch of its phase: test_loss in "max" mode improves only while the
# loss rises, and a learning model's loss falls
STOPS_AT_2 = '{metric = "test_loss", mode = "max", patience = 1}'
PHASE = '{{epochs = {epochs}, name = "{name}", optimizer = {{name = "adam", lr = 0.003}}, early_stopping = {es}}}'


def two_phases(first_stops: bool) -> str:
    phases = [PHASE.format(epochs=3, name="a", es=STOPS_AT_2 if first_stops else "{}"),
              PHASE.format(epochs=3 if not first_stops else 2, name="b", es="{}" if first_stops else STOPS_AT_2)]
    return f"phases=[{', '.join(phases)}]"


@pytest.fixture(scope="module")
def mnist_test(mnist_data) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images the smoke twin evaluates (the stratified subset of max_eval_batches batches, 0 = all)."""
    images, labels = split_arrays(mnist_data)
    recipe = load_recipe("mnist_mlp_smoke")
    n = recipe.max_eval_batches * recipe.data.eval_batch_size or len(labels)
    subset = torch.from_numpy(stratified_subset(labels.numpy(), n, recipe.seed))
    return images[subset], labels[subset]


def run_two_phases(mnist_data: Path, folder: Path, first_stops: bool) -> tuple[dict, list[dict], Path]:
    run_dir = folder / "run"
    recipe = recipe_file(folder, "mnist_mlp_smoke", two_phases(first_stops), "max_steps_per_epoch=8",
                         "tensorboard=false")
    summary = run_train(["--recipe", recipe, "--data", str(mnist_data), "--run-dir", str(run_dir), "--cpu"])
    return summary, metrics(run_dir), run_dir


def test_early_stopped_first_phase_then_full_phase_exports_the_final_weights(mnist_data, mnist_test, tmp_path):
    """The phase that decides the result is the last one: its final weights are tested and exported, not
    the best weights of an earlier, early-stopped phase (which one best.safetensors used to keep)."""
    summary, rows, run_dir = run_two_phases(mnist_data, tmp_path, first_stops=True)
    assert [r["phase"] for r in rows] == ["a", "a", "b", "b"]  # phase a stopped after 2 of its 3 epochs
    assert summary["early_stopped"] is True
    best_of_a, last = float(rows[0]["test_loss"]), float(rows[-1]["test_loss"])
    assert best_of_a != last
    assert summary["test_loss"] == last
    assert not (run_dir / "best.safetensors").exists()  # phase b keeps no best weights
    exported = load_file(run_dir / "model.safetensors")
    assert loss_of(run_dir, exported, *mnist_test) == pytest.approx(last, rel=1e-5)


def test_early_stopped_last_phase_exports_its_best_weights(mnist_data, mnist_test, tmp_path):
    """Early stopping cuts the last phase short; its best epoch's weights are tested and exported."""
    summary, rows, run_dir = run_two_phases(mnist_data, tmp_path, first_stops=False)
    assert [r["phase"] for r in rows] == ["a", "a", "a", "b", "b"]  # phase b stopped after 2 of its 3 epochs
    assert summary["early_stopped"] is True and summary["epochs"] == 5
    best, last = float(rows[3]["test_loss"]), float(rows[4]["test_loss"])
    assert best > last  # "max" mode: the first epoch of b is its best
    assert summary["test_loss"] == best
    exported, kept = load_file(run_dir / "model.safetensors"), load_file(run_dir / "best.safetensors")
    assert exported.keys() == kept.keys() and all(torch.equal(exported[k], kept[k]) for k in kept)
    assert loss_of(run_dir, exported, *mnist_test) == pytest.approx(best, rel=1e-5)


# -- the EMA ---------------------------------------------------------------------------------------------------

EMA_SETTINGS = ["--set", "ema_decay=0.9", "--set", "phases.0.epochs=2", "--set", "max_steps_per_epoch=6",
                "--set", "tensorboard=false"]


def test_ema_weights_are_evaluated_exported_and_survive_a_resume(mnist_data, mnist_test, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    argv = ["--recipe", "mnist_mlp_smoke", "--data", str(mnist_data), "--run-dir", str(run_dir), "--cpu",
            *EMA_SETTINGS]
    seen = {}
    real_finish = loop.finish

    def finish(run, phase):  # the live and the averaged weights at the end of training
        seen["live"] = {k: v.clone() for k, v in run.model.state_dict().items()}
        seen["ema"] = {k: v.clone() for k, v in run.evaluated.state_dict().items()}
        return real_finish(run, phase)

    monkeypatch.setattr(loop, "finish", finish)
    run_train(argv)
    monkeypatch.undo()
    rows = metrics(run_dir)
    # the end-of-epoch-1 checkpoint holds both: the test loss of epoch 1 is the average's, not the live model's
    (ckpt,) = [c for c in checkpoint.candidates(run_dir) if json.loads((c / "progress.json").read_text())["epoch"] == 1]
    live = load_file(ckpt / "model.safetensors")
    ema_state = torch.load(ckpt / "custom_checkpoint_0.pkl", weights_only=True)["Ema"]  # the callbacks' states
    assert int(ema_state.pop("ema.updates")) == 6  # one update per step
    assert loss_of(run_dir, ema_state, *mnist_test) == pytest.approx(float(rows[0]["test_loss"]), rel=1e-5)
    assert loss_of(run_dir, live, *mnist_test) != pytest.approx(float(rows[0]["test_loss"]), rel=1e-3)
    # the export is the average at the end, which differs from the live weights
    exported = load_file(run_dir / "model.safetensors")
    assert all(torch.equal(exported[k], seen["ema"][k]) for k in exported)
    assert not all(torch.equal(exported[k], seen["live"][k]) for k in exported)
    # resumed from the end of epoch 1, the run ends exactly as the uninterrupted one (the average and its
    # update count came back with the checkpoint)
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    (resumed / "summary.json").unlink()
    for later in checkpoint.candidates(resumed):
        if later.name != ckpt.name:
            shutil.rmtree(later)
    run_train(["--recipe", "mnist_mlp_smoke", "--data", str(mnist_data), "--run-dir", str(resumed), "--cpu",
               *EMA_SETTINGS, "--resume", "auto"])
    assert outputs(resumed) == outputs(run_dir)


# -- distillation loss, flip TTA, clipping -----------------------------------------------------------------------

@pytest.mark.parametrize("soft_targets", [False, True])
def test_distillation_loss_matches_a_hand_computation(soft_targets):
    t, alpha, smoothing = 3.0, 0.7, 0.1
    recipe = load_recipe("c10_kd_smoke", [f"loss.distill.temperature={t}", f"loss.distill.alpha={alpha}",
                                          f"loss.label_smoothing={smoothing}"])
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 10, generator=gen, dtype=torch.float64), torch.randn(8, 10, generator=gen,
                                                                                              dtype=torch.float64)
    labels = torch.randint(0, 10, (8,), generator=gen)
    targets = F.one_hot(labels, 10).double() * 0.6 + 0.04 if soft_targets else labels  # MixUp-like rows sum to 1

    def log_softmax(x):
        return x - x.exp().sum(1, keepdim=True).log()

    p_teacher = log_softmax(teacher / t).exp()
    kl = (p_teacher * (log_softmax(teacher / t) - log_softmax(student / t))).sum(1).mean()
    if soft_targets:  # soft targets carry their own smoothing
        hard = -(targets * log_softmax(student)).sum(1).mean()
    else:
        smooth = F.one_hot(labels, 10).double() * (1 - smoothing) + smoothing / 10
        hard = -(smooth * log_softmax(student)).sum(1).mean()
    got = loss_terms(recipe, student, targets, teacher)
    assert got["kd_soft_loss"].item() == pytest.approx((kl * t * t).item(), rel=1e-9)
    assert got["kd_hard_loss"].item() == pytest.approx(hard.item(), rel=1e-9)
    assert got["loss"].item() == pytest.approx((alpha * kl * t * t + (1 - alpha) * hard).item(), rel=1e-9)


class Batches:
    """A fixed list of (images, labels) batches behind the loader interface."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        pass

    def __iter__(self):
        return iter(self.batches)


@pytest.fixture
def accelerator():
    with isolated_state():
        yield Accelerator(cpu=True)


def test_tta_flip_averages_the_logits_of_each_image_and_its_mirror(accelerator):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))  # a linear model that is not mirror-symmetric
    images, labels = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    loader = Batches([(images[:4], labels[:4]), (images[4:], labels[4:])])
    recipe = load_recipe("c10_fast_smoke", ["loss.label_smoothing=0"])
    assert recipe.tta_flip
    got, _, _ = loop.evaluate(model, loader, recipe, accelerator)
    with torch.no_grad():
        logits = (model(images) + model(images.flip(3))) / 2
        plain = model(images)
    assert got["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    assert got["accuracy"] == (logits.argmax(1) == labels).double().mean().item()
    assert got["loss"] != pytest.approx(F.cross_entropy(plain, labels).item(), rel=1e-3)


def test_max_eval_batches_evaluates_a_fixed_stratified_subset():
    """Splits are stored class by class: a cap of 2 batches of 16 on 2 ranks must not be the first 64 records (all
    class 0) but 64 records spread over the classes as the split is, the same on every rank and every epoch,
    each in exactly one rank's shard."""
    labels = np.repeat(np.arange(10), [50, 50, 50, 50, 50, 30, 30, 30, 30, 30])  # 400, sorted by class
    images = np.zeros((len(labels), 4, 4, 3), dtype=np.uint8)

    def shards(epoch: int) -> list[np.ndarray]:
        seen = []
        for rank in range(2):
            options = LoaderOptions(data_dir=Path("."), split="test", batch_size=16, train=False, spec=AugmentSpec(),
                                    device=torch.device("cpu"), seed=4, rank=rank, world_size=2, max_batches=2)
            loader = TensorLoader.from_arrays(images, labels, mean=(0.0,) * 3, std=(1.0,) * 3, num_classes=10,
                                              options=options)
            loader.set_epoch(epoch)
            assert len(loader) == 2
            seen.append(torch.cat([y for _, y in loader]).numpy())
        return seen

    first = shards(0)
    assert [len(s) for s in first] == [32, 32]
    counts = np.bincount(np.concatenate(first), minlength=10)
    assert counts.tolist() == [8] * 5 + [5, 5, 5, 5, 4]  # 64 x 50/400, and 64 x 30/400 = 4.8 by largest remainder
    assert all(np.array_equal(a, b) for a, b in zip(first, shards(3)))  # the same subset every epoch
    assert np.array_equal(stratified_subset(labels, 64, 4), stratified_subset(labels, 64, 4))
    assert not np.array_equal(stratified_subset(labels, 64, 4), stratified_subset(labels, 64, 5))


def one_step(accelerator: Accelerator, settings: list[str], log: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor, float]:
    """One TrainStep (SGD, lr 1, no momentum: the update is minus the gradient used); the raw gradient, the
    update, and the logged gradient norm."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    images, labels = torch.randn(16, 3, 8, 8) * 5, torch.randint(0, 4, (16,))
    F.cross_entropy(model(images), labels).backward()
    raw = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    recipe = load_recipe("c10_cnn_smoke", ["loss.label_smoothing=0", *settings])
    step = TrainStep(accelerator, model, optimizer, scheduler, recipe)
    sums = EpochSums(torch.device("cpu"))
    step(images, labels, sums, log=log)
    update = before - torch.cat([p.detach().flatten() for p in model.parameters()])
    totals = EpochSums.totals(sums.stacked())
    return raw, update, totals.grad_norm_sum, totals.grad_norms


def test_clipping_by_norm_scales_the_gradient_and_logs_the_norm_before_clipping(accelerator):
    raw, update, logged, count = one_step(accelerator, ["grad_clip_norm=0.5"], log=False)
    assert raw.norm() > 1  # so that clipping acts
    assert update.norm().item() == pytest.approx(0.5, rel=1e-4)
    assert torch.allclose(update, raw * 0.5 / raw.norm(), atol=1e-6)
    assert count == 1 and logged == pytest.approx(raw.norm().item(), rel=1e-5)  # computed anyway: logged always


def test_clipping_by_value_clamps_each_entry_and_logs_the_clipped_norm(accelerator):
    raw, update, logged, count = one_step(accelerator, ["grad_clip_value=0.01"], log=True)
    assert raw.abs().max() > 0.01
    assert torch.allclose(update, raw.clamp(-0.01, 0.01), atol=1e-7)
    assert count == 1 and logged == pytest.approx(raw.clamp(-0.01, 0.01).norm().item(), rel=1e-5)
    _, _, _, count = one_step(accelerator, ["grad_clip_value=0.01"], log=False)
    assert count == 0  # between logging steps no norm is computed


def test_no_clipping_logs_the_raw_norm_at_logging_steps(accelerator):
    raw, update, logged, count = one_step(accelerator, [], log=True)
    assert torch.allclose(update, raw, atol=1e-7)
    assert count == 1 and logged == pytest.approx(raw.norm().item(), rel=1e-5)


def test_the_logged_gradient_norm_counts_only_finite_norms():
    """fp16's loss scaler skips a step whose gradients overflowed; its inf/NaN norm must not reach the epoch mean."""
    sums = EpochSums(torch.device("cpu"))
    logits, targets = torch.zeros(2, 3), torch.tensor([0, 1])
    for norm in (2.0, float("inf"), 4.0, float("nan")):
        sums.add({"loss": torch.tensor(1.0)}, logits, targets, torch.tensor(norm))
    totals = EpochSums.totals(sums.stacked())
    assert (totals.grad_norm, totals.grad_norms) == (3.0, 2)
    assert math.isnan(totals.nonfinite_grad_norm_sum)  # what the non-finite check reads without a loss scaler


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop"])
def test_fp16_refuses_an_optimizer_the_loss_scaler_would_sync_for(accelerator, name):
    """With a loss scaler, a non-fused optimizer (RMSprop: torch has no fused kernel) makes the scaler read
    found_inf on the host every step: one line suggesting bf16 instead. Fused ones take the scaler's tensors."""
    model = nn.Linear(4, 2)
    recipe = load_recipe("c10_cnn_smoke")
    optimizer = build_optimizer(param_groups(model, recipe.phases[0]), OptimizerConfig(name=name), "cpu")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    accelerator.scaler = torch.amp.GradScaler("cpu")  # what Accelerate builds for fp16 on CUDA
    if name != "rmsprop":
        TrainStep(accelerator, model, optimizer, scheduler, recipe)
        return
    with pytest.raises(UserError, match=r"^precision fp16 with RMSprop: .*use precision=bf16"):
        TrainStep(accelerator, model, optimizer, scheduler, recipe)


# -- resuming across a phase boundary ------------------------------------------------------------------------------

BOUNDARY = ('phases=[{epochs = 2, name = "head", train_modules = ["head"], optimizer = {name = "sgd", lr = 0.05}}, '
            '{epochs = 2, name = "all", optimizer = {name = "sgd", lr = 0.02}, '
            'param_groups = [{modules = ["head"], lr = 0.1}], schedule = {name = "cosine"}}]')


def test_resume_at_a_phase_boundary_matches_an_uninterrupted_run(tiny_rgb_data, tmp_path):
    """Killed right after the last epoch of phase 1: the resumed run builds phase 2's optimizer and schedule
    and ends with the uninterrupted run's metrics (learning rates of every group included) and weights."""
    recipe = recipe_file(tmp_path, "c10_cnn_smoke", BOUNDARY, "tensorboard=false")
    argv = ["--recipe", recipe, "--data", str(tiny_rgb_data), "--cpu"]
    reference = tmp_path / "reference"
    run_train([*argv, "--run-dir", str(reference)])
    rows = metrics(reference)
    assert [r["phase"] for r in rows] == ["head", "head", "all", "all"]
    assert not rows[0]["lr_head"] and rows[2]["lr_head"]  # phase 2 has a second group
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    (resumed / "summary.json").unlink()
    found = checkpoint.candidates(resumed)
    at_boundary = [c for c in found if json.loads((c / "progress.json").read_text())["phase"] == 1
                   and json.loads((c / "progress.json").read_text())["epoch"] == 0]
    assert len(at_boundary) == 1
    for ckpt in found:
        if ckpt != at_boundary[0]:
            shutil.rmtree(ckpt)
    run_train([*argv, "--run-dir", str(resumed), "--resume", "auto"])
    assert outputs(resumed) == outputs(reference)


def test_learning_rates_after_a_mid_epoch_resume_equal_an_uninterrupted_run(tiny_rgb_data, tmp_path, monkeypatch):
    """A cosine schedule resumed from the first checkpoint (mid-epoch 1) carries on from the step it stopped
    at: every later epoch logs the uninterrupted run's learning rate and the run ends with its weights."""
    settings = ["--set", "phases.0.epochs=3", "--set", "phases.0.schedule.name=cosine", "--set",
                "checkpoint_every_steps=2", "--set", "tensorboard=false"]
    argv = ["--recipe", "c10_cnn_smoke", "--data", str(tiny_rgb_data), "--cpu", *settings]
    reference = tmp_path / "reference"
    monkeypatch.setattr(checkpoint, "KEEP", 100)  # keep every checkpoint, the first one included
    run_train([*argv, "--run-dir", str(reference)])
    monkeypatch.undo()
    lrs = [float(r["lr_base"]) for r in metrics(reference)]
    assert lrs[0] > lrs[1] > lrs[2]
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    (resumed / "summary.json").unlink()
    *later, first = checkpoint.candidates(resumed)
    assert json.loads((first / "progress.json").read_text())["batch"] == 2  # mid-epoch 1 (3 steps an epoch)
    for ckpt in later:
        shutil.rmtree(ckpt)
    run_train([*argv, "--run-dir", str(resumed), "--resume", "auto"])
    assert [float(r["lr_base"]) for r in metrics(resumed)] == lrs
    assert outputs(resumed) == outputs(reference)


# -- mixed precision ----------------------------------------------------------------------------------------------

def output_dtypes(monkeypatch) -> dict[str, set[torch.dtype]]:
    """Record the output dtype of every Linear/Conv2d forward of the run's model in training and in evaluation
    (hooked when the first phase is prepared, after the model's shape probe)."""
    seen: dict[str, set[torch.dtype]] = {"train": set(), "eval": set()}
    real = loop.prepare_phase

    def record(module, inputs, out):
        seen["train" if module.training else "eval"].add(out.dtype)

    def prepare_phase(run, index):
        if not seen["train"]:
            for module in run.model.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    module.register_forward_hook(record)
        return real(run, index)

    monkeypatch.setattr(loop, "prepare_phase", prepare_phase)
    return seen


def test_bf16_on_the_cpu_computes_convolutions_in_bf16(tiny_rgb_data, tmp_path, monkeypatch):
    seen = output_dtypes(monkeypatch)
    summary = run_train(["--recipe", "c10_cnn_smoke", "--data", str(tiny_rgb_data), "--run-dir", str(tmp_path / "r"),
                         "--cpu", "--set", "precision=bf16", "--set", "tensorboard=false"])
    assert seen == {"train": {torch.bfloat16}, "eval": {torch.bfloat16}}
    assert math.isfinite(summary["test_loss"])
    exported = load_file(tmp_path / "r" / "model.safetensors")
    assert {t.dtype for t in exported.values() if t.is_floating_point()} == {torch.float32}  # fp32 master weights


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="fp16 autocast and its loss scaler exist only on CUDA (on the CPU Accelerate runs fp16 "
                           "recipes in fp32); this runs on GPU machines")
def test_fp16_on_cuda_computes_in_fp16_with_a_loss_scaler(tiny_rgb_data, tmp_path, monkeypatch):
    seen = output_dtypes(monkeypatch)
    scalers = []
    real_step = loop.TrainStep

    def train_step(accelerator, *args, **kwargs):
        scalers.append(accelerator.scaler)
        return real_step(accelerator, *args, **kwargs)

    monkeypatch.setattr(loop, "TrainStep", train_step)
    summary = run_train(["--recipe", "c10_cnn_smoke", "--data", str(tiny_rgb_data), "--run-dir", str(tmp_path / "r"),
                         "--set", "precision=fp16", "--set", "tensorboard=false"])
    assert seen == {"train": {torch.float16}, "eval": {torch.float16}}
    assert scalers and all(isinstance(s, torch.amp.GradScaler) for s in scalers)
    assert math.isfinite(summary["test_loss"])


# -- what the run folder records -----------------------------------------------------------------------------------

def test_pretrained_loading_is_recorded_in_the_run_folder(tiny_rgb_data, tmp_path):
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    run_dir = tmp_path / "run"
    run_train(["--recipe", "c10_cnn_smoke", "--data", str(tiny_rgb_data), "--run-dir", str(run_dir), "--cpu",
               "--set", "model.name=resnet18_cifar", "--set", "model.args={}", "--pretrained", str(weights),
               "--set", "phases.0.epochs=1", "--set", "max_steps_per_epoch=1", "--set", "tensorboard=false"])
    report = json.loads((run_dir / "pretrained.json").read_text())
    state = torch.load(weights, weights_only=True)
    replaced = ["conv1.weight", "fc.bias", "fc.weight"]  # the 3x3 stem and the 10-class head are new
    assert report == {"source": str(weights), "loaded": len(state) - len(replaced), "skipped": replaced}


def test_every_file_of_the_run_folder_is_published_by_rename(tiny_rgb_data, tmp_path, monkeypatch):
    """A reader (or a killed run) never sees half a file: summary.json (which marks a run finished), model.json,
    the weights, metrics.csv, reports and plots all appear by rename; checkpoints as whole folders.
    TensorBoard's event files are append-only logs, written as they grow."""
    renamed: set[Path] = set()
    real_replace = os.replace

    def replace(src, dst):
        renamed.add(Path(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    run_dir = tmp_path / "run"
    run_train(["--recipe", "c10_cnn_smoke", "--data", str(tiny_rgb_data), "--run-dir", str(run_dir), "--cpu",
               "--set", "phases.0.early_stopping.metric=test_loss"])
    top = {p for p in run_dir.iterdir() if p.is_file()}
    assert {"summary.json", "model.json", "model.safetensors", "best.safetensors", "metrics.csv", "config.toml",
            "environment.json", "confusion_matrix.png"} <= {p.name for p in top}
    assert top <= renamed, sorted(p.name for p in top - renamed)
    assert set(checkpoint.candidates(run_dir)) <= renamed
    assert not [p for p in run_dir.rglob(".tmp-*")]


def test_cudnn_autotuning_and_tf32_are_set_in_one_place_and_recorded(tiny_rgb_data, tmp_path, monkeypatch):
    """train.py and the throughput benchmarks share configure_backends: cuDNN's autotuner, and TF32 for fp32 on
    CUDA unless the recipe asks for strict_fp32; environment.json records what was set."""
    from benchmarks import train_throughput
    from beton_trainer.trainer.step import configure_backends

    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    try:
        cuda = torch.device("cuda")
        assert configure_backends(cuda) == {"cudnn_benchmark": True, "cudnn_allow_tf32": True,
                                            "float32_matmul_precision": "high"}
        assert configure_backends(cuda, strict_fp32=True, deterministic=True) == {
            "cudnn_benchmark": False, "cudnn_allow_tf32": False, "float32_matmul_precision": "highest"}
        calls = []
        monkeypatch.setattr(train_throughput, "configure_backends", calls.append)
        train_throughput.shared_step(nn.Linear(2, 2), load_recipe("c10_finetune"),
                                     train_throughput.StepConfig("no", False, False), torch.device("cpu"), "default")
        assert calls == [torch.device("cpu")]
        run_dir = tmp_path / "run"
        run_train(["--recipe", "c10_cnn_smoke", "--data", str(tiny_rgb_data), "--run-dir", str(run_dir), "--cpu",
                   "--set", "phases.0.epochs=1", "--set", "tensorboard=false", "--set", "strict_fp32=true"])
        backends = json.loads((run_dir / "environment.json").read_text())["backends"]
        assert backends == {"cudnn_benchmark": True, "cudnn_allow_tf32": False, "float32_matmul_precision": "highest"}
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = before[:2]
        torch.set_float32_matmul_precision(before[2])


# -- checkpoint interval, steady rate ------------------------------------------------------------------------------

def test_checkpoints_every_nth_epoch_and_the_steady_rate_leaves_the_first_epoch_out(mnist_data, tmp_path,
                                                                                   monkeypatch):
    """checkpoint_every_epochs=2 over 5 epochs of 5 steps: checkpoints at the ends of epochs 2 and 4 only (a
    checkpoint costs ~0.5 s for ResNet34 here, an epoch on a GPU about a second); 0 leaves only phase ends.
    summary.json's steady_images_per_s averages the last phase's epochs after the run's first."""
    monkeypatch.setattr(checkpoint, "KEEP", 100)
    run_dir = tmp_path / "run"
    summary = run_train(["--recipe", "mnist_mlp_smoke", "--data", str(mnist_data), "--run-dir", str(run_dir), "--cpu",
                         "--set", "phases.0.epochs=5", "--set", "checkpoint_every_epochs=2",
                         "--set", "tensorboard=false"])
    assert [c.name for c in checkpoint.candidates(run_dir)] == ["step-000000020", "step-000000010"]
    rates = [float(row["images_per_s"]) for row in metrics(run_dir)]
    assert summary["steady_images_per_s"] == pytest.approx(sum(rates[1:]) / 4)
    assert summary["images_per_s"] == pytest.approx(sum(rates) / 5)
    none = tmp_path / "none"
    run_train(["--recipe", "mnist_mlp_smoke", "--data", str(mnist_data), "--run-dir", str(none), "--cpu",
               "--set", "phases.0.epochs=3", "--set", "checkpoint_every_epochs=0", "--set", "tensorboard=false"])
    assert checkpoint.candidates(none) == []
