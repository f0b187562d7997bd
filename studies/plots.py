"""Draw a catalog `Plot` from the summary rows and the runs' histories (matplotlib Figures, no pyplot)."""

from __future__ import annotations

import math
from typing import Any

from matplotlib.figure import Figure

from beton_trainer.studies.catalog import Plot
from beton_trainer.studies.results import RunResult, is_number

__all__ = ["draw"]


def _ordered(values: list[Any]) -> list[Any]:
    """Distinct values: sorted when all are numbers, else in order of appearance."""
    distinct = list(dict.fromkeys(values))
    return sorted(distinct) if all(is_number(v) for v in distinct) else distinct


def _epochs(result: RunResult) -> list[float]:
    return result.curve("epoch")


def _eval_split(result: RunResult) -> str:
    """Validation curves when the run validated, else test."""
    return "val" if any(is_number(v) for v in result.curve("val_accuracy")) else "test"


def _curves(fig: Figure, plot: Plot, results: list[RunResult]) -> None:
    panels = _ordered([r.run.facts.get(plot.panel, "") for r in results]) if plot.panel else [""]
    axes = fig.subplots(len(panels), 2, squeeze=False)
    for (loss_ax, acc_ax), panel in zip(axes, panels):
        for result in results:
            if plot.panel and result.run.facts.get(plot.panel) != panel:
                continue
            split = _eval_split(result)
            line, = loss_ax.plot(_epochs(result), result.curve(f"{split}_loss"), marker="o", markersize=3,
                                 label=f"{result.run.label} ({split})")
            loss_ax.plot(_epochs(result), result.curve("train_loss"), linestyle="--", color=line.get_color(),
                         label=f"{result.run.label} (train)")
            acc_ax.plot(_epochs(result), result.curve(f"{split}_accuracy"), marker="o", markersize=3,
                        color=line.get_color(), label=result.run.label)
        suffix = f" ({plot.panel} {panel})" if plot.panel else ""
        loss_ax.set_title("loss" + suffix)
        acc_ax.set_title("accuracy" + suffix)
        for ax in (loss_ax, acc_ax):
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)


def _bars(fig: Figure, plot: Plot, rows: list[dict]) -> None:
    ax = fig.add_subplot()
    xs = _ordered([row[plot.x] for row in rows])
    hues = _ordered([row.get(plot.hue, "") for row in rows]) if plot.hue else [""]
    width = 0.8 / len(hues)
    for h, hue in enumerate(hues):
        mine = [row for row in rows if not plot.hue or row[plot.hue] == hue]
        heights = [next((row[plot.y] for row in mine if row[plot.x] == x), math.nan) for x in xs]
        positions = [i + (h - (len(hues) - 1) / 2) * width for i in range(len(xs))]
        spread = [next((row.get(f"{plot.y} std", 0) for row in mine if row[plot.x] == x), 0) for x in xs]
        bars = ax.bar(positions, [v if is_number(v) else 0 for v in heights], width, label=str(hue) or None,
                      yerr=spread, capsize=3)
        ax.bar_label(bars, labels=[f"{v:.3f}" if is_number(v) else "failed" for v in heights], fontsize=7)
    ax.set_xticks(range(len(xs)), [str(x) for x in xs], rotation=30 if len(xs) > 5 else 0,
                  ha="right" if len(xs) > 5 else "center")
    values = [row[plot.y] for row in rows if is_number(row.get(plot.y))]
    if plot.y.endswith("Acc") and values and min(values) > 0.5:  # accuracies close together: zoom in
        ax.set_ylim(min(values) - 0.05, 1.0)
    ax.set_xlabel(plot.x)
    ax.set_ylabel(plot.y)
    if plot.hue:
        ax.legend(title=plot.hue)


def _series(fig: Figure, plot: Plot, rows: list[dict], connect: bool) -> None:
    ax = fig.add_subplot()
    hues = _ordered([row.get(plot.hue, "") for row in rows]) if plot.hue else [""]
    points = [row for row in rows if is_number(row.get(plot.x)) and is_number(row.get(plot.y))]
    for hue in hues:
        group = sorted((row for row in points if not plot.hue or row[plot.hue] == hue),
                       key=lambda r: r[plot.x])
        if not group:
            continue
        xs, ys = [row[plot.x] for row in group], [row[plot.y] for row in group]
        spread = [row.get(f"{plot.y} std", 0) for row in group]
        ax.errorbar(xs, ys, yerr=spread, marker="o", linestyle="-" if connect else "none", capsize=3,
                    label=str(hue) or None)
        for row in group:
            ax.annotate(row["Model"], (row[plot.x], row[plot.y]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    reference = next((row for row in rows if row["Model"] == plot.reference), None)
    if reference is not None and is_number(reference[plot.y]):
        ax.axhline(reference[plot.y], linestyle=":", color="gray", label=plot.reference)
        if is_number(reference.get(f"{plot.y} std")):  # the baseline's seed-to-seed spread
            ax.axhspan(reference[plot.y] - reference[f"{plot.y} std"], reference[plot.y] + reference[f"{plot.y} std"],
                       color="gray", alpha=0.15)
    xs = [row[plot.x] for row in points]
    if xs and min(xs) > 0 and max(xs) / min(xs) >= 100:
        ax.set_xscale("log")
    ax.set_xlabel(plot.x)
    ax.set_ylabel(plot.y)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def _heatmaps(fig: Figure, plot: Plot, rows: list[dict]) -> None:
    panels = _ordered([row[plot.panel] for row in rows])
    xs, ys = _ordered([row[plot.x] for row in rows]), _ordered([row[plot.hue] for row in rows])
    values = [row[plot.y] for row in rows if is_number(row[plot.y])]
    lo, hi = (min(values), max(values)) if values else (0, 1)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        cells = {(row[plot.x], row[plot.hue]): row[plot.y] for row in rows if row[plot.panel] == panel}
        grid = [[cells.get((x, y), math.nan) for x in xs] for y in ys]
        image = ax.imshow(grid, cmap="viridis", vmin=lo, vmax=hi, aspect="auto")
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                ax.text(j, i, f"{value:.3f}" if is_number(value) else "-", ha="center", va="center",
                        color="white")
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
        ax.set_yticks(range(len(ys)), [str(y) for y in ys])
        ax.set_xlabel(plot.x)
        ax.set_ylabel(plot.hue)
        ax.set_title(f"{plot.panel} {panel}")
    fig.colorbar(image, ax=list(axes), label=plot.y)


def _lr_curves(fig: Figure, results: list[RunResult]) -> None:
    """Linear axis, unless the runs' peak rates span 10x or more (an LR sweep)."""
    ax = fig.add_subplot()
    peaks = [max((v for v in r.curve(c) if is_number(v)), default=0) for r in results for c in r.history
             if c.startswith("lr_")]
    log_scale = min(peaks, default=0) > 0 and max(peaks) / min(peaks) >= 10
    for result in results:
        for column in (c for c in result.history if c.startswith("lr_")):
            values = [v if is_number(v) and (v > 0 or not log_scale) else math.nan
                      for v in result.curve(column)]
            name = result.run.label + ("" if column == "lr_base" else f" {column[3:]}")
            ax.plot(_epochs(result), values, marker="o", markersize=3, label=name)
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("epoch (value at its end)")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _kd_losses(fig: Figure, results: list[RunResult]) -> None:
    distilled = [r for r in results if "kd_soft_loss" in r.history]
    axes = fig.subplots(1, max(len(distilled), 1), squeeze=False)[0]
    for ax, result in zip(axes, distilled):
        epochs = _epochs(result)
        ax.plot(epochs, result.curve("kd_hard_loss"), marker="o", label="hard (CE)")
        ax.plot(epochs, result.curve("kd_soft_loss"), marker="o", label="soft (T^2 KL)")
        ax.plot(epochs, result.curve("train_loss"), marker="o", label="combined")
        ax.set_title(result.run.label)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


def _best_epoch(result: RunResult) -> tuple[float, str]:
    """The epoch whose weights a run keeps by its early-stopping metric (val loss), else its best test
    accuracy's epoch."""
    split = _eval_split(result)
    column, pick = (f"{split}_loss", min) if split == "val" else ("test_accuracy", max)
    points = [(v, e) for v, e in zip(result.curve(column), _epochs(result)) if is_number(v)]
    return (pick(points)[1] if points else math.nan), ("best val loss" if split == "val" else "best test acc")


def _dynamics(fig: Figure, results: list[RunResult]) -> None:
    """Seed 001's "training dynamics": LR schedule, gradient norm, epochs run vs the kept epoch, memory."""
    (lr_ax, grad_ax), (stop_ax, mem_ax) = fig.subplots(2, 2)
    for result in results:
        epochs = _epochs(result)
        lr_ax.plot(epochs, result.curve("lr_base"), marker="o", markersize=3, label=result.run.label)
        grad_ax.plot(epochs, result.curve("grad_norm"), marker="o", markersize=3, label=result.run.label)
    labels = [r.run.label for r in results]
    ran = [max((e for e in _epochs(r) if is_number(e)), default=0) for r in results]
    best = [_best_epoch(r) for r in results]
    stop_ax.bar(range(len(results)), ran, color="lightgray", label="epochs run")
    stop_ax.scatter(range(len(results)), [b for b, _ in best], color="tab:red", zorder=3,
                    label=" / ".join(sorted({why for _, why in best})))
    memory = [max(r.values("peak_mem_mb"), default=0) for r in results]
    mem_ax.bar(range(len(results)), memory)
    for ax, title in ((lr_ax, "learning rate"), (grad_ax, "gradient norm (epoch mean)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    grad_ax.set_yscale("log")
    for ax, title in ((stop_ax, "early stopping: epochs run, kept epoch"), (mem_ax, "peak memory (MB, RSS)")):
        ax.set_title(title)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
    stop_ax.legend(fontsize=7)


def draw(plot: Plot, rows: list[dict], results: list[RunResult]) -> Figure:
    """The figure for `plot`: table plots from `rows` (one per run or per run group), per-epoch plots
    from `results` (one run per group)."""
    panels = len(set(row.get(plot.panel) for row in rows)) if plot.panel else 1
    wide = plot.kind == "kd_losses" and len(results) > 2
    size = {"curves": (12, 3.6 * panels), "heatmap": (5 * panels + 1, 4), "dynamics": (13, 8)}.get(
        plot.kind, (14 if wide else 8, 4.5))
    fig = Figure(figsize=size, layout="constrained")
    if plot.kind == "curves":
        _curves(fig, plot, results)
    elif plot.kind == "dynamics":
        _dynamics(fig, results)
    elif plot.kind == "bars":
        _bars(fig, plot, rows)
    elif plot.kind in ("scatter", "lines"):
        _series(fig, plot, rows, connect=plot.kind == "lines")
    elif plot.kind == "heatmap":
        _heatmaps(fig, plot, rows)
    elif plot.kind == "lr":
        _lr_curves(fig, results)
    else:
        _kd_losses(fig, results)
    fig.suptitle(plot.title)
    return fig
