"""SD²'s paired comparisons from the records' per-prompt counts: the exact greedy cells of a run, a cell's
paired arrays against a baseline, and the comparisons within each kind of prompt of an eval set (the groups
`prepare_data` lists in results/data/manifest.json, such as the held-out set's docstring and signature
headers), which a pooled interval can hide when the kinds point different ways.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd

from sd2 import methods, variants
from sd2.measure.stats import paired_ratio_ci
from sd2.report.collect import read_records
from sd2.report.comparisons import EXACT_CHAINS
from sd2.report.markdown import markdown_table
from sd2.report.verdicts import direction

BASELINES = ("layer_pruned", "dense_sd")
# A cell of one run: its draft's record is found by (*CELL, method, sparsity).
CELL = ["target", "draft", "eval_set", "estimator", "k"]


def exact_cells(results: Path) -> dict:
    """{(cell..., method): (per_prompt, prompt ids)} of the exact greedy records at a headline k, drafts as made."""
    found = {}
    for record, ids, _ in read_records((results / "records").rglob("*.json")):
        settings = (record.get("provenance") or {}).get("settings") or {}
        method, loss = variants.parse_variant(record["method"])
        if (
            record["temperature"] != 0
            or record["estimator"] not in EXACT_CHAINS
            or record["k"] not in settings.get("k", [])
            or loss not in (None, methods.DEFAULT_LOSS)
            or variants.split_quantization(record["method"])[1] != variants.NO_QUANTIZATION
        ):
            continue
        key = (*(record[c] for c in CELL), method, record["sparsity"])
        found[key] = (record["per_prompt"], ids[: record["n_prompts"]])
    return found


def paired_arrays(cells: dict, cell: tuple, sparsity: int, baseline: str):
    """((sd2 tokens, sd2 steps, baseline tokens, baseline steps) per prompt, prompt ids), or None where one side
    is missing."""
    sd2 = cells.get((*cell, "sd2", sparsity))
    other = cells.get((*cell, baseline, sparsity if baseline == "layer_pruned" else 0))
    if sd2 is None or other is None or sd2[1] != other[1]:
        return None
    (a, ids), (b, _) = sd2, other
    return (a["accepted_tokens"], a["steps"], b["accepted_tokens"], b["steps"]), ids


def group_rows(results: Path, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per SD² cell, baseline and prompt group of an eval set that has groups: the paired ratio and its
    95% interval over that group's prompts only."""
    manifest = results / "data" / "manifest.json"
    groups = json.loads(manifest.read_text()).get("eval_groups", {}) if manifest.exists() else {}
    if not groups:
        return pd.DataFrame()
    cells = exact_cells(results)
    rows = []
    for key in sorted((k for k in cells if k[-2] == "sd2" and k[2] in groups), key=str):
        cell, sparsity = key[:-2], key[-1]
        for baseline in BASELINES:
            paired = paired_arrays(cells, cell, sparsity, baseline)
            if paired is None:
                continue
            arrays, ids = paired
            for by, kinds in groups[cell[2]].items():
                for kind, members in kinds.items():
                    inside = np.isin(ids, members)
                    ratio, low, high = paired_ratio_ci(
                        *(np.asarray(a, float)[inside] for a in arrays), n_boot=n_boot, seed=seed
                    )
                    rows.append(
                        {
                            **dict(zip(CELL, cell)),
                            "sparsity": sparsity,
                            "group": f"{by}: {kind}",
                            "n_prompts": int(inside.sum()),
                            "baseline": baseline,
                            "ratio": ratio,
                            "ratio_ci_low": low,
                            "ratio_ci_high": high,
                        }
                    )
    return pd.DataFrame(rows)


def groups_block(results: Path) -> str:
    """SD² against the layer-pruned draft and dense_sd within each prompt group, paired 95% CIs."""
    table = group_rows(results)
    if table.empty:
        return "No eval set of this run lists prompt groups."
    cols = ["target", "draft", "eval_set", "estimator", "k", "sparsity", "group", "n_prompts"]
    out = []
    for key, rows in table.groupby(cols, sort=False):
        line = dict(zip(cols, key))
        for r in rows.itertuples():
            verdict = direction(r.ratio, r.ratio_ci_low, r.ratio_ci_high, 1.0).removeprefix("is ")
            line[f"SD² / {r.baseline}"] = f"{r.ratio:.3f} [{r.ratio_ci_low:.3f}, {r.ratio_ci_high:.3f}] {verdict}"
        out.append(line)
    return (
        markdown_table(pd.DataFrame(out))
        + "\n(greedy, exact walks; `results/records`, groups from `results/data/manifest.json`)"
    )
