"""Small convolutional nets for CIFAR/MNIST-sized images: `simple_cnn` and `residual_cnn`.

Both are `stages` stages of 3x3 convolutions whose width starts at `width` and doubles per stage,
with the resolution halved between stages, then global average pooling and a linear `head`.
`simple_cnn` stacks `blocks_per_stage` Conv-BN-ReLU layers per stage and downsamples by pooling;
`residual_cnn` is a stem conv plus `blocks_per_stage` torchvision `BasicBlock`s per stage (the
first block of a stage strides by 2, with a 1x1 conv + BN shortcut where the shape changes).

The defaults are the lab seed's distillation pair on CIFAR-10 (32x32x3, 10 classes):
  teacher  residual_cnn  stages=3, width=28, blocks_per_stage=2  -> 533,830 parameters (~500K)
  student  simple_cnn    stages=3, width=24, blocks_per_stage=1  ->  53,794 parameters (~50K)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from beton_trainer.common.schema import check_range
from beton_trainer.models.registry import ImageShape, register, require_min_side

__all__: list[str] = []


@dataclass
class CNNOptions:
    """Options both nets share; the defaults are the teacher's."""

    stages: int = 3
    width: int = 28  # channels of the first stage, doubled per stage
    blocks_per_stage: int = 2
    batch_norm: bool = True
    dropout: float = 0.0  # before the head

    def __post_init__(self) -> None:
        check_range("stages", self.stages, 1)
        check_range("width", self.width, 1)
        check_range("blocks_per_stage", self.blocks_per_stage, 1)
        check_range("dropout", self.dropout, 0, 1)


@dataclass
class SimpleCNNOptions(CNNOptions):
    width: int = 24
    blocks_per_stage: int = 1
    pooling: Literal["max", "avg"] = "max"  # how the resolution is halved between stages


def _check_size(image_shape: ImageShape, stages: int) -> None:
    """Each of the stages-1 halvings must leave at least 2x2 pixels."""
    require_min_side(image_shape, 2**stages, f"{stages} stages", "set model.args.stages lower")


def _norm(batch_norm: bool) -> type[nn.Module]:
    return nn.BatchNorm2d if batch_norm else nn.Identity


class _PooledHead(nn.Module):
    """Shared tail: features -> global average pool -> dropout -> linear `head`."""

    def __init__(self, features: nn.Module, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.features = features
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout))
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


@register("simple_cnn", options=SimpleCNNOptions, head="head")
class SimpleCNN(_PooledHead):
    """Stages of Conv-BN-ReLU with pooling between them."""

    def __init__(self, num_classes: int, image_shape: ImageShape, opts: SimpleCNNOptions) -> None:
        _check_size(image_shape, opts.stages)
        norm = _norm(opts.batch_norm)
        pool = nn.MaxPool2d if opts.pooling == "max" else nn.AvgPool2d
        layers: list[nn.Module] = []
        channels = image_shape[2]
        for stage in range(opts.stages):
            if stage > 0:
                layers.append(pool(2))
            out = opts.width * 2**stage
            for _ in range(opts.blocks_per_stage):
                layers += [nn.Conv2d(channels, out, 3, padding=1, bias=not opts.batch_norm),
                           norm(out), nn.ReLU(inplace=True)]
                channels = out
        super().__init__(nn.Sequential(*layers), channels, num_classes, opts.dropout)


@register("residual_cnn", options=CNNOptions, head="head")
class ResidualCNN(_PooledHead):
    """Stem conv, then stages of torchvision BasicBlocks (stride 2 at the start of each later stage)."""

    def __init__(self, num_classes: int, image_shape: ImageShape, opts: CNNOptions) -> None:
        _check_size(image_shape, opts.stages)
        norm = _norm(opts.batch_norm)
        channels = opts.width
        layers: list[nn.Module] = [nn.Conv2d(image_shape[2], channels, 3, padding=1, bias=not opts.batch_norm),
                                   norm(channels), nn.ReLU(inplace=True)]
        for stage in range(opts.stages):
            out = opts.width * 2**stage
            for block in range(opts.blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                shortcut = None
                if stride != 1 or channels != out:
                    shortcut = nn.Sequential(nn.Conv2d(channels, out, 1, stride, bias=False), norm(out))
                layers.append(BasicBlock(channels, out, stride, shortcut, norm_layer=norm))
                channels = out
        super().__init__(nn.Sequential(*layers), channels, num_classes, opts.dropout)
