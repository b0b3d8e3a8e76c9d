"""Parallel drafts against the same drafts proposing one token per pass (`make parallel`, config/parallel.yaml).

Per target, draft, method, sparsity, eval set and k: a `<method>+pard` draft's parallel walk against the
`<method>` (ce) draft's teacher-forced walk, paired over the same prompts. Beside MAL, the cost per accepted
token as the improvement factor (its inverse, in target forwards): under MACs, where a parallel step computes
the new real tokens and k - 1 masks (MAL / (1 + (MAL - 1 + k) c)), against k one-token passes (MAL / (1 + k c));
under weight bytes, where a parallel step reads the draft once (MAL / (1 + b)) against k times (MAL / (1 + k b)).
Each ratio's interval resamples the prompts of both drafts together (sd2.measure.stats.paired_statistic_ci),
the costs being fixed numbers of each draft.
"""

from pathlib import Path

import pandas as pd

from sd2 import methods, variants
from sd2.measure.stats import excludes, paired_statistic_ci
from sd2.report.collect import read_records
from sd2.report.markdown import markdown_table
from sd2.report.verdicts import direction

CELL = ("target", "draft", "eval_set", "k", "sparsity")


def _walks(results: Path) -> tuple[dict, dict]:
    """({cell + method: parallel record and ids}, {cell + method: autoregressive record and ids}), greedy, drafts
    as made; the parallel drafts are those of a parallel loss."""
    parallel, chained = {}, {}
    for record, ids, _ in read_records((results / "records").rglob("*.json")):
        method, loss = variants.parse_variant(record["method"])
        if record["temperature"] != 0 or variants.split_quantization(record["method"])[1] != variants.NO_QUANTIZATION:
            continue
        key = (*(record[c] for c in CELL), method)
        if record["estimator"] == "parallel_walk" and methods.LOSSES[loss].parallel:
            parallel[key] = (record, ids[: record["n_prompts"]])
        elif record["estimator"] == "teacher_forced_walk" and loss == methods.DEFAULT_LOSS:
            chained[key] = (record, ids[: record["n_prompts"]])
    return parallel, chained


def factors(parallel: dict, chained: dict, k: int) -> dict:
    """The improvement factor of each draft as a function of its MAL, under MACs and under weight bytes."""
    c_par, c_ar = parallel["macs_ratio"], chained["macs_ratio"]
    b_par, b_ar = parallel["weight_bytes_ratio"], chained["weight_bytes_ratio"]
    return {
        "macs": (lambda m: m / (1 + (m - 1 + k) * c_par), lambda m: m / (1 + k * c_ar)),
        "bytes": (lambda m: m / (1 + b_par), lambda m: m / (1 + k * b_ar)),
    }


def _same(mal):
    return mal


def _factor_ratio(f_par, f_ar):
    """The ratio of the two improvement factors from the per-prompt sums (tokens and steps of each draft)."""
    return lambda tokens, steps, chained_tokens, chained_steps: (
        f_par(tokens / steps) / f_ar(chained_tokens / chained_steps)
    )


def _compared(name: str, statistic, arrays, n_boot: int, seed: int) -> dict:
    value, low, high = paired_statistic_ci(statistic, *arrays, n_boot=n_boot, seed=seed)
    return {
        name: value,
        f"{name}_ci_low": low,
        f"{name}_ci_high": high,
        f"{name}_significant": len(arrays[0]) >= 20 and excludes(low, high, 1.0),
    }


def parallel_rows(results: Path, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per parallel draft and k with its autoregressive counterpart measured on the same prompts."""
    parallel, chained = _walks(results)
    rows = []
    for key, (par, ids) in sorted(parallel.items(), key=str):
        found = chained.get(key)
        if found is None or found[1] != ids:
            continue
        ar, k = found[0], key[3]
        arrays = [par["per_prompt"]["accepted_tokens"], par["per_prompt"]["steps"]]
        arrays += [ar["per_prompt"]["accepted_tokens"], ar["per_prompt"]["steps"]]
        headline = k in ((par.get("provenance") or {}).get("settings") or {}).get("k", [])
        row = {**dict(zip(CELL, key)), "method": key[-1], "headline_k": headline, "n_prompts": len(ids)}
        row.update(mal=par["mal"], chained_mal=ar["mal"])
        row.update(_compared("mal_ratio", _factor_ratio(_same, _same), arrays, n_boot, seed))
        for cost, (f_par, f_ar) in factors(par, ar, k).items():
            row[f"{cost}_factor"], row[f"chained_{cost}_factor"] = f_par(par["mal"]), f_ar(ar["mal"])
            row.update(_compared(f"{cost}_factor_ratio", _factor_ratio(f_par, f_ar), arrays, n_boot, seed))
        row.update(speedup=par.get("speedup"), chained_speedup=ar.get("speedup"))
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(value, low, high) -> str:
    return f"{value:.2f} [{low:.2f}, {high:.2f}] {direction(value, low, high, 1.0).removeprefix('is ')}"


def parallel_block(results: Path) -> str:
    """The README's parallel drafts at each draft's headline k: MAL and both improvement factors against the same
    draft proposing one token per pass, paired 95% CIs, and the measured CPU speed-ups."""
    table = parallel_rows(results) if (results / "records").exists() else pd.DataFrame()
    if table.empty:
        return "No parallel drafts yet (`make real`, then `make parallel`, writes `results/parallel/`)."
    table = table[table["headline_k"]]
    out = []
    for r in table.itertuples():
        out.append(
            {
                "draft": r.draft,
                "method": variants.label(r.method),
                "sparsity": r.sparsity,
                "k": r.k,
                "MAL one per pass": f"{r.chained_mal:.2f}",
                "MAL parallel": f"{r.mal:.2f}",
                "MAL ratio": _cell(r.mal_ratio, r.mal_ratio_ci_low, r.mal_ratio_ci_high),
                "factor, MACs (parallel / one per pass)": f"{r.macs_factor:.2f} / {r.chained_macs_factor:.2f}",
                "ratio, MACs": _cell(r.macs_factor_ratio, r.macs_factor_ratio_ci_low, r.macs_factor_ratio_ci_high),
                "factor, bytes (parallel / one per pass)": f"{r.bytes_factor:.2f} / {r.chained_bytes_factor:.2f}",
                "ratio, bytes": _cell(r.bytes_factor_ratio, r.bytes_factor_ratio_ci_low, r.bytes_factor_ratio_ci_high),
                "CPU speed-up (parallel / one per pass)": f"{r.speedup:.2f} / {r.chained_speedup:.2f}",
            }
        )
    return markdown_table(pd.DataFrame(out)) + f"\n(greedy, {table['eval_set'].iloc[0]}, `results/parallel/records`)"
