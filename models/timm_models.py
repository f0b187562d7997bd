"""`timm:<name>`: any timm architecture, built from scratch for this dataset's classes and image size.

Extra `[model]` kwargs go straight to `timm.create_model` (e.g. `patch_size = 4` for a ViT on 32x32).
`img_size` is passed for models that take it (ViTs and friends), so position embeddings fit H x W.
Pretrained timm weights are not supported here (they need the Hugging Face hub); use resnet*_cifar
with `pretrained` for ImageNet initialisation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from beton_trainer.common.errors import UserError, did_you_mean
from beton_trainer.models.registry import ImageShape, register_family

__all__: list[str] = []

PREFIX = "timm:"


def _check_name(name: str) -> None:
    import timm  # here, not at import: timm costs about a second, and only a timm model needs it

    if not timm.is_model(name):
        raise UserError(f"unknown timm model '{name}'{did_you_mean(name, timm.list_models())}; "
                        "see timm.list_models() for the names")


def build_timm(name: str, num_classes: int, image_shape: ImageShape, kwargs: dict[str, Any]) -> nn.Module:
    """timm.create_model(name) for `num_classes` and (H, W, C) images, with `kwargs` passed through."""
    _check_name(name)
    if "pretrained" in kwargs:
        raise UserError(f"model.pretrained is not supported for timm:{name} (timm weights need the Hugging "
                        "Face hub); remove it, or use resnet18_cifar/resnet34_cifar with pretrained")
    import timm

    h, w, c = image_shape
    args = {"num_classes": num_classes, "in_chans": c, **kwargs}
    try:
        try:
            model = timm.create_model(name, pretrained=False, img_size=(h, w), **args)
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise
            model = timm.create_model(name, pretrained=False, **args)  # a model without img_size (CNNs)
        _probe(model, image_shape)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise UserError(f"timm could not build '{name}' for {h}x{w}x{c} images with options {kwargs}: {exc}; "
                        "fix the [model] options or pick another model") from None
    return model


def _probe(model: nn.Module, image_shape: ImageShape) -> None:
    """One forward pass on a blank image, so an image too small for the model fails at build time."""
    h, w, c = image_shape
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, c, h, w))
    model.train()


def timm_head_name(name: str) -> str:
    """The classifier's module name from timm's config for `name` ('fc', 'head', 'head.fc', ...)."""
    from timm.models import get_pretrained_cfg

    _check_name(name)
    cfg = get_pretrained_cfg(name)
    if cfg is None or not cfg.classifier:
        raise UserError(f"timm does not name the classifier of '{name}'; pick another model to freeze/"
                        "re-weight its head")
    return cfg.classifier


register_family(PREFIX, build_timm, timm_head_name)
