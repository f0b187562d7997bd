"""The Python API (trainer.api) on real MNIST subsets: a model built in Python with phases, in-memory data in
every accepted form, custom metrics, mistakes raised (not exited), repeated fits, predict and load_run."""

from __future__ import annotations

import gzip
import json
import logging
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torchvision
from accelerate import Accelerator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import Subset

from beton_trainer.common.errors import UserError
from beton_trainer.trainer.api import Trainer, load_run
from beton_trainer.trainer.distributed import isolated_state
from tests.data_fixtures import mnist_subset
from tests.train_helpers import run_train

N_TRAIN, N_TEST = 2000, 500
RECIPE = {"name": "api_small", "data": {"batch_size": 50, "eval_batch_size": 250},
          "model": {"name": "mlp", "args": {"hidden_size": 32, "depth": 1}},
          "phases": [{"epochs": 1, "optimizer": {"name": "adam", "lr": 0.003}}],
          "max_steps_per_epoch": 15, "tensorboard": False}
SAME = ("train_loss", "train_accuracy", "grad_norm", "test_loss", "test_accuracy")  # what equal data reproduces


class TinyNet(nn.Module):
    """A model as a notebook defines it: its own module names, nothing registered."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU())
        self.classifier = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def error_rate(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) != labels).float().mean()


def macro_f1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    pred = logits.argmax(1)
    k = logits.shape[1]
    hits = torch.bincount(labels[pred == labels], minlength=k).float()
    return float((2 * hits / (torch.bincount(pred, minlength=k) + torch.bincount(labels, minlength=k)).clamp(min=1))
                 .mean())


@pytest.fixture(scope="module")
def mnist(real_data_root: Path) -> dict:
    """Real MNIST read from its IDX files: the first 2,000 training and 500 test images, uint8 NHWC."""
    return mnist_subset(real_data_root, N_TRAIN, N_TEST)


@pytest.fixture(scope="module")
def torchvision_root(real_data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared MNIST files laid out as torchvision.datasets.MNIST reads them (MNIST/raw, uncompressed)."""
    root = tmp_path_factory.mktemp("torchvision")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in (real_data_root / "mnist").glob("*-ubyte.gz"):
        with gzip.open(gz) as src, open(raw / gz.stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return root


def history_of(result, columns=SAME) -> list[tuple]:
    return [tuple(row[c] for c in columns) for row in result.history]


def test_model_built_in_python_with_phases_on_its_module_names(mnist, tmp_path, capsys):
    recipe = {**RECIPE, "phases": [
        {"name": "head", "epochs": 1, "train_modules": ["classifier"], "optimizer": {"name": "adam", "lr": 0.003}},
        {"name": "all", "epochs": 1, "optimizer": {"name": "adam", "lr": 0.003},
         "param_groups": [{"modules": ["features"], "lr": 0.001}]}]}
    net = TinyNet()
    trainer = Trainer(recipe, model=net, data=mnist, run_dir=tmp_path / "run", device="cpu")
    result = trainer.fit()
    out = capsys.readouterr().out
    head = sum(p.numel() for p in net.classifier.parameters())
    assert f"phase 1/2 'head': 1 epochs, {head:,} trainable parameters, groups base" in out
    everything = sum(p.numel() for p in net.parameters())
    assert f"phase 2/2 'all': 1 epochs, {everything:,} trainable parameters, groups features, base" in out
    first, second = result.history
    assert first["lr_base"] == 0.003 and first.get("lr_features") is None
    assert (second["lr_features"], second["lr_base"]) == (0.001, 0.003)
    info = json.loads((result.run_dir / "model.json").read_text())
    assert info["name"] == "custom:TinyNet" and info["classes"] == mnist["classes"]
    assert trainer.model is net  # trained in place, holding the exported weights
    assert result.summary["test_accuracy"] > 0.5  # 30 steps of 50 real digits, half of them head-only

    wrong = {**recipe, "phases": [{"epochs": 1, "train_modules": ["head"]}]}
    with pytest.raises(UserError, match="names module 'head', which TinyNet does not have; top-level modules: "
                                        "classifier, features"):
        Trainer(wrong, model=TinyNet(), data=mnist, run_dir=tmp_path / "wrong", device="cpu").fit()


def test_every_data_form_gives_the_same_run(mnist, torchvision_root, tmp_path):
    """uint8 NHWC arrays, float NCHW tensors in [0, 1] and torchvision's MNIST (PIL images, or ToTensor
    tensors) hold the same pixels, so with one seed their runs are identical."""
    images, labels = mnist["train"]
    test_images, test_labels = mnist["test"]
    as_float = {"train": (torch.tensor(images).permute(0, 3, 1, 2) / 255, torch.tensor(labels)),
                "test": (torch.tensor(test_images).permute(0, 3, 1, 2) / 255, torch.tensor(test_labels)),
                "classes": mnist["classes"]}

    def torchvision_data(transform) -> dict:
        train = torchvision.datasets.MNIST(str(torchvision_root), train=True, transform=transform)
        test = torchvision.datasets.MNIST(str(torchvision_root), train=False, transform=transform)
        return {"train": Subset(train, range(N_TRAIN)), "test": Subset(test, range(N_TEST)), "classes": train.classes}

    forms = {"uint8": mnist, "float": as_float, "pil": torchvision_data(None),
             "tensor": torchvision_data(torchvision.transforms.ToTensor())}
    runs = {name: Trainer(RECIPE, data=data, run_dir=tmp_path / name, device="cpu").fit()
            for name, data in forms.items()}
    reference = history_of(runs["uint8"])
    assert reference[0][1] > 0.4  # learning happened
    for name, result in runs.items():
        assert history_of(result) == reference, name
    assert json.loads((tmp_path / "pil" / "model.json").read_text())["classes"][0] == "0 - zero"


def test_custom_metrics_are_logged_beside_loss_and_accuracy(mnist, tmp_path):
    recipe = {**RECIPE, "tensorboard": True, "phases": [{"epochs": 2, "optimizer": {"name": "adam", "lr": 0.003}}]}
    trainer = Trainer(recipe, data=mnist, metrics={"error_rate": error_rate, "macro_f1": macro_f1},
                      run_dir=tmp_path / "run", device="cpu", val_fraction=0.1)
    result = trainer.fit()
    for row in result.history:
        for split in ("val", "test"):
            # the metric saw every logit and label of the split: 1 - accuracy, to float32 rounding
            assert row[f"{split}_error_rate"] == pytest.approx(1 - row[f"{split}_accuracy"], abs=1e-6)
            assert 0.3 < row[f"{split}_macro_f1"] <= 1
    header = (result.run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    # beside the split's built-in metrics (loss, accuracy, top-5 with ten classes), before the next split's
    assert header.index("val_accuracy") < header.index("val_error_rate") < header.index("test_loss")
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    assert {"val_macro_f1", "test_macro_f1", "test_error_rate"} <= set(events.Tags()["scalars"])
    assert [e.value for e in events.Scalars("test_macro_f1")] == pytest.approx(
        [row["test_macro_f1"] for row in result.history])
    # evaluate() is the loop's: the exported (last) weights give the last row again
    assert trainer.evaluate("test") == pytest.approx(
        {"loss": result.history[-1]["test_loss"], "accuracy": result.history[-1]["test_accuracy"], "count": N_TEST,
         "top5_accuracy": result.history[-1]["test_top5_accuracy"],
         "error_rate": result.history[-1]["test_error_rate"], "macro_f1": result.history[-1]["test_macro_f1"]})
    per_class = np.bincount(mnist["train"][1], minlength=10)
    assert trainer.evaluate("val")["count"] == sum(round(0.1 * n) for n in per_class)  # stratified


def normalized(m: dict) -> torch.Tensor:
    """The training images after ToTensor and Normalize: not pixels any more."""
    return torch.from_numpy((m["train"][0] / 255 - 0.1307) / 0.3081).permute(0, 3, 1, 2)


MISTAKES = {
    "bad-key": (lambda m: dict(overrides=["data.batch_sise=3"]), "did you mean 'batch_size'"),
    "normalized": (lambda m: dict(data={**m, "train": (normalized(m), m["train"][1])}),
                   r"floats in \[-0.424, 2.82\]; pass them in \[0, 1\]"),
    "five-channels": (lambda m: dict(data={**m, "train": (np.zeros((N_TRAIN, 5, 28, 28), np.uint8), m["train"][1])}),
                      r"images have shape \[2000, 5, 28, 28\]"),
    "short-labels": (lambda m: dict(data={**m, "train": (m["train"][0], m["train"][1][:-1])}),
                     "pass 2000 class indices"),
    "no-test": (lambda m: dict(data={"train": m["train"]}), "give 'train' and 'test'"),
    "few-names": (lambda m: dict(data={**m, "classes": ["a", "b", "c"]}),
                  "labels go up to 9 but there are 3 class names"),
    "reserved-metric": (lambda m: dict(metrics={"accuracy": error_rate}), "metric name 'accuracy' is not usable"),
    "metric-list": (lambda m: dict(metrics=[error_rate]), "pass a dict of name -> function"),
    "device": (lambda m: dict(device="tpu"), "device must be 'cuda', 'mps', 'cpu' or None"),
    "pretrained-custom": (lambda m: dict(model=TinyNet(), overrides=["model.pretrained=true"]),
                          "model.pretrained loads weights into registry models"),
    "val-fraction": (lambda m: dict(val_fraction=1.0), r"val_fraction must be in \[0, 1\)"),
    "val-missing": (lambda m: dict(overrides=['data.val_split="val"']), "pass val_fraction=0.1"),
    "val-twice": (lambda m: dict(data={**m, "val": m["test"]}, val_fraction=0.1),
                  "the data has a val split and val_fraction is set"),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_mistakes_raise_user_error(mistake, mnist):
    change, fragment = MISTAKES[mistake]
    with pytest.raises(UserError, match=fragment):
        Trainer(RECIPE, **{"data": mnist, "device": "cpu", **change(mnist)})


def test_fits_in_one_process_leave_nothing_behind(mnist, tmp_path, monkeypatch):
    """A fit failing mid-run raises UserError and cleans up; then two fits in a row (default run folders, a change of
    precision that a leftover Accelerate state would refuse) both train."""
    monkeypatch.chdir(tmp_path)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    failing = Trainer(RECIPE, data=mnist, device="cpu", overrides=["phases.0.optimizer.name=sgd",
                                                                   "phases.0.optimizer.lr=1e6"])
    with pytest.raises(UserError, match=r"the training (loss|gradient norm) became (nan|inf) by step 15"):
        failing.fit()  # fails mid-epoch, after the loop installed its signal handlers
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    results = [Trainer(RECIPE, data=mnist, device="cpu", overrides=[f"precision={p}"]).fit() for p in ("no", "bf16")]
    assert results[0].run_dir != results[1].run_dir
    assert all(r.run_dir.parent == Path("runs") and r.summary["test_accuracy"] > 0.6 for r in results)
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    with isolated_state():  # a leftover state would refuse another precision
        assert Accelerator(mixed_precision="bf16", cpu=True).mixed_precision == "bf16"
    assert not (dist.is_available() and dist.is_initialized())
    assert len(logging.getLogger("beton_trainer.models").handlers) <= 1


def test_predict_and_load_run(mnist, tmp_path):
    test_images, test_labels = mnist["test"]
    trainer = Trainer(RECIPE, model=TinyNet(), data=mnist, run_dir=tmp_path / "run", device="cpu")
    result = trainer.fit()
    labels, probabilities = trainer.predict(test_images)
    assert probabilities.shape == (N_TEST, 10) and torch.allclose(probabilities.sum(1), torch.ones(N_TEST))
    assert (labels.numpy() == test_labels).mean() == result.summary["test_accuracy"]  # the loop's own test
    as_float = torch.tensor(test_images).permute(0, 3, 1, 2) / 255
    assert torch.equal(trainer.predict(as_float).labels, labels)
    with pytest.raises(UserError, match=r"takes \[28, 28, 1\]; resize them first"):
        trainer.predict(np.zeros((2, 32, 32, 3), np.uint8))

    with pytest.raises(UserError, match=r"model defined in Python \(custom:TinyNet\).*model=TinyNet\(...\)"):
        load_run(result.run_dir)
    loaded = load_run(result.run_dir, model=TinyNet(), device="cpu")
    assert torch.allclose(loaded.predict(test_images).probabilities, probabilities)
    assert loaded.result.history == result.history and loaded.classes == mnist["classes"]
    with pytest.raises(UserError, match="trained on in-memory data, which is not saved with it"):
        loaded.evaluate("test")
    again = load_run(result.run_dir, model=TinyNet(), data=mnist, device="cpu")
    assert again.evaluate("test")["accuracy"] == result.summary["test_accuracy"]
    with pytest.raises(UserError, match="is not a finished run"):
        load_run(tmp_path)


def test_converted_folder_runs_as_the_command_line_does(mnist_data, tmp_path):
    """A converted folder goes through the CLI's path (same loader, same numbers); val_fraction reads it into
    memory and carves a stratified val split."""
    cli = run_train(["--recipe", "mnist_mlp_smoke", "--data", str(mnist_data), "--run-dir", str(tmp_path / "cli"),
                     "--cpu"])
    result = Trainer("mnist_mlp_smoke", data=mnist_data, run_dir=tmp_path / "api", device="cpu").fit()
    assert history_of(result) == history_of(load_run(tmp_path / "cli", device="cpu").result)
    assert result.summary["test_accuracy"] == cli["test_accuracy"]
    loaded = load_run(tmp_path / "api", device="cpu")  # a registry model: no module needed
    assert loaded.evaluate("test")["accuracy"] == result.summary["test_accuracy"]

    carved = Trainer("mnist_mlp_smoke", data=str(mnist_data), run_dir=tmp_path / "val", device="cpu",
                     val_fraction=0.05)
    assert carved.fit().history[0]["val_accuracy"] > 0.5
    per_class = json.loads((mnist_data / "manifest.json").read_text())["splits"]["train"]["histogram"]
    assert carved.evaluate("val")["count"] == sum(round(0.05 * n) for n in per_class)


def test_predict_runs_the_recipes_autocast_on_a_channels_last_model(mnist, tmp_path):
    """predict() feeds channels-last batches (as training does) to a channels-last model under the recipe's
    autocast: with bf16, the convolutions compute in bf16 as they did in training and evaluation."""
    recipe = {**RECIPE, "model": {"name": "simple_cnn"}, "precision": "bf16"}
    trainer = Trainer(recipe, data=mnist, run_dir=tmp_path / "run", device="cpu")
    trainer.fit(show_plots=False)
    convs = [m for m in trainer.model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    seen = []
    convs[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    trainer.predict(mnist["test"][0][:8])
    assert seen == [torch.bfloat16]


def test_the_distillation_teacher_is_channels_last_like_its_batches(tmp_path):
    from safetensors.torch import save_file

    from beton_trainer.trainer.modelio import make_model
    from beton_trainer.trainer.teacher import load_teacher

    info = {"name": "simple_cnn", "args": {}, "num_classes": 10, "image_shape": [32, 32, 3], "channels": "RGB"}
    model = make_model(info)
    (tmp_path / "model.json").write_text(json.dumps(info))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    manifest = {"classes": list(range(10)), "image_shape": [32, 32, 3]}
    for channels_last in (True, False):
        teacher = load_teacher(str(tmp_path), manifest, torch.device("cpu"), channels_last)
        weights = [m.weight for m in teacher.modules() if isinstance(m, nn.Conv2d)]
        assert all(w.is_contiguous(memory_format=torch.channels_last) == channels_last for w in weights)
