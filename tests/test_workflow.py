"""A real Snakemake run of the tiny config: every rule, outputs, caching, targeted reruns."""

import json
import os
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPO, snakemake_cmd

from sd2 import config as sd2_config
from sd2 import methods, variants

# What the rules make at each sparsity level (the registry, sd2/methods.py).
SPARSE_METHODS = {m.name for m in methods.METHODS if m.kind == "draft" and m.sparse}


def load(configfile) -> dict:
    return sd2_config.load(REPO / configfile)


def pairs(cfg) -> list[tuple[str, str]]:
    """(target, draft) pairs: a model never drafts for itself."""
    return [(t, d) for t in cfg["targets"] for d in cfg["drafts"] if d != t]


def n_variants(cfg) -> int:
    """Drafts made over all pairs: (variant, sparsity) per pair (sd2.variants.variants)."""
    return sum(len(variants.variants(cfg, t, d)) for t, d in pairs(cfg))


def n_drafts(cfg) -> int:
    """Measure jobs, one per measured draft (every eval set in it): (target, draft) pair x (variant, sparsity,
    quantization)."""
    return sum(len(variants.variants(cfg, t, d, quantized=True)) for t, d in pairs(cfg))


def n_cells(cfg) -> int:
    """Measured cells: eval set x measured draft."""
    return len(cfg["data"]["eval_sets"]) * n_drafts(cfg)


def dry_run(workdir, configfile="config/test.yaml", *args):
    proc = subprocess.run(
        snakemake_cmd(workdir, "-n", "--quiet", "rules", *args, configfile=configfile), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def job_counts(text):
    """Parse Snakemake's 'Job stats' table into {rule: count}."""
    counts, in_table = {}, False
    for line in text.splitlines():
        parts = line.split()
        if line.startswith("job ") and "count" in line:
            in_table = True
        elif in_table and len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
        elif in_table and not parts:
            break
    counts.pop("total", None)
    return counts


def test_all_outputs(tiny_run):
    cfg = load("config/test.yaml")
    records = sorted((tiny_run / "results" / "records").rglob("*.json"))
    assert len(records) == n_cells(cfg)
    table = pd.read_csv(tiny_run / "results" / "tables" / "measurements.csv")
    measure = cfg["measure"]
    # Rows per record file: same tokenizer, the walk at k = 1..k_max + sampled assisted generation
    # + the TVD estimate at k = 1..k_max; across tokenizers, the intersection walk at k = 1..k_max + the
    # UAG walk at each headline k + sampled assisted generation.
    models = cfg["models"]
    same = [(t, d) for t, d in pairs(cfg) if models[t]["tokenizer"] == models[d]["tokenizer"]]
    other = [p for p in pairs(cfg) if p not in same]
    assert same and other  # the tiny config covers both decoding paths
    per_file = {
        p: 2 * measure["k_max"] + 1 if p in same else measure["k_max"] + len(measure["k"]) + 1 for p in pairs(cfg)
    }
    assert len(table) == len(cfg["data"]["eval_sets"]) * sum(
        len(variants.variants(cfg, t, d)) * per_file[(t, d)] for t, d in pairs(cfg)
    )
    assert set(table["method"]) == set(cfg["methods"])
    # Direct Alignment (TVD++ against the target's logits) only where the tokenizers match.
    align = table[table["method"] == "direct_align"]
    assert set(align["target"]) == {t for t, _ in same} and set(align["loss"]) == {"tvdpp"}
    assert (
        set(table.loc[table["method"] == "sd2", "loss"]) == {"ce"}
        and table.loc[table["method"] == "dense", "loss"].isna().all()
    )
    assert set(table["sparsity"]) == {0, 50}
    assert (table["mal"] <= table["k"] + 1).all() and (table["mal"] >= 1).all()
    walk = table[table["estimator"] == "teacher_forced_walk"]
    assert set(walk["k"]) == set(range(1, measure["k_max"] + 1)) and (walk["target"] == "tiny-llama").all()
    checked = walk[walk["headline_k"]]
    assert (
        checked["checked_prompts"] + checked["draft_near_ties"] + checked["target_near_ties"] == measure["n_check"]
    ).all()
    assert (checked["checked_steps"] > 0).all() and checked["speedup"].notna().all()
    assert (table["mal_ci_low"] <= table["mal"]).all() and (table["mal"] <= table["mal_ci_high"]).all()
    assert set(table["same_tokenizer"]) == {True, False}
    outputs = sorted((tiny_run / "work" / "target_outputs").rglob("*.json"))
    assert len(outputs) == len(cfg["targets"]) * len(cfg["data"]["eval_sets"])  # shared by every draft
    comparisons = pd.read_csv(tiny_run / "results" / "tables" / "comparisons.csv")
    # One row per (target, draft, sparsity, eval set), temperature and estimator at the headline k for sd2
    # against its baselines (greedy across tokenizers: the UAG and the intersection walks), one per
    # (same-tokenizer pair, eval set) and temperature for Direct Alignment against dense_sd (ce).
    per_pair = len(cfg["data"]["eval_sets"]) * len(measure["temperatures"])
    baseline = comparisons[comparisons["loss"] == "ce"]
    rows_per_pair = {p: per_pair if p in same else per_pair + len(cfg["data"]["eval_sets"]) for p in pairs(cfg)}
    assert len(baseline) == len(cfg["sparsities"]) * sum(rows_per_pair.values())
    assert baseline["mal_ratio_vs_layer_pruned"].notna().all()
    by_loss = comparisons[comparisons["loss"] != "ce"]
    assert len(by_loss) == len(same) * per_pair and set(by_loss["ce_method"]) == {"dense_sd"}
    assert by_loss["mal_ratio_vs_ce"].notna().all()
    sparse = table[table["sparsity"] == 50]
    assert (sparse["draft_macs_per_token"] < table[table["method"] == "dense"]["draft_macs_per_token"].max()).all()
    for name in ("mal_vs_sparsity", "mal_vs_macs", "loss_curves"):
        assert (tiny_run / "results" / "figures" / f"{name}.png").stat().st_size > 1000
    models = pd.read_csv(tiny_run / "results" / "tables" / "models.csv")
    assert set(models["model"]) == set(cfg["models"])
    training = pd.read_csv(tiny_run / "results" / "tables" / "training.csv")
    assert set(training["stage"]) == {"pretrain", "instruct", "finetune"}
    record = json.loads(records[0].read_text())
    assert "Mean Accepted Length" in json.dumps(record["definitions"])
    # Every draft is exported (the tiny drafts are trained here, the dense one too), with its vLLM command.
    exports = sorted((tiny_run / "work" / "export").glob("*/*/*/sd2_draft.json"))
    assert len(exports) == n_variants(cfg)
    assert all("draft_model" in json.loads(p.read_text())["vllm"]["serve"] for p in exports)
    assert record["records"][0]["provenance"]["seed"] == 0


def exports_decode_the_recorded_steps(workdir, results, target_dir, eval_set, *, k, max_new_tokens, prompts) -> int:
    """Load every export of the target at target_dir with AutoModelForCausalLM alone and decode its first `prompts`
    cached prompts with transformers' assisted generation; each must commit the tokens, in the steps, that the
    draft's record counts there. Returns how many prompts were compared: one where batch-1 decoding leaves the
    cached continuation (a floating-point near-tie) cannot be, and is skipped."""
    import torch
    from transformers import AutoModelForCausalLM

    from sd2.generation import decoding_kwargs
    from sd2.measure.speculative import pin_draft, sd_generate

    target_name = Path(target_dir).name
    items = json.loads((workdir / "target_outputs" / target_name / f"{eval_set}.json").read_text())["items"]
    target = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    settings = decoding_kwargs(0.0, max_new_tokens, target.generation_config.pad_token_id)
    compared = 0
    for meta in sorted((workdir / "export" / target_name).glob("*/*/sd2_draft.json")):
        export = meta.parent
        record = json.loads(
            (results / "records" / eval_set / target_name / export.parent.name / f"{export.name}.json").read_text()
        )
        walk = next(r for r in record["records"] if r["estimator"] == "teacher_forced_walk" and r["k"] == k)
        draft = AutoModelForCausalLM.from_pretrained(export).eval()
        pin_draft(draft, k)
        for i, item in enumerate(items[:prompts]):
            new, steps = sd_generate(target, draft, torch.tensor([item["prompt_ids"]]), settings)
            if new.tolist() != item["continuation_ids"]:
                continue
            assert sum(c for c, _ in steps[:-1]) == walk["per_prompt"]["accepted_tokens"][i], export
            assert len(steps) - 1 == walk["per_prompt"]["steps"][i], export
            compared += 1
    return compared


def test_exports_load_with_transformers_alone_and_decode_the_recorded_steps(tiny_run):
    """Every export of the same-tokenizer target decodes, in transformers alone, the steps its record counts."""
    cfg = load("config/test.yaml")
    n = len(variants.variants(cfg, "tiny-llama", cfg["drafts"][0]))
    compared = exports_decode_the_recorded_steps(
        tiny_run / "work",
        tiny_run / "results",
        tiny_run / "work" / "models" / "tiny-llama",
        "humaneval",
        k=cfg["measure"]["k"][0],
        max_new_tokens=cfg["measure"]["max_new_tokens"],
        prompts=3,
    )
    assert compared >= 2 * n


@pytest.mark.real_weights
def test_real_model_exports_decode_the_recorded_steps():
    """`make real`'s exports, where this checkout has run it: the same check on SmolLM2 and its drafts."""
    cfg = load("config/real.yaml")
    work, target = REPO / cfg["workdir"], cfg["targets"][0]
    if not (work / "export" / target).is_dir():
        pytest.skip(f"no {cfg['workdir']}/export/{target}: run `make real` first")
    drafts = sum(len(variants.variants(cfg, target, d)) for d in cfg["drafts"])
    compared = exports_decode_the_recorded_steps(
        work,
        REPO / cfg["results_dir"],
        work / "hub" / target,
        "humaneval",
        k=cfg["measure"]["k"][0],
        max_new_tokens=cfg["measure"]["max_new_tokens"],
        prompts=1,
    )
    assert compared >= drafts - 2


def test_second_run_schedules_nothing(tiny_run):
    assert "Nothing to be done" in dry_run(tiny_run)


def test_changing_one_sparsity_reruns_only_its_jobs(tiny_run, tmp_path):
    raw = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump({**raw, "sparsities": [60]}))
    cfg = load(changed)
    proc = subprocess.run(snakemake_cmd(tiny_run, "-n", configfile=changed), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = job_counts(proc.stdout + proc.stderr)
    # Only the new level: prune (calibrated on each target's data and on the original data),
    # layer_prune (per draft), finetune (sd2 and layer_pruned per target, sparse_sft once on the
    # original data), measure and export_draft (the sparse methods); then the tables.
    targets, drafts = len(cfg["targets"]), len(cfg["drafts"])
    expect = {
        "prune": (targets + 1) * drafts,
        "layer_prune": drafts,
        "finetune": (2 * targets + 1) * drafts,
        "measure": n_drafts(cfg) - n_drafts({**cfg, "methods": [m for m in cfg["methods"] if m not in SPARSE_METHODS]}),
        # One export per (target, draft) pair and sparse method at the new level (config export.enabled).
        "export_draft": sum(d != t for t in cfg["targets"] for d in cfg["drafts"]) * len(SPARSE_METHODS),
        "collect": 1,
        "figures": 1,
        "all": 1,
    }
    assert cfg["methods"] == load("config/test.yaml")["methods"] and set(cfg["methods"]) >= SPARSE_METHODS
    assert cfg["losses"] == ["ce"]
    assert counts == expect, counts


def test_figures_from_tables_alone(tiny_run, tmp_path):
    """`make figures`: with only the tables present, the figures job is the only job."""
    tables = tmp_path / "results" / "tables"
    tables.mkdir(parents=True)
    for name in ("measurements.csv", "comparisons.csv", "training.csv"):
        (tables / name).write_bytes((tiny_run / "results" / "tables" / name).read_bytes())
    proc = subprocess.run(
        snakemake_cmd(tmp_path, "figures", "--allowed-rules", "figures", "--cores", "1"),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "results" / "figures" / "speedup.pdf").exists()
    assert not (tmp_path / "work").exists()


def job_resources(text):
    """{rule: {(gpu, mem_mb), ...}} of the jobs a dry run lists."""
    found, rule = {}, None
    for line in text.splitlines():
        if line.startswith(("rule ", "localrule ")):
            rule = line.split()[1].rstrip(":")
        elif line.strip().startswith("resources:") and "gpu=" in line:
            res = dict(item.split("=", 1) for item in line.split(":", 1)[1].replace(" ", "").split(","))
            found.setdefault(rule, set()).add((int(res["gpu"]), int(res["mem_mb"])))
    return found


def test_dry_run_builds_every_shipped_config(tmp_path):
    outs = {}
    shipped = ("config/config.yaml", "config/test.yaml", "config/paper.yaml", "config/families.yaml")
    for name in (*shipped, "config/quantization.yaml", "config/real.yaml", "config/parallel.yaml"):
        proc = subprocess.run(
            snakemake_cmd(tmp_path / name.replace("/", "_"), "-n", "-p", configfile=name),
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[name] = proc.stdout + proc.stderr
        assert job_counts(outs[name])["measure"] == n_drafts(load(name))
    # CPU runs (resources.gpu 0): every model job asks for the config's memory and no GPU, as ever.
    for name in ("config/config.yaml", "config/test.yaml"):
        asked = set().union(*job_resources(outs[name]).values())
        assert asked == {(0, load(name)["resources"]["mem_mb"])}, (name, asked)
        assert "--gpus" not in outs[name] and "--device-map" not in outs[name]
    # The paper config's jobs: each asks for what its memory plan needs (sd2.memory).
    out = outs["config/paper.yaml"]
    res = job_resources(out)
    gpus = {rule: {g for g, _ in r} for rule, r in res.items()}
    assert gpus["layer_prune"] == {0}  # CPU only
    assert gpus["self_distill"] == {1, 4}  # the 8B and 7B targets on one GPU, the 70B on four
    assert gpus["target_outputs"] == {1, 3} and 3 in gpus["measure"] and gpus["prune"] == {1}
    assert len({m for r in res.values() for _, m in r}) > 3  # host memory differs by job
    # The 70B target is spread over its GPUs; the jobs check for CUDA at once.
    assert "--target meta-llama/Llama-3.1-70B-Instruct" in out and "--gpus 4 --device-map auto" in out
    assert not re.search(r"sd2 layer-prune [^\n]*--gpus", out)
    # The other drafter families: heads for every target at both sizes, trees in the measure jobs.
    counts = job_counts(out)
    heads = len(load("config/paper.yaml")["targets"]) * 4
    assert counts["train_head"] == heads and counts["measure_head"] == heads * len(
        load("config/paper.yaml")["data"]["eval_sets"]
    )
    assert '"tree_budgets": [4, 8, 16]' in out
    families = job_counts(outs["config/families.yaml"])
    assert families["train_head"] == 4 and "train_sparse_head" not in families and families["measure_head"] == 4
    # Quantized drafts: every (draft, variant, sparsity) of both llama drafts once per scheme,
    # one-shot and quantization-aware (every variant there is fine-tuned).
    quantized = job_counts(outs["config/quantization.yaml"])
    assert quantized["quantize"] == 2 * 5 * 2 * 2 and quantized["measure"] == 2 * 5 * (1 + 2 * 2)
    assert "quantize" not in job_counts(outs["config/config.yaml"])
    # The real model: fetched once (hub or GGUF), one draft cut from its layers, one with its tokenizer.
    real = job_counts(outs["config/real.yaml"])
    assert real["fetch_model"] == real["layer_subset"] == real["pretrain"] == 1 and "download_model" not in real
    assert "sd2 train-tokenizer" in outs["config/real.yaml"] and "--kind from_model --model" in outs["config/real.yaml"]
    # Parallel drafts of the real model: dense_sd and sd2 at both levels with pard beside ce, for both drafts.
    parallel = outs["config/parallel.yaml"]
    tuned = set(re.findall(r"work-real/drafts/smollm2-135m-instruct/([\w-]+)/([\w+]+-s\d+)\b", parallel))
    assert {v for d, v in tuned if d == "smollm2-layers6"} == {
        f"{m}{loss}-s{s}"
        for m, levels in (("dense_sd", [0]), ("sd2", [50, 70]))
        for s in levels
        for loss in ("", "+pard")
    }


def test_report(tiny_run, tmp_path):
    """`snakemake --report`: a self-contained HTML report with the figures and captions."""
    report = tmp_path / "report.html"
    proc = subprocess.run(snakemake_cmd(tiny_run, "--report", str(report)), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report.stat().st_size > 100_000


def test_online_tracking_without_a_login_stops_before_any_job(tmp_path):
    """wandb.mode online: the main process checks the login once, before the first job (not in a dry run)."""
    raw = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    online = tmp_path / "online.yaml"
    online.write_text(yaml.safe_dump({**raw, "wandb": {"mode": "online"}}))
    # No credentials anywhere wandb looks: an empty home, no key, no netrc.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "NETRC"))}
    env["HOME"] = str(tmp_path / "home")
    run = tmp_path / "run"
    cmd = snakemake_cmd(run, "--cores", "1", "results/data/manifest.json", configfile=online)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode != 0
    assert "wandb.mode is 'online' but wandb finds no credentials" in proc.stdout + proc.stderr
    assert not (run / "work").exists() and not (run / "logs").exists()
    dry = subprocess.run(snakemake_cmd(run, "-n", configfile=online), capture_output=True, text=True, env=env)
    assert dry.returncode == 0, dry.stderr[-3000:]
