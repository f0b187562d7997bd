"""Loss landscape slices (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets"): the loss of
theta + a*d1 (+ b*d2) on a fixed batch, with random directions normalized per filter so that each filter
of d has the norm of the matching filter of theta. Biases and norm-layer parameters (1-D tensors) are not
perturbed, as in the paper. Compared before (a fresh init) and after training (seed 003, ex. 4)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from beton_trainer.studies.report import Section

__all__ = ["filter_normalized_direction", "landscape_probe", "loss_surface"]

EVAL_BATCH = 256


def filter_normalized_direction(model: nn.Module, generator: torch.Generator) -> list[torch.Tensor]:
    """A Gaussian direction shaped like the parameters, each filter (slice along dim 0) rescaled to the
    norm of the same filter of the weights; zero for 1-D parameters."""
    direction = []
    for p in model.parameters():
        if p.dim() <= 1:
            direction.append(torch.zeros_like(p))
            continue
        d = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        w_norm = p.detach().flatten(1).norm(dim=1)
        d_norm = d.flatten(1).norm(dim=1)
        direction.append(d * (w_norm / (d_norm + 1e-10)).view(-1, *([1] * (p.dim() - 1))))
    return direction


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of the model (eval mode) on the batch."""
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(images), EVAL_BATCH):
        logits = model(images[start:start + EVAL_BATCH]).float()
        target = labels[start:start + EVAL_BATCH]
        loss += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    return loss / len(images), correct / len(images)


@torch.no_grad()
def loss_surface(model: nn.Module, directions: list[list[torch.Tensor]], coords: list[tuple[float, ...]],
                 images: torch.Tensor, labels: torch.Tensor) -> list[tuple[float, float]]:
    """(loss, accuracy) at theta + sum_i c_i d_i for each coordinate tuple c; the weights are restored."""
    params = list(model.parameters())
    origin = [p.detach().clone() for p in params]
    out = []
    try:
        for c in coords:
            for i, p in enumerate(params):
                p.copy_(origin[i] + sum(ci * d[i] for ci, d in zip(c, directions)))
            out.append(evaluate(model, images, labels))
    finally:
        for p, o in zip(params, origin):
            p.copy_(o)
    return out


def landscape_probe(models: dict[str, nn.Module], images: torch.Tensor, labels: torch.Tensor, *,
                    points_1d: int, points_2d: int, seed: int = 0) -> tuple[list[Section], dict[str, Figure]]:
    """1-D and 2-D slices over [-1, 1] around each model (e.g. trained, untrained), same seed for both."""
    alphas = np.linspace(-1, 1, points_1d).tolist()
    grid = np.linspace(-1, 1, points_2d).tolist()
    summary, slices, surfaces = [], {}, {}
    for name, model in models.items():
        gen = torch.Generator().manual_seed(seed)
        d1, d2 = filter_normalized_direction(model, gen), filter_normalized_direction(model, gen)
        line = loss_surface(model, [d1], [(a,) for a in alphas], images, labels)
        plane = loss_surface(model, [d1, d2], [(a, b) for b in grid for a in grid], images, labels)
        center_loss, center_acc = evaluate(model, images, labels)
        losses = [loss for loss, _ in line]
        summary.append({"Model": name, "Center Loss": center_loss, "Center Acc": center_acc,
                        "1-D Min Loss": min(losses), "1-D Max Loss": max(losses),
                        "Loss at a=-1": losses[0], "Loss at a=+1": losses[-1],
                        "2-D Min Loss": min(loss for loss, _ in plane),
                        "2-D Max Loss": max(loss for loss, _ in plane)})
        slices[name] = line
        surfaces[name] = np.array([loss for loss, _ in plane]).reshape(points_2d, points_2d)
    columns = list(summary[0])
    names = list(models)
    slice_rows = [{"Alpha": a, **{f"{n} Loss": slices[n][i][0] for n in names},
                   **{f"{n} Acc": slices[n][i][1] for n in names}} for i, a in enumerate(alphas)]
    sections = [Section(f"Loss landscape on {len(images)} fixed training images", columns, summary),
                Section("1-D slice: loss at theta + a * d", list(slice_rows[0]), slice_rows)]
    figures = {"landscape_1d.png": _slice_figure(alphas, slices),
               "landscape_2d.png": _surface_figure(grid, surfaces)}
    return sections, figures


def _slice_figure(alphas: list[float], slices: dict[str, list[tuple[float, float]]]) -> Figure:
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for name, line in slices.items():
        loss_ax.plot(alphas, [loss for loss, _ in line], marker="o", markersize=3, label=name)
        acc_ax.plot(alphas, [acc for _, acc in line], marker="o", markersize=3, label=name)
    loss_ax.set_yscale("log")
    for ax, what in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.set_xlabel("a (filter-normalized direction d)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("1-D loss landscape slice")
    return fig


def _surface_figure(grid: list[float], surfaces: dict[str, np.ndarray]) -> Figure:
    fig = Figure(figsize=(5.5 * len(surfaces), 4.5), layout="constrained")
    for ax, (name, z) in zip(fig.subplots(1, len(surfaces), squeeze=False)[0], surfaces.items()):
        contour = ax.contourf(grid, grid, np.log10(z), levels=20, cmap="viridis")
        ax.contour(grid, grid, np.log10(z), levels=20, colors="k", linewidths=0.3)
        ax.plot([0], [0], "r+", markersize=10)
        fig.colorbar(contour, ax=ax, label="log10 loss")
        ax.set_xlabel("a (d1)")
        ax.set_ylabel("b (d2)")
        ax.set_title(name)
    fig.suptitle("2-D loss landscape (log10 of the loss)")
    return fig
