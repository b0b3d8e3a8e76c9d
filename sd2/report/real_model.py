"""The generated blocks of the real-model run (`make real`, config/real.yaml, results/real/): SD² against
its baselines on a pretrained instruct target, and the same comparisons beside the demo's and the paper's."""

import json
from pathlib import Path

import pandas as pd

from sd2 import variants
from sd2.report.comparisons import baseline_comparisons, exact_greedy_cells, with_sd2_comparisons
from sd2.report.markdown import ci_column, draft_columns, markdown_table, time_by_rule
from sd2.report.plots import sparse_layer_speedups
from sd2.report.verdicts import direction

REAL = "real"
METHODS = ["dense", "dense_sd", "layer_pruned", "sparse_oneshot", "sparse_sft", "sd2"]
# As the paper reports them (Lasby et al., arXiv 2504.08838; Llama-3.1-70B-Instruct target, Llama-3.2 drafts).
PAPER = {"sd2_over_layer_pruned": 1.59, "macs_cut_pct_at_50": 43.87}
HOUR = 3600


def _compared(results: Path) -> pd.DataFrame:
    compared = baseline_comparisons(pd.read_csv(results / "tables" / "comparisons.csv"))
    return compared[compared["temperature"] == 0]


def weights_note(real: Path, target: str) -> str:
    """Where the target's weights came from (fetch_model's marker), as results must say."""
    marker = real / "models" / f"{target}.json"
    if not marker.exists():
        return "weights as configured"
    return json.loads(marker.read_text())["weights"]


def _run_line(real: Path) -> str:
    path = real / "run_time.json"
    if not path.exists():
        return "`make real` has not completed a run from nothing here yet."
    rec = json.loads(path.read_text())
    machine = rec["machine"]
    over = rec["seconds"] - HOUR
    verdict = f"{over / 60:.0f} min over the hour it should fit in" if over > 0 else "within the hour"
    return (
        f"`make real` from nothing: **{rec['seconds'] / 60:.0f} min** ({rec['seconds']:,} s) on {machine['cpu']}, "
        f"{machine['cores']} cores, {verdict} ({rec['provenance']['created'][:10]}, `results/real/run_time.json`)."
    )


def real_model(results: Path) -> str:
    """The real-model run: every draft's MAL, cost and speed-up, SD² paired against dense_sd and layer-pruned."""
    real = results / REAL
    if not (real / "tables" / "measurements.csv").exists():
        return "No real-model results yet (`make real` writes `results/real/`)."
    paired = ["mal_change_pct", "change_ci_low", "change_ci_high", "change_significant"]
    paired += ["mal_ratio_vs_layer_pruned", "ratio_ci_low", "ratio_ci_high", "ratio_significant"]
    rows = with_sd2_comparisons(
        exact_greedy_cells(pd.read_csv(real / "tables" / "measurements.csv"), METHODS),
        pd.read_csv(real / "tables" / "comparisons.csv"),
        paired,
        METHODS,
    )
    view = pd.DataFrame(
        {
            **draft_columns(rows),
            "MAL change vs dense_sd, % [paired CI]": _marked(rows, "mal_change_pct", "change", "change_significant"),
            "SD² / layer-pruned [paired CI]": _marked(rows, "mal_ratio_vs_layer_pruned", "ratio", "ratio_significant"),
            "CPU speed-up": rows["speedup"].map(lambda v: f"{v:.2f}x" if v == v else "–"),
        }
    )
    first = rows.iloc[0]
    return (
        f"{first['target']} ({weights_note(real, first['target'])}), {first['eval_set']} "
        f"({first['n_prompts']} prompts, asked through its chat template), greedy, k = {first['k']}, exact "
        "teacher-forced walk; 95% bootstrap intervals over prompts, the SD² columns paired over the same "
        "prompts (* = the interval excludes no change). CPU speed-up: wall-clock tokens/s of speculative "
        "decoding over the target alone, batch 1, on the few prompts each job times. "
        + _run_line(real)
        + "\n\n"
        + markdown_table(view)
        + "(`results/real/tables/measurements.csv`, `results/real/tables/comparisons.csv`)\n\n"
        + "\n".join(f"- {s}" for s in verdicts(rows))
    )


def _marked(rows: pd.DataFrame, value: str, prefix: str, significant: str) -> list[str]:
    shown = ci_column(rows, value, f"{prefix}_ci_low", f"{prefix}_ci_high")
    return [s + ("*" if flag is True else "") for s, flag in zip(shown, rows[significant])]


def verdicts(rows: pd.DataFrame) -> list[str]:
    """One sentence per SD² draft, from its paired intervals: better, worse or not distinguishable."""
    out = []
    for _, r in rows[rows["method"] == "sd2"].iterrows():
        vs_lp = direction(r["mal_ratio_vs_layer_pruned"], r["ratio_ci_low"], r["ratio_ci_high"], 1.0)
        vs_sd = direction(r["mal_change_pct"], r["change_ci_low"], r["change_ci_high"], 0.0)
        out.append(
            f"{r['draft']}, SD² at {r['sparsity']}% ({1 - r['macs_reduction']:.2f} of the dense draft's MACs): "
            f"MAL {vs_lp} the layer-pruned draft's ({r['mal_ratio_vs_layer_pruned']:.2f}x "
            f"[{r['ratio_ci_low']:.2f}, {r['ratio_ci_high']:.2f}]) and {vs_sd} dense_sd's "
            f"({r['mal_change_pct']:+.1f}% [{r['change_ci_low']:+.1f}, {r['change_ci_high']:+.1f}])."
        )
    best = rows.loc[rows["speedup"].idxmax()] if rows["speedup"].notna().any() else None
    if best is not None:
        faster = "faster" if best["speedup"] > 1 else "slower"
        out.append(
            f"Fastest on this CPU: {best['draft']} {variants.label(best['method'])} at {best['sparsity']}%, "
            f"{best['speedup']:.2f}x the target alone ({best['sd_tokens_per_s']:.1f} against "
            f"{best['ar_tokens_per_s']:.1f} tokens/s): speculative decoding is {faster} here."
        )
    return out


def beside_the_paper(results: Path) -> str:
    """SD² against layer-pruned and the MACs 50% sparsity saves: the paper, the demo run and the real-model run."""
    runs = {"demo (from-scratch models)": results, "real model": results / REAL}
    lines = []
    for name, path in runs.items():
        if not (path / "tables" / "comparisons.csv").exists():
            continue
        compared = _compared(path)
        compared = compared[compared["estimator"] == "teacher_forced_walk"]
        ratios = compared["mal_ratio_vs_layer_pruned"].dropna()
        at_50 = compared[compared["sparsity"] == 50]["macs_reduction_pct"].dropna()
        sig = f"{compared['ratio_significant'].eq(True).sum()} of {len(ratios)} cells significant"
        lines.append(
            {
                "run": name,
                "SD² / layer-pruned MAL": f"{ratios.min():.2f}–{ratios.max():.2f} ({sig})",
                "MACs cut at 50% sparsity": f"{at_50.min():.1f}–{at_50.max():.1f}%",
            }
        )
    lines.insert(
        0,
        {
            "run": "paper (Llama-3.1-70B target)",
            "SD² / layer-pruned MAL": f"{PAPER['sd2_over_layer_pruned']:.2f}",
            "MACs cut at 50% sparsity": f"{PAPER['macs_cut_pct_at_50']:.2f}% (Llama-3.2-3B draft)",
        },
    )
    return markdown_table(pd.DataFrame(lines)) + "(greedy, exact walk, every same-tokenizer cell of each run)"


def benchmark_table(name: str, command: str, view=lambda table: table):
    """A block that shows a benchmark's CSV for the real model (results/real/tables/<name>.csv), through `view`."""

    def render(results: Path) -> str:
        path = results / REAL / "tables" / f"{name}.csv"
        if not path.exists():
            return f"Not measured yet (`{command} --out results/real/tables/{name}.csv`)."
        return markdown_table(view(pd.read_csv(path))) + f"\n(`{command}`, `results/real/tables/{name}.csv`)"

    return render


def _layer_speedups(table: pd.DataFrame) -> pd.DataFrame:
    """The CSR kernel against dense torch for a whole decoder layer, one row per batch, one column per sparsity."""
    layer = sparse_layer_speedups(table)
    layer = layer[layer["backend"] != "dense"]
    wide = layer.pivot_table(index=["batch", "threads", "backend"], columns="sparsity", values="speedup")
    wide.columns = [f"speed-up at {s:g}%" for s in wide.columns]
    return wide.reset_index()


layer_subsets = benchmark_table("layer_subsets", "python benchmarks/layer_subsets.py")
SPARSE_KERNEL_COMMAND = (
    "python benchmarks/sparse_kernels.py --config config/real.yaml --model smollm2-layers6 --backend torch_csr_i32 "
    "--batches 1 6 --sparsities 0 0.5 0.7 --dtypes fp32 --threads 1 --figure results/real/figures/sparse_kernels"
)
sparse_kernels = benchmark_table("sparse_kernels", SPARSE_KERNEL_COMMAND, _layer_speedups)


def real_time_by_rule(results: Path) -> str:
    """Where `make real`'s time goes: job-seconds per rule (results/real/tables/job_times.csv)."""
    return time_by_rule(results / REAL, "results/real/tables/job_times.csv")
