"""`make readme`: the result blocks of the README and of docs/*.md, generated from the committed tables.

Every number the documentation shows about a run sits between a pair of markers,
<!-- generated:NAME --> and <!-- /generated:NAME -->, in README.md or in any page of docs/, and is
rewritten from results/ (or, for the methods table, from the registry sd2.methods) by this module;
text outside the markers is left alone. No torch here.
"""

import json
import re
from pathlib import Path

import pandas as pd

from sd2 import methods, variants
from sd2.report.collect import with_variant_columns
from sd2.report.comparisons import (
    EXACT_CHAINS,
    MIN_PROMPTS_FOR_SIGNIFICANCE,
    baseline_comparisons,
    exact_greedy_cells,
    family_comparisons,
    loss_comparisons,
    with_sd2_comparisons,
)
from sd2.report.markdown import ci_column, draft_columns, markdown_table, summary_markdown, time_by_rule, with_ci
from sd2.report.parallel import parallel_block
from sd2.report.per_prompt import groups_block
from sd2.report.real_model import beside_the_paper, layer_subsets, real_model, real_time_by_rule
from sd2.report.real_model import sparse_kernels as real_sparse_kernels
from sd2.report.replicates import replicates_block
from sd2.report.verdicts import headline_verdicts, verdicts


def run_time(results: Path) -> str:
    path = results / "run_time.json"
    if not path.exists():
        return "No recorded run from nothing yet (`make clean && make run` writes `results/run_time.json`)."
    rec = json.loads(path.read_text())
    machine = rec["machine"]
    models = ", ".join(
        f"{name} {m['tokens_per_s']:,.0f} tokens/s ({m['precision']})" for name, m in rec["probe"]["models"].items()
    )
    return (
        f"`make run` from nothing: **{rec['seconds']} s ({rec['seconds'] / 60:.0f} min)** on {machine['cpu']}, "
        f"{machine['cores']} cores, native bf16: {'yes' if machine['native_bf16'] else 'no'} "
        f"({rec['provenance']['created'][:10]}, `results/run_time.json`). "
        f"The throughput probe before it: {models}."
    )


def _machine(record: dict) -> str:
    machine = record["machine"]
    bf16 = "native bf16" if machine.get("native_bf16") else "no native bf16"
    return f"{machine['cpu']}, {machine['cores']} cores, {bf16}"


def _test_time(target: str, record: dict) -> str:
    counts = ", ".join(f"{record[key]} {key}" for key in ("passed", "skipped") if record.get(key))
    return (
        f"- `make {target}`: **{record['seconds'] / 60:.0f} min** ({counts}) on {_machine(record)} "
        f"({record['created'][:10]}, `make test-times`)."
    )


def commands(results: Path) -> str:
    """How long the two commands took when they last ran in full (results/run_time.json, results/test_time.json)."""
    run = results / "run_time.json"
    if run.exists():
        rec = json.loads(run.read_text())
        lines = [
            f"- `make run` from nothing: **{rec['seconds'] / 60:.0f} min** ({rec['seconds']:,} s) on {_machine(rec)} "
            f"({rec['provenance']['created'][:10]}, `results/run_time.json`)."
        ]
    else:
        lines = [
            "- `make run`: no recorded run from nothing yet (`make clean && make run` writes `results/run_time.json`)."
        ]
    tests = results / "test_time.json"
    recorded = json.loads(tests.read_text()) if tests.exists() else {}
    if "test" not in recorded:
        lines.append(
            "- `make test`: not timed yet (`make test-times` records both suites' wall time in results/test_time.json)."
        )
    lines += [_test_time(target, recorded[target]) for target in ("test", "test-integration") if target in recorded]
    return "\n".join(lines)


def models(results: Path) -> str:
    table = pd.read_csv(results / "tables" / "models.csv")
    return markdown_table(table)


# The demo models' aims: what makes the default run's numbers worth reading.
AIMS = {
    "target_body_rate": 0.8,
    "target_distinct_4gram_share": 0.6,
    "target_parse_rate": 0.5,
    "draft_distinct_4gram_share": 0.3,
    "target_over_draft_parameters": 3.0,
    "best_dense_sd_mal": 2.0,
    "heldout_half_width": 0.11,
    "sweep_minutes": 60,
}
HELDOUT = "stdlib_heldout"


def _check(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _target_aims(targets: pd.DataFrame) -> list[str]:
    lines = []
    for t in targets.itertuples():
        ok = (
            t.body_rate >= AIMS["target_body_rate"]
            and t.distinct_4gram_share >= AIMS["target_distinct_4gram_share"]
            and t.parse_rate >= AIMS["target_parse_rate"]
        )
        lines.append(
            f"- target {t.model}: body rate {t.body_rate:.2f} (aim >= {AIMS['target_body_rate']}), "
            f"distinct 4-gram share {t.distinct_4gram_share:.2f} (>= {AIMS['target_distinct_4gram_share']}), "
            f"parse rate {t.parse_rate:.2f} "
            f"(>= {AIMS['target_parse_rate']}), on {t.n_prompts} prompts: {_check(ok)}."
        )
    return lines


def _draft_aims(drafts: pd.DataFrame, targets: pd.DataFrame) -> list[str]:
    """A draft must write varied bodies and be worse per byte than every target (else the pair says little)."""
    best_target_bpb = targets["val_bits_per_byte"].max()
    target_bpb = ", ".join(f"{b:.3f}" for b in targets["val_bits_per_byte"])
    lines = []
    for d in drafts.itertuples():
        ok = (
            d.distinct_4gram_share >= AIMS["draft_distinct_4gram_share"]
            and d.body_rate > 0
            and d.val_bits_per_byte > best_target_bpb
        )
        lines.append(
            f"- draft {d.model}: distinct 4-gram share {d.distinct_4gram_share:.2f} "
            f"(>= {AIMS['draft_distinct_4gram_share']}), "
            f"body rate {d.body_rate:.2f}, {d.val_bits_per_byte:.3f} bits/byte against the targets' "
            f"{target_bpb} (worse than every target): {_check(ok)}."
        )
    ratio = targets["parameters"].min() / drafts["parameters"].max()
    lines.append(
        f"- smallest target / largest draft: {ratio:.2f}x parameters (>= {AIMS['target_over_draft_parameters']}): "
        f"{_check(ratio >= AIMS['target_over_draft_parameters'])}."
    )
    return lines


def _best_dense_sd_aim(results: Path) -> list[str]:
    meas = results / "tables" / "measurements.csv"
    if not meas.exists():
        return []
    df = with_variant_columns(pd.read_csv(meas))
    first_set = df["eval_set"].iloc[0]
    sd = df[
        (df["method"] == "dense_sd")
        & (df["loss"] == methods.DEFAULT_LOSS)
        & df["headline_k"]
        & (df["temperature"] == 0)
        & (df["eval_set"] == first_set)
        & (df["estimator"] == "teacher_forced_walk")
    ]
    if not len(sd):
        return []
    b = sd.loc[sd["mal"].idxmax()]
    return [
        f"- best dense_sd draft, greedy MAL at k = {b['k']} on {first_set}: {b['target']}/{b['draft']} "
        f"{b['mal']:.2f} [{b['mal_ci_low']:.2f}, {b['mal_ci_high']:.2f}] (>= {AIMS['best_dense_sd_mal']}): "
        f"{_check(b['mal'] >= AIMS['best_dense_sd_mal'])}."
    ]


def _heldout_width_aim(results: Path) -> list[str]:
    """The held-out set must be large enough to separate the drafts: every greedy cell's 95% interval at the
    headline k, under an exact walk, at most this wide on each side."""
    meas = results / "tables" / "measurements.csv"
    if not meas.exists():
        return []
    df = pd.read_csv(meas)
    cells = df[
        (df["eval_set"] == HELDOUT) & df["headline_k"] & (df["temperature"] == 0) & df["estimator"].isin(EXACT_CHAINS)
    ]
    if not len(cells):
        return []
    half = (cells["mal_ci_high"] - cells["mal_ci_low"]) / 2
    w = cells.loc[half.idxmax()]
    aim = AIMS["heldout_half_width"]
    return [
        f"- widest 95% half-width of a greedy MAL at k = {w['k']} on {HELDOUT} ({int(w['n_prompts'])} prompts, "
        f"{len(cells)} cells): {half.max():.3f}, {w['target']}/{w['draft']} {w['method']} s{w['sparsity']} "
        f"under {w['estimator']} (<= {aim}): {_check(half.max() <= aim)}."
    ]


def _sweep_time_aim(results: Path) -> list[str]:
    record = results / "run_time.json"
    if not record.exists():
        return []
    rec = json.loads(record.read_text())
    minutes = rec["seconds"] / 60
    return [
        f"- the whole default sweep: {minutes:.0f} min on {rec['machine']['cpu']}, "
        f"{rec['machine']['cores']} cores, native bf16 {'yes' if rec['machine']['native_bf16'] else 'no'} "
        f"(<= {AIMS['sweep_minutes']}): {_check(minutes <= AIMS['sweep_minutes'])}."
    ]


def aims(results: Path) -> str:
    """Each aim of the demo models against the tables, met or missed, with the numbers."""
    m = pd.read_csv(results / "tables" / "models.csv")
    targets, drafts = m[m["role"] == "target"], m[m["role"] == "draft"]
    lines = [
        *_target_aims(targets),
        *_draft_aims(drafts, targets),
        *_best_dense_sd_aim(results),
        *_heldout_width_aim(results),
        *_sweep_time_aim(results),
    ]
    return "\n".join(lines)


def per_draft(results: Path) -> str:
    measurements = pd.read_csv(results / "tables" / "measurements.csv")
    compared = pd.read_csv(results / "tables" / "comparisons.csv")
    return summary_markdown(measurements, compared)


def _share(df: pd.DataFrame, column: str) -> str:
    return f"{int(df[column].sum())} of {len(df)}"


def _directions(cells: pd.DataFrame, prefix: str) -> tuple[int, int, int]:
    """Cells whose paired ratio (columns <prefix>_significant, _ci_low, _ci_high) is significantly above 1,
    significantly below 1, and neither."""
    significant = cells[f"{prefix}_significant"]
    up = int((significant & (cells[f"{prefix}_ci_low"] > 1)).sum())
    down = int((significant & (cells[f"{prefix}_ci_high"] < 1)).sum())
    return up, down, len(cells) - up - down


def _pooled(compared: pd.DataFrame) -> list[str]:
    """Pooled ranges of SD²'s paired comparisons over cells of one target and estimator, each with enough
    prompts to be called significant (MIN_PROMPTS_FOR_SIGNIFICANCE); the others are named apart."""
    lines = []
    for (target, estimator), cells in compared.groupby(["target", "estimator"], sort=False):
        few = cells[cells["n_prompts"] < MIN_PROMPTS_FOR_SIGNIFICANCE]
        cells = cells[cells["n_prompts"] >= MIN_PROMPTS_FOR_SIGNIFICANCE]
        where = f"{target}, {estimator}"
        if len(few):
            lines.append(
                f"- **{where}**: {len(few)} cells on fewer than {MIN_PROMPTS_FOR_SIGNIFICANCE} prompts, "
                "left out of every range and never called significant."
            )
        ratio, change = cells.dropna(subset=["ratio_ci_low"]), cells.dropna(subset=["change_ci_low"])
        if len(ratio):
            up, down, neither = _directions(ratio, "ratio")
            lines.append(
                f"- **{where}: SD² / layer-pruned MAL** (greedy, {len(ratio)} cells of draft x sparsity x eval set, "
                f"paired 95% bootstrap CIs over {int(ratio['n_prompts'].min())}-{int(ratio['n_prompts'].max())} "
                f"prompts): ratio {ratio['mal_ratio_vs_layer_pruned'].min():.2f} to "
                f"{ratio['mal_ratio_vs_layer_pruned'].max():.2f}; significantly above 1 in {up} cells, below 1 "
                f"in {down}, not significant in {neither}; the layer-pruned draft's MACs "
                f"differ from SD²'s by {ratio['layer_pruned_macs_vs_sd2_pct'].min():+.1f}% to "
                f"{ratio['layer_pruned_macs_vs_sd2_pct'].max():+.1f}%."
            )
        if len(change):
            lines.append(
                f"- **{where}: SD² against dense_sd**: MACs {-change['macs_reduction_pct'].max():.1f}% "
                f"to {-change['macs_reduction_pct'].min():.1f}%, MAL change {change['mal_change_pct'].min():+.1f}% "
                f"to {change['mal_change_pct'].max():+.1f}%; significant in {_share(change, 'change_significant')} "
                "cells."
            )
    return lines


def significance(results: Path) -> str:
    """What the paired comparisons say, in sentences, greedy decoding: per target and estimator."""
    compared = pd.read_csv(results / "tables" / "comparisons.csv")
    # Each kind of row leaves the other kind's *_significant empty, so pandas reads those columns as objects.
    flags = [c for c in ("ratio_significant", "change_significant", "vs_ce_significant") if c in compared]
    compared[flags] = compared[flags].eq(True)
    by_loss = loss_comparisons(compared[compared["temperature"] == 0])
    by_loss = by_loss.dropna(subset=["vs_ce_ci_low"]) if len(by_loss) else by_loss
    greedy = baseline_comparisons(compared[compared["temperature"] == 0])
    if not len(greedy):
        return "No comparisons in the tables."
    lines = _pooled(greedy)
    for (method, loss), cells in by_loss.groupby(["method", "loss"], sort=False):
        up, down, neither = _directions(cells, "vs_ce")
        lines.append(
            f"- **{variants.label(method, loss)} / {variants.label(cells['ce_method'].iloc[0], 'ce')} (ce) MAL** "
            f"(greedy, {len(cells)} cells, same steps and data): ratio {cells['mal_ratio_vs_ce'].min():.2f} to "
            f"{cells['mal_ratio_vs_ce'].max():.2f}; significantly above 1 in {up} cells, below 1 in "
            f"{down}, not significant in {neither}."
        )
    return "\n".join(lines)


def measure_time(results: Path) -> str:
    """Measuring part of the sweep now, and the previous measurement timed on a sample of the same cells."""
    tables = results / "tables"
    if not (tables / "job_times.csv").exists():
        return "No job times recorded (`make run` writes `results/tables/job_times.csv`)."
    now = pd.read_csv(tables / "job_times.csv")
    measure, outputs = now[now["rule"] == "measure"], now[now["rule"] == "target_outputs"]
    total = measure["seconds"].sum() + outputs["seconds"].sum()
    lines = [
        f"- now: {total:,.0f} job-seconds: {len(measure)} `measure` jobs, {measure['seconds'].sum():,.0f} s "
        f"(mean {measure['seconds'].mean():.1f} s, max {measure['seconds'].max():.1f} s), "
        f"and {len(outputs)} `target_outputs` jobs, {outputs['seconds'].sum():,.0f} s (`results/tables/job_times.csv`)."
    ]
    before_path = tables / "job_times_before.csv"
    if before_path.exists():
        before = pd.read_csv(before_path)
        before = before[before["rule"] == "measure"]
        estimate = before["seconds"].mean() * len(measure)
        lines.append(
            f"- before: the previous `measure` (assisted generation only, 6 prompts x 40 tokens, k = 5) took "
            f"{before['seconds'].mean():.1f} s per job on {len(before)} cells of the previous default models "
            f"(5.5M-parameter targets; same machine, two jobs at a time as in the sweep): about {estimate:,.0f} "
            f"job-seconds for {len(measure)} jobs "
            f"(`results/tables/job_times_before.csv`); now / before = {total / estimate:.2f}, and "
            f"{measure['seconds'].mean() / before['seconds'].mean():.2f}x per `measure` job alone (the "
            f"`target_outputs` jobs are shared by every draft of a target and eval set)."
        )
    return "\n".join(lines)


def benchmark_table(name: str, script: str):
    """A block that shows a benchmark's CSV (results/tables/<name>.csv) as it is."""

    def render(results: Path) -> str:
        path = results / "tables" / f"{name}.csv"
        if not path.exists():
            return f"Not measured yet (`python benchmarks/{script}.py --out results/tables/{name}.csv`)."
        return markdown_table(pd.read_csv(path)) + f"\n(`benchmarks/{script}.py`, `results/tables/{name}.csv`)"

    return render


def precision(results: Path) -> str:
    path = results / "tables" / "precision.csv"
    if not path.exists():
        return "Not measured yet (`python benchmarks/precision.py --out results/tables/precision.csv`)."
    r = pd.read_csv(path).iloc[0]
    return (
        f"{r['model']}, batch {r['batch']}, {r['threads']} threads on {r['cpu']} "
        f"(native bf16: {'yes' if r['native_bf16'] else 'no'}): "
        f"fp32 **{r['fp32_tokens_per_s']:,.0f} tokens/s**, bf16 autocast **{r['bf16_tokens_per_s']:,.0f} tokens/s** "
        f"(bf16 / fp32 = {r['bf16_over_fp32']:.3f}; `benchmarks/precision.py`, `results/tables/precision.csv`)."
    )


def cuda_jobs(name: str):
    """A block of jobs run one by one on a GPU (benchmarks/cuda_jobs.py, results/tables/<name>.csv)."""

    def render(results: Path) -> str:
        path = results / "tables" / f"{name}.csv"
        if not path.exists():
            run = f"python benchmarks/cuda_jobs.py dry.txt --out results/tables/{name}.csv"
            return f"Not measured yet (`{run}` on a GPU)."
        jobs = pd.read_csv(path)
        jobs["job"] = jobs["log"].str.removeprefix("logs/").str.removesuffix(".log")
        return markdown_table(jobs[["job", "status", "seconds", "peak_gpu_mib"]]) + (
            f"\n(`benchmarks/cuda_jobs.py`, `results/tables/{name}.csv`; its `failure` column holds"
            " each failed job's log tail)"
        )

    return render


def paper_plan(results: Path) -> str:
    """What each job of config/paper.yaml asks Slurm for (sd2.memory), from the config alone."""
    from sd2.config import load
    from sd2.memory import describe, job_plans

    config = load(results.parent / "config" / "paper.yaml")
    table = pd.DataFrame([describe(plan) for plan in job_plans(config)]).drop(columns=["mem_mb"])
    return markdown_table(table) + "\n(`python -m sd2 memory-plan --config config/paper.yaml`)"


def _families_dir(results: Path) -> Path:
    return results / "families"


def on_top_header(results: Path, name: str) -> tuple[str | None, list]:
    """The first line of a block of a config run on top of the default run (`make <name>`, writing
    results/<name>/): its recorded time, or that it has not completed; and its record files.
    None when it has not run at all."""
    sub = results / name
    path = sub / "run_time.json"
    records = sorted((sub / "records").rglob("*.json"))
    if not path.exists() and not records:
        return None, records
    if not path.exists():
        return (
            f"**`make {name}` has not completed** (no `results/{name}/run_time.json`): the rows below are the "
            f"{len(records)} record files it had written."
        ), records
    rec = json.loads(path.read_text())
    machine = rec["machine"]
    minutes = rec["seconds"] / 60
    where = f"{machine['cpu']}, {machine['cores']} cores ({rec['provenance']['created'][:10]}"
    first = (
        f"`make {name}` on top of the default run's `work/`: **{rec['seconds']} s ({minutes:.0f} min)** wall, "
        f"{rec['jobs']} job{'s' * (rec['jobs'] != 1)}, {rec['job_seconds']:,} job-seconds, on {where}, "
        f"`results/{name}/run_time.json`)."
    )
    earlier = rec.get("earlier")
    if earlier:
        first += (
            f" It added to an earlier completed run of this config ({earlier['seconds']} s, {earlier['jobs']} jobs, "
            f"{earlier['provenance']['created'][:10]}): it ran only the jobs the config had gained since."
        )
    elif not rec.get("whole_config", True):
        first += (
            " That invocation resumed one that was cut before timing was recorded: it ran only the jobs still "
            "missing, so its time covers those alone, not the whole config."
        )
    return first, records


def families(results: Path) -> str:
    """config/families.yaml's run: its time, and every drafter family against the dense self-distilled draft."""
    first, records = on_top_header(results, "families")
    if first is None:
        return "Not run yet: `make families` (after `make run`) writes `results/families/`."
    lines = [first, ""]
    df = family_comparisons(records)
    if not len(df):
        return "\n".join([*lines, "No greedy records in `results/families/records/`."])
    view = pd.DataFrame(
        {
            "target": df["target"],
            "eval set": df["eval_set"],
            "k": df["k"],
            "drafter": [variants.label(m, loss) for m, loss in zip(df["method"], df["loss"])],
            "draft": df["draft"],
            "sparsity": df["sparsity"],
            "estimator": df["estimator"],
            "n": df["n_prompts"],
            "MAL [95% CI]": ci_column(df, "mal", "mal_ci_low", "mal_ci_high"),
            "draft MACs/token": df["draft_macs_per_token"].map(lambda v: f"{v:,.0f}"),
            "improvement factor [95% CI]": ci_column(
                df, "improvement_factor", "improvement_factor_ci_low", "improvement_factor_ci_high"
            ),
            "MAL / dense_sd [paired 95% CI]": ci_column(
                df, "mal_ratio_vs_dense_sd", "vs_dense_sd_ci_low", "vs_dense_sd_ci_high"
            ),
            "significant": df["vs_dense_sd_significant"].map({True: "yes", False: "no"}),
            "checked": df["checked_prompts"].map(lambda v: "–" if v != v else f"{v:.0f}"),
        }
    )
    return "\n".join([*lines, markdown_table(view)])


def families_trees(results: Path) -> str:
    """Draft-token trees of config/families.yaml: MAL and improvement factor per node budget, beside the chain."""
    path = _families_dir(results) / "tables" / "measurements.csv"
    if not path.exists():
        return "Not run yet: `make families` (after `make run`) writes `results/families/`."
    df = with_variant_columns(pd.read_csv(path))
    greedy = df[df["temperature"] == 0]
    trees = greedy[greedy["estimator"] == "tree_walk"]
    if not len(trees):
        return "No tree rows in `results/families/tables/measurements.csv`."
    walk = greedy[greedy["estimator"] == "teacher_forced_walk"]
    chain = walk.assign(loss=walk["loss"].fillna("")).set_index(
        ["target", "draft", "method", "loss", "sparsity", "eval_set", "k"]
    )["mal"]
    rows = []
    for r in trees.itertuples():
        key = (
            r.target,
            r.draft,
            r.method,
            r.loss if isinstance(r.loss, str) else "",
            r.sparsity,
            r.eval_set,
            r.tree_budget,
        )
        rows.append(
            {
                "target": r.target,
                "eval set": r.eval_set,
                "drafter": variants.label(r.method, r.loss),
                "draft": r.draft,
                "sparsity": r.sparsity,
                "budget (nodes)": r.tree_budget,
                "branching": r.tree_branching,
                "MAL [95% CI]": with_ci(r.mal, r.mal_ci_low, r.mal_ci_high),
                "chain MAL, k = budget": f"{chain[key]:.2f}" if key in chain.index else "–",
                "improvement factor [95% CI]": with_ci(
                    r.improvement_factor, r.improvement_factor_ci_low, r.improvement_factor_ci_high
                ),
                "checked": "–" if r.checked_prompts != r.checked_prompts else f"{r.checked_prompts:.0f}",
            }
        )
    return markdown_table(pd.DataFrame(rows))


def families_significance(results: Path) -> str:
    """The loss variants against their ce variant, in config/families.yaml's run."""
    fam = _families_dir(results)
    if not (fam / "tables" / "comparisons.csv").exists():
        return "Not run yet: `make families` (after `make run`) writes `results/families/`."
    return significance(fam)


QUANTIZATION_KEYS = ["target", "draft", "method", "loss", "quantization", "sparsity", "eval_set", "k"]


def _quantization_view(df: pd.DataFrame) -> pd.DataFrame:
    """One row per draft as made or quantized: MAL, both costs, both improvement factors, the paired ratio."""
    return pd.DataFrame(
        {
            "target": df["target"],
            "eval set": df["eval_set"],
            "k": df["k"],
            "draft": df["draft"],
            "method": [variants.label(m, loss) for m, loss in zip(df["method"], df["loss"])],
            "sparsity": df["sparsity"],
            "quantization": df["quantization"],
            "n": df["n_prompts"],
            "MAL [95% CI]": ci_column(df, "mal", "mal_ci_low", "mal_ci_high"),
            "weight bytes/token": df["draft_weight_bytes_per_token"].map(lambda v: f"{v:,.0f}"),
            "MACs/token": df["draft_macs_per_token"].map(lambda v: f"{v:,.0f}"),
            "IF, MACs [95% CI]": ci_column(
                df, "improvement_factor", "improvement_factor_ci_low", "improvement_factor_ci_high"
            ),
            "IF, bytes [95% CI]": ci_column(
                df, "improvement_factor_bytes", "improvement_factor_bytes_ci_low", "improvement_factor_bytes_ci_high"
            ),
            "MAL / unquantized [paired 95% CI]": ci_column(
                df, "mal_ratio_vs_unquantized", "vs_unquantized_ci_low", "vs_unquantized_ci_high"
            ),
            "significant": df["vs_unquantized_significant"].map({True: "yes", False: "no"}).fillna("–"),
        }
    )


def _quantized_summary(vs: pd.DataFrame) -> str:
    """How many quantized drafts differ significantly from the same draft unquantized, and each scheme's range."""
    quantized = vs[vs["quantization"] != variants.NO_QUANTIZATION]
    significant = quantized["vs_unquantized_significant"].eq(True)
    worse = quantized[significant & (quantized["mal_ratio_vs_unquantized"] < 1)]
    better = quantized[significant & (quantized["mal_ratio_vs_unquantized"] > 1)]
    summary = (
        f"Quantized against unquantized (paired): {len(quantized)} drafts; MAL significantly lower in "
        f"{len(worse)}, significantly higher in {len(better)}, not distinguishable in "
        f"{len(quantized) - len(worse) - len(better)}."
    )
    for scheme, rows in quantized.groupby("quantization", sort=False):
        summary += (
            f" {scheme}: MAL ratio {rows['mal_ratio_vs_unquantized'].min():.3f} to "
            f"{rows['mal_ratio_vs_unquantized'].max():.3f}."
        )
    return summary


def _qat_section(qat: pd.DataFrame) -> list[str]:
    """Quantization-aware fine-tuning against one-shot quantization of the same draft, paired."""
    significant = qat["vs_one_shot_significant"].eq(True)
    worse = qat[significant & (qat["mal_ratio_vs_one_shot"] < 1)]
    better = qat[significant & (qat["mal_ratio_vs_one_shot"] > 1)]
    view = pd.DataFrame(
        {
            "draft": qat["draft"],
            "method": [variants.label(m, loss) for m, loss in zip(qat["method"], qat["loss"])],
            "sparsity": qat["sparsity"],
            "quantization": qat["quantization"],
            "MAL [95% CI]": ci_column(qat, "mal", "mal_ci_low", "mal_ci_high"),
            "one-shot MAL [95% CI]": ci_column(qat, "one_shot_mal", "one_shot_mal_ci_low", "one_shot_mal_ci_high"),
            "QAT / one-shot [paired 95% CI]": ci_column(
                qat, "mal_ratio_vs_one_shot", "vs_one_shot_ci_low", "vs_one_shot_ci_high"
            ),
            "significant": qat["vs_one_shot_significant"].map({True: "yes", False: "no"}),
        }
    )
    return [
        "",
        f"Quantization-aware fine-tuning against one-shot quantization at the same steps and data (paired): "
        f"{len(qat)} drafts; QAT significantly better in {len(better)}, significantly worse in {len(worse)}, "
        f"not distinguishable in {len(qat) - len(better) - len(worse)}.",
        "",
        markdown_table(view),
    ]


def quantization(results: Path) -> str:
    """config/quantization.yaml's run: every draft as made and quantized, greedy at the reported k: MAL,
    weight bytes and MACs per token, the improvement factor with either cost, and each quantized draft
    against the same draft unquantized (paired over the same prompts)."""
    first, _ = on_top_header(results, "quantization")
    tables = results / "quantization" / "tables"
    if first is None or not (tables / "measurements.csv").exists():
        return "Not run yet: `make quantization` (after `make run`) writes `results/quantization/`."
    df = with_variant_columns(pd.read_csv(tables / "measurements.csv"))
    df = df[(df["temperature"] == 0) & (df["estimator"] == "teacher_forced_walk") & df["headline_k"].eq(True)]
    compared = with_variant_columns(pd.read_csv(tables / "comparisons.csv"))
    ratio_columns = ["mal_ratio_vs_unquantized", "vs_unquantized_ci_low", "vs_unquantized_ci_high"]
    vs = compared[compared["mal_ratio_vs_unquantized"].notna()][
        QUANTIZATION_KEYS + ratio_columns + ["vs_unquantized_significant"]
    ]
    df = df.merge(vs, on=QUANTIZATION_KEYS, how="left")
    parts = [first, "", _quantized_summary(vs), "", markdown_table(_quantization_view(df))]
    if "mal_ratio_vs_one_shot" in compared:
        qat = compared[compared["mal_ratio_vs_one_shot"].notna()]
        if len(qat):
            parts += _qat_section(qat)
    return "\n".join(parts)


def sparse_kernels(results: Path) -> str:
    """benchmarks/sparse_kernels.py: per model, batch, dtype and threads, each sparse backend's speed-up over
    dense torch for a whole decoder layer's linears at every sparsity, and the CPU it ran on."""
    from sd2.report.plots import sparse_layer_speedups

    path = results / "tables" / "sparse_kernels.csv"
    if not path.exists():
        return "Not measured yet (`python benchmarks/sparse_kernels.py`)."
    table = pd.read_csv(path)
    layer = sparse_layer_speedups(table)
    layer = layer[layer["backend"] != "dense"]
    wide = layer.pivot_table(
        index=["model", "batch", "dtype", "threads", "backend"], columns="sparsity", values="speedup"
    ).reset_index()
    wide.columns = [f"{c}%" if isinstance(c, (int, float)) and not isinstance(c, bool) else c for c in wide.columns]
    wins = layer[(layer["speedup"] > 1) & layer["sparsity"].isin([50, 70]) & (layer["batch"] == 1)]
    best = (
        "; ".join(
            f"{r.model} {r.dtype} {r.threads} thread{'s' * (r.threads > 1)} at {r.sparsity}%: "
            f"{r.backend} {r.speedup:.2f}x"
            for r in wins.sort_values("speedup", ascending=False).itertuples()
        )
        or "none"
    )
    cpu = table["cpu"].dropna().iloc[0] if table["cpu"].notna().any() else "unknown CPU"
    return "\n".join(
        [
            f"CPU: {cpu}, torch {table['torch_version'].iloc[0]}. Speed-up = dense torch time / backend time for one "
            "decoder layer's linears (q, k, v, o, gate, up, down), > 1 = the sparse kernel is faster. "
            f"Batch-1 wins at the drafts' sparsities (50%, 70%): {best}.",
            "",
            markdown_table(wide.round(2)),
            "",
            "(`benchmarks/sparse_kernels.py`, `results/tables/sparse_kernels.csv`; per shape there)",
        ]
    )


RUN_TOKENS = {"speculative": "max_new_tokens", "draft_alone": "draft_tokens"}


def sparse_decoding(results: Path) -> str:
    """benchmarks/sparse_decoding.py: tokens/s of one draft run three ways (dense fp32, CSR fp32, dense bf16), in
    speculative decoding and alone, per case and threads, with paired 95% intervals and a verdict per ratio."""
    path = results / "tables" / "sparse_decoding.csv"
    if not path.exists():
        return "Not measured yet (`python benchmarks/sparse_decoding.py --out results/tables/sparse_decoding.csv`)."
    t = pd.read_csv(path)
    rows = []
    for r in t.to_dict("records"):
        for run, label in (("speculative", "speculative"), ("draft_alone", "draft alone")):
            row = {
                "case": r["case"],
                "threads": r["threads"],
                "run": label,
                "prompts × tokens": f"{r['prompts']} × {r[RUN_TOKENS[run]]}",
                "MAL": r["mal"] if run == "speculative" else float("nan"),
                "tokens/s dense fp32": r[f"{run}_tokens_per_s_dense"],
                "CSR fp32": r[f"{run}_tokens_per_s_csr"],
                "dense bf16": r[f"{run}_tokens_per_s_bf16"],
            }
            for a, b, label in (("csr", "dense", "CSR / dense fp32"), ("csr", "bf16", "CSR fp32 / dense bf16")):
                name = f"{run}_{a}_over_{b}"
                low, high = r[f"{name}_ci_low"], r[f"{name}_ci_high"]
                row[f"{label} [95% CI]"] = with_ci(r[name], low, high)
                row[f"{label}: CSR is"] = "faster" if low > 1 else "slower" if high < 1 else "not distinguishable"
            rows.append(row)
    return "\n".join(
        [
            f"CPU: {t['cpu'].iloc[0]}, torch {t['torch_version'].iloc[0]}, greedy, batch 1, k = {t['k'].iloc[0]}; "
            f"CSR layers per draft: {', '.join(f'{c} {n}' for c, n in dict(zip(t['case'], t['csr_layers'])).items())}. "
            "Ratios are tokens/s of one arm over another, paired by prompt (faster/slower = the 95% interval "
            "excludes 1). The target commits the same tokens with every arm: "
            f"{int(t['same_tokens'].sum())} of {int(t['prompts'].sum())} prompts agreed.",
            "",
            markdown_table(pd.DataFrame(rows)),
            "(`benchmarks/sparse_decoding.py`, `results/tables/sparse_decoding.csv`; per-prompt times in "
            "`results/tables/sparse_decoding.json`)",
        ]
    )


HEADLINE_METHODS = ("dense", "dense_sd", "layer_pruned", "sd2")


def headline(results: Path) -> str:
    """The one result the README shows: SD² against its dense and MAC-matched baselines on one target and
    eval set, greedy and exact, with SD² / layer-pruned paired over the same prompts."""
    if not (results / "tables" / "measurements.csv").exists():
        return "No measurements yet (`make run` writes `results/tables/measurements.csv`)."
    rows = with_sd2_comparisons(
        exact_greedy_cells(pd.read_csv(results / "tables" / "measurements.csv"), HEADLINE_METHODS),
        pd.read_csv(results / "tables" / "comparisons.csv"),
        ["mal_ratio_vs_layer_pruned", "ratio_ci_low", "ratio_ci_high", "ratio_significant"],
        HEADLINE_METHODS,
    )
    view = pd.DataFrame(
        {
            **draft_columns(rows),
            "SD² / layer-pruned [paired 95% CI]": ci_column(
                rows, "mal_ratio_vs_layer_pruned", "ratio_ci_low", "ratio_ci_high"
            ),
            "significant": rows["ratio_significant"].map({True: "yes", False: "no"}).fillna("–"),
        }
    )
    first = rows.iloc[0]
    return (
        f"{first['target']}, {first['eval_set']} ({first['n_prompts']} prompts), greedy, k = {first['k']}, "
        f"exact teacher-forced walk; 95% bootstrap intervals over prompts.\n\n"
        + markdown_table(view)
        + "(`results/tables/measurements.csv`, `results/tables/comparisons.csv`; every draft: docs/results.md)"
    )


TUNED_ON = {
    "target": "the target's self-distilled answers",
    "original": "the dataset's original responses",
    None: "not tuned",
}


def _method_row(m) -> dict:
    if m.kind == "head":
        start, sparsity = "the target's hidden states (a draft head)", "0 (a sparse copy: `heads.sparsities`)"
        loss = "its own training (rule `train_head`)"
    else:
        start = methods.START_POINTS[m.init].description
        sparsity = "every `sparsities` level" if m.sparse else "0"
        loss = "–" if not m.tuned else f"`{m.loss}` (fixed)" if m.loss else "every entry of `losses`"
    return {
        "method": f"`{m.name}`",
        "label": m.label,
        "starts from": start,
        "tuned on": TUNED_ON[m.data],
        "sparsity": sparsity,
        "loss": loss,
    }


def methods_table(results: Path) -> str:
    """The registry (sd2.methods) as tables: methods, fine-tuning losses, draft-head families."""
    losses = pd.DataFrame(
        {
            "loss": f"`{x.name}`",
            "teacher": {"target": "the target's logits", "draft": "the dense draft"}.get(x.teacher, "none"),
            "what it is": x.description,
            "implemented by": f"`{x.objective}`",
        }
        for x in methods.LOSSES.values()
    )
    heads = pd.DataFrame(
        {
            "head family": f"`{h.name}`",
            "module": f"`{h.module}`",
            "proposes": "beams (`heads.beam_width`)" if h.beams else "one chain",
            "default sizes (`heads.sizes`)": "; ".join(
                f"{size}: {', '.join(f'{key} {value}' for key, value in kwargs.items())}"
                for size, kwargs in h.default_sizes.items()
            ),
        }
        for h in methods.HEAD_FAMILIES.values()
    )
    return "\n".join(
        [
            markdown_table(pd.DataFrame(_method_row(m) for m in methods.METHODS)),
            markdown_table(losses),
            markdown_table(heads) + "(from the registry, `sd2/methods.py`)",
        ]
    )


BLOCKS = {
    "commands": commands,
    "headline": headline,
    "headline_verdicts": headline_verdicts,
    "verdicts": verdicts,
    "replicates": replicates_block,
    "replicates_summary": lambda results: replicates_block(results, listed=False),
    "parallel": lambda results: parallel_block(results / "parallel"),
    "real_model": real_model,
    "beside_the_paper": beside_the_paper,
    "layer_subsets": layer_subsets,
    "real_time_by_rule": real_time_by_rule,
    "real_sparse_kernels": real_sparse_kernels,
    "methods": methods_table,
    "run_time": run_time,
    "precision": precision,
    "models": models,
    "aims": aims,
    "time_by_rule": time_by_rule,
    "instruct_stage": benchmark_table("instruct_stage", "instruct_stage"),
    "instruct_steps": benchmark_table("instruct_steps", "instruct_steps"),
    "threads": benchmark_table("threads", "threads"),
    "length_grouping": benchmark_table("length_grouping", "length_grouping"),
    "cuda_jobs": cuda_jobs("cuda_jobs"),
    "cuda_jobs_demo": cuda_jobs("cuda_jobs_demo"),
    "paper_plan": paper_plan,
    "gpu_memory_plan": benchmark_table("gpu_memory_plan", "gpu_memory_plan"),
    "finetune_memory": benchmark_table("finetune_memory", "finetune_memory"),
    "per_draft": per_draft,
    "significance": significance,
    "prompt_groups": groups_block,
    "measure_time": measure_time,
    "families": families,
    "families_trees": families_trees,
    "families_significance": families_significance,
    "quantization": quantization,
    "quantize_real_shapes": benchmark_table("quantize_real_shapes", "quantize_real_shapes"),
    "sparse_kernels": sparse_kernels,
    "sparse_decoding": sparse_decoding,
}


MARKER = re.compile(r"<!-- generated:(\w+) -->")


def documents(readme_path) -> list[Path]:
    """Every file that may hold generated blocks: the README and the pages of docs/ beside it."""
    readme = Path(readme_path)
    return [readme, *sorted((readme.parent / "docs").glob("*.md"))]


def render(text: str, results: Path, rendered: dict) -> tuple[str, list[str]]:
    """text with each generated block rewritten (rendered caches each block's body by name); the names found."""
    found = []
    for name in MARKER.findall(text):
        pattern = re.compile(rf"(<!-- generated:{name} -->\n)(?:.*?\n)?(<!-- /generated:{name} -->)", re.S)
        if name not in rendered:
            rendered[name] = BLOCKS[name](results).strip()
        text = pattern.sub(lambda m, body=rendered[name]: m.group(1) + body + "\n" + m.group(2), text)
        found.append(name)
    return text, found


def regenerated(readme_path, results_dir) -> dict[Path, tuple[str, list[str]]]:
    """Each document's text with its blocks regenerated from results_dir, and the blocks it holds; an unknown
    block name anywhere is an error before anything is rendered."""
    texts = {path: path.read_text() for path in documents(readme_path)}
    for path, text in texts.items():
        unknown = set(MARKER.findall(text)) - set(BLOCKS)
        if unknown:
            raise ValueError(f"{path}: unknown generated block(s) {sorted(unknown)} (known: {sorted(BLOCKS)})")
    rendered = {}
    return {path: render(text, Path(results_dir), rendered) for path, text in texts.items()}


def stale(readme_path, results_dir) -> list[Path]:
    """The documents whose generated blocks differ from what `make readme` makes from results_dir now."""
    return [path for path, (text, _) in regenerated(readme_path, results_dir).items() if text != path.read_text()]


def update(readme_path, results_dir) -> list[str]:
    """Rewrite every generated block of the README and of docs/*.md beside it in place; the names of the blocks
    found, in document order."""
    found = []
    for path, (text, names) in regenerated(readme_path, results_dir).items():
        if text != path.read_text():
            path.write_text(text)
        found += names
    return found
