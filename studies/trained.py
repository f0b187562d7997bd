"""A finished run's model and a few of its dataset's images, for the probe studies."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from beton_trainer.common.errors import UserError
from beton_trainer.format.dataset import open_split
from beton_trainer.pipelines.augment import EvalTransform
from beton_trainer.trainer.modelio import make_model

__all__ = ["check_run", "first_conv", "load_model", "run_data_path", "sample_images", "untrained_model"]


def check_run(folder: Path) -> Path:
    """A finished run folder (model.json, model.safetensors, summary.json), else a UserError."""
    missing = [n for n in ("model.json", "model.safetensors", "summary.json") if not (folder / n).is_file()]
    if missing:
        raise UserError(f"{folder} is not a finished training run ({', '.join(missing)} missing); pass --run "
                        "the folder of a finished `python train.py` run, or leave out --run to train one")
    return folder


def load_model(folder: Path, device: torch.device) -> tuple[nn.Module, dict]:
    """The exported model of a run, in eval mode, and its model.json info."""
    info = json.loads((folder / "model.json").read_text())
    model = make_model(info)
    model.load_state_dict(load_file(folder / "model.safetensors"))
    return model.to(device).eval(), info


def untrained_model(info: dict, device: torch.device, seed: int = 0) -> nn.Module:
    """A fresh initialization of the same architecture (the "before training" reference)."""
    torch.manual_seed(seed)
    return make_model(info).to(device).eval()


def run_data_path(folder: Path) -> Path:
    """The dataset a run trained on, from its resolved recipe."""
    return Path(tomllib.loads((folder / "config.toml").read_text())["data"]["path"])


def sample_images(data_dir: Path, split: str, n: int, device: torch.device
                  ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """The first n images of a split: as stored (uint8 NHWC), normalized (float NCHW on device), labels."""
    data = open_split(data_dir, split)
    raw = data.images[:n]
    labels = torch.from_numpy(data.labels[:n]).to(device)
    pixels = torch.from_numpy(np.ascontiguousarray(raw)).to(device).permute(0, 3, 1, 2)
    images, _ = EvalTransform(mean=data.mean, std=data.std, channels_last=False)(pixels, labels)
    return raw, images, labels


def first_conv(model: nn.Module) -> nn.Conv2d:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise UserError(f"{type(model).__name__} has no convolution layer; probe a CNN run "
                        "(e.g. one trained with the c10_cnn or c100_scratch recipe)")
    return conv
