"""sd2.results: records -> measurements.csv, training logs -> training.csv, headline maths.

`write_synthetic_records` and `write_synthetic_tables` build small made-up inputs; the
plot and notebook tests import them. Synthetic data lives only in tmp_path.
"""

import json
import math

import pandas as pd
import pytest

from sd2.results import (
    MEASUREMENT_COLUMNS,
    TRAINING_COLUMNS,
    collect_measurements,
    collect_training,
    headline,
    markdown_table,
    summary_table,
)

K = 5
TARGET_MACS = 10_000_000
DENSE_DRAFT_MACS = 1_000_000
# target -> same tokenizer as the drafts?
TARGETS = {"t_llama": True, "t_qwen": False}
VARIANTS = [("dense", 0), ("dense_sd", 0), ("sparse_oneshot", 50), ("sparse_sft", 50), ("layer_pruned", 50), ("layer_pruned", 70), ("sd2", 50), ("sd2", 70)]
# Made up, but physical: every MAL stays within 1..k+1.
BASE_MAL = {"dense": 2.6, "dense_sd": 3.6, "sparse_oneshot": 2.2, "sparse_sft": 2.8, "layer_pruned": 2.4, "sd2": 3.4}
EVAL_SETS = ("humaneval", "stdlib_heldout")


def synthetic_mal(target, method, sparsity, eval_set, temperature):
    return BASE_MAL[method] - sparsity / 100 - (0.3 if not TARGETS[target] else 0) - (0.2 if eval_set == "stdlib_heldout" else 0) - 0.2 * temperature


def synthetic_record(target, draft, method, sparsity, eval_set, temperature):
    mal = synthetic_mal(target, method, sparsity, eval_set, temperature)
    draft_macs = DENSE_DRAFT_MACS * (1 - 0.9 * sparsity / 100)
    n_steps = 100
    accepted = round(mal * n_steps)  # mal * n_steps == accepted_tokens
    return {
        "target": target, "draft": draft, "method": method, "sparsity": sparsity, "eval_set": eval_set,
        "k": K, "temperature": temperature, "n_prompts": 4, "n_steps": n_steps, "truncated_steps": 4,
        "accepted_tokens": accepted, "drafted_tokens": K * n_steps, "accepted_draft_tokens": accepted - n_steps, "mal": mal, "acceptance_rate": (mal - 1) / K,
        "acceptance_by_position": [max(0.0, (mal - 1) / K * (1.2 - 0.1 * i)) for i in range(K)],
        "accepted_length_histogram": [10, 20, 30, 20, 10, 10],
        "draft_macs_per_token": draft_macs, "target_macs_per_token": TARGET_MACS, "macs_ratio": draft_macs / TARGET_MACS,
        "improvement_factor": mal / (1 + K * draft_macs / TARGET_MACS),
        "ar_tokens_per_s": 50.0, "sd_tokens_per_s": 50.0 * mal / 2, "speedup": mal / 2,
        "same_tokenizer": TARGETS[target], "lossless_checked": temperature == 0,
        "provenance": {"seed": 0, "versions": {"python": "3.11.9", "torch": "2.13.0", "wandb": None}, "settings": {"max_new_tokens": 64}},
    }


def write_synthetic_records(root, targets=tuple(TARGETS), drafts=("d_small",), variants=VARIANTS, eval_sets=EVAL_SETS) -> list:
    """One record file per (eval set, target, draft, method, sparsity), records at T=0 and T=1."""
    paths = []
    for eval_set in eval_sets:
        for target in targets:
            for draft in drafts:
                for method, sparsity in variants:
                    path = root / "records" / eval_set / target / draft / f"{method}-s{sparsity}.json"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    records = [synthetic_record(target, draft, method, sparsity, eval_set, t) for t in (0.0, 1.0)]
                    path.write_text(json.dumps({"definitions": {"mal": "tokens per step incl. bonus"}, "records": records}))
                    paths.append(path)
    return paths


def write_training_log(path, n=4, start=5.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"step": 10 * i, "tokens": 1000 * i, "train_loss": start - 0.5 * i, "val_loss": start - 0.4 * i, "lr": 1e-3, "seconds": float(i), "train_seconds": 0.9 * i, "tokens_per_s": 1111.1 if i else float("nan"), "precision": "fp32"} for i in range(n)]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def synthetic_curves(root) -> list[dict]:
    curves = [{"stage": "pretrain", "model": m, "path": write_training_log(root / "models" / m / "training.csv", start=s)} for m, s in (("t_llama", 6.0), ("d_small", 7.0))]
    for method, sparsity in [("dense_sd", 0), ("sd2", 50), ("layer_pruned", 50)]:
        path = write_training_log(root / "drafts" / "t_llama" / "d_small" / f"{method}-s{sparsity}" / "training.csv", n=3, start=3.0 + sparsity / 100)
        curves.append({"stage": "finetune", "model": "d_small", "target": "t_llama", "draft": "d_small", "method": method, "sparsity": sparsity, "path": path})
    path = write_training_log(root / "drafts" / "original" / "d_small" / "sparse_sft-s50" / "training.csv", n=3)
    curves.append({"stage": "finetune", "model": "d_small", "target": "original", "draft": "d_small", "method": "sparse_sft", "sparsity": 50, "path": path})
    return curves


def write_synthetic_tables(root) -> tuple:
    """root/tables/measurements.csv and training.csv from synthetic records and logs."""
    m = collect_measurements(write_synthetic_records(root), root / "tables" / "measurements.csv")
    t = collect_training(synthetic_curves(root), root / "tables" / "training.csv")
    return m, t


@pytest.fixture
def measurements(tmp_path):
    return collect_measurements(write_synthetic_records(tmp_path), tmp_path / "tables" / "measurements.csv")


def test_collect_measurements_rows_columns_and_csv(tmp_path, measurements):
    n_files = len(EVAL_SETS) * len(TARGETS) * len(VARIANTS)
    assert len(measurements) == 2 * n_files  # two temperatures per file
    assert list(measurements.columns) == MEASUREMENT_COLUMNS
    on_disk = pd.read_csv(tmp_path / "tables" / "measurements.csv")
    assert len(on_disk) == len(measurements) and list(on_disk.columns) == MEASUREMENT_COLUMNS
    assert not list((tmp_path / "tables").glob(".*tmp*"))  # the temporary was renamed away
    row = measurements.iloc[0]
    assert json.loads(row["acceptance_by_position"])[0] == pytest.approx((row["mal"] - 1) / K * 1.2)
    assert json.loads(row["accepted_length_histogram"]) == [10, 20, 30, 20, 10, 10]
    assert row["seed"] == 0 and row["versions"] == "python=3.11.9;torch=2.13.0"


def test_collect_measurements_sorted_deterministically(tmp_path):
    paths = write_synthetic_records(tmp_path)
    a = collect_measurements(paths, tmp_path / "a.csv")
    b = collect_measurements(list(reversed(paths)), tmp_path / "b.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    first = a[(a["target"] == "t_llama") & (a["eval_set"] == "humaneval") & (a["temperature"] == 0)]
    assert list(zip(first["method"], first["sparsity"])) == [
        ("dense", 0), ("dense_sd", 0), ("sparse_oneshot", 50), ("sparse_sft", 50), ("layer_pruned", 50), ("layer_pruned", 70), ("sd2", 50), ("sd2", 70)
    ]
    assert list(a["target"].unique()) == ["t_llama", "t_qwen"]
    assert list(b["temperature"].iloc[:2]) == [0.0, 1.0]


def test_macs_reduction_against_dense_draft(measurements):
    row = measurements[(measurements["method"] == "sd2") & (measurements["sparsity"] == 70)].iloc[0]
    assert row["macs_reduction"] == pytest.approx(1 - DENSE_DRAFT_MACS * (1 - 0.63) / DENSE_DRAFT_MACS)
    assert (measurements.loc[measurements["method"] == "dense", "macs_reduction"] == 0).all()


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
    assert len(df) == 2 * 4 + 4 * 3
    assert list(df["stage"].unique()) == ["pretrain", "finetune"]
    assert df.loc[df["stage"] == "pretrain", "method"].isna().all()
    sd2 = df[df["method"] == "sd2"]
    assert sd2["step"].tolist() == [0, 10, 20] and sd2["val_loss"].iloc[-1] == pytest.approx(3.5 - 0.8)
    # the workflow labels fine-tuning on the original responses with target 'original'
    assert df.loc[df["stage"] == "finetune", "method"].iloc[0] == "sparse_sft"


def test_summary_table(measurements):
    s = summary_table(measurements)
    assert len(s) == len(TARGETS) * len(VARIANTS)
    assert {"mal_humaneval", "mal_stdlib_heldout", "acceptance_rate", "draft_macs_per_token", "improvement_factor", "speedup"} <= set(s.columns)
    row = s[(s["target"] == "t_qwen") & (s["method"] == "sd2") & (s["sparsity"] == 50)].iloc[0]
    assert row["mal_humaneval"] == pytest.approx(3.4 - 0.5 - 0.3)
    assert row["mal_stdlib_heldout"] == pytest.approx(3.4 - 0.5 - 0.3 - 0.2)
    assert row["speedup"] == pytest.approx((2.6 + 2.4) / 2 / 2)  # mean over the two eval sets
    md = markdown_table(s)
    lines = md.strip().splitlines()
    assert len(lines) == 2 + len(s) and lines[1].startswith("| --- |")
    assert "1,000,000" in md  # a dense draft's MACs, thousands separated


def test_headline_by_hand(measurements):
    h = headline(measurements)
    assert len(h) == len(TARGETS) * len(EVAL_SETS) * 2  # two sd2 sparsity levels
    row = h[(h["target"] == "t_llama") & (h["eval_set"] == "humaneval") & (h["sparsity"] == 50)].iloc[0]
    sd2_mal, layer_mal, dense_sd_mal = 3.4 - 0.5, 2.4 - 0.5, 3.6
    assert row["mal_ratio_vs_layer_pruned"] == pytest.approx(sd2_mal / layer_mal)
    assert row["macs_reduction_pct"] == pytest.approx(45.0)  # 0.9 * 50% of the dense draft's MACs
    assert row["mal_change_pct"] == pytest.approx(100 * (sd2_mal / dense_sd_mal - 1))


def test_headline_missing_baseline_is_nan(tmp_path):
    paths = write_synthetic_records(tmp_path, targets=("t_llama",), variants=[("sd2", 50), ("dense_sd", 0)], eval_sets=("humaneval",))
    h = headline(collect_measurements(paths, tmp_path / "m.csv"))
    assert len(h) == 1 and math.isnan(h["mal_ratio_vs_layer_pruned"].iloc[0])
    assert h["macs_reduction_pct"].iloc[0] == pytest.approx(45.0)


def test_record_without_keys_fails_loudly(tmp_path):
    path = tmp_path / "bad.json"
    record = synthetic_record("t_llama", "d_small", "sd2", 50, "humaneval", 0.0)
    del record["draft"]
    path.write_text(json.dumps({"definitions": {}, "records": [record]}))
    with pytest.raises(ValueError, match="draft"):
        collect_measurements([path], tmp_path / "m.csv")
