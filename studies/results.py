"""What a study's report is made of: each run folder read back (summary, metrics history, dataset) and
turned into one row of the summary table."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from beton_trainer.studies.catalog import Run
from beton_trainer.trainer.report import read_history

__all__ = ["RunResult", "first_seeds", "group_columns", "group_rows", "is_number", "load_result", "summary_rows",
           "table_columns"]

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
        row: dict[str, Any] = {"Model": r.run.label, "Group": r.run.group or r.run.label,
                               "Dataset": r.dataset, "Params": s.get("parameters"),
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


# the numbers a group of seeded runs reports as mean ± std (the facts are the same across its seeds)
AVERAGED = ("Test Acc", "Train Time", "Train Acc", "Gap", "Best Test Acc", "Epochs", "Img/s",
            "Improvement")


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool, a blank cell or NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def group_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run group (one run over its seeds), in first-appearance order: each AVERAGED column's
    mean over the finished seeds, its sample std as `<column> std` (absent for one seed), Seeds, and for
    an Improvement whether it lies outside the seed-to-seed spread (|mean| > 2 std of the paired
    differences)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["Group"], []).append(row)
    out = []
    for label, members in groups.items():
        row = {k: v for k, v in members[0].items() if k not in ("Seed", "Status")}
        row["Model"] = label
        row["Seeds"] = len(members)
        for column in AVERAGED:
            values = [m[column] for m in members if is_number(m.get(column))]
            row[column] = statistics.fmean(values) if values else None
            if len(values) > 1:
                row[f"{column} std"] = statistics.stdev(values)
        if row.get("Improvement std") is not None:
            row["Outside Spread"] = "yes" if abs(row["Improvement"]) > 2 * row["Improvement std"] else "no"
        failed = [m for m in members if m["Status"] != "ok"]
        row["Status"] = f"{len(failed)} of {len(members)} seeds {failed[0]['Status']}" if failed else "ok"
        out.append(row)
    return out


def group_columns(results: list[RunResult], extra: tuple[str, ...]) -> list[str]:
    """The grouped table's columns: the per-run ones less Seed, then Seeds (and Outside Spread)."""
    columns = [c for c in table_columns(results, extra) if c not in ("Seed", "Status")]
    spread = ["Outside Spread"] if "Improvement" in columns else []
    status = ["Status"] if any(r.error for r in results) else []
    return [*columns, "Seeds", *spread, *status]


def first_seeds(results: list[RunResult]) -> list[RunResult]:
    """Each group's first run: what the per-epoch plots draw (one curve per group, not per seed)."""
    seen: set[str] = set()
    firsts = []
    for r in results:
        group = r.run.group or r.run.label
        if group not in seen:
            seen.add(group)
            firsts.append(r)
    return firsts
