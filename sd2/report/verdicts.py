"""The results prose, generated from comparisons.csv: one sentence per SD² cell, with its conditions.

Each sentence names its cell (target, eval set, estimator, draft, sparsity, prompts), says which
way each paired interval points or that it includes no change, and says how many MACs the
layer-pruned draft costs beside SD² where whole layers could not match them.
"""

from pathlib import Path

import pandas as pd

from sd2.report.comparisons import EXACT_CHAINS, baseline_comparisons

# Below this share the layer-pruned draft's MACs count as SD²'s (whole layers never match them exactly).
MACS_MATCHED_PCT = 1.0
ESTIMATOR_NAMES = {
    "teacher_forced_walk": "exact teacher-forced walk",
    "uag_walk": "exact walk under transformers' universal assisted generation",
    "tli_walk": "exact walk under vLLM's token-level intersection",
}


def direction(value: float, low: float, high: float, none: float) -> str:
    """How a paired interval reads: above, below, or not distinguishable from `none` (no change)."""
    if value != value:
        return "cannot be compared with"
    if low > none:
        return "is significantly above"
    if high < none:
        return "is significantly below"
    return "is not distinguishable from"


def macs_condition(pct: float) -> str:
    """The layer-pruned draft's MACs beside SD²'s, as a comparison with it must say."""
    if pct != pct:
        return "MACs unknown"
    if abs(pct) < MACS_MATCHED_PCT:
        return "the same MACs"
    return f"{abs(pct):.1f}% {'more' if pct > 0 else 'fewer'} MACs than SD²"


def cell_sentence(r) -> str:
    """SD² in one cell against the layer-pruned draft and dense_sd, both paired over the same prompts."""
    vs_lp = direction(r["mal_ratio_vs_layer_pruned"], r["ratio_ci_low"], r["ratio_ci_high"], 1.0)
    vs_sd = direction(r["mal_change_pct"], r["change_ci_low"], r["change_ci_high"], 0.0)
    return (
        f"{r['draft']}, SD² at {r['sparsity']}% ({100 - r['macs_reduction_pct']:.0f}% of dense_sd's MACs): MAL "
        f"{vs_lp} the layer-pruned draft's ({r['mal_ratio_vs_layer_pruned']:.2f}x [{r['ratio_ci_low']:.2f}, "
        f"{r['ratio_ci_high']:.2f}], the layer-pruned draft at {macs_condition(r['layer_pruned_macs_vs_sd2_pct'])}) "
        f"and {vs_sd} "
        f"dense_sd's ({r['mal_change_pct']:+.1f}% [{r['change_ci_low']:+.1f}, {r['change_ci_high']:+.1f}])."
    )


def greedy_baselines(results: Path) -> pd.DataFrame:
    """SD²'s paired comparisons of the exact greedy estimators, cells in table order."""
    compared = baseline_comparisons(pd.read_csv(results / "tables" / "comparisons.csv"))
    return compared[(compared["temperature"] == 0) & compared["estimator"].isin(EXACT_CHAINS)]


def grouped_sentences(compared: pd.DataFrame) -> list[str]:
    """A heading per target, eval set and estimator, then one sentence per SD² cell."""
    lines = []
    for (target, eval_set, estimator), cells in compared.groupby(["target", "eval_set", "estimator"], sort=False):
        n = cells["n_prompts"].agg(["min", "max"])
        prompts = f"{n['min']}" if n["min"] == n["max"] else f"{n['min']}-{n['max']}"
        lines.append(
            f"- **{target}, {eval_set}** ({prompts} prompts, greedy, k = {cells['k'].iloc[0]}, "
            f"{ESTIMATOR_NAMES.get(estimator, estimator)}; paired 95% CIs):"
        )
        lines += [f"  - {cell_sentence(r)}" for _, r in cells.iterrows()]
    return lines


def verdicts(results: Path) -> str:
    """Every SD² cell's verdicts against both baselines, greedy and exact (docs/results.md)."""
    if not (results / "tables" / "comparisons.csv").exists():
        return "No comparisons yet (`make run` writes `results/tables/comparisons.csv`)."
    return "\n".join(grouped_sentences(greedy_baselines(results)))


def headline_verdicts(results: Path) -> str:
    """The README's verdicts: HumanEval, each target under its first exact estimator."""
    if not (results / "tables" / "comparisons.csv").exists():
        return "No comparisons yet (`make run` writes `results/tables/comparisons.csv`)."
    compared = greedy_baselines(results)
    if (compared["eval_set"] == "humaneval").any():
        compared = compared[compared["eval_set"] == "humaneval"]
    order = {name: i for i, name in enumerate(EXACT_CHAINS)}
    first = compared.assign(rank=compared["estimator"].map(order)).groupby("target")["rank"].transform("min")
    return "\n".join(grouped_sentences(compared[compared["estimator"].map(order) == first]))
