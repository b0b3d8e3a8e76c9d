"""sd2.plots: every figure from small synthetic tables, PNG + PDF, no torch."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from sd2.plots import CAPTIONS, FIGURES, load_tables, make_figures, pareto_front, plot_mal_vs_sparsity, save_figure
from test_results import write_synthetic_tables

REPO = Path(__file__).resolve().parents[1]
EXPECTED = [f"{stem}.{ext}" for stem in FIGURES for ext in ("png", "pdf")]


@pytest.fixture(scope="module")
def tables_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("plots")
    write_synthetic_tables(root)
    return root / "tables"


def test_make_figures_writes_every_figure_without_torch(tables_dir, tmp_path):
    """In a fresh interpreter, as the figures rule runs: every file, and neither torch nor transformers imported."""
    out = tmp_path / "figures"
    code = (
        "import sys, json; from sd2.plots import make_figures; "
        f"paths = make_figures({str(tables_dir)!r}, {str(out)!r}); "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad; print(json.dumps([p.name for p in paths]))"
    )
    result = subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120, capture_output=True, text=True)
    assert json.loads(result.stdout) == EXPECTED
    for name in EXPECTED:
        path = out / name
        assert path.stat().st_size > 5000
        assert path.read_bytes().startswith(b"\x89PNG" if path.suffix == ".png" else b"%PDF")
    assert sorted(p.name for p in out.iterdir()) == sorted(EXPECTED)  # no temporaries left


def test_saved_figures_are_reproducible(tables_dir, tmp_path):
    """No creation date or software stamp: rerunning the rule gives byte-identical files."""
    measurements, _ = load_tables(tables_dir)
    a = save_figure(plot_mal_vs_sparsity(measurements), tmp_path / "a", "x")
    b = save_figure(plot_mal_vs_sparsity(measurements), tmp_path / "b", "x")
    assert [x.read_bytes() == y.read_bytes() for x, y in zip(a, b)] == [True, True]


def test_empty_tables_still_give_every_figure(tmp_path):
    tables = tmp_path / "tables"
    tables.mkdir()
    from sd2.results import MEASUREMENT_COLUMNS, TRAINING_COLUMNS

    pd.DataFrame(columns=MEASUREMENT_COLUMNS).to_csv(tables / "measurements.csv", index=False)
    pd.DataFrame(columns=TRAINING_COLUMNS).to_csv(tables / "training.csv", index=False)
    assert [p.name for p in make_figures(tables, tmp_path / "figures")] == EXPECTED


def test_captions_cover_every_figure_and_report_file():
    assert set(CAPTIONS) == set(FIGURES)
    for stem, caption in CAPTIONS.items():
        rst = (REPO / "workflow" / "report" / f"{stem}.rst").read_text()
        assert rst.startswith(caption)  # the report and the README say the same thing
    assert (REPO / "workflow" / "report" / "workflow.rst").stat().st_size > 0


def test_pareto_front():
    points = pd.DataFrame({"macs": [1, 2, 2, 3, 4, 5], "mal": [1.5, 1.4, 2.0, 1.9, 2.5, 2.5]})
    front = pareto_front(points, "macs", "mal")
    assert front["macs"].tolist() == [1, 2, 4] and front["mal"].tolist() == [1.5, 2.0, 2.5]
