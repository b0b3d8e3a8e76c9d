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

# Baselines first, the method last: tables and legends read in this order.
METHOD_ORDER = ("dense", "dense_sd", "sparse_oneshot", "sparse_sft", "layer_pruned", "sd2")
DENSE_METHODS = ("dense", "dense_sd")

KEYS = ["target", "draft", "method", "sparsity", "eval_set", "k", "temperature"]
MEASUREMENT_COLUMNS = KEYS + [
    "n_prompts",
    "n_steps",
    "truncated_steps",
    "accepted_tokens",
    "drafted_tokens",
    "accepted_draft_tokens",
    "mal",
    "acceptance_rate",
    "acceptance_by_position",
    "accepted_length_histogram",
    "draft_macs_per_token",
    "target_macs_per_token",
    "macs_ratio",
    "macs_reduction",
    "improvement_factor",
    "ar_tokens_per_s",
    "sd_tokens_per_s",
    "speedup",
    "same_tokenizer",
    "lossless_checked",
    "seed",
    "versions",
    "record_file",
]
CURVE_COLUMNS = ["step", "tokens", "train_loss", "val_loss", "lr", "seconds", "train_seconds", "tokens_per_s", "precision"]
CURVE_LABELS = ["stage", "model", "target", "draft", "method", "sparsity"]
TRAINING_COLUMNS = CURVE_LABELS + CURVE_COLUMNS


def method_rank(method: str) -> int:
    """Position of a method in METHOD_ORDER; unknown methods sort after the known ones."""
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def sort_measurements(df: pd.DataFrame) -> pd.DataFrame:
    """Deterministic order: target, draft, method (METHOD_ORDER), sparsity, eval set, k, temperature."""
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
    rows = []
    for path in sorted(str(p) for p in record_paths):
        with open(path) as f:
            doc = json.load(f)
        rows += [record_row(r, path) for r in doc["records"]]
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
        labels = {c: curve.get(c) for c in CURVE_LABELS}
        frames.append(log[CURVE_COLUMNS].assign(**labels)[TRAINING_COLUMNS])
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=TRAINING_COLUMNS)
    if len(df):
        # Pretraining before fine-tuning; within a stage, by labels then step.
        order = {"pretrain": 0, "finetune": 1}
        df = df.assign(_stage=df["stage"].map(order).fillna(2), _rank=df["method"].map(lambda m: method_rank(m) if isinstance(m, str) else -1))
        by = ["_stage", "model", "target", "draft", "_rank", "method", "sparsity", "step"]
        df = df.sort_values(by, kind="mergesort", na_position="first").drop(columns=["_stage", "_rank"]).reset_index(drop=True)
    write_table(df, out_csv)
    return df


def summary_table(measurements: pd.DataFrame, temperature: float = 0.0) -> pd.DataFrame:
    """One row per target x draft x method x sparsity x k at one temperature (greedy by default).

    Columns: mal_<eval_set> for each eval set, then the mean over eval sets of acceptance
    rate, improvement factor and speed-up, and the draft's MACs per token and MACs reduction.
    """
    at_t = measurements[measurements["temperature"] == temperature]
    group = ["target", "draft", "method", "sparsity", "k"]
    mal = at_t.pivot_table(index=group, columns="eval_set", values="mal", aggfunc="mean")
    mal.columns = [f"mal_{c}" for c in mal.columns]
    means = at_t.groupby(group)[["acceptance_rate", "draft_macs_per_token", "macs_reduction", "improvement_factor", "speedup"]].mean()
    out = mal.join(means).reset_index()
    return sort_measurements(out) if len(out) else out


def _pick(df: pd.DataFrame, method: str, sparsity: int | None, cols: list[str]) -> pd.DataFrame:
    """MAL and MACs of one method, indexed by the comparison keys."""
    sel = df[df["method"] == method]
    if sparsity is not None:
        sel = sel[sel["sparsity"] == sparsity]
    keys = ["target", "draft", "eval_set", "k", "temperature"] + (["sparsity"] if sparsity is None else [])
    return sel.set_index(keys)[cols]


def headline(measurements: pd.DataFrame, temperature: float = 0.0) -> pd.DataFrame:
    """The paper's comparisons, per target, draft, sparsity, eval set and k.

    - mal_ratio_vs_layer_pruned = MAL(sd2) / MAL(layer_pruned at the same sparsity level,
      i.e. layers dropped to match that sparse draft's MACs); the paper reports 1.59.
    - macs_reduction_pct = 100 * (1 - MACs(sd2) / MACs(dense_sd)); the paper reports 43.87.
    - mal_change_pct = 100 * (MAL(sd2) / MAL(dense_sd) - 1); the paper reports -8.36.
    Missing counterparts give NaN.
    """
    at_t = measurements[measurements["temperature"] == temperature]
    cols = ["mal", "draft_macs_per_token"]
    sd2 = _pick(at_t, "sd2", None, cols).add_prefix("sd2_")
    layer = _pick(at_t, "layer_pruned", None, cols).add_prefix("layer_pruned_")
    dense_sd = _pick(at_t, "dense_sd", 0, cols).add_prefix("dense_sd_")
    out = sd2.join(layer, how="left").reset_index()
    out = out.merge(dense_sd.reset_index(), on=["target", "draft", "eval_set", "k", "temperature"], how="left")
    out["mal_ratio_vs_layer_pruned"] = out["sd2_mal"] / out["layer_pruned_mal"]
    out["macs_reduction_pct"] = 100.0 * (1.0 - out["sd2_draft_macs_per_token"] / out["dense_sd_draft_macs_per_token"])
    out["mal_change_pct"] = 100.0 * (out["sd2_mal"] / out["dense_sd_mal"] - 1.0)
    first = ["target", "draft", "sparsity", "eval_set", "k", "temperature"]
    out = out[first + [c for c in out.columns if c not in first]]
    return out.sort_values(first, kind="mergesort").reset_index(drop=True)


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


def summary_markdown(measurements: pd.DataFrame) -> str:
    """The README's result tables, as produced by the run: per-draft summary and the paper's comparisons."""
    parts = []
    for temperature in sorted(measurements["temperature"].unique()):
        mode = "greedy" if temperature == 0 else f"sampling, T={temperature:g}"
        parts.append(f"### Per draft ({mode})\n\n{markdown_table(summary_table(measurements, temperature))}")
        cols = ["target", "draft", "sparsity", "eval_set", "k", "sd2_mal", "layer_pruned_mal", "dense_sd_mal",
                "mal_ratio_vs_layer_pruned", "macs_reduction_pct", "mal_change_pct"]
        parts.append(f"### SD² vs layer-pruned and dense_sd ({mode})\n\n{markdown_table(headline(measurements, temperature)[cols])}")
    return "\n".join(parts)
