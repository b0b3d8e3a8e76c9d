"""What the replicate study says (config/replicates.yaml): SD²'s comparisons across training runs.

Per kind of replicate, SD² cell (target, draft, eval set, exact estimator, headline k, sparsity) and
baseline (the layer-pruned draft at SD²'s sparsity, dense_sd),
over the default run (seed 0) and every replicate of that kind:
- each run's own paired verdict (sd2.measure.stats.paired_ratio_ci over its prompts), and whether
  they all point the same way;
- the two-level bootstrap interval (runs, then prompts within a run: sd2.measure.stats.two_level_ci),
  which covers the training run as well as the choice of prompts;
- the spread of the per-run ratios (their standard deviation): under `full` replicates it comes
  from pretraining and fine-tuning, under `finetune` ones from fine-tuning alone.
"""

from pathlib import Path

import numpy as np
import pandas as pd

from sd2 import config
from sd2.measure.stats import excludes, paired_ratio, paired_ratio_ci, two_level_ci
from sd2.replicates import name
from sd2.report.collect import write_table
from sd2.report.per_prompt import BASELINES, CELL, exact_cells, paired_arrays
from sd2.report.verdicts import direction


def run_dirs(study: dict) -> dict[str, list[tuple[str, Path]]]:
    """{kind: [(run, results dir)]}: the default run as seed 0 of every kind, then the kind's replicates."""
    base = config.load(study["base"])
    return {
        kind: [(f"seed{base['seed']}", Path(base["results_dir"]))]
        + [(name(kind, s), Path(study["results_dir"]) / name(kind, s)) for s in study["seeds"]]
        for kind in study["kinds"]
    }


def _same_prompts(per_run: list, paired: list, cell: tuple) -> None:
    """Runs measured on other prompts than the default run (its eval set changed since) cannot be pooled."""
    for (label, _), (_, ids) in zip(per_run[1:], paired[1:]):
        if ids != paired[0][1]:
            raise ValueError(
                f"replicate {label} measured other {cell[2]} prompts than the default run ({len(ids)} against "
                f"{len(paired[0][1])}, or other ids): the eval set changed since; run `make replicates` again"
            )


def replicate_rows(study: dict, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per kind, SD² cell and baseline measured in every run of that kind."""
    rows = []
    for kind, runs in run_dirs(study).items():
        per_run = [(label, exact_cells(path)) for label, path in runs]
        keys = {(key[:-2], key[-1]) for key in per_run[0][1] if key[-2] == "sd2"}
        for cell, sparsity in sorted(keys, key=str):
            for baseline in BASELINES:
                paired = [paired_arrays(cells, cell, sparsity, baseline) for _, cells in per_run]
                if any(a is None for a in paired):
                    continue
                _same_prompts(per_run, paired, cell)
                arrays = [a for a, _ in paired]
                one_level = [paired_ratio_ci(*a, n_boot=n_boot, seed=seed) for a in arrays]
                verdicts = [direction(*r, 1.0) for r in one_level]
                ratio, low, high = two_level_ci(arrays, paired_ratio, n_boot=n_boot, seed=seed)
                rows.append(
                    {
                        "kind": kind,
                        **dict(zip(CELL, cell)),
                        "sparsity": sparsity,
                        "baseline": baseline,
                        "runs": len(arrays),
                        "run_labels": " ".join(label for label, _ in per_run),
                        "run_ratios": " ".join(f"{r[0]:.4f}" for r in one_level),
                        "run_verdicts": "; ".join(v.removeprefix("is ") for v in verdicts),
                        "verdict_holds": len(set(verdicts)) == 1,
                        "ratio": ratio,
                        "ratio_ci_low": low,
                        "ratio_ci_high": high,
                        "ratio_significant": excludes(low, high, 1.0),
                        "run_spread_sd": float(np.std([r[0] for r in one_level], ddof=1)),
                    }
                )
    return pd.DataFrame(rows)


def write_tables(study: dict) -> list[Path]:
    """results/replicates/tables/replicates.csv."""
    out = Path(study["results_dir"]) / "tables" / "replicates.csv"
    write_table(replicate_rows(study), out)
    return [out]


def _per_target(rows: pd.DataFrame, column: str) -> str:
    """'llama-target 13 of 16, qwen-target 8 of 24': the rows of each target where `column` is true."""
    return ", ".join(f"{t} {int(r[column].eq(True).sum())} of {len(r)}" for t, r in rows.groupby("target", sort=False))


def replicates_block(results: Path, listed: bool = True) -> str:
    """The replicate verdicts: per kind and target, how many of SD²'s verdicts against each baseline hold across
    runs and how many two-level intervals exclude 1; `listed`: each comparison that does not hold, too."""
    path = results / "replicates" / "tables" / "replicates.csv"
    if not path.exists():
        return "No replicate study yet (`make replicates` after `make run` writes `results/replicates/`)."
    table = pd.read_csv(path)
    lines = []
    for kind, rows in table.groupby("kind", sort=False):
        held = rows["verdict_holds"].eq(True)
        lines.append(
            f"- **{kind} replicates** ({rows['runs'].max()} runs each): the verdict holds in every run in "
            f"{int(held.sum())} of {len(rows)} comparisons ({_per_target(rows, 'verdict_holds')}); the two-level "
            f"interval excludes 1 in {_per_target(rows, 'ratio_significant')}; run-to-run spread of the ratio (sd) "
            f"{rows['run_spread_sd'].median():.3f} median."
        )
        widest = rows.loc[rows["run_spread_sd"].idxmax()]
        ratios = ", ".join(f"{float(x):.2f}" for x in str(widest["run_ratios"]).split())
        lines.append(
            f"  - widest spread: {widest['target']}/{widest['draft']} s{widest['sparsity']} {widest['eval_set']} "
            f"against {widest['baseline']}, ratio {ratios} in the "
            f"{widest['runs']} runs ({', '.join(str(widest['run_labels']).split())}; two-level "
            f"{widest['ratio']:.2f} [{widest['ratio_ci_low']:.2f}, {widest['ratio_ci_high']:.2f}])."
        )
        if not listed:
            continue
        for _, r in rows[~held].iterrows():
            lines.append(
                f"  - does not hold: {r['target']}/{r['draft']} s{r['sparsity']} {r['eval_set']} ({r['estimator']}) "
                f"against {r['baseline']}: {r['run_verdicts']} (two-level {r['ratio']:.2f} "
                f"[{r['ratio_ci_low']:.2f}, {r['ratio_ci_high']:.2f}])"
            )
    # A kind of the study with no finished replicate yet is said to be missing, not left out silently.
    study = results.parent / "config" / "replicates.yaml"
    for kind in config.read(study)["kinds"] if study.exists() else []:
        if kind not in set(table["kind"]):
            lines.append(f"- **{kind} replicates**: not run yet (`make replicates` runs them after the kinds above).")
    return "\n".join(lines)
