"""The model a run trains and exports: `model.json` (what rebuilds it) beside `model.safetensors`."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from beton_trainer.common.files import atomic_path
from beton_trainer.models import PretrainedReport, build_model
from beton_trainer.pipelines.base import CENTER_CROP_RATIO, model_image_shape, varied_sizes
from beton_trainer.trainer.config import Recipe

__all__ = ["make_model", "model_info", "save_weights"]


def model_info(recipe: Recipe, manifest: dict) -> dict:
    """What it takes to rebuild the model and to feed it, without the recipe or the dataset (model.json).

    An image file becomes the model's input as the evaluation loaders make it: decoded to `channels` (RGB,
    or L for grey); for photos of varied sizes, a centred square crop of `center_crop_fraction` of the
    shorter side; resized to `input_size` (H, W; fixed-size data is used as stored); scaled by `scale` to
    [0, 1]; minus `mean`, divided by `std` per channel (the training split's); laid out as `layout`.
    """
    shape = list(model_image_shape(manifest, recipe.data.resolutions()))
    return {"name": recipe.model.name, "args": recipe.model.args, "num_classes": len(manifest["classes"]),
            "image_shape": shape, "classes": manifest["classes"],
            "channels": "RGB" if shape[2] == 3 else "L", "input_size": shape[:2],
            "center_crop_fraction": CENTER_CROP_RATIO if varied_sizes(manifest) else None, "scale": 1 / 255,
            "mean": list(manifest["mean"]), "std": list(manifest["std"]), "layout": "NCHW"}


class _Reports(logging.Handler):
    """Collects the PretrainedReport a model builder logs."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[PretrainedReport] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.found += [a for a in record.args or () if isinstance(a, PretrainedReport)]


def make_model(info: dict, pretrained: bool | str = False) -> nn.Module:
    """The model a `model_info` dict describes (fresh weights, or pretrained ones). With pretrained weights,
    what the builder loaded and skipped is kept as the model's `pretrained_report` (when its log is on)."""
    kwargs = dict(info["args"])
    if pretrained:
        kwargs["pretrained"] = pretrained
    reports = _Reports()
    logging.getLogger("beton_trainer.models").addHandler(reports)
    try:
        model = build_model(info["name"], num_classes=info["num_classes"], image_shape=tuple(info["image_shape"]),
                            **kwargs)
    finally:
        logging.getLogger("beton_trainer.models").removeHandler(reports)
    if reports.found:
        model.pretrained_report = reports.found[-1]
    return model


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict safetensors can write (contiguous tensors: channels-last weights are not)."""
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def save_weights(model: nn.Module, path: Path) -> None:
    """Weights written to a temporary file and renamed into place: a reader never sees half a file."""
    with atomic_path(path) as tmp:
        save_file(plain_state(model), str(tmp))
