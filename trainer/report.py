"""End-of-run reports: the classification report, the confusion matrix and the training-history plots.

The metrics are computed from the confusion matrix with torch alone, and the text table keeps the layout of
sklearn's `classification_report` (what the seed printed) without depending on sklearn. Plots use
`matplotlib.figure.Figure` directly, so no display and no global pyplot state are involved; matplotlib is
imported only when a plot is drawn (it costs ~0.6 s of start-up otherwise), and where it is not installed (a
bare GPU image) the reports are written without their pictures, after one note.
"""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from beton_trainer.common.errors import UserError
from beton_trainer.common.files import atomic_path, write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["classification_report", "confusion_figure", "history_figures", "plot_history", "read_history",
           "write_reports"]

_noted = False  # the missing-matplotlib note, printed once per process
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
    _check_predictions(preds, labels)
    matrix = confusion_matrix(preds, labels, len(class_names)).double()
    tp, predicted, support = matrix.diag(), matrix.sum(0), matrix.sum(1)
    per_class = {"precision": _ratio(tp, predicted), "recall": _ratio(tp, support),
                 "f1-score": _ratio(2 * tp, predicted + support)}
    rows = [{"name": name, **{k: float(v[c]) for k, v in per_class.items()}, "support": int(support[c])}
            for c, name in enumerate(class_names)]
    total = len(labels)
    rows.append({"name": "accuracy", "precision": "", "recall": "", "f1-score": float(tp.sum()) / total,
                 "support": total})
    seen = (predicted + support) > 0  # classes neither predicted nor present stay out of the macro average
    rows.append({"name": "macro avg", **{k: float(v[seen].mean()) for k, v in per_class.items()}, "support": total})
    rows.append({"name": "weighted avg", **{k: float((v * support).sum()) / total for k, v in per_class.items()},
                 "support": total})
    return _format_table(rows), rows


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts of (true class, predicted class), int64 (num_classes, num_classes)."""
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, 0 where the denominator is 0 (an undefined precision, recall or F1)."""
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1), torch.zeros_like(numerator))


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

    matrix = confusion_matrix(preds, labels, len(class_names)).tolist()
    with atomic_path(run_dir / "confusion_matrix.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true\\predicted", *class_names])
        writer.writerows([name, *counts] for name, counts in zip(class_names, matrix))
    if can_plot():
        with atomic_path(run_dir / "confusion_matrix.png") as tmp:
            confusion_figure(matrix, class_names).savefig(tmp, dpi=100)
    return text


def can_plot() -> bool:
    """Whether matplotlib is installed; where it is not, one note says the pictures are left out."""
    global _noted
    if importlib.util.find_spec("matplotlib") is not None:
        return True
    if not _noted:
        print("note: matplotlib is not installed (pip install matplotlib), so the run's plots and confusion matrix "
              "picture are left out; the CSV files hold their numbers")
        _noted = True
    return False


def confusion_figure(matrix: list[list[int]], class_names: list[str]) -> Figure:
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


def history_figures(columns: dict[str, list]) -> dict[str, Figure]:
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
    if not columns or not can_plot():
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in history_figures(columns).items():
        with atomic_path(out_dir / name) as tmp:
            fig.savefig(tmp, dpi=100)
        written.append(out_dir / name)
    return written
