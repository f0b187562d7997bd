"""End-of-run reports: the classification report, the confusion matrix and the training-history plots.

Metrics come from torchmetrics so they match what the loop logs; the text table keeps the layout of
sklearn's `classification_report` (what the seed printed) without depending on sklearn. Plots use
`matplotlib.figure.Figure` directly, so no display and no global pyplot state are involved. Both are imported
where a report is made, at the end of a run: they cost ~0.8 s of start-up that the first step does not wait for.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from common.errors import UserError
from common.files import atomic_path, write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT_COLUMNS = ("name", "precision", "recall", "f1-score", "support")
ANNOTATE_MAX_CLASSES = 20  # beyond this the counts in the confusion matrix cells become unreadable


def _check_predictions(preds: torch.Tensor, labels: torch.Tensor) -> None:
    if preds.ndim != 1 or preds.shape != labels.shape or preds.numel() == 0:
        raise ValueError(
            f"preds and labels must be equal-length non-empty 1-D tensors, got {tuple(preds.shape)} "
            f"and {tuple(labels.shape)}"
        )


def classification_report(
    preds: torch.Tensor, labels: torch.Tensor, class_names: list[str]
) -> tuple[str, list[dict]]:
    """The sklearn-style text table and the same numbers as CSV rows (one per class, then the averages).

    Classes that are neither predicted nor present count as 0 per class and are left out of the macro
    average, as sklearn does for labels it never sees.
    """
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_f1_score,
        multiclass_precision,
        multiclass_recall,
    )

    _check_predictions(preds, labels)
    args = {"preds": preds, "target": labels, "num_classes": len(class_names)}
    support = torch.bincount(labels, minlength=len(class_names)).tolist()
    total = len(labels)
    per_class = [multiclass_precision(**args, average=None).tolist(),
                 multiclass_recall(**args, average=None).tolist(),
                 multiclass_f1_score(**args, average=None).tolist()]
    rows = [
        {"name": name, "precision": p, "recall": r, "f1-score": f, "support": s}
        for name, p, r, f, s in zip(class_names, *per_class, support)
    ]
    accuracy = multiclass_accuracy(**args, average="micro").item()
    rows.append({"name": "accuracy", "precision": "", "recall": "", "f1-score": accuracy, "support": total})
    for average in ("macro", "weighted"):
        rows.append({
            "name": f"{average} avg",
            "precision": multiclass_precision(**args, average=average).item(),
            "recall": multiclass_recall(**args, average=average).item(),
            "f1-score": multiclass_f1_score(**args, average=average).item(),
            "support": total,
        })
    return _format_table(rows), rows


def _format_table(rows: list[dict]) -> str:
    """sklearn's layout: right-aligned names, 9-wide columns, 2 decimals, blank lines around the class rows."""
    width = max(len("weighted avg"), *(len(row["name"]) for row in rows))
    lines = [f"{'':>{width}} " + "".join(f" {h:>9}" for h in REPORT_COLUMNS[1:]), ""]
    for row in rows:
        if row["name"] == "accuracy":
            lines.append("")
        cells = [f" {'':>9}" if row[key] == "" else f" {row[key]:>9.2f}" for key in REPORT_COLUMNS[1:4]]
        lines.append(f"{row['name']:>{width}} " + "".join(cells) + f" {row['support']:>9}")
    return "\n".join(lines) + "\n"


def write_reports(run_dir: Path, preds: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> str:
    """Write the classification report (.txt, .csv) and the confusion matrix (.csv, .png); return the text."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    text, rows = classification_report(preds, labels, class_names)
    write_text(run_dir / "classification_report.txt", text)
    with atomic_path(run_dir / "classification_report.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=REPORT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

    from torchmetrics.functional.classification import multiclass_confusion_matrix

    matrix = multiclass_confusion_matrix(preds, labels, num_classes=len(class_names)).tolist()
    with atomic_path(run_dir / "confusion_matrix.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true\\predicted", *class_names])
        writer.writerows([name, *counts] for name, counts in zip(class_names, matrix))
    with atomic_path(run_dir / "confusion_matrix.png") as tmp:
        _confusion_figure(matrix, class_names).savefig(tmp, dpi=100)
    return text


def _confusion_figure(matrix: list[list[int]], class_names: list[str]) -> Figure:
    """Counts heat map; cells are annotated only while they stay readable (<= ANNOTATE_MAX_CLASSES)."""
    from matplotlib.figure import Figure

    n = len(class_names)
    side = min(max(6.0, 0.5 * n), 24.0)
    label_size = min(10.0, 40 * side / n)  # about 60% of a row's height (72 pt per inch) once many rows share it
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=label_size)
    ax.set_yticks(range(n), class_names, fontsize=label_size)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix (test)")
    if n <= ANNOTATE_MAX_CLASSES:
        threshold = max(max(row) for row in matrix) / 2
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                color = "white" if count > threshold else "black"
                ax.text(j, i, str(count), ha="center", va="center", color=color, fontsize=8)
    return fig


def read_history(metrics_csv: Path) -> dict[str, list]:
    """The metrics table as columns: floats (NaN for empty cells), except 'phase' which stays text."""
    if not metrics_csv.is_file():
        raise UserError(f"metrics file {metrics_csv} not found; pass the metrics.csv of a finished run")
    with open(metrics_csv, newline="") as f:
        records = list(csv.DictReader(f))
    if records and "epoch" not in records[0]:
        raise UserError(f"{metrics_csv} has no 'epoch' column; pass the metrics.csv written by train.py")
    columns: dict[str, list] = {}
    for record in records:
        for key, value in record.items():
            if key is None:  # cells beyond the header of a malformed row
                continue
            if key == "phase":
                columns.setdefault(key, []).append(value or "")
            else:
                columns.setdefault(key, []).append(_to_float(value))
    return columns


def _to_float(value: str | None) -> float:
    try:
        return float(value) if value else math.nan
    except ValueError:
        return math.nan


def _has_values(values: list[float]) -> bool:
    return any(not math.isnan(v) for v in values)


def _epoch_axis(columns: dict[str, list]) -> list[float]:
    """The epoch column when it increases across phases; otherwise (it restarts per phase) the row number."""
    epochs = columns["epoch"]
    if all(b > a for a, b in zip(epochs, epochs[1:])) and _has_values(epochs):
        return epochs
    return [float(i) for i in range(1, len(epochs) + 1)]


def _mark_phases(ax, xs: list[float], phases: list[str]) -> None:
    """Dotted vertical lines between epochs of different phases, labelled with the phase that starts."""
    for i in range(1, len(phases)):
        if phases[i] != phases[i - 1]:
            boundary = (xs[i - 1] + xs[i]) / 2
            ax.axvline(boundary, linestyle=":", color="gray")
            ax.text(boundary, 0.98, f" {phases[i]}", transform=ax.get_xaxis_transform(),
                    va="top", fontsize=8, color="gray")


def _plot_series(ax, xs: list[float], columns: dict[str, list], names: list[str],
                 labels: list[str] | None = None) -> None:
    """Plot each column that holds a value; markers keep single-epoch series visible."""
    from matplotlib.ticker import MaxNLocator

    for name, label in zip(names, labels or names):
        if _has_values(columns.get(name, [])):
            ax.plot(xs, columns[name], marker="o", markersize=3, label=label)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def _history_figures(columns: dict[str, list]) -> dict[str, Figure]:
    """The history plots by file name; lr and distillation plots only when their columns hold values."""
    from matplotlib.figure import Figure

    xs = _epoch_axis(columns)
    phases = columns.get("phase", [""] * len(xs))
    figures = {}

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    splits = ["train", "val", "test"]
    for ax, metric in zip(fig.subplots(1, 2), ["loss", "accuracy"]):
        _plot_series(ax, xs, columns, [f"{s}_{metric}" for s in splits], splits)
        ax.set_title(metric)
        _mark_phases(ax, xs, phases)
    figures["learning_curves.png"] = fig

    # A frozen group's lr of 0 has no place on a log axis: leave those epochs out of its line.
    lrs = {name: [v if v > 0 else math.nan for v in values] for name, values in columns.items()
           if name.startswith("lr_")}
    lr_names = [name for name, values in lrs.items() if _has_values(values)]
    if lr_names:
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        ax = fig.add_subplot()
        _plot_series(ax, xs, lrs, lr_names)
        ax.set_yscale("log")
        ax.set_title("learning rate per parameter group")
        _mark_phases(ax, xs, phases)
        figures["lr_schedule.png"] = fig

    kd_names = [name for name in columns if name.startswith("kd_") and _has_values(columns[name])]
    if kd_names:
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        ax = fig.add_subplot()
        _plot_series(ax, xs, columns, kd_names)
        ax.set_title("distillation losses")
        _mark_phases(ax, xs, phases)
        figures["distill_losses.png"] = fig
    return figures


def plot_history(metrics_csv: Path, out_dir: Path) -> list[Path]:
    """Write learning_curves.png, lr_schedule.png and (with kd_* columns) distill_losses.png; return their paths.

    A metrics.csv without rows yields no plots rather than an error, so a run that stopped early still ends cleanly.
    """
    columns = read_history(Path(metrics_csv))
    if not columns:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in _history_figures(columns).items():
        with atomic_path(out_dir / name) as tmp:
            fig.savefig(tmp, dpi=100)
        written.append(out_dir / name)
    return written
