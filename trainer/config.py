"""The one recipe schema: dataclasses loaded from `recipes/<name>.toml`, overridden by `--set key=value`.

A recipe is a list of phases (seed 000: a head-only warm-up, then a full fine-tune), each with its
own epochs, trainable modules, optimizer, parameter groups, schedule and early stopping. Everything
else (data, model, augmentation, loss, precision) is shared by all phases.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from beton_trainer import recipes
from beton_trainer.common.errors import UserError, did_you_mean
from beton_trainer.common.schema import check_range, from_dict, to_dict
from beton_trainer.pipelines.augment import AugmentSpec
from beton_trainer.pipelines.base import MIN_RESOLUTION, ResolutionSchedule

__all__ = ["OptimizerConfig", "ParamGroupConfig", "PhaseConfig", "RECIPES_DIR", "Recipe", "ScheduleConfig",
           "apply_override", "load_recipe", "recipe_differences", "recipe_to_toml"]

RECIPES_DIR = Path(recipes.__file__).resolve().parent  # package data: found the same installed or not


@dataclass
class DataConfig:
    path: str = ""  # converted dataset folder (holds manifest.json); --data overrides
    loader: Literal["tensor", "ffcv", "dali", "photo"] = "tensor"  # the backend feeding the device; --loader overrides
    batch_size: int = 128  # training batch per process
    eval_batch_size: int = 512  # evaluation batch per process
    num_workers: int = 2  # photo and ffcv workers, dali threads (the tensor backend has none)
    val_split: str = ""  # "val" to validate on val.beton (convert with --val-fraction); "" = no validation
    # photos of varied sizes (photo, ffcv, dali): decoded to square crops of these sides; fixed-size data ignores them
    resolution: int = 224  # training random-resized-crop side (when there is no ramp)
    eval_resolution: int = 224  # evaluation centre-crop side (crop 224/256 of the shorter side, then resize)
    min_res: int = 0  # progressive resizing: min_res up to start_ramp, max_res from end_ramp on; 0 = off
    max_res: int = 0  # progressive resizing: the side from end_ramp on
    start_ramp: int = 0  # epochs, counted from 0 over all phases
    end_ramp: int = 0  # the epoch from which max_res is used
    # sets larger than memory (docs: Loaders, "Scale"): the ffcv backend's order and os_cache, a cap on free memory
    order: Literal["random", "page_aware", "auto"] = "auto"  # auto: page-aware for a .beton over half the free RAM
    order_block_pages: int = 0  # page-aware order: pages shuffled together; 0 = as many as fill 1 GiB
    os_cache: bool | Literal["auto"] = "auto"  # ffcv: auto = off with the page-aware order, on with the random
    memory_budget_gb: float = 0.0  # at most this much memory counts as free (else $BETON_MEMORY_BUDGET_GB); 0 = none
    # at start-up, each .beton against the page checksums written when it was converted (format.integrity)
    verify: Literal["pages", "full", "off"] = "pages"  # the pages the loader reads, every page, or none (size alone)

    def __post_init__(self) -> None:
        if self.order == "page_aware" and self.loader != "ffcv":
            raise UserError(f"data.order = \"page_aware\" is an order of the ffcv loader, not of '{self.loader}'; "
                            "use --loader ffcv, or data.order = \"auto\"")
        check_range("order_block_pages", self.order_block_pages, 0)
        check_range("memory_budget_gb", self.memory_budget_gb, 0)
        check_range("batch_size", self.batch_size, 1)
        check_range("eval_batch_size", self.eval_batch_size, 1)
        check_range("num_workers", self.num_workers, 0)
        check_range("resolution", self.resolution, MIN_RESOLUTION)
        check_range("eval_resolution", self.eval_resolution, MIN_RESOLUTION)
        if self.min_res or self.max_res:
            check_range("min_res", self.min_res, MIN_RESOLUTION)
            check_range("max_res", self.max_res, self.min_res)
            check_range("start_ramp", self.start_ramp, 0)
            check_range("end_ramp", self.end_ramp, self.start_ramp)

    def memory_options(self) -> dict[str, Any]:
        """The loaders' view of the scale settings (LoaderOptions' order, block_pages, os_cache, memory_budget_gb)."""
        return dict(order=self.order, block_pages=self.order_block_pages, memory_budget_gb=self.memory_budget_gb,
                    os_cache=None if self.os_cache == "auto" else self.os_cache)

    def resolutions(self) -> ResolutionSchedule:
        """The loaders' view of the resolution settings."""
        return ResolutionSchedule(train=self.resolution, eval=self.eval_resolution, min_res=self.min_res,
                                  max_res=self.max_res, start_ramp=self.start_ramp, end_ramp=self.end_ramp)


@dataclass
class ModelConfig:
    name: str = "simple_cnn"  # a registry name (resnet34_cifar, mlp, ...) or "timm:<name>"
    pretrained: bool | str = False  # True: ImageNet weights via torchvision; a string: a state-dict path
    args: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of the model


@dataclass
class DistillConfig:
    teacher: str = ""  # the run folder of a finished teacher run (model.json + model.safetensors); "" = off
    teacher_recipe: str = ""  # when `teacher` holds no finished run yet, train it first with this recipe
    temperature: float = 4.0  # softens teacher and student logits in the KL term
    alpha: float = 0.5  # weight of the soft (KL) term

    def __post_init__(self) -> None:
        check_range("temperature", self.temperature, 0, lo_open=True)
        check_range("alpha", self.alpha, 0, 1)


@dataclass
class LossConfig:
    label_smoothing: float = 0.0  # cross-entropy label smoothing; 0 = off
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        check_range("label_smoothing", self.label_smoothing, 0, 1)


@dataclass
class OptimizerConfig:
    name: Literal["sgd", "adam", "adamw", "rmsprop"] = "sgd"  # the torch.optim optimizer
    lr: float = 0.1  # the base learning rate (onecycle: its peak)
    momentum: float = 0.9  # sgd, rmsprop
    nesterov: bool = False  # sgd: Nesterov momentum
    weight_decay: float = 0.0  # L2 penalty (adamw: decoupled weight decay)
    no_decay_norm_bias: bool = False  # the usual exemption of norm weights and biases from decay
    betas: tuple[float, float] = (0.9, 0.999)  # adam, adamw

    def __post_init__(self) -> None:
        check_range("lr", self.lr, 0, lo_open=True)
        check_range("momentum", self.momentum, 0, 1)
        check_range("weight_decay", self.weight_decay, 0)


@dataclass
class ParamGroupConfig:
    modules: list[str]  # module name prefixes, e.g. ["fc"]
    lr: float  # this group's learning rate (others use the optimizer's lr)

    def __post_init__(self) -> None:
        check_range("lr", self.lr, 0, lo_open=True)


@dataclass
class ScheduleConfig:
    name: Literal["constant", "cosine", "onecycle", "warm_restarts", "step", "triangular"] = "constant"  # LR schedule
    t_max: int = 0  # cosine: epochs of the half period (0 = the phase's epochs)
    eta_min: float = 0.0  # cosine, warm_restarts
    t_0: int = 10  # warm_restarts: epochs of the first cycle
    t_mult: int = 1  # warm_restarts: factor by which each cycle is longer than the last
    step_size: int = 30  # step: epochs between decays
    gamma: float = 0.1  # step: factor applied to the LR at each decay
    pct_start: float = 0.3  # onecycle: fraction of the phase spent rising to lr
    peak_epoch: float = 2.0  # triangular: linear from 1e-4 x lr up to lr at this epoch, then linear down to 0
    warmup_epochs: float = 0.0  # linear warm-up from 0 before the schedule (all but onecycle)

    def __post_init__(self) -> None:
        check_range("t_max", self.t_max, 0)
        check_range("t_0", self.t_0, 1)
        check_range("t_mult", self.t_mult, 1)
        check_range("step_size", self.step_size, 1)
        check_range("pct_start", self.pct_start, 0, 1, lo_open=True)
        check_range("warmup_epochs", self.warmup_epochs, 0)
        check_range("peak_epoch", self.peak_epoch, 0)


@dataclass
class EarlyStoppingConfig:
    metric: str = ""  # e.g. "val_loss", "val_accuracy"; "" = off
    patience: int = 10  # epochs without improvement before the phase stops
    mode: Literal["min", "max"] = "min"  # min for a loss, max for an accuracy

    def __post_init__(self) -> None:
        check_range("patience", self.patience, 1)


@dataclass
class PhaseConfig:
    epochs: int  # required: the phase's length
    name: str = "train"  # shown in logs and metrics.csv
    train_modules: list[str] = field(default_factory=list)  # prefixes of trainable modules; [] = all
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    param_groups: list[ParamGroupConfig] = field(default_factory=list)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)

    def __post_init__(self) -> None:
        check_range("epochs", self.epochs, 1)


@dataclass
class Recipe:
    name: str = "recipe"  # names the default run folder (runs/<name>-<timestamp>) and the summary
    description: str = ""  # one line on what the recipe does (listed in the docs)
    seed: int = 0  # the run's seed: initialisation, sample order, augmentations
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    loss: LossConfig = field(default_factory=LossConfig)
    phases: list[PhaseConfig] = field(default_factory=lambda: [PhaseConfig(epochs=1)])
    precision: Literal["no", "fp16", "bf16"] = "no"  # autocast mixed precision; a launcher's setting replaces it
    channels_last: bool = True  # model and batches in channels-last memory format
    compile: bool = False  # torch.compile the model
    compile_mode: Literal["default", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"] = "default"  # torch.compile's mode
    strict_fp32: bool = False  # true: no TF32 on CUDA (fp32 matmuls and convolutions at full precision)
    grad_clip_norm: float = 0.0  # 0 = off (seed 000: 1.0)
    grad_clip_value: float = 0.0  # 0 = off (seed 003: 0.1)
    ema_decay: float = 0.0  # 0 = off; evaluation then uses the EMA weights
    tta_flip: bool = False  # evaluate on the image and its mirror, averaging logits
    checkpoint_every_steps: int = 0  # also mid-epoch, every N steps; 0 = at epoch ends only
    checkpoint_every_epochs: int = 1  # at every Nth epoch's end (and always where a phase ends); 0 = phase ends only
    max_steps_per_epoch: int = 0  # 0 = whole epoch; smoke recipes cut epochs short
    max_eval_batches: int = 0  # per process, a fixed stratified subset for every evaluation and the test; 0 = all
    tensorboard: bool = True  # write TensorBoard events under tensorboard/ (when installed)
    wandb: bool = False  # used when installed; offline mode without a network

    def __post_init__(self) -> None:
        if not self.phases:
            raise UserError("'phases' is empty: a recipe needs at least one [[phases]] table with 'epochs'")
        check_range("grad_clip_norm", self.grad_clip_norm, 0)
        check_range("grad_clip_value", self.grad_clip_value, 0)
        check_range("ema_decay", self.ema_decay, 0, 1)
        check_range("checkpoint_every_steps", self.checkpoint_every_steps, 0)
        check_range("checkpoint_every_epochs", self.checkpoint_every_epochs, 0)
        check_range("max_steps_per_epoch", self.max_steps_per_epoch, 0)
        check_range("max_eval_batches", self.max_eval_batches, 0)
        if self.grad_clip_norm and self.grad_clip_value:
            raise UserError("both grad_clip_norm and grad_clip_value are set: choose one (set the other to 0)")

    @property
    def total_epochs(self) -> int:
        return sum(p.epochs for p in self.phases)


def list_recipes() -> list[str]:
    """The names of the recipes that ship with the package (`c10_finetune`, ...)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def recipe_path(name_or_path: str) -> Path:
    """`c10_finetune` -> recipes/c10_finetune.toml; a path to a .toml file is used as is."""
    path = Path(name_or_path)
    if path.suffix == ".toml":
        if not path.is_file():
            raise UserError(f"recipe file not found: {path}")
        return path
    path = RECIPES_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        names = list_recipes()
        raise UserError(f"unknown recipe '{name_or_path}'{did_you_mean(name_or_path, names)}; "
                        f"see recipes/ for the list ({len(names)} recipes)")
    return path


def parse_value(text: str) -> Any:
    """A `--set` value: TOML/Python literals (1, 0.1, true, [1, 2], "x"), else the raw string."""
    lowered = text.strip()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return tomllib.loads(f"v = {lowered}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        return ast.literal_eval(lowered)
    except (ValueError, SyntaxError):
        return text


def _leaf_paths(cls: type, prefix: str = "") -> list[str]:
    """Dotted paths of every setting of a dataclass (not inside lists), for --set suffix matching."""
    paths = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        paths.append(path)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            paths += _leaf_paths(type(default), f"{path}.")
    return paths


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `key=value` to the raw recipe dict (dotted keys; `phases.1.epochs` indexes lists).

    A key that is not a full path but the unique last part of one (`pretrained`) is resolved to it.
    """
    if "=" not in assignment:
        raise UserError(f"bad --set '{assignment}': write key=value, e.g. --set data.batch_size=256")
    key, value = assignment.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"bad --set '{assignment}': the key is empty")
    parts = key.split(".")
    if parts[0] not in {f.name for f in dataclasses.fields(Recipe)}:
        matches = [p for p in _leaf_paths(Recipe) if p.endswith("." + key)]
        if not matches and parts[0] in {f.name for f in dataclasses.fields(PhaseConfig)}:
            raise UserError(f"--set {key}: '{parts[0]}' belongs to each phase; write phases.0.{key} "
                            "(phases are numbered from 0)")
        if len(matches) == 1:
            parts = matches[0].split(".")
        elif len(matches) > 1:
            raise UserError(f"--set key '{key}' is ambiguous: write one of {', '.join(matches)}")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(f"--set {key}: '{'.'.join(parts[:i])}' has {len(node)} items; "
                                f"index with 0..{len(node) - 1}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise UserError(f"--set {key}: '{part}' is a value, not a table")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise UserError(f"--set {key}: index out of range (0..{len(node) - 1})")
        node[int(last)] = parse_value(value)
    else:
        node[last] = parse_value(value)


def _read_raw(name_or_path: str, seen: tuple[str, ...] = ()) -> dict:
    """A recipe file as a dict. `extends = "base"` + `set = ["key=value", ...]` derives one recipe from
    another (the smoke twins), so a variant states only what differs."""
    path = recipe_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"recipe {path} is not valid TOML ({exc}); fix the file") from None
    if "extends" not in data:
        if "set" in data:
            raise UserError(f"recipe {path} has 'set' without 'extends'; name the recipe it modifies")
        return data
    if data["extends"] in seen:
        raise UserError(f"recipe {path} extends itself through {' -> '.join(seen)}")
    extra = set(data) - {"extends", "set", "name", "description"}
    if extra:
        raise UserError(f"recipe {path} extends '{data['extends']}' and may only hold extends, set, name and "
                        f"description; move {', '.join(sorted(extra))} into 'set'")
    base = _read_raw(data["extends"], (*seen, data["extends"]))
    for assignment in data.get("set", []):
        apply_override(base, assignment)
    base.update({k: data[k] for k in ("name", "description") if k in data})
    return base


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe. Any mistake is a one-line UserError."""
    data = _read_raw(name_or_path)
    data.setdefault("name", recipe_path(name_or_path).stem)
    for assignment in overrides:
        apply_override(data, assignment)
    return from_dict(Recipe, data)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        return {k: v for i, value in enumerate(data) for k, v in _flatten(value, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): data}


def recipe_differences(a: Recipe, b: Recipe) -> list[str]:
    """Dotted keys whose values differ between two recipes (e.g. a run's config.toml and a resume's)."""
    flat_a, flat_b = _flatten(to_dict(a)), _flatten(to_dict(b))
    return sorted(k for k in flat_a.keys() | flat_b.keys() if flat_a.get(k) != flat_b.get(k))


def recipe_to_toml(recipe: Recipe) -> str:
    """The resolved recipe as TOML text (written into the run folder, reloadable with --recipe)."""
    return dump_toml(to_dict(recipe))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def dump_toml(data: dict, prefix: str = "") -> str:
    """Minimal TOML writer for recipe dicts (tables, arrays of tables, scalars, lists)."""
    scalars, tables, table_lists = [], [], []
    for key, value in data.items():
        if isinstance(value, dict) and value and key != "args":
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            table_lists.append((key, value))
        elif value is not None:
            scalars.append(f"{key} = {_toml_value(value)}")
    out = "\n".join(scalars) + ("\n" if scalars else "")
    for key, value in tables:
        out += f"\n[{prefix}{key}]\n" + dump_toml(value, f"{prefix}{key}.")
    for key, items in table_lists:
        for item in items:
            out += f"\n[[{prefix}{key}]]\n" + dump_toml(item, f"{prefix}{key}.")
    return out
