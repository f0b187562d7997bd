"""What the first convolution of a trained model does to real images: its filters and feature maps
(seed 003, ex. 5), and how stride and padding change the output (ex. 6)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from beton_trainer.studies.report import Section

__all__ = ["conv_output_size", "filters_probe", "stride_padding_probe"]

MAX_FILTERS = 64  # filters shown in the grid and the table
MAPS_SHOWN = 8  # feature maps per sample image
STRIDES = (1, 2, 3)
PADDINGS = (0, 1, 2)


def conv_output_size(n: int, kernel: int, stride: int, padding: int) -> int:
    """floor((n + 2p - k) / s) + 1: the side of a convolution's output."""
    return (n + 2 * padding - kernel) // stride + 1


def _show_image(ax, image: np.ndarray, title: str = "") -> None:
    """uint8 or [0, 1] float (H, W, C) image; one channel is drawn in gray."""
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray")
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Scaled to [0, 1] (a constant tensor becomes 0.5)."""
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.full_like(x, 0.5)


def filter_grid(weight: torch.Tensor) -> Figure:
    """Each filter (out, in, k, k) scaled to [0, 1]: RGB when it reads 3 channels, else its mean in gray."""
    filters = weight[:MAX_FILTERS].detach().cpu().float()
    cols = min(8, len(filters))
    rows = -(-len(filters) // cols)
    fig = Figure(figsize=(1.3 * cols, 1.4 * rows + 0.5), layout="constrained")
    for i, ax in enumerate(fig.subplots(rows, cols, squeeze=False).flat):
        if i >= len(filters):
            ax.axis("off")
            continue
        f = filters[i] if filters.shape[1] == 3 else filters[i].mean(0, keepdim=True)
        _show_image(ax, _unit(f).permute(1, 2, 0).numpy(), f"#{i}")
    out, inp, kh, kw = weight.shape
    fig.suptitle(f"First-layer filters ({out} of {inp}x{kh}x{kw})")
    return fig


def filters_probe(conv: nn.Conv2d, raw: np.ndarray, images: torch.Tensor
                  ) -> tuple[list[Section], dict[str, Figure]]:
    """The filters, their responses to the sample images (per-filter statistics) and the feature maps."""
    with torch.no_grad():
        maps = conv(images).cpu()
    weight = conv.weight.detach().cpu()
    rows = [{"Filter": i, "Weight Norm": weight[i].norm().item(),
             "Mean Abs Response": maps[:, i].abs().mean().item(),
             "Active Fraction": (maps[:, i] > 0).float().mean().item()}
            for i in range(min(len(weight), MAX_FILTERS))]
    shown = min(MAPS_SHOWN, maps.shape[1])
    fig = Figure(figsize=(1.5 * (shown + 1), 1.6 * len(raw) + 0.5), layout="constrained")
    axes = fig.subplots(len(raw), shown + 1, squeeze=False)
    for r, image in enumerate(raw):
        _show_image(axes[r][0], image, "input")
        for c in range(shown):
            axes[r][c + 1].imshow(maps[r, c].numpy(), cmap="viridis")
            axes[r][c + 1].set_title(f"filter #{c}", fontsize=8)
            axes[r][c + 1].axis("off")
    fig.suptitle("Sample images through the first-layer filters (raw responses)")
    section = Section("First-layer filters", list(rows[0]), rows)
    return [section], {"filters.png": filter_grid(weight), "feature_maps.png": fig}


def stride_padding_probe(conv: nn.Conv2d, raw: np.ndarray, images: torch.Tensor
                         ) -> tuple[list[Section], dict[str, Figure]]:
    """The trained filters applied with each stride x padding: measured output shape vs the formula, maps."""
    kernel = conv.kernel_size[0]
    h, w = images.shape[2:]
    rows, maps = [], {}
    for stride in STRIDES:
        for padding in PADDINGS:
            with torch.no_grad():
                out = F.conv2d(images[:1], conv.weight, conv.bias, stride=stride, padding=padding)
            formula = tuple(conv_output_size(n, kernel, stride, padding) for n in (h, w))
            measured = tuple(out.shape[2:])
            maps[stride, padding] = out[0, 0].cpu()
            rows.append({"Stride": stride, "Padding": padding, "Kernel": kernel, "Input": f"{h}x{w}",
                         "Output": f"{measured[0]}x{measured[1]}", "Formula": f"{formula[0]}x{formula[1]}",
                         "Match": "yes" if measured == formula else "NO"})
    fig = Figure(figsize=(12, 9), layout="constrained")
    axes = fig.subplots(len(STRIDES), len(PADDINGS) + 1)
    side = max(max(m.shape) for m in maps.values())
    for r, stride in enumerate(STRIDES):
        if r == 0:
            _show_image(axes[r][0], raw[0], f"input {h}x{w}")
        else:
            axes[r][0].axis("off")
        for c, padding in enumerate(PADDINGS):
            ax, m = axes[r][c + 1], maps[stride, padding].numpy()
            # the same pixel scale in every panel, so the smaller outputs look smaller
            ax.imshow(m, cmap="viridis", extent=(0, m.shape[1], m.shape[0], 0))
            ax.set_xlim(0, side)
            ax.set_ylim(side, 0)
            ax.set_title(f"stride {stride}, padding {padding}: {m.shape[0]}x{m.shape[1]}", fontsize=9)
    fig.suptitle(f"Filter #0 of the first layer ({kernel}x{kernel}) with each stride and padding")
    columns = ["Stride", "Padding", "Kernel", "Input", "Output", "Formula", "Match"]
    section = Section("Output shapes: measured vs floor((n + 2p - k) / s) + 1", columns, rows)
    return [section], {"stride_padding.png": fig}
