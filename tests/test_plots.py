"""sd2.report.plots and its registry sd2.report.figures: every figure from small synthetic tables, PNG + PDF,
no torch."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import BarContainer, ErrorbarContainer
from synthetic import K_MAX, VARIANTS, K, write_synthetic_tables

from sd2.report.canvas import FEW_PROMPTS_BAR_LABEL, FEW_PROMPTS_LABEL, save_figure
from sd2.report.canvas import color as variant_color
from sd2.report.figures import CI_NOTE, FIGURES, make_figures, register_figure, write_captions
from sd2.report.plots import (
    MAX_K_COLUMNS,
    load_tables,
    main_slice,
    pareto_front,
    plot_improvement_factor,
    plot_mal_vs_k,
    plot_mal_vs_macs,
    plot_mal_vs_sparsity,
    plot_mal_vs_tree_budget,
    plot_mal_vs_weight_bytes,
    plot_tokenizer_comparison,
    same_variant,
    variant_label,
)
from sd2.variants import parse_variant

REPO = Path(__file__).resolve().parents[1]
EXPECTED = [f"{stem}.{ext}" for stem in FIGURES for ext in ("png", "pdf")]


@pytest.fixture(scope="module")
def tables_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("plots")
    write_synthetic_tables(root)
    return root / "tables"


@pytest.fixture(scope="module")
def measurements(tables_dir):
    return load_tables(tables_dir)[0]


def is_empty_figure(fig, message: str) -> bool:
    """The one-panel placeholder that empty_figure draws, with `message` in it."""
    (ax,) = fig.axes
    return not ax.axison and any(message in t.get_text() for t in ax.texts)


def errorbar_spans(ax) -> list[tuple[float, float]]:
    """(low, high) of every error bar drawn on `ax`, sorted."""
    segments = [seg for c in ax.containers if isinstance(c, ErrorbarContainer) for seg in c.lines[2][0].get_segments()]
    return sorted((seg[0][1], seg[1][1]) for seg in segments)


def test_make_figures_writes_every_figure_without_torch(tables_dir, tmp_path):
    """In a fresh interpreter, as the figures rule runs: every file, and neither torch nor transformers imported."""
    out = tmp_path / "figures"
    code = (
        "import sys, json; from sd2.report.figures import make_figures; "
        f"paths = make_figures({str(tables_dir)!r}, {str(out)!r}); "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad; print(json.dumps([p.name for p in paths]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=REPO, timeout=600, capture_output=True, text=True
    )
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
    from sd2.report.collect import MEASUREMENT_COLUMNS, TRAINING_COLUMNS

    pd.DataFrame(columns=MEASUREMENT_COLUMNS).to_csv(tables / "measurements.csv", index=False)
    pd.DataFrame(columns=TRAINING_COLUMNS).to_csv(tables / "training.csv", index=False)
    assert [p.name for p in make_figures(tables, tmp_path / "figures")] == EXPECTED


def test_every_figure_is_registered_once_with_its_caption(tmp_path):
    """The registry is the one place a figure's caption lives: the report's caption files are written from it."""
    names = list(FIGURES)
    assert names == [spec.name for spec in FIGURES.values()]
    assert names.index("mal_vs_k") == names.index("improvement_factor") + 1
    for stem in ("mal_vs_sparsity", "mal_vs_macs", "improvement_factor", "tokenizer_comparison", "mal_vs_weight_bytes"):
        assert FIGURES[stem].caption.endswith(CI_NOTE)
    assert [name for name, spec in FIGURES.items() if spec.quantized] == ["mal_vs_weight_bytes"]
    paths = write_captions(tmp_path / "captions")
    assert list(paths) == names
    for name, spec in FIGURES.items():
        assert Path(paths[name]).is_absolute()
        assert Path(paths[name]).read_text() == spec.rst() == f"{spec.caption}\n\n{spec.details}\n"
    # Every parse of the workflow writes them: unchanged files are left alone.
    stamps = {name: Path(path).stat().st_mtime_ns for name, path in paths.items()}
    assert {name: Path(path).stat().st_mtime_ns for name, path in write_captions(tmp_path / "captions").items()} == (
        stamps
    )
    report = REPO / "workflow" / "report"
    assert not [name for name in names if (report / f"{name}.rst").exists()]  # no copies beside the registry
    assert (report / "workflow.rst").stat().st_size > 0
    with pytest.raises(ValueError, match="'speedup' is registered already"):
        register_figure(FIGURES["speedup"])


def _hollow(container) -> bool:
    return container.lines[0].get_markerfacecolor() == "white"


def _dotted(container) -> bool:
    """Error bars drawn with dashes (solid ones have none)."""
    return container.lines[2][0].get_linestyle()[0][1] is not None


def test_cells_with_few_prompts_are_hollow_with_dotted_intervals(measurements):
    """A cell measured on fewer prompts than a comparison needs: hollow marker or unfilled bar, dotted
    error bar, and a legend entry that says why; cells with enough prompts are drawn as before."""
    few = measurements.assign(n_prompts=measurements["n_prompts"].where(measurements["target"] == "t_llama", 2))
    assert FEW_PROMPTS_LABEL not in [t.get_text() for t in plot_mal_vs_macs(measurements).legends[0].get_texts()]
    fig = plot_mal_vs_macs(few)
    assert FEW_PROMPTS_LABEL in [t.get_text() for t in fig.legends[0].get_texts()]
    for ax in fig.axes:
        containers = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        hollow = "t_qwen" in ax.get_title()
        assert containers and all(_hollow(c) == hollow for c in containers)
        assert all(_dotted(c) == hollow for c in containers)
    bars = plot_tokenizer_comparison(few)
    assert FEW_PROMPTS_BAR_LABEL in [t.get_text() for t in bars.legends[0].get_texts()]
    faces = [
        (c.get_label(), p.get_facecolor()) for c in bars.axes[0].containers if isinstance(c, BarContainer) for p in c
    ]
    assert {label for label, _ in faces} == {"t_llama (same tokenizer)", "t_qwen (different tokenizer, intersection)"}
    assert all((face == (1, 1, 1, 1)) == ("t_qwen" in label) for label, face in faces)


def test_marker_keys_are_legend_entries_not_text_under_the_axes(measurements):
    """The marker of each draft model (mal_vs_macs) or quantization (mal_vs_weight_bytes) is explained in the
    legend: a note in the figure's corner ran into the last panel's x label."""
    two_drafts = measurements.assign(
        draft=measurements["draft"].where(measurements["sparsity"] != 70, "d_other"),
    )
    fig = plot_mal_vs_macs(two_drafts)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"draft d_small", "draft d_other"} <= set(legend)
    assert [t.get_text() for t in fig.texts] == [fig.get_suptitle()]  # no note beside the title
    with_bytes = measurements.assign(draft_weight_bytes_per_token=measurements["draft_macs_per_token"] * 2)
    fig = plot_mal_vs_weight_bytes(with_bytes)
    assert "quantization none" in [t.get_text() for t in fig.legends[0].get_texts()]
    assert [t.get_text() for t in fig.texts] == [fig.get_suptitle()]


def test_pareto_front():
    points = pd.DataFrame({"macs": [1, 2, 2, 3, 4, 5], "mal": [1.5, 1.4, 2.0, 1.9, 2.5, 2.5]})
    front = pareto_front(points, "macs", "mal")
    assert front["macs"].tolist() == [1, 2, 4] and front["mal"].tolist() == [1.5, 2.0, 2.5]


def test_main_slice_keeps_measured_rows_at_the_reported_k(measurements):
    greedy = main_slice(measurements)
    assert set(greedy["k"]) == {K} and greedy["headline_k"].all()
    # A different-tokenizer pair is drawn under vLLM's intersection rule; transformers' UAG walk is in the tables only.
    assert set(greedy["estimator"]) == {"teacher_forced_walk", "tli_walk"}
    assert len(greedy) == len(greedy.drop_duplicates(["target", "draft", "method", "loss", "sparsity", "eval_set"]))
    sampled = main_slice(measurements, temperature=1.0)
    assert set(sampled["estimator"]) == {"assisted_generation"}  # the tvd_estimate is not a measurement
    assert main_slice(measurements, k=1).empty  # the walk measures k = 1, but the config does not report it


def test_main_slice_reads_empty_headline_cells_as_not_reported(measurements, tmp_path):
    """A CSV column with empty cells comes back as objects, where bool(NaN) is True."""
    m = measurements.astype({"headline_k": object})
    m.loc[m["k"] != K, "headline_k"] = None
    m.to_csv(tmp_path / "m.csv", index=False)
    assert set(main_slice(pd.read_csv(tmp_path / "m.csv"))["k"]) == {K}


def test_figures_leave_the_tvd_estimate_out(measurements):
    tvd = measurements[measurements["estimator"] == "tvd_estimate"]
    assert len(tvd)
    assert is_empty_figure(plot_mal_vs_sparsity(tvd, temperature=1.0), "no data")
    assert is_empty_figure(plot_mal_vs_k(tvd), "no teacher-forced walk rows")


@pytest.mark.parametrize(
    "plot, value, targets",
    [
        (plot_mal_vs_sparsity, "mal", ["t_llama"]),
        (plot_mal_vs_macs, "mal", ["t_llama"]),
        (plot_improvement_factor, "improvement_factor", ["t_llama"]),
        (plot_tokenizer_comparison, "mal", ["t_llama", "t_qwen"]),
    ],
)
def test_error_bars_are_the_95_percent_cis(measurements, plot, value, targets):
    """The first panel (eval set humaneval) carries one error bar per draft variant and target, spanning its CI."""
    fig = plot(measurements)
    rows = main_slice(measurements)
    rows = rows[(rows["eval_set"] == "humaneval") & rows["target"].isin(targets)]
    expected = sorted(zip(rows[f"{value}_ci_low"], rows[f"{value}_ci_high"]))
    assert len(expected) == len(VARIANTS) * len(targets)
    assert np.allclose(errorbar_spans(fig.axes[0]), expected)
    assert all(errorbar_spans(ax) for ax in fig.axes)


def test_mal_vs_k_lines_bands_and_best_k(measurements):
    fig = plot_mal_vs_k(measurements)
    assert len(fig.axes) == 2 * 2  # MAL and improvement factor x two eval sets of the one walk pair t_llama, d_small
    top, bottom = fig.axes[0], fig.axes[2]
    assert top.get_title() == "humaneval: d_small → t_llama"
    assert "improvement factor" in bottom.get_ylabel()
    walk = measurements[
        (measurements["estimator"] == "teacher_forced_walk") & (measurements["eval_set"] == "humaneval")
    ]
    for ax, value in ((top, "mal"), (bottom, "improvement_factor")):
        lines = {line.get_label(): line for line in ax.get_lines()}
        for name, sparsity in VARIANTS:
            method, loss = parse_variant(name)
            rows = walk[
                (walk["method"] == method) & (walk["loss"].fillna("") == (loss or "")) & (walk["sparsity"] == sparsity)
            ]
            line = lines[variant_label(method, sparsity, loss)]
            rows = rows.sort_values("k")
            assert list(line.get_xdata()) == list(range(1, K_MAX + 1))
            assert np.allclose(line.get_ydata(), rows[value])
        stars = [line for line in ax.get_lines() if line.get_marker() == "*" and len(line.get_xdata())]
        assert len(stars) == len(VARIANTS) and all(list(star.get_xdata()) == [K] for star in stars)
        assert len(ax.collections) == len(VARIANTS)  # one CI band per draft variant
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[-1].startswith("best k") and legend.count(legend[-1]) == 1


def test_loss_variants_and_direct_alignment_are_labelled_apart(measurements):
    """Legends name Direct Alignment and each loss variant; a loss variant is a shade of its method's colour."""
    assert variant_label("direct_align", 0, "tvdpp") == "Direct Alignment"
    assert variant_label("sd2", 50, "kl") == "sd2 (kl) s50" and variant_label("sd2", 50, "ce") == "sd2 s50"
    assert variant_label("dense", 0, None) == "dense"
    assert variant_color("sd2", "kl") != variant_color("sd2", "ce") == variant_color("sd2")
    assert variant_color("direct_align", "tvdpp") == variant_color("direct_align")  # its own loss: no shade
    fig = plot_mal_vs_sparsity(measurements)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "Direct Alignment" in legend and "sd2 (kl)" in legend and "sd2" in legend
    bars = {c.get_label(): c.lines[0].get_color() for c in fig.axes[0].containers}
    assert bars["sd2 (kl)"] != bars["sd2"] == variant_color("sd2")
    ticks = [t.get_text() for t in plot_improvement_factor(measurements).axes[0].get_xticklabels()]
    assert ticks[-2:] == ["sd2 (kl) s50", "sd2 (kl) s70"] and "Direct Alignment" in ticks


def test_mal_vs_k_keeps_one_eval_set_when_columns_would_crowd(measurements):
    walk = measurements[measurements["estimator"] == "teacher_forced_walk"]
    many = pd.concat([walk.assign(eval_set=f"set{i}") for i in range(MAX_K_COLUMNS + 1)])
    fig = plot_mal_vs_k(many)
    assert len(fig.axes) == 2
    assert "eval set set0 only" in fig.get_suptitle()
    few = plot_mal_vs_k(pd.concat([walk.assign(eval_set=f"set{i}") for i in range(MAX_K_COLUMNS)]))
    assert len(few.axes) == 2 * MAX_K_COLUMNS and "only" not in few.get_suptitle()


def test_mal_vs_k_without_walk_rows(measurements):
    assert is_empty_figure(
        plot_mal_vs_k(measurements[measurements["estimator"] != "teacher_forced_walk"]), "no teacher-forced walk rows"
    )


def _with_tree_rows(measurements):
    """The synthetic walk rows of k = 2, 4, 6 relabelled as trees of those budgets, each a bit better than the chain."""
    walk = measurements[(measurements["estimator"] == "teacher_forced_walk") & measurements["k"].isin([2, 4, 6])]
    shapes = {2: "2", 4: "2,1", 6: "3,1"}
    tree_rows = walk.assign(
        estimator="tree_walk",
        tree_budget=walk["k"],
        tree_branching=walk["k"].map(shapes),
        mal=walk["mal"] + 0.3,
        mal_ci_low=walk["mal_ci_low"] + 0.3,
        mal_ci_high=walk["mal_ci_high"] + 0.3,
        headline_k=False,
    )
    return pd.concat([measurements, tree_rows], ignore_index=True), tree_rows


def test_mal_vs_tree_budget_lines_bands_and_chain_reference(measurements):
    both, tree_rows = _with_tree_rows(measurements)
    fig = plot_mal_vs_tree_budget(both)
    assert len(fig.axes) == 2 * 2  # MAL and improvement factor x two eval sets of the one walk pair
    top, bottom = fig.axes[0], fig.axes[2]
    assert top.get_title() == "humaneval: d_small → t_llama" and "improvement factor" in bottom.get_ylabel()
    chains = measurements[
        (measurements["estimator"] == "teacher_forced_walk") & (measurements["eval_set"] == "humaneval")
    ]
    shown = tree_rows[tree_rows["eval_set"] == "humaneval"]
    for ax, value in ((top, "mal"), (bottom, "improvement_factor")):
        solid = {line.get_label(): line for line in ax.get_lines() if line.get_linestyle() == "-"}
        dotted = [line for line in ax.get_lines() if line.get_linestyle() == ":" and len(line.get_xdata())]
        assert len(dotted) == len(VARIANTS) and len(ax.collections) == len(VARIANTS)  # a chain and a band per variant
        for name, sparsity in VARIANTS:
            method, loss = parse_variant(name)
            rows = shown[same_variant(shown, method, loss, sparsity)].sort_values("tree_budget")
            line = solid[variant_label(method, sparsity, loss)]
            assert list(line.get_xdata()) == [2, 4, 6] and np.allclose(line.get_ydata(), rows[value])
            ref = chains[same_variant(chains, method, loss, sparsity) & chains["k"].isin([2, 4, 6])]
            assert any(np.allclose(d.get_ydata(), ref.sort_values("k")[value]) for d in dotted)
    assert sorted({t.get_text() for t in top.texts}) == ["2", "2,1", "3,1"]  # the branching at each point
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[-2:] == ["tree (shape per budget)", "chain of as many nodes (k = n)"]


def test_mal_vs_tree_budget_without_tree_rows(measurements):
    assert is_empty_figure(plot_mal_vs_tree_budget(measurements), "no tree_walk rows")
    assert "mal_vs_tree_budget" in FIGURES


def test_mal_vs_weight_bytes_puts_quantized_drafts_at_their_bytes(measurements):
    """Records without byte counts: the placeholder. With them: one point per draft and scheme at its
    bytes, markers by quantization, and quantized drafts left out of the per-method figures."""
    assert is_empty_figure(
        plot_mal_vs_weight_bytes(measurements.drop(columns=["draft_weight_bytes_per_token"])),
        "no records with weight bytes",
    )
    df = main_slice(measurements)
    df = df[df["target"] == df["target"].iloc[0]]
    quantized = df[df["method"] == "sd2"].assign(quantization="w4a16")
    both = pd.concat([df, quantized], ignore_index=True)
    both["draft_weight_bytes_per_token"] = (
        both["draft_macs_per_token"] * 2 / both["quantization"].map({"none": 1, "w4a16": 3})
    )
    fig = plot_mal_vs_weight_bytes(both)
    ax = fig.axes[0]
    xs = sorted(x for line in ax.lines if line.get_marker() == "^" for x in line.get_xdata())
    assert xs == sorted(
        quantized["draft_macs_per_token"][quantized["eval_set"] == ax.get_title().split(":")[0]] * 2 / 3
    )
