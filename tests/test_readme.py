"""`python -m sd2 readme`: the README's result blocks come from the tables, the rest is left alone."""

import json

import pandas as pd
import pytest

from sd2.readme import update
from test_results import write_synthetic_tables

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
    (tmp_path / "run_time.json").write_text(json.dumps({
        "seconds": 3600, "machine": {"cpu": "Test CPU", "cores": 2, "native_bf16": False},
        "probe": {"models": {"t": {"tokens_per_s": 1800.0, "precision": "fp32"}}}, "provenance": {"created": "2026-11-25T20:00:00"}}))
    rows = [{"rule": "measure", "job": f"j{i}", "seconds": 10.0, "max_rss_mb": 1.0} for i in range(4)]
    rows.append({"rule": "target_outputs", "job": "t", "seconds": 5.0, "max_rss_mb": 1.0})
    pd.DataFrame(rows).to_csv(tmp_path / "tables" / "job_times.csv", index=False)
    pd.DataFrame([{**r, "seconds": 20.0} for r in rows[:2]]).to_csv(tmp_path / "tables" / "job_times_before.csv", index=False)
    return tmp_path


def test_blocks_regenerated_from_tables(tmp_path, results):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert update(readme, results) == ["run_time", "per_draft", "significance", "measure_time"]
    text = readme.read_text()
    assert "Hand-written text stays." in text and text.endswith("Footer stays.\n")
    assert "**3600 s (60 min)** on Test CPU, 2 cores, native bf16: no" in text and "t 1,800 tokens/s (fp32)" in text
    compared = pd.read_csv(results / "tables" / "comparisons.csv")
    greedy = compared[compared["temperature"] == 0]
    assert f"ratio {greedy['mal_ratio_vs_layer_pruned'].min():.2f} to {greedy['mal_ratio_vs_layer_pruned'].max():.2f}" in text
    assert "- now: 45 job-seconds: 4 `measure` jobs, 40 s" in text and "1 `target_outputs`" in text
    assert "20.0 s per job on 2 of these cells" in text and "about 80 job-seconds for 4 jobs" in text and "now / before = 0.56" in text and "0.50x per `measure` job" in text
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
