"""The replicate study: its config, the two-level bootstrap, the table from records, and a real run on top."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import yaml
from conftest import REPO, snakemake_cmd
from synthetic import write_synthetic_records

from sd2 import replicates
from sd2.errors import ConfigError
from sd2.measure.stats import paired_ratio, paired_ratio_ci, two_level_ci
from sd2.report.replicates import replicate_rows, replicates_block, write_tables


def _paired_run(effect, seed, n=120):
    rng = np.random.default_rng(seed)
    steps = rng.integers(20, 60, n).astype(float)
    easy = rng.uniform(1.5, 4.0, n)
    return (easy * effect * steps, steps, easy * steps, steps)


def test_two_level_ci_of_one_run_is_the_paired_one():
    run = _paired_run(1.1, 0)
    run = (run[0] * np.random.default_rng(1).uniform(0.9, 1.1, len(run[0])), *run[1:])
    one = paired_ratio_ci(*run, n_boot=2000, seed=0)
    two = two_level_ci([run], paired_ratio, n_boot=2000, seed=0)
    assert two[0] == pytest.approx(one[0])
    assert two[1] == pytest.approx(one[1], abs=0.01) and two[2] == pytest.approx(one[2], abs=0.01)


def test_two_level_ci_widens_with_the_spread_between_runs():
    same = [_paired_run(1.1, s) for s in range(3)]
    spread = [_paired_run(e, s) for s, e in enumerate((1.0, 1.1, 1.25))]
    low_same, high_same = two_level_ci(same, paired_ratio, n_boot=2000, seed=0)[1:]
    estimate, low, high = two_level_ci(spread, paired_ratio, n_boot=2000, seed=0)
    assert estimate == pytest.approx(np.mean([1.0, 1.1, 1.25]))
    assert high - low > 5 * (high_same - low_same)
    assert low <= 1.0 + 1e-9 and high >= 1.25 - 1e-9  # three runs: the interval reaches the extreme runs


def _study(tmp_path, **over) -> dict:
    base = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    base.update(workdir=str(tmp_path / "work"), results_dir=str(tmp_path / "results"))
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    study = {
        "base": str(tmp_path / "base.yaml"),
        "seeds": [1],
        "kinds": ["finetune"],
        "methods": ["dense_sd", "layer_pruned", "sd2"],
        "results_dir": str(tmp_path / "results" / "replicates"),
        **over,
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    return study


@pytest.mark.parametrize(
    "over, message",
    [({"seeds": [0, 1]}, "other than the base run's seed 0"), ({"kinds": ["half"]}, "kinds"), ({"sead": 1}, "sead")],
)
def test_study_errors_name_the_bad_value(tmp_path, over, message):
    _study(tmp_path, **over)
    with pytest.raises(ConfigError, match=message):
        replicates.read_study(tmp_path / "study.yaml")


def test_replicate_config_is_the_base_with_its_seed_and_places(tmp_path):
    study = _study(tmp_path)
    cfg = replicates.replicate_config(study, "finetune", 1)
    assert cfg["seed"] == 1 and cfg["methods"] == ["dense_sd", "layer_pruned", "sd2"]
    assert cfg["workdir"] == str(tmp_path / "work" / "replicates" / "finetune-seed1")
    assert cfg["results_dir"] == str(tmp_path / "results" / "replicates" / "finetune-seed1")
    assert cfg["measure"]["temperatures"] == [0.0] and cfg["measure"]["check_every_k"] is None
    assert cfg["models"] == yaml.safe_load((tmp_path / "base.yaml").read_text())["models"]


def test_replicate_table_from_records(tmp_path):
    """Two runs of the same synthetic records: every verdict holds, no spread; a run whose SD² is worse breaks
    the verdict against the layer-pruned draft and shows in the block."""
    study = _study(tmp_path)
    write_synthetic_records(tmp_path / "results", targets=("t_llama",), eval_sets=("humaneval",))
    replica = tmp_path / "results" / "replicates" / "finetune-seed1"
    write_synthetic_records(replica, targets=("t_llama",), eval_sets=("humaneval",))
    rows = replicate_rows(study, n_boot=500)
    assert set(rows["baseline"]) == {"layer_pruned", "dense_sd"} and set(rows["sparsity"]) == {50, 70}
    assert (rows["runs"] == 2).all() and rows["verdict_holds"].all() and (rows["run_spread_sd"] == 0).all()
    # The replica's SD² at 50% falls below its layer-pruned draft.
    path = replica / "records" / "humaneval" / "t_llama" / "d_small" / "sd2-s50.json"
    doc = json.loads(path.read_text())
    for record in (r for r in doc["records"] if "per_prompt" in r):
        record["per_prompt"]["accepted_tokens"] = [round(a * 0.6) for a in record["per_prompt"]["accepted_tokens"]]
    path.write_text(json.dumps(doc))
    write_tables(study)
    table = replicate_rows(study, n_boot=500).to_dict("records")
    broken = [r for r in table if not r["verdict_holds"]]
    assert {(r["sparsity"], r["baseline"]) for r in broken} >= {(50, "layer_pruned")}
    shutil.copytree(tmp_path / "results" / "replicates", tmp_path / "shown" / "replicates")
    text = replicates_block(tmp_path / "shown")
    assert "finetune replicates** (2 runs each)" in text and "does not hold: t_llama/d_small s50" in text
    # A kind the study names but no replicate of which has finished is said to be missing.
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "replicates.yaml").write_text("kinds: [finetune, full]\n")
    assert "**full replicates**: not run yet" in replicates_block(tmp_path / "shown")


def test_a_replicate_measured_on_other_prompts_is_refused(tmp_path):
    """A replicate measured before the eval set changed cannot be pooled with the default run."""
    study = _study(tmp_path)
    write_synthetic_records(tmp_path / "results", targets=("t_llama",), eval_sets=("humaneval",))
    replica = tmp_path / "results" / "replicates" / "finetune-seed1"
    write_synthetic_records(replica, targets=("t_llama",), eval_sets=("humaneval",))
    for path in (replica / "records").rglob("*.json"):
        doc = json.loads(path.read_text())
        doc["prompt_ids"] = [f"old/{i}" for i in doc["prompt_ids"]]
        path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="replicate finetune-seed1 measured other humaneval prompts"):
        replicate_rows(study, n_boot=100)


@pytest.mark.integration
def test_a_finetune_replicate_runs_on_top_of_a_real_run(tiny_run, tmp_path):
    """A real Snakemake run of one replicate on a hard-linked copy of the tiny run: the pretrained models are the
    default run's, every compared draft is made again with the replicate's seed and measured."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir, copy_function=os.link, symlinks=True)
    study = {
        "base": str(REPO / "config" / "test.yaml"),
        "seeds": [1],
        "kinds": ["finetune"],
        "methods": ["dense_sd", "layer_pruned", "sd2"],
        "results_dir": "results/replicates",
    }
    os.chdir(run_dir)
    try:
        cfg = replicates.replicate_config(study, "finetune", 1)
        base = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
        assert replicates.link_default_run(base, cfg, "finetune") == list(replicates.KINDS["finetune"])
        path = run_dir / cfg["workdir"] / "config.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        pretrained = {p: p.stat().st_mtime for p in (run_dir / cfg["workdir"] / "models").rglob("*.safetensors")}
        env = {**os.environ, "WANDB_MODE": "disabled", "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}"}
        command = snakemake_cmd(run_dir, "collect", "--rerun-triggers", "mtime", "--cores", "2", configfile=path)
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert {p: p.stat().st_mtime for p in pretrained} == pretrained  # not trained again
        records = sorted((run_dir / cfg["results_dir"] / "records").rglob("*.json"))
        assert {p.stem for p in records} == {"dense_sd-s0", "layer_pruned-s50", "sd2-s50"}
        made = [run_dir / cfg["workdir"] / part for part in ("drafts", "pruned")]
        seeds = {json.loads(p.read_text())["seed"] for d in made for p in d.rglob("provenance.json")}
        assert seeds == {1}  # fine-tuned and pruned again, with the replicate's seed
        rows = replicate_rows(study, n_boot=200)
        assert len(rows) and (rows["runs"] == 2).all()
    finally:
        os.chdir(REPO)
