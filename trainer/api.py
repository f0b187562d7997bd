"""The Python API for notebooks: the command line's one loop (`trainer.loop.train`), fed a model, data and
metrics built in Python, returning plain objects and raising `UserError` (never exiting).

    trainer = Trainer("mnist_mlp", model=MyNet(), data={"train": (x, y), "test": (xt, yt), "classes": names},
                      metrics={"macro_f1": macro_f1}, overrides=["phases.0.epochs=2"], val_fraction=0.1)
    result = trainer.fit()           # FitResult: history (a dict per epoch), summary, run_dir
    labels, probabilities = trainer.predict(images)
    again = load_run(result.run_dir, model=MyNet())

Each call leaves the process as it found it (Accelerate's state, signal handlers, process group), so a
notebook can fit again in the same kernel.
"""

from __future__ import annotations

import copy
import csv
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn

from beton_trainer.common.errors import UserError
from beton_trainer.common.schema import from_dict
from beton_trainer.format.dataset import load_manifest
from beton_trainer.pipelines.augment import EvalTransform
from beton_trainer.pipelines.memory import MEMORY, as_images, data_splits, folder_splits
from beton_trainer.trainer.callbacks import Callback
from beton_trainer.trainer.config import Recipe, apply_override, load_recipe
from beton_trainer.trainer.distributed import isolated_state
from beton_trainer.trainer.loop import evaluate, split_loader, train
from beton_trainer.trainer.modelio import make_model
from beton_trainer.trainer.state import RunOptions

CUSTOM = "custom:"  # model.json's name for a model built in Python: "custom:<ClassName>"
RESERVED_METRICS = ("loss", "accuracy", "count")
Metric = Callable[[torch.Tensor, torch.Tensor], Any]  # (logits (N, classes), labels (N,)) -> a number


class Prediction(NamedTuple):
    labels: torch.Tensor  # (N,) predicted class indices
    probabilities: torch.Tensor  # (N, classes) softmax


@dataclass
class FitResult:
    """What a finished run left: metrics.csv as one dict per epoch, summary.json, the run folder."""

    history: list[dict]
    summary: dict
    run_dir: Path
    plots: list[Path] = field(default_factory=list)

    def show(self) -> None:
        """Display the run's plots (learning curves, LR schedule, confusion matrix) in a notebook."""
        from IPython.display import Image, display

        for path in self.plots:
            display(Image(filename=str(path)))


def read_recipe(recipe: str | Path | dict, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A recipe name, .toml path or dict (the TOML's tables as dicts), with `--set` strings applied."""
    if isinstance(recipe, dict):
        data = copy.deepcopy(recipe)
        for assignment in overrides:
            apply_override(data, assignment)
        return from_dict(Recipe, data)
    return load_recipe(str(recipe), overrides)


def resolve_device(name: str | None) -> torch.device:
    """The seed's choice: CUDA, then Apple's MPS, then the CPU; or the one named, if present."""
    present = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name is None:
        return torch.device(next(kind for kind, ok in present.items() if ok))
    if name not in present:
        raise UserError(f"device must be 'cuda', 'mps', 'cpu' or None (the first present), got {name!r}")
    if not present[name]:
        raise UserError(f"device '{name}' is not present on this machine; pass device=None (the first of CUDA, "
                        "MPS, CPU) or device='cpu'")
    return torch.device(name)


def check_metrics(metrics: dict[str, Metric] | None) -> dict[str, Metric]:
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise UserError(f"metrics is a {type(metrics).__name__}; pass a dict of name -> function(logits, labels), "
                        "e.g. {'macro_f1': macro_f1}")
    for name, fn in metrics.items():
        if not isinstance(name, str) or not name.isidentifier() or name in RESERVED_METRICS:
            raise UserError(f"metric name {name!r} is not usable; name it with letters, digits and _ (not "
                            f"{', '.join(RESERVED_METRICS)}): it becomes the columns val_<name> and test_<name>")
        if not callable(fn):
            raise UserError(f"metric '{name}' is a {type(fn).__name__}, not a function of (logits, labels)")
    return dict(metrics)


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (plots are then shown inline)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and "IPKernelApp" in shell.config


def fresh_run_dir(name: str) -> Path:
    """runs/<recipe>-<time>, numbered when a run of the same second took the name (fits in a quick loop)."""
    base = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return None if text == "" else text


def read_history(run_dir: Path) -> list[dict]:
    """metrics.csv, one dict per epoch, numbers as numbers ('' as None)."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def finished_result(run_dir: Path) -> FitResult:
    summary = json.loads((run_dir / "summary.json").read_text())
    plots = [run_dir / name for name in [*summary.get("plots", []), "confusion_matrix.png"]]
    return FitResult(read_history(run_dir), summary, run_dir, [p for p in plots if p.is_file()])


def exported_model(run_dir: Path, info: dict, module: nn.Module | None, device: torch.device,
                   channels_last: bool) -> nn.Module:
    """The run's exported weights, in `module` (a model built in Python) or in the registry model model.json names,
    in the memory format predict() feeds it (as in training)."""
    if module is None:
        if info["name"].startswith(CUSTOM):
            cls = info["name"][len(CUSTOM):]
            raise UserError(f"{run_dir} holds a model defined in Python ({info['name']}), which model.json cannot "
                            f"rebuild; pass an instance: load_run({str(run_dir)!r}, model={cls}(...))")
        module = make_model(info)
    try:
        module.load_state_dict(load_file(run_dir / "model.safetensors"))
    except RuntimeError as exc:
        raise UserError(f"the weights in {run_dir} do not fit {type(module).__name__} "
                        f"({str(exc).splitlines()[0]}); pass the model the run trained") from None
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module.to(device).eval()


class Trainer:
    """One recipe trained through the CLI's loop, with optional Python-built model, data and metrics.

    recipe: a name in recipes/, a .toml path, or a dict of the same tables; `overrides` are `--set` strings.
    model: None (the recipe's), a registry name, or an nn.Module (trained in place; recorded in model.json as
        "custom:<ClassName>"); phases' train_modules and param_groups name its modules.
    data: None (the recipe's data.path), a converted dataset folder, or a dict {"train": ..., "test": ...,
        optional "val": ..., "classes": [...]} whose splits are (images, labels) (uint8 NHWC or float NCHW in
        [0, 1], arrays or tensors) or torchvision-style datasets of (PIL image or tensor, label); such data is
        held by the tensor backend on the device, no .beton written. val_fraction carves a stratified, seeded
        val split out of train (a folder is then read into memory too) and the run validates on it.
    metrics: {name: function(logits, labels) -> number}, computed per epoch on the whole val and test splits
        and logged as val_<name>, test_<name> beside loss and accuracy.
    device: None (CUDA, else MPS, else CPU), 'cuda', 'mps' or 'cpu'.
    callbacks: `Callback` instances, called after the built-in ones and before the loggers (trainer.callbacks);
        their state is saved in every checkpoint and restored by `fit(resume=...)`.
    """

    def __init__(self, recipe: str | Path | dict, model: str | nn.Module | None = None, data: Any = None,
                 metrics: dict[str, Metric] | None = None, run_dir: str | Path | None = None,
                 device: str | None = None, *, overrides: list[str] | tuple[str, ...] = (),
                 val_fraction: float = 0.0, callbacks: list[Callback] | tuple[Callback, ...] = ()) -> None:
        self.recipe = read_recipe(recipe, overrides)
        self.device = resolve_device(device)
        self.metrics = check_metrics(metrics)
        self.callbacks = list(callbacks)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.module = model if isinstance(model, nn.Module) else None
        if isinstance(model, str):
            self.recipe.model.name = model
        elif self.module is not None:
            if self.recipe.model.pretrained:
                raise UserError("model.pretrained loads weights into registry models only; load yours into the "
                                "module before passing it, and set model.pretrained=false")
            self.recipe.model.name, self.recipe.model.args = CUSTOM + type(model).__name__, {}
        elif model is not None:
            raise UserError(f"model is a {type(model).__name__}; pass a registry name (e.g. 'mlp') or an nn.Module")
        self.splits = self._splits(data, val_fraction)
        self.model: nn.Module | None = None  # the exported model, after fit() or load_run()
        self.info: dict = {}  # its model.json
        self.result: FitResult | None = None

    def _splits(self, data: Any, val_fraction: float) -> dict | None:
        """In-memory splits for the tensor backend, or None when the loop reads the folder at data.path."""
        seed, config = self.recipe.seed, self.recipe.data
        if isinstance(data, dict):
            splits = data_splits(data, val_fraction, seed)
        elif data is None or isinstance(data, (str, Path)):
            config.path = str(data) if data is not None else config.path
            if not val_fraction:
                return None
            splits = folder_splits(config.path, val_fraction, seed)
        else:
            raise UserError(f"data is a {type(data).__name__}; pass a converted dataset folder or a dict "
                            "{'train': ..., 'test': ...} of (images, labels) or torchvision-style datasets")
        if config.val_split and config.val_split not in splits:
            raise UserError(f"the recipe validates on split '{config.val_split}' and the data has none; pass "
                            "val_fraction=0.1 (or a 'val' entry in data)")
        config.path, config.loader = str(MEMORY), "tensor"
        config.val_split = "val" if "val" in splits else ""
        return splits

    def fit(self, show_plots: bool = True, resume: bool = False) -> FitResult:
        """Train the recipe to the end (the CLI's `train`); in a notebook, show the plots (`show_plots`).
        `resume`: continue the run in `run_dir` from its newest good checkpoint (`--resume auto`), callbacks'
        states included; a run that has finished is only loaded."""
        if resume and self.run_dir is None:
            raise UserError("fit(resume=True) continues the run in run_dir: pass Trainer(..., run_dir=...)")
        options = RunOptions(run_dir=str(self.run_dir or fresh_run_dir(self.recipe.name)),
                             resume="auto" if resume else None, cpu=self.device.type == "cpu", model=self.module,
                             splits=self.splits, metrics=self.metrics, callbacks=self.callbacks)
        with isolated_state():
            train(self.recipe, options)
        self._load(Path(options.run_dir))
        if show_plots and in_notebook():
            self.result.show()
        return self.result

    def _load(self, run_dir: Path) -> None:
        self.info = json.loads((run_dir / "model.json").read_text())
        self.model = exported_model(run_dir, self.info, self.module, self.device, self.recipe.channels_last)
        self.result = finished_result(run_dir)

    def _trained(self) -> nn.Module:
        if self.model is None:
            raise UserError("no trained model yet: call fit() first, or load a finished run with load_run(run_dir)")
        return self.model

    @property
    def classes(self) -> list[str]:
        return list(self.info.get("classes", []))

    def evaluate(self, split: str = "test") -> dict[str, float]:
        """Loss, accuracy, count and the extra metrics of the exported model on a split (the loop's evaluate)."""
        model = self._trained()
        if self.splits is not None and split not in self.splits:
            raise UserError(f"no '{split}' split: the data has {', '.join(self.splits)}")
        if self.splits is None and self.recipe.data.path == str(MEMORY):
            raise UserError("this run trained on in-memory data, which is not saved with it; pass it again: "
                            "load_run(run_dir, data={'train': ..., 'test': ...})")
        with isolated_state():
            accelerator = Accelerator(mixed_precision=self.recipe.precision, cpu=self.device.type == "cpu")
            loader = split_loader(self.recipe, accelerator, split, train=False, memory=self.splits)
            metrics, _, _ = evaluate(model, loader, self.recipe, accelerator, extra=self.metrics)
        return metrics

    @torch.no_grad()
    def predict(self, images: Any) -> Prediction:
        """Class indices and softmax probabilities for images in any form `data` takes (uint8 NHWC, float NCHW
        in [0, 1]), normalized as in training."""
        model = self._trained()
        pixels = as_images(images, "predict()")
        if list(pixels.shape[1:]) != list(self.info["image_shape"]):
            raise UserError(f"predict() got images of shape {list(pixels.shape[1:])} (H, W, C) but the model takes "
                            f"{self.info['image_shape']}; resize them first")
        stats = self.info if "mean" in self.info else load_manifest(self.recipe.data.path)  # older model.json
        transform = EvalTransform(mean=stats["mean"], std=stats["std"], channels_last=self.recipe.channels_last)
        model.eval()
        chunks = []
        with isolated_state():  # the recipe's autocast, as evaluate() and training run it
            accelerator = Accelerator(mixed_precision=self.recipe.precision, cpu=self.device.type == "cpu")
            with accelerator.autocast():
                for start in range(0, len(pixels), self.recipe.data.eval_batch_size):
                    batch = torch.from_numpy(pixels[start:start + self.recipe.data.eval_batch_size]).to(self.device)
                    x, _ = transform(batch.permute(0, 3, 1, 2), None)
                    logits = model(x)
                    if self.recipe.tta_flip:
                        logits = (logits + model(x.flip(3))) / 2
                    chunks.append(logits.float().softmax(1).cpu())
        probabilities = torch.cat(chunks)
        return Prediction(probabilities.argmax(1), probabilities)


def load_run(run_dir: str | Path, model: nn.Module | None = None, data: Any = None,
             metrics: dict[str, Metric] | None = None, device: str | None = None, *,
             val_fraction: float = 0.0) -> Trainer:
    """A finished run (of fit() or train.py) ready to predict; to evaluate an in-memory run, pass its data.
    A run of a model built in Python needs an instance of it (`model`): model.json cannot rebuild it."""
    run_dir = Path(run_dir)
    missing = [n for n in ("config.toml", "model.json", "model.safetensors", "summary.json")
               if not (run_dir / n).is_file()]
    if missing:
        raise UserError(f"{run_dir} is not a finished run ({', '.join(missing)} missing); pass the folder of a "
                        "finished fit() or train.py run")
    trainer = Trainer(run_dir / "config.toml", model=model, data=data, metrics=metrics, run_dir=run_dir,
                      device=device, val_fraction=val_fraction)
    trainer._load(run_dir)
    return trainer


__all__ = ["FitResult", "Prediction", "Trainer", "load_run"]
