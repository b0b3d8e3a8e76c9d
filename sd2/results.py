"""Rule `collect`: measurement records and training logs -> `results/tables/*.csv`.

Also the pure table maths used by the README, the notebook and the figures:
`summary_table`, `headline`, `markdown_table`. Definitions follow GUIDE section 3:
MAL counts the target's bonus token (1..k+1 for a same-tokenizer pair); acceptance rate = accepted draft
tokens / drafted tokens; MACs per token = linear-layer weight MACs (a sparse layer costs
its non-zeros); improvement factor = MAL / (1 + k * MACs_draft / MACs_target).

No torch here: tables and figures must regenerate in seconds from cached results.
"""

import json

import pandas as pd

from sd2.checkpoint import atomic_path
from sd2.stats import excludes, paired_ratio_ci

# Baselines first, the method last: tables and legends read in this order.
METHOD_ORDER = ("dense", "dense_sd", "sparse_oneshot", "sparse_sft", "layer_pruned", "sd2")
DENSE_METHODS = ("dense", "dense_sd")

KEYS = ["target", "draft", "method", "sparsity", "eval_set", "temperature", "estimator", "k"]
MEASUREMENT_COLUMNS = KEYS + [
    "headline_k",
    "best_k",
    "n_prompts",
    "n_steps",
    "truncated_steps",
    "accepted_tokens",
    "drafted_tokens",
    "accepted_draft_tokens",
    "mal",
    "mal_ci_low",
    "mal_ci_high",
    "acceptance_rate",
    "acceptance_by_position",
    "accepted_length_histogram",
    "alpha",
    "alpha_ci_low",
    "alpha_ci_high",
    "draft_macs_per_token",
    "target_macs_per_token",
    "macs_ratio",
    "macs_reduction",
    "improvement_factor",
    "improvement_factor_ci_low",
    "improvement_factor_ci_high",
    "ar_tokens_per_s",
    "sd_tokens_per_s",
    "speedup",
    "same_tokenizer",
    "decoding_path",
    "checked_prompts",
    "checked_steps",
    "draft_near_ties",
    "target_near_ties",
    "tree_budget",
    "tree_branching",
    "tree_nodes",
    "tree_nodes_expanded",
    "tree_verify_width",
    "seed",
    "versions",
    "record_file",
]
CURVE_COLUMNS = [
    "step",
    "tokens",
    "train_loss",
    "val_loss",
    "lr",
    "seconds",
    "train_seconds",
    "tokens_per_s",
    "precision",
]
CURVE_LABELS = ["stage", "model", "target", "draft", "method", "sparsity"]
TRAINING_COLUMNS = CURVE_LABELS + CURVE_COLUMNS


# Fewer prompts than this: no comparison is called significant, whatever its interval.
MIN_PROMPTS_FOR_SIGNIFICANCE = 20


def method_rank(method: str) -> int:
    """Position of a method in METHOD_ORDER; unknown methods sort after the known ones."""
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def sort_measurements(df: pd.DataFrame) -> pd.DataFrame:
    """Deterministic order: target, draft, method (METHOD_ORDER), sparsity, eval set, temperature, estimator, k."""
    keys = [c for c in KEYS if c in df.columns]
    # The rank orders known methods; the name after it orders unknown ones alphabetically.
    by = [c for key in keys for c in (["_rank", "method"] if key == "method" else [key])]
    ranked = df.assign(_rank=df["method"].map(method_rank))
    return ranked.sort_values(by, kind="mergesort").drop(columns="_rank").reset_index(drop=True)


def versions_string(versions: dict | None) -> str:
    """{"python": "3.11.9", "torch": "2.13.0", "wandb": None} -> "python=3.11.9;torch=2.13.0"."""
    return ";".join(f"{name}={v}" for name, v in (versions or {}).items() if v is not None)


# MAL may be missing: a run whose every generation ended in its first step counts no step.
REQUIRED = KEYS + ["draft_macs_per_token", "target_macs_per_token"]


def record_row(record: dict, record_file: str) -> dict:
    """Flatten one measurement record into one table row (lists become JSON strings).

    Optional fields may be missing (empty cells); the identifying keys and the MACs may not.
    """
    missing = [c for c in REQUIRED if record.get(c) is None]
    if missing:
        raise ValueError(f"{record_file}: record without {missing}")
    row = {c: record.get(c) for c in MEASUREMENT_COLUMNS}
    for col in ("acceptance_by_position", "accepted_length_histogram"):
        row[col] = json.dumps(record.get(col))
    prov = record.get("provenance") or {}
    # The k values the config reports (measure.k); the walk's other k values fill the MAL-vs-k curves.
    # A tree's k is its node budget: tree rows belong to the tree-budget figure, not to the headline k.
    row["headline_k"] = record["estimator"] != "tree_walk" and record["k"] in (prov.get("settings") or {}).get(
        "k", [record["k"]]
    )
    row["seed"] = prov.get("seed")
    row["versions"] = versions_string(prov.get("versions"))
    row["record_file"] = str(record_file)
    return row


def add_macs_reduction(df: pd.DataFrame) -> pd.DataFrame:
    """macs_reduction = 1 - draft MACs / MACs of the same draft model kept dense (a fraction).

    The dense reference is the draft's dense or dense_sd record (both cost the same);
    a draft without one gets NaN rather than a made-up reference.
    """
    dense = df[df["method"].isin(DENSE_METHODS)].groupby("draft")["draft_macs_per_token"].median()
    reference = df["draft"].map(dense)
    return df.assign(macs_reduction=1.0 - df["draft_macs_per_token"] / reference)


def write_table(df: pd.DataFrame, out_csv) -> None:
    """CSV written to a temporary sibling and renamed: readers never see half a table."""
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False)


def collect_measurements(record_paths: list, out_csv) -> pd.DataFrame:
    """One row per record of every record file, sorted, written atomically to `out_csv`.

    Fails on two records with the same (target, draft, method, sparsity, eval set, k,
    temperature): averaging or picking one silently would hide a workflow bug.
    """
    rows = [record_row(r, path) for r, _, path in read_records(record_paths)]
    df = pd.DataFrame(rows, columns=MEASUREMENT_COLUMNS)
    if len(df):
        df = add_macs_reduction(df)
        duplicated = df[df.duplicated(KEYS, keep=False)]
        if len(duplicated):
            raise ValueError(f"duplicate measurements for {KEYS}:\n{duplicated[KEYS + ['record_file']]}")
        df = sort_measurements(df)
    write_table(df, out_csv)
    return df


def collect_training(curves: list[dict], out_csv) -> pd.DataFrame:
    """Stack training logs into one long table: the curve's labels + step, tokens, losses, lr, seconds.

    Each item: {"stage": "pretrain" | "finetune", "model", "target", "draft", "method",
    "sparsity", "path": training.csv}. Labels that do not apply (a pretrained model has
    no method) may be left out and stay empty.
    """
    frames = []
    for curve in curves:
        log = pd.read_csv(curve["path"])
        missing = set(CURVE_COLUMNS) - set(log.columns)
        if missing:
            raise ValueError(f"{curve['path']}: missing columns {sorted(missing)}")
        # A from-scratch model's file names its own stages (pretrain, then instruct).
        labels = {c: curve.get(c) for c in CURVE_LABELS if not (c == "stage" and "stage" in log.columns)}
        frames.append(log.assign(**labels)[TRAINING_COLUMNS])
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=TRAINING_COLUMNS)
    if len(df):
        # Pretraining before fine-tuning; within a stage, by labels then step.
        order = {"pretrain": 0, "instruct": 1, "finetune": 2}
        df = df.assign(
            _stage=df["stage"].map(order).fillna(3),
            _rank=df["method"].map(lambda m: method_rank(m) if isinstance(m, str) else -1),
        )
        by = ["_stage", "model", "target", "draft", "_rank", "method", "sparsity", "step"]
        df = (
            df.sort_values(by, kind="mergesort", na_position="first")
            .drop(columns=["_stage", "_rank"])
            .reset_index(drop=True)
        )
    write_table(df, out_csv)
    return df


def summary_table(measurements: pd.DataFrame, temperature: float = 0.0) -> pd.DataFrame:
    """One row per target x draft x method x sparsity x reported k at one temperature, measured estimators only.

    Columns: the estimator; per eval set its MAL with the 95% CI and the number of prompts;
    then the mean over eval sets of acceptance rate, improvement factor and speed-up, and
    the draft's MACs per token and MACs reduction.
    """
    at_t = measurements[
        (measurements["temperature"] == temperature)
        & (measurements["estimator"] != "tvd_estimate")
        & measurements["headline_k"].astype(bool)
    ]
    group = ["target", "draft", "method", "sparsity", "k", "estimator"]
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
    means = at_t.groupby(group)[
        ["acceptance_rate", "draft_macs_per_token", "macs_reduction", "improvement_factor", "speedup"]
    ].mean()
    return sort_measurements(wide.join(means).reset_index())


COMPARISON_KEYS = ["target", "draft", "sparsity", "eval_set", "temperature", "estimator", "k"]
COMPARISON_COLUMNS = COMPARISON_KEYS + [
    "n_prompts",
    "sd2_mal",
    "sd2_mal_ci_low",
    "sd2_mal_ci_high",
    "layer_pruned_mal",
    "layer_pruned_mal_ci_low",
    "layer_pruned_mal_ci_high",
    "dense_sd_mal",
    "dense_sd_mal_ci_low",
    "dense_sd_mal_ci_high",
    "mal_ratio_vs_layer_pruned",
    "ratio_ci_low",
    "ratio_ci_high",
    "ratio_significant",
    "macs_reduction_pct",
    "mal_change_pct",
    "change_ci_low",
    "change_ci_high",
    "change_significant",
]


def read_records(record_paths) -> list[tuple[dict, list, str]]:
    """(record, the file's prompt ids, file) for every record of every file, in sorted file order."""
    out = []
    for path in sorted(str(p) for p in record_paths):
        with open(path) as f:
            doc = json.load(f)
        out += [(r, doc.get("prompt_ids"), path) for r in doc["records"]]
    return out


def _paired(a: dict, ids_a, b: dict, ids_b) -> tuple[float, float, float]:
    """MAL(a) / MAL(b) with a paired bootstrap CI over the prompts both measured; NaN if they differ."""
    pa, pb = a.get("per_prompt"), b.get("per_prompt")
    n = a.get("n_prompts")
    if not pa or not pb or n != b.get("n_prompts") or ids_a is None or ids_a[:n] != (ids_b or [])[:n]:
        return float("nan"), float("nan"), float("nan")
    settings = (a.get("provenance") or {}).get("settings") or {}
    return paired_ratio_ci(
        pa["accepted_tokens"],
        pa["steps"],
        pb["accepted_tokens"],
        pb["steps"],
        n_boot=settings.get("bootstrap", 2000),
        seed=(a.get("provenance") or {}).get("seed") or 0,
    )


def comparisons(record_paths) -> pd.DataFrame:
    """The paper's comparisons with paired 95% bootstrap CIs, per target, draft, sparsity, eval set,
    temperature, estimator and reported k (the tvd_estimate has no per-prompt steps and is left out).

    - mal_ratio_vs_layer_pruned = MAL(sd2) / MAL(layer_pruned at the same sparsity level, i.e.
      layers dropped to match that sparse draft's MACs); the paper reports 1.59.
    - macs_reduction_pct = 100 * (1 - MACs(sd2) / MACs(dense_sd)); the paper reports 43.87.
    - mal_change_pct = 100 * (MAL(sd2) / MAL(dense_sd) - 1); the paper reports -8.36.
    Both MAL comparisons resample the same prompts on both sides; *_significant says whether
    the 95% interval excludes no difference, and is False below MIN_PROMPTS_FOR_SIGNIFICANCE
    prompts: a bootstrap over a handful of prompts undercovers badly. Missing counterparts give NaN.
    """
    index = {}
    for record, ids, _ in read_records(record_paths):
        settings = (record.get("provenance") or {}).get("settings") or {}
        if record.get("estimator") == "tvd_estimate" or record["k"] not in settings.get("k", [record["k"]]):
            continue
        index[
            tuple(
                record[c]
                for c in ("target", "draft", "method", "sparsity", "eval_set", "temperature", "estimator", "k")
            )
        ] = (record, ids)
    rows = []
    for (target, draft, method, sparsity, eval_set, temperature, estimator, k), (sd2, ids) in index.items():
        if method != "sd2":
            continue
        row = {
            "target": target,
            "draft": draft,
            "sparsity": sparsity,
            "eval_set": eval_set,
            "temperature": temperature,
            "estimator": estimator,
            "k": k,
            "n_prompts": sd2.get("n_prompts"),
        }
        others = {"sd2": (sd2, ids)}
        for base, level in (("layer_pruned", sparsity), ("dense_sd", 0)):
            found = index.get((target, draft, base, level, eval_set, temperature, estimator, k))
            if found:
                others[base] = found
        for name in ("sd2", "layer_pruned", "dense_sd"):
            rec = others.get(name, ({}, None))[0]
            for col in ("mal", "mal_ci_low", "mal_ci_high"):
                row[f"{name}_{col}"] = rec.get(col, float("nan"))
        nan3 = (float("nan"),) * 3
        enough = (sd2.get("n_prompts") or 0) >= MIN_PROMPTS_FOR_SIGNIFICANCE
        ratio = _paired(sd2, ids, *others["layer_pruned"]) if "layer_pruned" in others else nan3
        change = _paired(sd2, ids, *others["dense_sd"]) if "dense_sd" in others else nan3
        row.update(
            mal_ratio_vs_layer_pruned=ratio[0],
            ratio_ci_low=ratio[1],
            ratio_ci_high=ratio[2],
            ratio_significant=enough and excludes(ratio[1], ratio[2], 1.0),
        )
        dense_macs = others["dense_sd"][0]["draft_macs_per_token"] if "dense_sd" in others else float("nan")
        row["macs_reduction_pct"] = 100.0 * (1.0 - sd2["draft_macs_per_token"] / dense_macs)
        row.update(
            mal_change_pct=100.0 * (change[0] - 1),
            change_ci_low=100.0 * (change[1] - 1),
            change_ci_high=100.0 * (change[2] - 1),
            change_significant=enough and excludes(change[1], change[2], 1.0),
        )
        rows.append(row)
    df = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    return df.sort_values(COMPARISON_KEYS, kind="mergesort").reset_index(drop=True) if len(df) else df


def collect_comparisons(record_paths, out_csv) -> pd.DataFrame:
    df = comparisons(record_paths)
    write_table(df, out_csv)
    return df


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


def summary_markdown(measurements: pd.DataFrame, compared: pd.DataFrame) -> str:
    """The README's result tables, as produced by the run: per-draft MAL with CIs, and the paper's comparisons."""
    parts = []
    for temperature in sorted(measurements["temperature"].unique()):
        mode = "greedy" if temperature == 0 else f"sampling, T={temperature:g}"
        table = summary_table(measurements, temperature)
        evals = [c[len("mal_") :] for c in table.columns if c.startswith("mal_")]
        shown = table[["target", "draft", "method", "sparsity", "k", "estimator"]].copy()
        for e in evals:
            shown[f"MAL {e} [95% CI]"] = [
                with_ci(*v) for v in zip(table[f"mal_{e}"], table[f"ci_low_{e}"], table[f"ci_high_{e}"])
            ]
            shown[f"n {e}"] = table[f"n_{e}"].astype("Int64")
        for col in ("acceptance_rate", "draft_macs_per_token", "macs_reduction", "improvement_factor", "speedup"):
            shown[col] = table[col]
        parts.append(f"### Per draft ({mode})\n\n{markdown_table(shown)}")
        cmp_t = compared[compared["temperature"] == temperature]
        if len(cmp_t):
            view = cmp_t[["target", "draft", "sparsity", "eval_set", "k", "estimator", "n_prompts"]].copy()
            view["SD² / layer-pruned MAL [95% CI]"] = [
                with_ci(*v)
                for v in zip(cmp_t["mal_ratio_vs_layer_pruned"], cmp_t["ratio_ci_low"], cmp_t["ratio_ci_high"])
            ]
            view["significant (ratio)"] = cmp_t["ratio_significant"].map({True: "yes", False: "no"})
            view["MACs change vs dense_sd %"] = -cmp_t["macs_reduction_pct"]
            view["MAL change vs dense_sd % [95% CI]"] = [
                with_ci(*v) for v in zip(cmp_t["mal_change_pct"], cmp_t["change_ci_low"], cmp_t["change_ci_high"])
            ]
            view["significant (change)"] = cmp_t["change_significant"].map({True: "yes", False: "no"})
            parts.append(
                f"### SD² vs layer-pruned and dense_sd ({mode}; paired bootstrap over prompts)\n\n"
                f"{markdown_table(view)}"
            )
    return "\n".join(parts)
