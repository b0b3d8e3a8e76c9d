"""Rule `collect`: measurement records and training logs -> measurements.csv and training.csv.

The table schema (KEYS, MEASUREMENT_COLUMNS, TRAINING_COLUMNS), the deterministic row order every
table shares, and reading records and writing tables. Definitions: MAL counts the target's bonus
token (1..k+1 for a same-tokenizer pair); acceptance rate = accepted draft tokens / drafted tokens;
MACs per token = linear-layer weight MACs (a sparse layer costs its non-zeros); improvement
factor = MAL / (1 + k * MACs_draft / MACs_target).

No torch here: tables and figures must regenerate in seconds from cached results.
"""

import json

import pandas as pd

from sd2 import methods, variants
from sd2.checkpoint import atomic_path

# Drafts as dense as the draft model itself: their MACs are the reference of macs_reduction.

# `method` is the registry's method, `loss` its fine-tuning loss (empty for an untuned draft),
# `quantization` its weight quantization ("none" for none): records and curves name a variant
# `<method>+<loss>@<scheme>` (sd2.variants.variant_name, quantized_name), split here.
KEYS = ["target", "draft", "method", "loss", "quantization", "sparsity", "eval_set", "temperature", "estimator", "k"]
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
    "mal_vllm",
    "mal_vllm_ci_low",
    "mal_vllm_ci_high",
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
    "draft_weight_bytes_per_token",
    "target_weight_bytes_per_token",
    "weight_bytes_ratio",
    "improvement_factor_bytes",
    "improvement_factor_bytes_ci_low",
    "improvement_factor_bytes_ci_high",
    "ar_tokens_per_s",
    "sd_tokens_per_s",
    "speedup",
    "draft_kernel",
    "same_tokenizer",
    "decoding_path",
    "checked_prompts",
    "checked_steps",
    "draft_near_ties",
    "target_near_ties",
    "engine_same_steps",
    "tli_shared_tokens",
    "target_training_precision",
    "draft_training_precision",
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
CURVE_LABELS = ["stage", "model", "target", "draft", "method", "loss", "sparsity"]
TRAINING_COLUMNS = CURVE_LABELS + CURVE_COLUMNS


def with_variant_columns(df: pd.DataFrame) -> pd.DataFrame:
    """A table as it is, or one written before losses or quantization were sweep axes with the
    columns it lacks: `loss` (each method's own: ce for a tuned method, none for an untuned one)
    and `quantization` ("none")."""
    if "loss" not in df.columns:
        df = df.assign(loss=df["method"].map(lambda m: methods.default_loss(m) if isinstance(m, str) else None))
    if "quantization" not in df.columns:
        df = df.assign(quantization=variants.NO_QUANTIZATION)
    return df


def unquantized(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of drafts served with their weights as made (the comparisons between methods)."""
    if "quantization" not in df.columns:
        return df
    return df[df["quantization"].isna() | (df["quantization"] == variants.NO_QUANTIZATION)]


def with_rank(df: pd.DataFrame, keys: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """`df` with rank columns, and the sort keys: the registry's method order, no loss then ce first."""
    by = []
    for key in keys:
        if key == "method":
            by += ["_rank", "method"]  # the name after the rank orders unknown methods alphabetically
        elif key == "loss":
            by += ["_loss_rank", "loss"]
        elif key == "quantization":
            by.append("_quantization_rank")
        else:
            by.append(key)
    ranked = df.assign(_rank=df["method"].map(methods.rank))
    if "loss" in df.columns:
        ranked = ranked.assign(_loss_rank=df["loss"].map(methods.loss_rank))
    if "quantization" in df.columns:
        ranked = ranked.assign(_quantization_rank=df["quantization"].map(variants.quantization_rank))
    return ranked, by


def drop_ranks(ranked: pd.DataFrame) -> pd.DataFrame:
    """A sorted frame without with_rank's columns, renumbered."""
    return ranked.drop(columns=[c for c in ("_rank", "_loss_rank", "_quantization_rank") if c in ranked]).reset_index(
        drop=True
    )


def sort_measurements(df: pd.DataFrame) -> pd.DataFrame:
    """Deterministic order: target, draft, method (the registry's order), loss, sparsity, eval set, temperature,
    estimator, k."""
    ranked, by = with_rank(df, [c for c in KEYS if c in df.columns])
    ranked = ranked.sort_values(by, kind="mergesort", na_position="first")
    return drop_ranks(ranked)


def versions_string(versions: dict | None) -> str:
    """{"python": "3.11.9", "torch": "2.13.0", "wandb": None} -> "python=3.11.9;torch=2.13.0"."""
    return ";".join(f"{name}={v}" for name, v in (versions or {}).items() if v is not None)


# MAL may be missing: a run whose every generation ended in its first step counts no step.
REQUIRED = KEYS + ["draft_macs_per_token", "target_macs_per_token"]


def record_row(record: dict, record_file: str) -> dict:
    """Flatten one measurement record into one table row (lists become JSON strings).

    Optional fields may be missing (empty cells); the identifying keys and the MACs may not.
    """
    missing = [c for c in REQUIRED if c not in ("loss", "quantization") and record.get(c) is None]
    if missing:
        raise ValueError(f"{record_file}: record without {missing}")
    row = {c: record.get(c) for c in MEASUREMENT_COLUMNS}
    row["method"], row["loss"] = variants.parse_variant(record["method"])
    row["quantization"] = variants.split_quantization(record["method"])[1]
    # Records from before measure.draft_kernel existed were all timed with the draft as stored.
    row["draft_kernel"] = record.get("draft_kernel") or "dense"
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
    dense = df[df["method"].isin(dense_methods())].groupby("draft")["draft_macs_per_token"].median()
    reference = df["draft"].map(dense)
    return df.assign(macs_reduction=1.0 - df["draft_macs_per_token"] / reference)


def add_bytes_improvement(df: pd.DataFrame) -> pd.DataFrame:
    """improvement_factor_bytes = MAL / (1 + f x draft bytes / target bytes), with weight bytes read
    per token (sd2.measure.weight_bytes) as the cost instead of MACs; f = draft forwards per step
    (k for a chain, the expanded nodes for a tree, 1 for a parallel draft's one pass). NaN where a
    record has no byte counts (heads, and records measured before bytes were counted)."""
    forwards = df["k"].where(df["estimator"] != "tree_walk", df["tree_nodes_expanded"])
    forwards = forwards.where(df["estimator"] != "parallel_walk", 1)
    scale = 1.0 / (1.0 + forwards * df["weight_bytes_ratio"])
    return df.assign(
        improvement_factor_bytes=df["mal"] * scale,
        improvement_factor_bytes_ci_low=df["mal_ci_low"] * scale,
        improvement_factor_bytes_ci_high=df["mal_ci_high"] * scale,
    )


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
        df = add_bytes_improvement(add_macs_reduction(df))
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
        if curve.get("method"):
            labels["method"], labels["loss"] = variants.parse_variant(curve["method"])
        frames.append(log.assign(**labels)[TRAINING_COLUMNS])
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=TRAINING_COLUMNS)
    if len(df):
        # Pretraining before fine-tuning; within a stage, by labels then step.
        order = {"pretrain": 0, "instruct": 1, "finetune": 2}
        df = df.assign(
            _stage=df["stage"].map(order).fillna(3),
            _rank=df["method"].map(lambda m: methods.rank(m) if isinstance(m, str) else -1),
            _loss_rank=df["loss"].map(methods.loss_rank),
        )
        by = ["_stage", "model", "target", "draft", "_rank", "method", "_loss_rank", "sparsity", "step"]
        df = (
            df.sort_values(by, kind="mergesort", na_position="first")
            .drop(columns=["_stage", "_rank", "_loss_rank"])
            .reset_index(drop=True)
        )
    write_table(df, out_csv)
    return df


def read_records(record_paths) -> list[tuple[dict, list, str]]:
    """(record, the file's prompt ids, file) for every record of every file, in sorted file order."""
    out = []
    for path in sorted(str(p) for p in record_paths):
        with open(path) as f:
            doc = json.load(f)
        out += [(r, doc.get("prompt_ids"), path) for r in doc["records"]]
    return out


def dense_methods() -> list[str]:
    """Draft methods that start from the dense draft (registered ones included, hence a function)."""
    return [m.name for m in methods.METHODS if m.kind == "draft" and m.init == "dense"]
