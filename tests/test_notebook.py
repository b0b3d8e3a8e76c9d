"""notebooks/results.ipynb executes headless against small synthetic tables."""

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from synthetic import write_synthetic_tables

from sd2.report.figures import FIGURES

REPO = Path(__file__).resolve().parents[1]


def test_results_notebook_executes(tmp_path, monkeypatch):
    write_synthetic_tables(tmp_path)
    # The kernel inherits the environment: point it at the synthetic tables, never at results/.
    monkeypatch.setenv("SD2_TABLES", str(tmp_path / "tables"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(REPO / "notebooks" / "results.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == len(FIGURES)  # one per figure
    assert "measurements" in "".join(o.get("text", "") for o in outputs)
    tables = "".join(o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "mal_ratio_vs_layer_pruned" in tables and "change_significant" in tables  # comparisons.csv is shown
