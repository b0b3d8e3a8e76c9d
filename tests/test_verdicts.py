"""sd2.report.verdicts: each generated sentence says what its cell's paired intervals and MACs say."""

import re

import pandas as pd
import pytest

from sd2.report import verdicts
from sd2.report.readme import significance


def _row(**over):
    row = {
        "target": "t",
        "eval_set": "humaneval",
        "estimator": "teacher_forced_walk",
        "k": 5,
        "n_prompts": 164,
        "draft": "d-s",
        "sparsity": 70,
        "macs_reduction_pct": 29.0,
        "layer_pruned_macs_vs_sd2_pct": 11.6,
        "mal_ratio_vs_layer_pruned": 1.11,
        "ratio_ci_low": 1.06,
        "ratio_ci_high": 1.16,
        "mal_change_pct": 0.3,
        "change_ci_low": -0.8,
        "change_ci_high": 1.5,
    }
    return pd.Series({**row, **over})


def test_cell_sentence_states_direction_and_the_macs_condition():
    text = verdicts.cell_sentence(_row())
    assert text == (
        "d-s, SD² at 70% (71% of dense_sd's MACs): MAL is significantly above the layer-pruned draft's "
        "(1.11x [1.06, 1.16], the layer-pruned draft at 11.6% more MACs than SD²) and is not distinguishable "
        "from dense_sd's (+0.3% [-0.8, +1.5])."
    )
    below = verdicts.cell_sentence(_row(ratio_ci_low=0.9, ratio_ci_high=0.95, layer_pruned_macs_vs_sd2_pct=0.2))
    assert "is significantly below the layer-pruned draft's" in below and "at the same MACs" in below
    assert "3.0% fewer MACs" in verdicts.cell_sentence(_row(layer_pruned_macs_vs_sd2_pct=-3.0))


@pytest.mark.parametrize(
    "value, low, high, word",
    [(1.2, 1.1, 1.3, "above"), (0.8, 0.7, 0.9, "below"), (1.0, 0.9, 1.1, "not distinguishable")],
)
def test_direction_reads_the_interval_not_the_estimate(value, low, high, word):
    assert word in verdicts.direction(value, low, high, 1.0)


def test_pooled_ranges_never_mix_targets_estimators_or_small_cells(tmp_path):
    rows = [
        _row(),
        _row(draft="d-m", mal_ratio_vs_layer_pruned=1.5, ratio_ci_low=1.4, ratio_ci_high=1.6),
        _row(target="q", estimator="uag_walk", mal_ratio_vs_layer_pruned=0.9, ratio_ci_low=0.85, ratio_ci_high=0.95),
        _row(target="q", estimator="assisted_generation", n_prompts=2, mal_ratio_vs_layer_pruned=3.0),
    ]
    table = pd.DataFrame(rows).assign(
        method="sd2", loss="ce", quantization="none", temperature=0.0, ratio_significant=True, change_significant=False
    )
    (tmp_path / "tables").mkdir()
    table.to_csv(tmp_path / "tables" / "comparisons.csv", index=False)
    lines = significance(tmp_path).splitlines()
    ranges = [line for line in lines if "SD² / layer-pruned MAL" in line]
    assert len(ranges) == 2
    assert "t, teacher_forced_walk" in ranges[0] and "ratio 1.11 to 1.50" in ranges[0]
    assert "q, uag_walk" in ranges[1] and "ratio 0.90 to 0.90" in ranges[1]
    assert any("1 cells on fewer than 20 prompts" in line for line in lines)
    assert not any("3.00" in line for line in lines)


def test_every_committed_verdict_is_its_rows():
    """The committed results prose: one sentence per exact greedy SD² cell, each regenerated from its row, the
    direction words matching the row's intervals."""
    from pathlib import Path

    results = Path(__file__).resolve().parents[1] / "results"
    text = (results.parent / "docs" / "results.md").read_text()
    rows = verdicts.greedy_baselines(results)
    assert len(rows)
    for _, row in rows.iterrows():
        sentence = verdicts.cell_sentence(row)
        assert sentence in text
        said = re.search(r"MAL is (.*?) the layer-pruned", sentence).group(1)
        if row["ratio_ci_low"] > 1:
            assert said == "significantly above"
        elif row["ratio_ci_high"] < 1:
            assert said == "significantly below"
        else:
            assert said == "not distinguishable from"
