"""What a study's report is made of: each run folder read back (summary, metrics history, dataset) and
turned into one row of the summary table."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studies.catalog import Run
from trainer.report import read_history

STANDARD = ("Model", "Dataset", "Params", "Test Acc", "Train Time")


@dataclass
class RunResult:
    run: Run
    folder: Path
    summary: dict | None  # None when the run did not finish
    history: dict[str, list]  # metrics.csv as columns (NaN for empty cells)
    dataset: str
    error: str = ""

    def values(self, column: str) -> list[float]:
        """The column's logged numbers (empty cells left out)."""
        return [v for v in self.history.get(column, []) if not math.isnan(v)]

    def last(self, column: str) -> float:
        return (self.values(column) or [math.nan])[-1]

    def curve(self, column: str) -> list[float]:
        return list(self.history.get(column, []))


def load_result(run: Run, folder: Path, error: str = "") -> RunResult:
    """A run folder read back; a run that failed keeps whatever history it wrote."""
    summary_path = folder / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() and not error else None
    history = read_history(folder / "metrics.csv") if (folder / "metrics.csv").is_file() else {}
    dataset = "?"
    if (folder / "environment.json").is_file():
        data = json.loads((folder / "environment.json").read_text()).get("data", {})
        dataset = data.get("name") or "?"
    if summary is None and not error:
        error = "no summary.json: the run did not finish"
    return RunResult(run, folder, summary, history, dataset, error)


def summary_rows(results: list[RunResult]) -> list[dict[str, Any]]:
    """One row per run: the standard columns, the run's facts, then every derived column a study may show."""
    by_label = {r.run.label: r for r in results}
    rows = []
    for r in results:
        s = r.summary or {}
        test = s.get("test_accuracy", math.nan)
        train = r.last("train_accuracy")
        row: dict[str, Any] = {"Model": r.run.label, "Dataset": r.dataset, "Params": s.get("parameters"),
                               "Test Acc": test, "Train Time": s.get("wall_s"), **r.run.facts,
                               "Train Acc": train, "Gap": train - test,
                               "Best Test Acc": max(r.values("test_accuracy"), default=math.nan),
                               "Epochs": s.get("epochs"), "Img/s": s.get("images_per_s")}
        base = by_label.get(r.run.compare_to)
        row["Improvement"] = test - base.summary["test_accuracy"] if base and base.summary else None
        row["Status"] = f"failed: {r.error}" if r.error else "ok"
        rows.append(row)
    return rows


def table_columns(results: list[RunResult], extra: tuple[str, ...]) -> list[str]:
    """STANDARD, the facts (in run order), the study's derived columns, and Status if any run failed."""
    facts = list(dict.fromkeys(k for r in results for k in r.run.facts))
    status = ["Status"] if any(r.error for r in results) else []
    return [*STANDARD, *facts, *extra, *status]
