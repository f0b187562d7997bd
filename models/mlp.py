"""Fully connected baselines on flattened pixels: `mlp` and `residual_mlp`.

Both take (B, C, H, W) input and flatten it (logical order, so channels_last input works too).
`residual_mlp` is an input projection, `depth` pre-norm residual blocks
(x + Linear(Dropout(Act(Linear(LayerNorm(x)))))) and a final LayerNorm, so it stays trainable
at depths where the plain MLP stops learning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from beton_trainer.common.schema import check_range
from beton_trainer.models.registry import ImageShape, register

__all__: list[str] = []

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


@dataclass
class MLPOptions:
    hidden_size: int = 512
    depth: int = 2  # hidden layers (mlp) or residual blocks (residual_mlp); 0 gives a linear model
    activation: Literal["relu", "gelu", "tanh"] = "relu"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_range("hidden_size", self.hidden_size, 1)
        check_range("depth", self.depth, 0)
        check_range("dropout", self.dropout, 0, 1)


@register("mlp", options=MLPOptions, head="head")
class MLP(nn.Module):
    """Flatten -> `depth` x (Linear, activation, dropout) -> head."""

    def __init__(self, num_classes: int, image_shape: ImageShape, opts: MLPOptions) -> None:
        super().__init__()
        h, w, c = image_shape
        layers: list[nn.Module] = [nn.Flatten()]
        width = h * w * c
        for _ in range(opts.depth):
            layers += [nn.Linear(width, opts.hidden_size), ACTIVATIONS[opts.activation](), nn.Dropout(opts.dropout)]
            width = opts.hidden_size
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class ResidualBlock(nn.Module):
    """x + Linear(Dropout(Act(Linear(LayerNorm(x)))))."""

    def __init__(self, size: int, activation: str, dropout: float) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.LayerNorm(size),
            nn.Linear(size, size),
            ACTIVATIONS[activation](),
            nn.Dropout(dropout),
            nn.Linear(size, size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


@register("residual_mlp", options=MLPOptions, head="head")
class ResidualMLP(nn.Module):
    """Flatten -> Linear projection -> `depth` residual blocks -> LayerNorm -> head."""

    def __init__(self, num_classes: int, image_shape: ImageShape, opts: MLPOptions) -> None:
        super().__init__()
        h, w, c = image_shape
        blocks = [ResidualBlock(opts.hidden_size, opts.activation, opts.dropout) for _ in range(opts.depth)]
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(h * w * c, opts.hidden_size),
            *blocks,
            nn.LayerNorm(opts.hidden_size),
        )
        self.head = nn.Linear(opts.hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

