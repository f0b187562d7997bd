"""examples/lab_mlp_vs_residual.ipynb executed headless in a real Jupyter kernel on the real MNIST.

The kernel works in examples/, or in the folder NOTEBOOK_DIR names: CI's core check runs it from a user's own
folder outside the checkout, against the installed wheel."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "lab_mlp_vs_residual.ipynb"


def test_lab_notebook_runs_and_reports(real_data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", str(real_data_root))  # the kernel inherits this process's environment
    monkeypatch.setenv("LAB_OUT", str(tmp_path))
    # one intra-op thread: on a busy shared 2-core machine, OpenMP's spin-waiting threads made the four tiny fits
    # take 3.5 minutes instead of 35 s (the notebook itself leaves torch's defaults alone)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    folder = os.environ.get("NOTEBOOK_DIR") or str(NOTEBOOK.parent)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": folder}}).execute()

    results = json.loads((tmp_path / "results.json").read_text())
    assert [(r["model"], r["depth"]) for r in results] == [("MLP", 2), ("MLP", 8), ("ResidualMLP", 2),
                                                           ("ResidualMLP", 8)]
    for r in results:
        assert r["test_accuracy"] > 0.8, r["model"]  # 120 steps of 128 real digits (the deep plain MLP: ~0.86)
        assert 0.8 < r["test_macro_f1"] <= 1
        assert (tmp_path / f"{r['model']}-d{r['depth']}" / "metrics.csv").read_text().count("test_macro_f1") == 1
    info = json.loads((tmp_path / "ResidualMLP-d8" / "model.json").read_text())
    assert info["name"] == "custom:ResidualMLP"
    assert (tmp_path / "comparison.png").stat().st_size > 10_000

    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    assert "predicted: [" in "".join(out.text for out in outputs if out.output_type == "stream")
    shown = [[out.data for out in cell.outputs if out.output_type == "display_data"]
             for cell in notebook.cells if cell.cell_type == "code"]
    table = next(d["text/markdown"] for cell in shown for d in cell if "text/markdown" in d)
    for r in results:
        assert f"| {r['model']} | {r['depth']} | {r['parameters']:,} |" in table
    images = [sum("image/png" in d for d in cell) for cell in shown]
    # fit() showed the last run's learning curves, LR schedule and confusion matrix; then the comparison plot
    assert [n for n in images if n] == [3, 1]
