"""`python -m sd2 readme`: the result blocks of the README and of docs/*.md come from the tables (the methods
table from the registry), the rest is left alone."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from synthetic import write_synthetic_tables

from sd2 import methods
from sd2.report.readme import BLOCKS, commands, headline, methods_table, regenerated, stale, update
from sd2.report.real_model import beside_the_paper, real_model

REPO = Path(__file__).resolve().parent.parent

README = """# Title

Hand-written text stays.

<!-- generated:run_time -->
old
<!-- /generated:run_time -->

<!-- generated:significance -->
old
<!-- /generated:significance -->

<!-- generated:per_draft -->
<!-- /generated:per_draft -->

<!-- generated:measure_time -->
<!-- /generated:measure_time -->

Footer stays.
"""


@pytest.fixture
def results(tmp_path):
    write_synthetic_tables(tmp_path)
    (tmp_path / "run_time.json").write_text(
        json.dumps(
            {
                "seconds": 3600,
                "machine": {"cpu": "Test CPU", "cores": 2, "native_bf16": False},
                "probe": {"models": {"t": {"tokens_per_s": 1800.0, "precision": "fp32"}}},
                "provenance": {"created": "2026-11-25T20:00:00"},
            }
        )
    )
    rows = [{"rule": "measure", "job": f"j{i}", "seconds": 10.0, "max_rss_mb": 1.0} for i in range(4)]
    rows.append({"rule": "target_outputs", "job": "t", "seconds": 5.0, "max_rss_mb": 1.0})
    pd.DataFrame(rows).to_csv(tmp_path / "tables" / "job_times.csv", index=False)
    pd.DataFrame([{**r, "seconds": 20.0} for r in rows[:2]]).to_csv(
        tmp_path / "tables" / "job_times_before.csv", index=False
    )
    return tmp_path


def test_blocks_regenerated_from_tables(tmp_path, results):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert update(readme, results) == ["run_time", "significance", "per_draft", "measure_time"]
    text = readme.read_text()
    assert "Hand-written text stays." in text and text.endswith("Footer stays.\n")
    assert "**3600 s (60 min)** on Test CPU, 2 cores, native bf16: no" in text and "t 1,800 tokens/s (fp32)" in text
    compared = pd.read_csv(results / "tables" / "comparisons.csv")
    greedy = compared[(compared["temperature"] == 0) & (compared["method"] == "sd2") & (compared["loss"] == "ce")]
    # One pooled range per target and estimator, never across them.
    for (target, estimator), cells in greedy.groupby(["target", "estimator"]):
        ratios = cells["mal_ratio_vs_layer_pruned"]
        assert f"**{target}, {estimator}: SD² / layer-pruned MAL**" in text
        assert f"ratio {ratios.min():.2f} to {ratios.max():.2f}" in text
    assert "- now: 45 job-seconds: 4 `measure` jobs, 40 s" in text and "1 `target_outputs`" in text
    assert (
        "20.0 s per job on 2 cells of the previous default models" in text
        and "about 80 job-seconds for 4 jobs" in text
        and "now / before = 0.56" in text
        and "0.50x per `measure` job" in text
    )
    assert "MAL humaneval [95% CI]" in text and "\nold\n" not in text
    once = readme.read_text()
    update(readme, results)
    assert readme.read_text() == once  # idempotent


def test_unknown_block_is_an_error(tmp_path, results):
    readme = tmp_path / "README.md"
    readme.write_text(README + "<!-- generated:typo -->\n\n<!-- /generated:typo -->\n")
    with pytest.raises(ValueError, match="typo"):
        update(readme, results)
    assert readme.read_text().count("old") == 2  # nothing written


def test_aims_block_says_met_or_missed_with_the_numbers(tmp_path, results):
    models = pd.DataFrame(
        [
            {
                "model": "t",
                "role": "target",
                "parameters": 3_000_000,
                "val_bits_per_byte": 1.5,
                "distinct_4gram_share": 0.7,
                "body_rate": 0.9,
                "parse_rate": 0.6,
                "n_prompts": 64,
            },
            {
                "model": "t2",
                "role": "target",
                "parameters": 3_300_000,
                "val_bits_per_byte": 1.6,
                "distinct_4gram_share": 0.5,
                "body_rate": 0.9,
                "parse_rate": 0.6,
                "n_prompts": 64,
            },
            {
                "model": "d",
                "role": "draft",
                "parameters": 1_000_000,
                "val_bits_per_byte": 1.55,
                "distinct_4gram_share": 0.4,
                "body_rate": 1.0,
                "parse_rate": 0.2,
                "n_prompts": 64,
            },
        ]
    )
    models.to_csv(results / "tables" / "models.csv", index=False)
    # One held-out greedy cell made wide: the aim names it and its half-width.
    meas = pd.read_csv(results / "tables" / "measurements.csv")
    held = meas.index[(meas["eval_set"] == "stdlib_heldout") & meas["headline_k"] & (meas["temperature"] == 0)].tolist()
    assert len(held) > 1
    wide = meas.loc[held[-1]]
    meas.loc[held[-1], ["mal_ci_low", "mal_ci_high"]] = [wide["mal"] - 0.5, wide["mal"] + 0.5]
    meas.to_csv(results / "tables" / "measurements.csv", index=False)
    readme = tmp_path / "README.md"
    readme.write_text("<!-- generated:aims -->\n<!-- /generated:aims -->\n")
    update(readme, results)
    lines = readme.read_text().splitlines()
    assert "target t: body rate 0.90" in lines[1] and lines[1].endswith(": met.")
    assert "distinct 4-gram share 0.50" in lines[2] and lines[2].endswith("**missed**.")  # t2 loops
    # d is better than t2 in bits/byte, so it is not "worse than every target"
    assert "1.550 bits/byte against the targets' 1.500, 1.600" in lines[3] and lines[3].endswith("**missed**.")
    assert "3.00x parameters" in lines[4] and lines[4].endswith(": met.")
    assert any("the whole default sweep: 60 min on Test CPU" in line and line.endswith(": met.") for line in lines)
    width = next(line for line in lines if "widest 95% half-width" in line)
    assert f"on stdlib_heldout ({wide['n_prompts']} prompts, {len(held)} cells): 0.500" in width
    assert f"{wide['target']}/{wide['draft']} {wide['method']} s{wide['sparsity']}" in width
    assert width.endswith("**missed**.")


def test_time_by_rule_and_instruct_stage_blocks(tmp_path, results):
    pd.DataFrame(
        [
            {"model": "d", "stage": "pretrained", "body_rate": 0.2, "parse_rate": 0.0},
            {"model": "d", "stage": "+ instruct", "body_rate": 0.9, "parse_rate": 0.3},
        ]
    ).to_csv(results / "tables" / "instruct_stage.csv", index=False)
    readme = tmp_path / "README.md"
    readme.write_text(
        "<!-- generated:time_by_rule -->\n<!-- /generated:time_by_rule -->\n"
        "<!-- generated:instruct_stage -->\n<!-- /generated:instruct_stage -->\n"
    )
    update(readme, results)
    text = readme.read_text()
    # job_times.csv of the fixture: 4 measure jobs of 10 s, 1 target_outputs job of 5 s
    assert "| measure | 4 | 40 | 89% | 10.00 |" in text and "| target_outputs | 1 | 5 | 11% | 5.00 |" in text
    assert "Total 45 job-seconds" in text
    assert "| d | + instruct | 0.90 | 0.30 |" in text


def test_blocks_in_docs_pages_are_regenerated_too(tmp_path, results):
    """`make readme` finds generated blocks wherever they live: the README and every page of docs/ beside it."""
    readme = tmp_path / "README.md"
    readme.write_text("# T\n\n<!-- generated:run_time -->\nold\n<!-- /generated:run_time -->\n")
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "results.md"
    page.write_text(
        "Page.\n\n<!-- generated:run_time -->\n<!-- /generated:run_time -->\n"
        "<!-- generated:measure_time -->\nold\n<!-- /generated:measure_time -->\nEnd.\n"
    )
    assert stale(readme, results) == [readme, page]
    assert update(readme, results) == ["run_time", "run_time", "measure_time"]
    assert "**3600 s (60 min)**" in readme.read_text() and "**3600 s (60 min)**" in page.read_text()
    assert page.read_text().startswith("Page.\n") and page.read_text().endswith("End.\n")
    assert "- now: 45 job-seconds" in page.read_text() and "\nold\n" not in page.read_text()
    assert stale(readme, results) == []


def test_unknown_block_in_a_docs_page_writes_nothing(tmp_path, results):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "page.md"
    page.write_text("<!-- generated:typo -->\n<!-- /generated:typo -->\n")
    with pytest.raises(ValueError, match=r"page\.md: unknown generated block\(s\) \['typo'\]"):
        update(readme, results)
    assert readme.read_text() == README


def test_commands_block_says_how_long_each_command_took(results):
    text = commands(results)
    assert "`make run` from nothing: **60 min** (3,600 s) on Test CPU, 2 cores, no native bf16 (2026-11-25" in text
    assert "`make test`: not timed yet" in text
    (results / "test_time.json").write_text(
        json.dumps(
            {
                "test": {
                    "seconds": 780,
                    "passed": 400,
                    "skipped": 2,
                    "created": "2026-11-27T10:00:00",
                    "machine": {"cpu": "Test CPU", "cores": 2, "native_bf16": False},
                }
            }
        )
    )
    text = commands(results)
    assert "- `make test`: **13 min** (400 passed, 2 skipped) on Test CPU, 2 cores, no native bf16 (2026-11-27" in text
    assert "not timed" not in text and "test-integration" not in text


def test_headline_block_compares_sd2_with_its_baselines(results):
    text = headline(results)
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| draft | method | sparsity % | MAL [95% CI] |")
    rows = [line.split(" | ") for line in table[2:]]
    assert {r[1] for r in rows} <= {"dense", "dense_sd", "layer_pruned", "sd2"} and any(r[1] == "sd2" for r in rows)
    assert all(r[6] == "–" for r in rows if r[1] != "sd2")  # the paired ratio is SD²'s alone
    assert all(re.match(r"\d\.\d\d \[\d\.\d\d, \d\.\d\d\]", r[6]) for r in rows if r[1] == "sd2")


def test_real_model_block_pairs_sd2_with_both_baselines_and_says_where_the_weights_came_from(results):
    """The real-model block reads results/real/: one row per draft variant, SD²'s paired columns, a verdict per
    SD² draft that follows its intervals, and the weights' source from fetch_model's marker."""
    real = results / "real"
    write_synthetic_tables(real)
    (real / "models").mkdir(exist_ok=True)
    target = pd.read_csv(real / "tables" / "measurements.csv")["target"].value_counts().index[0]
    weights = "Q4_1 GGUF weights dequantized to float32: they carry its rounding"
    (real / "models" / f"{target}.json").write_text(json.dumps({"weights": weights}))
    text = real_model(results)
    assert weights in text and "`make real` has not completed" in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ")][2:]
    assert rows and all((r[6] == "–") == (r[1] != "sd2") for r in rows)
    compared = pd.read_csv(real / "tables" / "comparisons.csv")
    sd2 = compared[
        (compared["method"] == "sd2") & (compared["target"] == target) & (compared["eval_set"] == "humaneval")
    ]
    verdicts = [line for line in text.splitlines() if line.startswith("- ") and "SD² at" in line]
    assert len(verdicts) == len(sd2[(sd2["temperature"] == 0) & (sd2["loss"] == "ce")])
    for line in verdicts:
        assert re.search(r"MAL is (significantly (above|below)|not distinguishable from) the layer-pruned", line)
    paper = beside_the_paper(results)
    assert "1.59" in paper and "43.87%" in paper and "real model" in paper and "demo" in paper


def test_methods_block_is_the_registry():
    text = methods_table(None)
    for m in methods.METHODS:
        assert f"| `{m.name}` | {m.label} |" in text
    for loss in methods.LOSSES.values():
        assert f"| `{loss.name}` |" in text and loss.description in text and loss.objective in text
    for family in methods.HEAD_FAMILIES.values():
        assert f"| `{family.name}` | `{family.module}` |" in text


def test_committed_docs_match_the_committed_tables():
    """Every generated block of the README and of docs/*.md is what `make readme` makes from results/ now, and
    every block the generator knows is shown somewhere."""
    documents = regenerated(REPO / "README.md", REPO / "results")
    assert REPO / "docs" / "results.md" in documents
    assert stale(REPO / "README.md", REPO / "results") == [], "stale generated blocks: run `make readme`"
    shown = {name for _, names in documents.values() for name in names}
    assert shown == set(BLOCKS), f"blocks shown nowhere: {sorted(set(BLOCKS) - shown)}"


def test_readme_dag_names_every_rule():
    rules = {
        name
        for path in (REPO / "workflow" / "rules").glob("*.smk")
        for name in re.findall(r"^rule (\w+):", path.read_text(), re.M)
    }
    dag = re.search(r"## What the workflow does\n\n```\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    assert rules and not {r for r in rules if not re.search(rf"\b{r}\b", dag)}


def test_families_blocks(tmp_path):
    """config/families.yaml's blocks: every greedy exact record against dense_sd of its draft, paired."""
    from sd2.report.comparisons import family_comparisons
    from sd2.report.readme import families, families_significance, families_trees

    assert families(tmp_path).startswith("Not run yet") and families_trees(tmp_path).startswith("Not run yet")
    fam = tmp_path / "families"
    write_synthetic_tables(fam)
    (fam / "run_time.json").write_text(
        json.dumps(
            {
                "seconds": 1800,
                "jobs": 12,
                "job_seconds": 3000,
                "machine": {"cpu": "Test CPU", "cores": 2, "native_bf16": False},
                "provenance": {"created": "2026-11-26T08:00:00"},
            }
        )
    )
    df = family_comparisons(sorted((fam / "records").rglob("*.json")))
    assert set(df["estimator"]) == {"teacher_forced_walk", "uag_walk", "tli_walk"}
    ref = df[df["method"] == "dense_sd"]
    assert (ref["mal_ratio_vs_dense_sd"] == 1).all() and not ref["vs_dense_sd_significant"].any()
    da = df[(df["method"] == "direct_align") & (df["target"] == "t_llama")].iloc[0]
    sd = df[(df["method"] == "dense_sd") & (df["target"] == "t_llama") & (df["eval_set"] == da["eval_set"])].iloc[0]
    assert da["mal_ratio_vs_dense_sd"] == pytest.approx(da["mal"] / sd["mal"], rel=0.05)
    assert da["vs_dense_sd_ci_low"] <= da["mal_ratio_vs_dense_sd"] <= da["vs_dense_sd_ci_high"]
    text = families(tmp_path)
    assert "**1800 s (30 min)**" in text and "12 jobs, 3,000 job-seconds" in text
    assert "| Direct Alignment |" in text and "| sd2 (kl) |" in text
    assert text.count("\n| t_") == len(df)
    assert families_trees(tmp_path).startswith("No tree rows")
    assert "sd2 (kl) / sd2 (ce) MAL" in families_significance(tmp_path)
