"""Paired comparisons from per-prompt counts: within each prompt group an eval set lists."""

import json

import numpy as np
from synthetic import PROMPT_IDS, write_synthetic_records

from sd2.measure.stats import paired_ratio_ci
from sd2.report.per_prompt import exact_cells, group_rows, groups_block, paired_arrays


def _manifest(results, groups):
    (results / "data").mkdir(parents=True, exist_ok=True)
    (results / "data" / "manifest.json").write_text(json.dumps({"eval_groups": groups}))


def test_each_group_is_paired_over_its_own_prompts(tmp_path):
    write_synthetic_records(tmp_path, targets=("t_llama",), eval_sets=("humaneval", "stdlib_heldout"))
    first, rest = PROMPT_IDS[:15], PROMPT_IDS[15:]
    _manifest(tmp_path, {"stdlib_heldout": {"header": {"docstring": first, "signature": rest}}})
    rows = group_rows(tmp_path, n_boot=300)
    # Only the eval set that lists groups, each group on its own prompts.
    assert set(rows["eval_set"]) == {"stdlib_heldout"}
    assert set(rows["group"]) == {"header: docstring", "header: signature"}
    assert set(rows.loc[rows["group"] == "header: docstring", "n_prompts"]) == {15}
    row = rows[(rows["group"] == "header: signature") & (rows["baseline"] == "layer_pruned")].iloc[0]
    cell = tuple(row[c] for c in ["target", "draft", "eval_set", "estimator", "k"])
    arrays, ids = paired_arrays(exact_cells(tmp_path), cell, row["sparsity"], "layer_pruned")
    inside = np.isin(ids, rest)
    expected = paired_ratio_ci(*(np.asarray(a, float)[inside] for a in arrays), n_boot=300, seed=0)
    assert (row["ratio"], row["ratio_ci_low"], row["ratio_ci_high"]) == expected
    text = groups_block(tmp_path)
    assert text.count("| header: signature |") == text.count("| header: docstring |") == len(rows) // 4


def test_no_groups_is_said(tmp_path):
    write_synthetic_records(tmp_path, targets=("t_llama",), eval_sets=("humaneval",))
    _manifest(tmp_path, {})
    assert groups_block(tmp_path) == "No eval set of this run lists prompt groups."
