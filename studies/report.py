"""The one report builder: tables (markdown in report.md, raw numbers in CSV) and PNG figures."""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

__all__ = ["Section", "markdown_table", "write_report"]

POINTS = {"Gap", "Improvement"}  # differences of accuracies, signed


@dataclass
class Section:
    title: str
    columns: list[str]
    rows: list[dict[str, Any]]


def format_cell(column: str, value: Any) -> str:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if column.endswith("Acc"):  # accuracies: Test Acc, Train Acc, Best Test Acc, ...
        return f"{value:.2%}"
    if column in POINTS:
        return f"{value * 100:+.2f} pp"
    if column == "Params":
        return f"{value:,}"
    if column == "Train Time":
        return f"{value:.1f} s"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_spread(column: str, value: Any, std: Any) -> str:
    """`mean ± std` when the row has a spread for the column (several seeds), else the value alone."""
    if not isinstance(std, float) or math.isnan(std) or std == 0 or value is None:
        return format_cell(column, value)
    if column.endswith("Acc"):
        return f"{value * 100:.2f} ± {std * 100:.2f}%"
    if column in POINTS:
        return f"{value * 100:+.2f} ± {std * 100:.2f} pp"
    if column == "Train Time":
        return f"{value:.1f} ± {std:.1f} s"
    return f"{value:.4g} ± {std:.2g}"


def _cells(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def markdown_table(section: Section) -> str:
    lines = [_cells(section.columns), "|" + "---|" * len(section.columns)]
    lines += [_cells([format_spread(c, row.get(c), row.get(f"{c} std")) for c in section.columns])
              for row in section.rows]
    return "\n".join(lines)


def slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")


def write_report(study_dir: Path, heading: str, intro: list[str], sections: list[Section],
                 figures: dict[str, Figure]) -> Path:
    """report.md (intro lines, each section's table, the figures), `<section>.csv` and plots/*.png."""
    plots = study_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    parts = [f"# {heading}", "", *intro, ""]
    for section in sections:
        parts += [f"## {section.title}", "", markdown_table(section), ""]
        spreads = [f"{c} std" for c in section.columns if any(f"{c} std" in row for row in section.rows)]
        with open(study_dir / f"{slug(section.title)}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*section.columns, *spreads], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(section.rows)
    if figures:
        parts += ["## Plots", ""]
    for name, fig in figures.items():
        fig.savefig(plots / name, dpi=100)
        parts += [f"![{name}](plots/{name})", ""]
    path = study_dir / "report.md"
    path.write_text("\n".join(parts))
    return path
