"""Rule `collect`: summary.md, the per-draft and comparison tables in markdown (the README shows them).

No torch here.
"""

from pathlib import Path

import pandas as pd

from sd2 import methods, variants
from sd2.report.collect import sort_measurements, with_variant_columns
from sd2.report.comparisons import baseline_comparisons, loss_comparisons

# Per-draft columns of the summary, each the mean over eval sets; the improvement factor with MACs as the
# cost, then with weight bytes (missing from records made before bytes were measured).
SUMMARY_MEANS = [
    "acceptance_rate",
    "draft_macs_per_token",
    "macs_reduction",
    "improvement_factor",
    "draft_weight_bytes_per_token",
    "improvement_factor_bytes",
    "speedup",
]


def summary_table(measurements: pd.DataFrame, temperature: float = 0.0) -> pd.DataFrame:
    """One row per target x draft x method x loss x sparsity x reported k at one temperature, measured estimators only.

    Columns: the estimator; per eval set its MAL with the 95% CI and the number of prompts;
    then the mean over eval sets of SUMMARY_MEANS (acceptance rate, MACs, both improvement
    factors, weight bytes, speed-up).
    """
    measurements = with_variant_columns(measurements)
    at_t = measurements[
        (measurements["temperature"] == temperature)
        & (measurements["estimator"] != "tvd_estimate")
        & measurements["headline_k"].astype(bool)
    ]
    # An untuned draft has no loss; grouping drops empty keys, so it groups as "" and is emptied again below.
    at_t = at_t.assign(loss=at_t["loss"].fillna(""))
    group = ["target", "draft", "method", "loss", "quantization", "sparsity", "k", "estimator"]
    parts = []
    for value, name in (("mal", "mal"), ("mal_ci_low", "ci_low"), ("mal_ci_high", "ci_high"), ("n_prompts", "n")):
        wide = at_t.pivot_table(index=group, columns="eval_set", values=value, aggfunc="first")
        wide.columns = [f"{name}_{c}" if name != "mal" else f"mal_{c}" for c in wide.columns]
        parts.append(wide)
    if not len(at_t):
        return pd.DataFrame(columns=group)
    wide = pd.concat(parts, axis=1)
    evals = sorted(at_t["eval_set"].unique())
    wide = wide[[f"{n}_{e}" for e in evals for n in ("mal", "ci_low", "ci_high", "n")]]
    means = at_t.groupby(group)[[c for c in SUMMARY_MEANS if c in at_t.columns]].mean()
    table = wide.join(means).reset_index()
    return sort_measurements(table.assign(loss=table["loss"].mask(table["loss"] == "")))


def _cell(value) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "–"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.2f}"
    return "" if value is None else str(value)


def markdown_table(df: pd.DataFrame) -> str:
    """GitHub markdown table: floats to 2 decimals, large numbers with thousands separators, NaN as –."""
    header = "| " + " | ".join(str(c) for c in df.columns) + " |"
    rule = "| " + " | ".join("---" for _ in df.columns) + " |"
    body = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def with_ci(value, low, high) -> str:
    """'1.37 [1.33, 1.41]' (or '–' for a missing value)."""
    if value != value:
        return "–"
    return f"{value:.2f} [{low:.2f}, {high:.2f}]" if low == low else f"{value:.2f}"


def ci_column(df: pd.DataFrame, value: str, low: str, high: str) -> list[str]:
    """with_ci of every row of df's columns value, low and high."""
    return [with_ci(*v) for v in zip(df[value], df[low], df[high])]


def per_draft_markdown(measurements: pd.DataFrame, temperature: float) -> str:
    """summary_table at one temperature with each MAL and its CI in one column, methods by their labels."""
    table = summary_table(measurements, temperature)
    evals = [c[len("mal_") :] for c in table.columns if c.startswith("mal_")]
    # The method's label names a loss other than its own ('sd2 (kl)'), and Direct Alignment as such.
    shown = table[["target", "draft", "method", "sparsity", "k", "estimator"]].copy()
    shown["method"] = [variants.label(m, loss) for m, loss in zip(table["method"], table["loss"])]
    for e in evals:
        shown[f"MAL {e} [95% CI]"] = ci_column(table, f"mal_{e}", f"ci_low_{e}", f"ci_high_{e}")
        shown[f"n {e}"] = table[f"n_{e}"].astype("Int64")
    for col in SUMMARY_MEANS:
        if col in table.columns:
            shown[col] = table[col]
    return markdown_table(shown)


def yes_no(flags: pd.Series) -> pd.Series:
    return flags.map({True: "yes", False: "no"})


def baseline_markdown(cmp_t: pd.DataFrame) -> str:
    """SD² (ce) against layer_pruned and dense_sd: the paper's comparisons, from comparisons.csv rows."""
    view = cmp_t[["target", "draft", "sparsity", "eval_set", "k", "estimator", "n_prompts"]].copy()
    view["SD² / layer-pruned MAL [95% CI]"] = ci_column(
        cmp_t, "mal_ratio_vs_layer_pruned", "ratio_ci_low", "ratio_ci_high"
    )
    view["significant (ratio)"] = yes_no(cmp_t["ratio_significant"])
    view["MACs change vs dense_sd %"] = -cmp_t["macs_reduction_pct"]
    view["MAL change vs dense_sd % [95% CI]"] = ci_column(cmp_t, "mal_change_pct", "change_ci_low", "change_ci_high")
    view["significant (change)"] = yes_no(cmp_t["change_significant"])
    return markdown_table(view)


def loss_markdown(by_loss: pd.DataFrame) -> str:
    """Each loss variant against the ce variant of its method, from comparisons.csv rows."""
    view = by_loss[["target", "draft"]].copy()
    view["draft variant"] = [variants.label(m, loss) for m, loss in zip(by_loss["method"], by_loss["loss"])]
    view["against"] = by_loss["ce_method"].map(lambda m: variants.label(m, methods.DEFAULT_LOSS) + " (ce)")
    view = view.join(by_loss[["sparsity", "eval_set", "k", "estimator", "n_prompts"]])
    view["MAL [95% CI]"] = ci_column(by_loss, "mal", "mal_ci_low", "mal_ci_high")
    view["MAL with ce [95% CI]"] = ci_column(by_loss, "ce_mal", "ce_mal_ci_low", "ce_mal_ci_high")
    view["ratio to ce [95% CI]"] = ci_column(by_loss, "mal_ratio_vs_ce", "vs_ce_ci_low", "vs_ce_ci_high")
    view["significant"] = yes_no(by_loss["vs_ce_significant"])
    return markdown_table(view)


def summary_markdown(measurements: pd.DataFrame, compared: pd.DataFrame) -> str:
    """The README's result tables, as produced by the run: per temperature, per-draft MAL with CIs,
    the paper's comparisons, and each loss variant against the ce variant of its method."""
    parts = []
    for temperature in sorted(measurements["temperature"].unique()):
        mode = "greedy" if temperature == 0 else f"sampling, T={temperature:g}"
        parts.append(f"### Per draft ({mode})\n\n{per_draft_markdown(measurements, temperature)}")
        at_t = compared[compared["temperature"] == temperature]
        cmp_t = baseline_comparisons(at_t)
        if len(cmp_t):
            parts.append(
                f"### SD² vs layer-pruned and dense_sd ({mode}; paired bootstrap over prompts)\n\n"
                f"{baseline_markdown(cmp_t)}"
            )
        by_loss = loss_comparisons(at_t)
        if len(by_loss):
            parts.append(
                f"### Loss variants vs cross-entropy ({mode}; same steps and data, paired bootstrap over prompts)"
                f"\n\n{loss_markdown(by_loss)}"
            )
    return "\n".join(parts)


def time_by_rule(results: Path, source: str = "results/tables/job_times.csv") -> str:
    """Where a sweep's time goes: job-seconds per rule, from <results>/tables/job_times.csv."""
    path = results / "tables" / "job_times.csv"
    if not path.exists():
        return f"No job times recorded (a run from nothing writes `{source}`)."
    jobs = pd.read_csv(path)
    by_rule = jobs.groupby("rule")["seconds"].agg(["count", "sum", "mean"]).sort_values("sum", ascending=False)
    total = by_rule["sum"].sum()
    table = pd.DataFrame(
        {
            "rule": by_rule.index,
            "jobs": by_rule["count"].to_numpy(),
            "job-seconds": by_rule["sum"].round().astype(int).to_numpy(),
            "share": (by_rule["sum"] / total).map("{:.0%}".format).to_numpy(),
            "mean s/job": by_rule["mean"].round(1).to_numpy(),
        }
    )
    return markdown_table(table) + f"\nTotal {total:,.0f} job-seconds (`{source}`)."


def draft_columns(rows: pd.DataFrame) -> dict:
    """The columns a table of drafts starts with: which draft, its MAL and its cost, each with its 95% CI."""
    return {
        "draft": rows["draft"],
        "method": [variants.label(m) for m in rows["method"]],
        "sparsity %": rows["sparsity"],
        "MAL [95% CI]": ci_column(rows, "mal", "mal_ci_low", "mal_ci_high"),
        "MACs vs dense": (1 - rows["macs_reduction"]).map("{:.2f}".format),
        "improvement factor [95% CI]": ci_column(
            rows, "improvement_factor", "improvement_factor_ci_low", "improvement_factor_ci_high"
        ),
    }
