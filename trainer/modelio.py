"""The model a run trains and exports: `model.json` (what rebuilds it) beside `model.safetensors`."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from common.files import atomic_path
from models import build_model
from trainer.config import Recipe


def model_info(recipe: Recipe, manifest: dict) -> dict:
    """What it takes to rebuild the model without the recipe (written as model.json beside the weights)."""
    return {"name": recipe.model.name, "args": recipe.model.args, "num_classes": len(manifest["classes"]),
            "image_shape": manifest["image_shape"], "classes": manifest["classes"]}


def make_model(info: dict, pretrained: bool | str = False) -> nn.Module:
    """The model a `model_info` dict describes (fresh weights, or pretrained ones)."""
    kwargs = dict(info["args"])
    if pretrained:
        kwargs["pretrained"] = pretrained
    return build_model(info["name"], num_classes=info["num_classes"], image_shape=tuple(info["image_shape"]),
                       **kwargs)


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict safetensors can write (contiguous tensors: channels-last weights are not)."""
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def save_weights(model: nn.Module, path: Path) -> None:
    """Weights written to a temporary file and renamed into place: a reader never sees half a file."""
    with atomic_path(path) as tmp:
        save_file(plain_state(model), str(tmp))
