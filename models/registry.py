"""Models by name, so a recipe's `[model]` table (name + kwargs) is all it takes to pick one.

Each model registers a builder with `@register(name, options=SomeDataclass, head="fc")`. The options
dataclass is the model's kwargs: `from_dict` checks keys and types, its `__post_init__` checks
ranges, so a typo in a recipe is a one-line UserError instead of a TypeError deep in a constructor.
A family of models named by a prefix (`timm:<name>`, see models/timm_models.py) registers a builder and a
head-name function with `register_family`. The registry imports none of the modules that register into it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from torch import nn

from beton_trainer.common.errors import UserError, did_you_mean
from beton_trainer.common.schema import from_dict

__all__ = ["ImageShape", "build_model", "count_parameters", "head_module_name", "list_models", "model_summary",
           "register", "register_family", "require_min_side"]

ImageShape = tuple[int, int, int]  # (H, W, C), as in the data manifest
Builder = Callable[..., nn.Module]  # builder(num_classes, image_shape, options) -> nn.Module


@dataclass(frozen=True)
class _Entry:
    build: Builder
    options: type
    head: str


@dataclass(frozen=True)
class _Family:
    build: Callable[[str, int, ImageShape, dict[str, Any]], nn.Module]  # (name after the prefix, classes, shape, args)
    head: Callable[[str], str]  # name after the prefix -> the classifier's module name


_MODELS: dict[str, _Entry] = {}
_FAMILIES: dict[str, _Family] = {}


def register(name: str, *, options: type, head: str) -> Callable[[Builder], Builder]:
    """Decorator adding a builder `fn(num_classes, image_shape, options)` to the registry under `name`."""

    def add(fn: Builder) -> Builder:
        if name in _MODELS:
            raise ValueError(f"model '{name}' is registered twice")
        _MODELS[name] = _Entry(fn, options, head)
        return fn

    return add


def register_family(prefix: str, build: Callable[[str, int, ImageShape, dict[str, Any]], nn.Module],
                    head: Callable[[str], str]) -> None:
    """Models named `<prefix><name>` (e.g. `timm:resnet18`): `build(name, num_classes, image_shape, args)` makes
    one, `head(name)` names its classifier module."""
    if prefix in _FAMILIES:
        raise ValueError(f"model family '{prefix}' is registered twice")
    _FAMILIES[prefix] = _Family(build, head)


def list_models() -> list[str]:
    """The registered model names (families such as `timm:<name>` reach more)."""
    return sorted(_MODELS)


def _family(name: str) -> tuple[_Family, str] | None:
    """The family a prefixed name belongs to, and the name after the prefix."""
    prefix = next((p for p in _FAMILIES if name.startswith(p)), None)
    return (_FAMILIES[prefix], name[len(prefix):]) if prefix else None


def _entry(name: str) -> _Entry:
    if name not in _MODELS:
        families = "".join(f", or {p}<name>" for p in sorted(_FAMILIES))
        raise UserError(f"unknown model '{name}'{did_you_mean(name, _MODELS)}; choose one of "
                        f"{', '.join(list_models())}{families}")
    return _MODELS[name]


def _check_image_shape(image_shape: Any) -> ImageShape:
    if (not isinstance(image_shape, (tuple, list)) or len(image_shape) != 3
            or not all(isinstance(v, int) and v > 0 for v in image_shape)):
        raise UserError(f"image shape must be three positive integers (H, W, C), got {image_shape!r}; "
                        "check the dataset manifest")
    return tuple(image_shape)


def build_model(name: str, *, num_classes: int, image_shape: ImageShape, **kwargs: Any) -> nn.Module:
    """Build model `name` for `num_classes` classes and (H, W, C) images; kwargs are its options."""
    if num_classes < 1:
        raise UserError(f"num_classes must be >= 1, got {num_classes}; check the dataset manifest")
    shape = _check_image_shape(image_shape)
    family = _family(name)
    if family:
        return family[0].build(family[1], num_classes, shape, kwargs)
    entry = _entry(name)
    if "pretrained" in kwargs and "pretrained" not in {f.name for f in fields(entry.options)}:
        raise UserError(f"model '{name}' has no pretrained weights to load; set model.pretrained=false "
                        "(drop --pretrained), or choose a model that has them (resnet18_cifar, resnet34_cifar)")
    return entry.build(num_classes, shape, from_dict(entry.options, kwargs, "model.args"))


def head_module_name(name: str) -> str:
    """Dotted name of model `name`'s classifier head (for `get_submodule`: freezing, its own LR)."""
    family = _family(name)
    return family[0].head(family[1]) if family else _entry(name).head


def require_min_side(image_shape: ImageShape, min_side: int, what: str, fix: str) -> None:
    """Raise UserError at build time when images are too small for `what` (e.g. 4 downsampling stages)."""
    h, w, _ = image_shape
    if min(h, w) < min_side:
        raise UserError(f"{h}x{w} images are too small for {what} (needs at least {min_side}x{min_side}); "
                        f"{fix}")


def count_parameters(model: nn.Module) -> int:
    """Total number of parameter elements."""
    return sum(p.numel() for p in model.parameters())


def model_summary(model: nn.Module) -> str:
    """One line for logs: class name, total and trainable parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{type(model).__name__}: {count_parameters(model):,} parameters ({trainable:,} trainable)"
