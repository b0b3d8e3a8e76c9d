"""sd2.report.collect, comparisons and markdown: records -> measurements.csv, comparisons.csv and summary.md,
training logs -> training.csv."""

import json

import pandas as pd
import pytest
from synthetic import (
    DENSE_DRAFT_MACS,
    EVAL_SETS,
    K_MAX,
    N_PROMPTS,
    TARGETS,
    VARIANTS,
    K,
    rows_per_file,
    synthetic_curves,
    synthetic_mal,
    synthetic_record,
    write_synthetic_records,
)

from sd2.report.collect import MEASUREMENT_COLUMNS, TRAINING_COLUMNS, collect_measurements, collect_training
from sd2.report.comparisons import COMPARISON_COLUMNS, MIN_PROMPTS_FOR_SIGNIFICANCE, collect_comparisons
from sd2.report.markdown import markdown_table, summary_markdown, summary_table


@pytest.fixture
def measurements(tmp_path):
    return collect_measurements(write_synthetic_records(tmp_path), tmp_path / "tables" / "measurements.csv")


def test_collect_measurements_rows_columns_and_csv(tmp_path, measurements):
    per_target = len(EVAL_SETS) * len(VARIANTS)
    assert len(measurements) == sum(per_target * rows_per_file(t) for t in TARGETS)
    assert list(measurements.columns) == MEASUREMENT_COLUMNS
    on_disk = pd.read_csv(tmp_path / "tables" / "measurements.csv")
    assert len(on_disk) == len(measurements) and list(on_disk.columns) == MEASUREMENT_COLUMNS
    assert not list((tmp_path / "tables").glob(".*tmp*"))  # the temporary was renamed away
    row = measurements[measurements["estimator"] == "teacher_forced_walk"].iloc[0]
    assert row["k"] == 1 and not row["headline_k"]
    assert json.loads(row["acceptance_by_position"])[0] == pytest.approx(
        (synthetic_mal("t_llama", "dense", 0, "humaneval", 0.0, 1) - 1) * 1.2
    )
    assert row["seed"] == 0 and row["versions"] == "python=3.11.9;torch=2.13.0"
    assert measurements.loc[measurements["k"] == K, "headline_k"].all()
    assert (measurements["mal_ci_low"] <= measurements["mal"]).all() and (
        measurements["mal"] <= measurements["mal_ci_high"]
    ).all()


def test_collect_measurements_sorted_deterministically(tmp_path):
    paths = write_synthetic_records(tmp_path)
    a = collect_measurements(paths, tmp_path / "a.csv")
    b = collect_measurements(list(reversed(paths)), tmp_path / "b.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    first = a[(a["target"] == "t_llama") & (a["eval_set"] == "humaneval") & (a["temperature"] == 0) & (a["k"] == K)]
    # The registry's order (sd2.methods), ce before another loss; records' variant names split into method and loss.
    assert list(zip(first["method"], first["loss"].fillna("-"), first["sparsity"])) == [
        ("dense", "-", 0),
        ("dense_sd", "ce", 0),
        ("direct_align", "tvdpp", 0),
        ("sparse_oneshot", "-", 50),
        ("sparse_sft", "ce", 50),
        ("layer_pruned", "ce", 50),
        ("layer_pruned", "ce", 70),
        ("sd2", "ce", 50),
        ("sd2", "ce", 70),
        ("sd2", "kl", 50),
        ("sd2", "kl", 70),
    ]
    assert list(a["target"].unique()) == ["t_llama", "t_qwen"]
    # Within a draft: greedy before sampled, then by estimator and k.
    dense = b[(b["target"] == "t_qwen") & (b["method"] == "dense") & (b["eval_set"] == "humaneval")]
    assert list(dense["temperature"]) == sorted(dense["temperature"]) and dense["temperature"].iloc[0] == 0.0
    assert list(dense["estimator"])[: K_MAX + 1] == ["tli_walk"] * K_MAX + ["uag_walk"]


def test_macs_reduction_against_dense_draft(measurements):
    row = measurements[(measurements["method"] == "sd2") & (measurements["sparsity"] == 70)].iloc[0]
    assert row["macs_reduction"] == pytest.approx(1 - DENSE_DRAFT_MACS * (1 - 0.63) / DENSE_DRAFT_MACS)
    assert (measurements.loc[measurements["method"] == "dense", "macs_reduction"] == 0).all()
    assert (measurements.loc[measurements["method"] == "direct_align", "macs_reduction"] == 0).all()


def test_duplicate_records_fail_loudly(tmp_path):
    paths = write_synthetic_records(tmp_path, targets=("t_llama",), variants=[("sd2", 50)], eval_sets=("humaneval",))
    copy = tmp_path / "copy.json"
    copy.write_text(paths[0].read_text())
    with pytest.raises(ValueError, match="duplicate"):
        collect_measurements(paths + [copy], tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()


def test_empty_inputs_still_write_headers(tmp_path):
    assert collect_measurements([], tmp_path / "m.csv").empty
    assert pd.read_csv(tmp_path / "m.csv").columns.tolist() == MEASUREMENT_COLUMNS
    assert collect_training([], tmp_path / "t.csv").empty
    assert pd.read_csv(tmp_path / "t.csv").columns.tolist() == TRAINING_COLUMNS


def test_collect_training_long_table(tmp_path):
    df = collect_training(synthetic_curves(tmp_path), tmp_path / "t.csv")
    assert list(df.columns) == TRAINING_COLUMNS
    assert len(df) == 2 * 4 + 5 * 3
    assert list(df["stage"].unique()) == ["pretrain", "finetune"]
    assert df.loc[df["stage"] == "pretrain", ["method", "loss"]].isna().all().all()
    sd2 = df[(df["method"] == "sd2") & (df["loss"] == "ce")]
    assert sd2["step"].tolist() == [0, 10, 20] and sd2["val_loss"].iloc[-1] == pytest.approx(3.5 - 0.8)
    # The workflow's label sd2+kl is the method sd2 with the loss kl, after its ce curve.
    assert df.loc[df["method"] == "sd2", "loss"].tolist() == ["ce"] * 3 + ["kl"] * 3
    # the workflow labels fine-tuning on the original responses with target 'original'
    assert df.loc[df["stage"] == "finetune", "method"].iloc[0] == "sparse_sft"


def test_summary_table(measurements):
    s = summary_table(measurements)
    # A row per estimator at the headline k: the walk (same tokenizer); the UAG and intersection walks (different).
    assert len(s) == 3 * len(VARIANTS)
    assert s.loc[s["method"] == "dense", "loss"].isna().all() and set(s.loc[s["method"] == "sd2", "loss"]) == {
        "ce",
        "kl",
    }
    assert {
        "mal_humaneval",
        "ci_low_humaneval",
        "ci_high_humaneval",
        "n_humaneval",
        "mal_stdlib_heldout",
        "acceptance_rate",
        "draft_macs_per_token",
        "improvement_factor",
        "speedup",
    } <= set(s.columns)
    assert set(s["k"]) == {K} and set(s["estimator"]) == {"teacher_forced_walk", "uag_walk", "tli_walk"}
    row = s[(s["target"] == "t_qwen") & (s["method"] == "sd2") & (s["sparsity"] == 50)].iloc[0]
    assert row["mal_humaneval"] == pytest.approx(3.4 - 0.5 - 0.3, abs=0.01)
    assert row["ci_low_humaneval"] < row["mal_humaneval"] < row["ci_high_humaneval"]
    assert row["n_stdlib_heldout"] == N_PROMPTS
    md = markdown_table(s)
    lines = md.strip().splitlines()
    assert len(lines) == 2 + len(s) and lines[1].startswith("| --- |")
    assert "1,000,000" in md  # a dense draft's MACs, thousands separated


@pytest.fixture
def compared(tmp_path):
    return collect_comparisons(write_synthetic_records(tmp_path), tmp_path / "tables" / "comparisons.csv")


def test_comparisons_by_hand(compared):
    assert list(compared.columns) == COMPARISON_COLUMNS
    baseline = compared[compared["loss"] == "ce"]
    # two eval sets x two sd2 levels x estimators at K: the walk and sampled assisted generation (same tokenizer),
    # the UAG and intersection walks and sampled assisted generation (different); tvd estimates are not compared
    assert len(baseline) == len(EVAL_SETS) * 2 * (2 + 3) and set(baseline["method"]) == {"sd2"}
    assert set(compared["k"]) == {K}
    row = baseline[
        (baseline["target"] == "t_llama")
        & (baseline["eval_set"] == "humaneval")
        & (baseline["sparsity"] == 50)
        & (baseline["temperature"] == 0)
    ].iloc[0]
    assert row["estimator"] == "teacher_forced_walk" and row["n_prompts"] == N_PROMPTS
    assert row["mal_ratio_vs_layer_pruned"] == pytest.approx(row["sd2_mal"] / row["layer_pruned_mal"])
    assert row["ratio_ci_low"] < row["mal_ratio_vs_layer_pruned"] < row["ratio_ci_high"]
    assert row["ratio_significant"]  # 2.9 against 1.9 with the prompt effect cancelled
    assert row["macs_reduction_pct"] == pytest.approx(45.0)  # 0.9 * 50% of the dense draft's MACs
    assert row["layer_pruned_macs_vs_sd2_pct"] == pytest.approx(0.0)  # the synthetic cut matches SD²'s MACs
    assert row["mal_change_pct"] == pytest.approx(100 * (row["sd2_mal"] / row["dense_sd_mal"] - 1))
    assert row["change_ci_low"] < row["mal_change_pct"] < row["change_ci_high"] < 0


def test_loss_variants_against_their_ce_variant(compared):
    """sd2+kl against sd2 (ce) at the same sparsity, direct_align against dense_sd (ce): paired ratios."""
    by_loss = compared[compared["loss"] != "ce"]
    # two eval sets x estimators at K (2 same tokenizer, 3 different) x (direct_align + sd2+kl at two levels)
    assert len(by_loss) == len(EVAL_SETS) * (2 + 3) * 3
    assert by_loss["mal_ratio_vs_layer_pruned"].isna().all() and compared["mal_ratio_vs_ce"].notna().sum() == len(
        by_loss
    )
    assert dict(zip(by_loss["method"], by_loss["ce_method"])) == {"direct_align": "dense_sd", "sd2": "sd2"}
    kl = by_loss[(by_loss["method"] == "sd2") & (by_loss["sparsity"] == 70) & (by_loss["temperature"] == 0)].iloc[0]
    assert kl["loss"] == "kl" and kl["mal_ratio_vs_ce"] == pytest.approx(kl["mal"] / kl["ce_mal"])
    assert kl["vs_ce_ci_low"] < kl["mal_ratio_vs_ce"] < kl["vs_ce_ci_high"]
    assert kl["vs_ce_significant"]  # 3.5 against 3.4 per prompt, the prompt effect cancelled
    align = by_loss[(by_loss["method"] == "direct_align") & (by_loss["temperature"] == 0)].iloc[0]
    assert align["loss"] == "tvdpp" and align["sparsity"] == 0
    assert align["mal_ratio_vs_ce"] == pytest.approx(align["mal"] / align["ce_mal"]) and align["mal_ratio_vs_ce"] > 1


def test_loss_variant_without_its_ce_variant_is_nan(tmp_path):
    paths = write_synthetic_records(tmp_path, targets=("t_llama",), variants=[("sd2+kl", 50)], eval_sets=("humaneval",))
    c = collect_comparisons(paths, tmp_path / "c.csv")
    assert len(c) == 2 and c["ce_mal"].isna().all() and c["mal_ratio_vs_ce"].isna().all()
    assert not c["vs_ce_significant"].any() and c["mal"].notna().all()


def test_paired_interval_is_narrower_than_the_unpaired_ones(compared):
    """The prompt effect is shared, so the paired ratio's CI is tighter than the two MALs' CIs suggest."""
    row = compared[compared["loss"] == "ce"].iloc[0]
    unpaired_low = row["sd2_mal_ci_low"] / row["layer_pruned_mal_ci_high"]
    unpaired_high = row["sd2_mal_ci_high"] / row["layer_pruned_mal_ci_low"]
    assert row["ratio_ci_high"] - row["ratio_ci_low"] < 0.5 * (unpaired_high - unpaired_low)


def test_equal_drafts_are_not_significant(tmp_path):
    paths = write_synthetic_records(
        tmp_path,
        targets=("t_llama",),
        variants=[("sd2", 50), ("layer_pruned", 50), ("dense_sd", 0)],
        eval_sets=("humaneval",),
    )
    for path in paths:  # make layer_pruned's per-prompt counts a shuffled copy of sd2's: same MAL, no effect
        doc = json.loads(path.read_text())
        if "layer_pruned" in path.name:
            sd2 = json.loads(path.with_name("sd2-s50.json").read_text())
            for rec, ref in zip(doc["records"], sd2["records"]):
                if "per_prompt" not in ref:
                    continue
                rec.update({k: ref[k] for k in ("mal", "mal_ci_low", "mal_ci_high", "n_steps", "accepted_tokens")})
                rec["per_prompt"] = {
                    "accepted_tokens": ref["per_prompt"]["accepted_tokens"][::-1],
                    "steps": ref["per_prompt"]["steps"],
                }
            path.write_text(json.dumps(doc))
    c = collect_comparisons(paths, tmp_path / "c.csv")
    greedy = c[c["temperature"] == 0].iloc[0]
    assert greedy["mal_ratio_vs_layer_pruned"] == pytest.approx(1.0)
    assert greedy["ratio_ci_low"] < 1 < greedy["ratio_ci_high"] and not greedy["ratio_significant"]


def test_comparison_missing_baseline_is_nan(tmp_path):
    paths = write_synthetic_records(
        tmp_path, targets=("t_llama",), variants=[("sd2", 50), ("dense_sd", 0)], eval_sets=("humaneval",)
    )
    c = collect_comparisons(paths, tmp_path / "c.csv")
    assert len(c) == 2 and c["mal_ratio_vs_layer_pruned"].isna().all() and not c["ratio_significant"].any()
    assert c["ce_method"].isna().all() and c["mal_ratio_vs_ce"].isna().all()
    assert c["macs_reduction_pct"].iloc[0] == pytest.approx(45.0)


def test_summary_markdown_says_what_is_significant(measurements, compared):
    md = summary_markdown(measurements, compared)
    assert "### Per draft (greedy)" in md and "paired bootstrap" in md
    assert "significant (ratio)" in md and "| yes |" in md
    assert "[" in md and "MAL humaneval [95% CI]" in md
    # Loss variants and Direct Alignment by their labels, and their own comparison with ce.
    assert "| Direct Alignment |" in md and "| sd2 (kl) |" in md
    assert "### Loss variants vs cross-entropy (greedy" in md and "| dense_sd (ce) |" in md


def test_record_without_keys_fails_loudly(tmp_path):
    path = tmp_path / "bad.json"
    record = synthetic_record("t_llama", "d_small", "sd2", 50, "humaneval", 0.0, "teacher_forced_walk")
    del record["draft"]
    path.write_text(json.dumps({"definitions": {}, "records": [record]}))
    with pytest.raises(ValueError, match="draft"):
        collect_measurements([path], tmp_path / "m.csv")


def test_few_prompts_are_never_significant(tmp_path):
    """A clear difference measured on too few prompts is reported, but not called significant."""
    paths = write_synthetic_records(
        tmp_path,
        targets=("t_llama",),
        variants=[("sd2", 50), ("layer_pruned", 50), ("dense_sd", 0)],
        eval_sets=("humaneval",),
    )
    assert collect_comparisons(paths, tmp_path / "all.csv")["ratio_significant"].all()
    for path in paths:  # keep the first prompts only
        doc = json.loads(path.read_text())
        n = MIN_PROMPTS_FOR_SIGNIFICANCE - 1
        doc["prompt_ids"] = doc["prompt_ids"][:n]
        for rec in doc["records"]:
            rec["n_prompts"] = n
            if "per_prompt" in rec:
                rec["per_prompt"] = {key: values[:n] for key, values in rec["per_prompt"].items()}
        path.write_text(json.dumps(doc))
    few = collect_comparisons(paths, tmp_path / "few.csv")
    assert (few["mal_ratio_vs_layer_pruned"] > 1.1).all()
    assert not few["ratio_significant"].any() and not few["change_significant"].any()


def test_quantized_drafts_are_their_own_rows_compared_with_the_unquantized_draft(tmp_path):
    """sd2@w4a16: method sd2, quantization w4a16; compared with sd2 as made, paired; bytes-based
    improvement factor from the records' byte counts; left out of the baseline comparisons."""
    paths = write_synthetic_records(
        tmp_path, targets=("t_llama",), variants=[("sd2", 50), ("sd2@w4a16", 50), ("layer_pruned", 50)]
    )
    for path in paths:
        doc = json.loads(path.read_text())
        for r in doc["records"]:
            draft_bytes = 300_000 if "@w4a16" in r["method"] else 1_000_000
            r.update(draft_weight_bytes_per_token=draft_bytes, target_weight_bytes_per_token=10_000_000)
            r["weight_bytes_ratio"] = draft_bytes / 10_000_000
        path.write_text(json.dumps(doc))
    m = collect_measurements(paths, tmp_path / "m.csv")
    assert set(m["quantization"]) == {"none", "w4a16"} and set(m["method"]) == {"sd2", "layer_pruned"}
    walk = m[m["estimator"] == "teacher_forced_walk"]
    expected = walk["mal"] / (1 + walk["k"] * walk["weight_bytes_ratio"])
    assert walk["improvement_factor_bytes"].tolist() == pytest.approx(expected.tolist())
    c = collect_comparisons(paths, tmp_path / "c.csv")
    q = c[(c["quantization"] == "w4a16") & (c["temperature"] == 0) & (c["eval_set"] == "humaneval")].iloc[0]
    assert q["method"] == "sd2" and q["mal_ratio_vs_unquantized"] == pytest.approx(q["mal"] / q["unquantized_mal"])
    assert q["vs_unquantized_ci_low"] < q["mal_ratio_vs_unquantized"] < q["vs_unquantized_ci_high"] < 1
    assert q["vs_unquantized_significant"] and q["weight_bytes_ratio_vs_unquantized"] == pytest.approx(0.3)
    # The paper's comparison stays between drafts as made.
    base = c[c["mal_ratio_vs_layer_pruned"].notna()]
    assert len(base) and set(base["quantization"]) == {"none"}
