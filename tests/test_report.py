"""End-of-run reports checked against an independent numpy computation and sklearn's documented output."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from beton_trainer.common.errors import UserError
from beton_trainer.trainer.report import (
    classification_report,
    confusion_figure,
    history_figures,
    plot_history,
    read_history,
    write_reports,
)

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _predictions(num_classes: int = 10, n: int = 1000, accuracy: float = 0.7, seed: int = 0):
    """Imbalanced labels; about `accuracy` of the predictions right, the rest a random other class."""
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.5, 1.5, num_classes)
    labels = rng.choice(num_classes, size=n, p=weights / weights.sum())
    wrong = (labels + rng.integers(1, num_classes, size=n)) % num_classes
    preds = np.where(rng.random(n) < accuracy, labels, wrong)
    return torch.from_numpy(preds).long(), torch.from_numpy(labels).long()


def _numpy_metrics(preds: np.ndarray, labels: np.ndarray, num_classes: int):
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, preds), 1)
    tp, support = np.diag(cm), cm.sum(axis=1)
    precision = tp / cm.sum(axis=0)
    recall = tp / support
    f1 = 2 * precision * recall / (precision + recall)
    return cm, precision, recall, f1, support


def test_matches_sklearn_documented_output():
    # The example from sklearn.metrics.classification_report's docstring, including a never-predicted class.
    text, _ = classification_report(
        torch.tensor([0, 0, 2, 2, 1]), torch.tensor([0, 1, 2, 2, 2]), ["class 0", "class 1", "class 2"]
    )
    assert text == (
        "              precision    recall  f1-score   support\n"
        "\n"
        "     class 0       0.50      1.00      0.67         1\n"
        "     class 1       0.00      0.00      0.00         1\n"
        "     class 2       1.00      0.67      0.80         3\n"
        "\n"
        "    accuracy                           0.60         5\n"
        "   macro avg       0.50      0.56      0.49         5\n"
        "weighted avg       0.70      0.60      0.61         5\n"
    )


def test_report_numbers_match_numpy():
    preds, labels = _predictions()
    _, precision, recall, f1, support = _numpy_metrics(preds.numpy(), labels.numpy(), 10)
    text, rows = classification_report(preds, labels, NAMES)

    assert [row["name"] for row in rows] == [*NAMES, "accuracy", "macro avg", "weighted avg"]
    by_name = {row["name"]: row for row in rows}
    for i, name in enumerate(NAMES):
        assert by_name[name]["precision"] == pytest.approx(precision[i], abs=1e-6)
        assert by_name[name]["recall"] == pytest.approx(recall[i], abs=1e-6)
        assert by_name[name]["f1-score"] == pytest.approx(f1[i], abs=1e-6)
        assert by_name[name]["support"] == support[i]
    accuracy = (preds == labels).float().mean().item()
    assert 0.65 < accuracy < 0.75
    assert by_name["accuracy"]["f1-score"] == pytest.approx(accuracy, abs=1e-6)
    weights = support / support.sum()
    for metric, values in [("precision", precision), ("recall", recall), ("f1-score", f1)]:
        assert by_name["macro avg"][metric] == pytest.approx(values.mean(), abs=1e-6)
        assert by_name["weighted avg"][metric] == pytest.approx((values * weights).sum(), abs=1e-6)

    # The text holds the same numbers, one line per row, with the header and the supports.
    lines = text.splitlines()
    assert lines[0].split() == ["precision", "recall", "f1-score", "support"]
    table = {line[:12].strip(): line[12:].split() for line in lines[2:] if line.strip()}
    assert list(table) == [row["name"] for row in rows]
    for name, cells in table.items():
        row = by_name[name]
        numbers = [row["precision"], row["recall"], row["f1-score"]] if name != "accuracy" else [row["f1-score"]]
        assert [float(c) for c in cells[:-1]] == pytest.approx(numbers, abs=0.005 + 1e-9)
        assert int(cells[-1]) == row["support"]
    assert sum(int(table[name][-1]) for name in NAMES) == int(table["accuracy"][-1]) == len(labels)


def test_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="1-D"):
        classification_report(torch.tensor([0, 1]), torch.tensor([0, 1, 1]), ["a", "b"])


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
        return image.size


def test_write_reports(tmp_path):
    preds, labels = _predictions()
    cm, *_ = _numpy_metrics(preds.numpy(), labels.numpy(), 10)
    text = write_reports(tmp_path / "run", preds, labels, NAMES)

    run = tmp_path / "run"
    assert (run / "classification_report.txt").read_text() == text == classification_report(preds, labels, NAMES)[0]
    with open(run / "classification_report.csv", newline="") as f:
        report_rows = list(csv.DictReader(f))
    assert [r["name"] for r in report_rows][-3:] == ["accuracy", "macro avg", "weighted avg"]
    assert sum(int(r["support"]) for r in report_rows[:10]) == len(labels)

    with open(run / "confusion_matrix.csv", newline="") as f:
        matrix_rows = list(csv.reader(f))
    assert matrix_rows[0][1:] == NAMES
    assert [r[0] for r in matrix_rows[1:]] == NAMES
    counts = np.array([[int(c) for c in r[1:]] for r in matrix_rows[1:]])
    assert counts.sum() == len(labels)
    np.testing.assert_array_equal(counts, cm)

    width, height = _png_size(run / "confusion_matrix.png")
    assert 400 <= width <= 3000 and 400 <= height <= 3000


def test_confusion_annotations_only_for_few_classes(tmp_path):
    preds, labels = _predictions(num_classes=100, n=3000)
    names = [f"class_{i:02d}" for i in range(100)]
    cm, *_ = _numpy_metrics(preds.numpy(), labels.numpy(), 100)
    assert len(confusion_figure(cm.tolist(), names).axes[0].texts) == 0
    assert len(confusion_figure(cm[:10, :10].tolist(), names[:10]).axes[0].texts) == 100

    write_reports(tmp_path, preds, labels, names)
    width, height = _png_size(tmp_path / "confusion_matrix.png")
    assert 1500 <= width <= 3000 and 1500 <= height <= 3000


def _write_metrics(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _epoch_row(epoch: int, phase: str, **extra) -> dict:
    row = {"epoch": epoch, "phase": phase, "train_loss": 2.0 / epoch, "train_accuracy": 0.5 + 0.04 * epoch,
           "val_loss": "", "val_accuracy": "", "test_loss": "", "test_accuracy": "",
           "lr_0": 0.0 if phase == "warmup" else 1e-3 / epoch, "lr_head": 1e-2 / epoch, "grad_norm": 1.5}
    return row | extra


def test_plot_history_two_phases_without_val(tmp_path):
    rows = [_epoch_row(e, "warmup") for e in (1, 2)] + [_epoch_row(e, "finetune") for e in (3, 4, 5)]
    rows[-1] |= {"test_loss": 0.9, "test_accuracy": 0.71}
    metrics = _write_metrics(tmp_path / "metrics.csv", rows)

    written = plot_history(metrics, tmp_path / "plots")
    assert [p.name for p in written] == ["learning_curves.png", "lr_schedule.png"]
    for path in written:
        width, height = _png_size(path)
        assert width >= 500 and height >= 300

    figures = history_figures(read_history(metrics))
    loss_ax, acc_ax = figures["learning_curves.png"].axes
    for ax in (loss_ax, acc_ax):
        assert ax.get_legend_handles_labels()[1] == ["train", "test"]  # val is empty, so not drawn
        boundaries = [line for line in ax.lines if line.get_linestyle() == ":"]
        assert [line.get_xdata()[0] for line in boundaries] == [2.5]
    lr_ax = figures["lr_schedule.png"].axes[0]
    assert lr_ax.get_yscale() == "log"
    assert lr_ax.get_legend_handles_labels()[1] == ["lr_0", "lr_head"]
    lr_0 = next(line for line in lr_ax.lines if line.get_label() == "lr_0")
    assert np.isnan(lr_0.get_ydata()[:2]).all()  # lr 0 while frozen is left out of the log plot


def test_plot_history_epochs_restarting_per_phase_and_distillation(tmp_path):
    rows = [_epoch_row(e, "warmup", kd_hard_loss=1.0, kd_soft_loss=0.5) for e in (1, 2)]
    rows += [_epoch_row(e, "finetune", kd_hard_loss=0.8, kd_soft_loss=0.4) for e in (1, 2)]
    metrics = _write_metrics(tmp_path / "metrics.csv", rows)

    written = plot_history(metrics, tmp_path)
    assert [p.name for p in written] == ["learning_curves.png", "lr_schedule.png", "distill_losses.png"]
    loss_ax = history_figures(read_history(metrics))["learning_curves.png"].axes[0]
    train_line = next(line for line in loss_ax.lines if line.get_label() == "train")
    assert list(train_line.get_xdata()) == [1, 2, 3, 4]  # rows in order, not overlapping epochs


def test_plot_history_single_row_and_empty(tmp_path):
    one = _write_metrics(tmp_path / "one.csv", [_epoch_row(1, "main", val_loss=1.1, val_accuracy=0.6)])
    written = plot_history(one, tmp_path / "one")
    assert [p.name for p in written] == ["learning_curves.png", "lr_schedule.png"]
    assert all(_png_size(p)[0] > 0 for p in written)

    header_only = tmp_path / "empty.csv"
    header_only.write_text("epoch,phase,train_loss\n")
    assert plot_history(header_only, tmp_path / "empty") == []

    with pytest.raises(UserError, match="not found"):
        plot_history(tmp_path / "missing.csv", tmp_path)
