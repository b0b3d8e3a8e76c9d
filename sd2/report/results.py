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

from sd2 import methods
from sd2.checkpoint import atomic_path
from sd2.measure.stats import excludes, paired_ratio_ci

# Baselines first, the method last: tables and legends read in the registry's order (sd2.methods).
METHOD_ORDER = methods.NAMES
# Drafts as dense as the draft model itself: their MACs are the reference of macs_reduction.
DENSE_METHODS = tuple(m.name for m in methods.METHODS if m.kind == "draft" and m.init == "dense")

# `method` is the registry's method, `loss` its fine-tuning loss (empty for an untuned draft),
# `quantization` its weight quantization ("none" for none): records and curves name a variant
# `<method>+<loss>@<scheme>` (sd2.methods.variant_name, quantized_name), split here.
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


# Fewer prompts than this: no comparison is called significant, whatever its interval.
MIN_PROMPTS_FOR_SIGNIFICANCE = 20


def method_rank(method: str) -> int:
    """Position of a method in METHOD_ORDER; unknown methods sort after the known ones."""
    return methods.rank(method)


def with_variant_columns(df: pd.DataFrame) -> pd.DataFrame:
    """A table as it is, or one written before losses or quantization were sweep axes with the
    columns it lacks: `loss` (each method's own: ce for a tuned method, none for an untuned one)
    and `quantization` ("none")."""
    if "loss" not in df.columns:
        df = df.assign(loss=df["method"].map(lambda m: methods.default_loss(m) if isinstance(m, str) else None))
    if "quantization" not in df.columns:
        df = df.assign(quantization=methods.NO_QUANTIZATION)
    return df


def unquantized(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of drafts served with their weights as made (the comparisons between methods)."""
    if "quantization" not in df.columns:
        return df
    return df[df["quantization"].isna() | (df["quantization"] == methods.NO_QUANTIZATION)]


def baseline_comparisons(compared: pd.DataFrame) -> pd.DataFrame:
    """The rows of comparisons.csv that compare sd2 (ce) with its baselines."""
    if "loss" not in compared.columns:  # a table written before losses were a sweep axis has no others
        return compared
    compared = unquantized(compared)
    return compared[(compared["method"] == "sd2") & (compared["loss"] == methods.DEFAULT_LOSS)]


def loss_comparisons(compared: pd.DataFrame) -> pd.DataFrame:
    """The rows of comparisons.csv that compare a loss variant with the ce variant of its method."""
    if "loss" not in compared.columns:  # a table written before losses were a sweep axis: none
        return pd.DataFrame(columns=COMPARISON_COLUMNS)
    compared = unquantized(compared)
    return compared[compared["loss"].notna() & (compared["loss"] != methods.DEFAULT_LOSS)]


def quantization_comparisons(compared: pd.DataFrame) -> pd.DataFrame:
    """The rows of comparisons.csv that compare a quantized draft with the same draft unquantized."""
    if "quantization" not in compared.columns:
        return pd.DataFrame(columns=COMPARISON_COLUMNS)
    return compared[compared["quantization"].notna() & (compared["quantization"] != methods.NO_QUANTIZATION)]


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
    ranked = df.assign(_rank=df["method"].map(method_rank))
    if "loss" in df.columns:
        ranked = ranked.assign(_loss_rank=df["loss"].map(methods.loss_rank))
    if "quantization" in df.columns:
        ranked = ranked.assign(_quantization_rank=df["quantization"].map(methods.quantization_rank))
    return ranked, by


def drop_ranks(ranked: pd.DataFrame) -> pd.DataFrame:
    """A sorted frame without with_rank's columns, renumbered."""
    return ranked.drop(columns=[c for c in ("_rank", "_loss_rank", "_quantization_rank") if c in ranked]).reset_index(
        drop=True
    )


def sort_measurements(df: pd.DataFrame) -> pd.DataFrame:
    """Deterministic order: target, draft, method (METHOD_ORDER), loss, sparsity, eval set, temperature,
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
    row["method"], row["loss"] = methods.parse_variant(record["method"])
    row["quantization"] = methods.split_quantization(record["method"])[1]
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
    dense = df[df["method"].isin(DENSE_METHODS)].groupby("draft")["draft_macs_per_token"].median()
    reference = df["draft"].map(dense)
    return df.assign(macs_reduction=1.0 - df["draft_macs_per_token"] / reference)


def add_bytes_improvement(df: pd.DataFrame) -> pd.DataFrame:
    """improvement_factor_bytes = MAL / (1 + f x draft bytes / target bytes), with weight bytes read
    per token (sd2.measure.weight_bytes) as the cost instead of MACs; f = draft forwards per step
    (k for a chain, the expanded nodes for a tree). NaN where a record has no byte counts (heads,
    and records measured before bytes were counted)."""
    forwards = df["k"].where(df["estimator"] != "tree_walk", df["tree_nodes_expanded"])
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
            labels["method"], labels["loss"] = methods.parse_variant(curve["method"])
        frames.append(log.assign(**labels)[TRAINING_COLUMNS])
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=TRAINING_COLUMNS)
    if len(df):
        # Pretraining before fine-tuning; within a stage, by labels then step.
        order = {"pretrain": 0, "instruct": 1, "finetune": 2}
        df = df.assign(
            _stage=df["stage"].map(order).fillna(3),
            _rank=df["method"].map(lambda m: method_rank(m) if isinstance(m, str) else -1),
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


COMPARISON_KEYS = [
    "target",
    "draft",
    "method",
    "loss",
    "quantization",
    "sparsity",
    "eval_set",
    "temperature",
    "estimator",
    "k",
]
# Rows with loss ce compare SD² with its baselines (the paper's comparisons); rows with another loss
# compare that loss variant with the ce variant of the same method (ce_method: direct_align's is dense_sd).
BASELINE_COLUMNS = [
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
LOSS_COLUMNS = [
    "ce_method",
    "mal",
    "mal_ci_low",
    "mal_ci_high",
    "ce_mal",
    "ce_mal_ci_low",
    "ce_mal_ci_high",
    "mal_ratio_vs_ce",
    "vs_ce_ci_low",
    "vs_ce_ci_high",
    "vs_ce_significant",
]
# Rows of a quantized draft compare it with the same draft unquantized (same method, loss, sparsity).
QUANTIZATION_COLUMNS = [
    "unquantized_mal",
    "unquantized_mal_ci_low",
    "unquantized_mal_ci_high",
    "mal_ratio_vs_unquantized",
    "vs_unquantized_ci_low",
    "vs_unquantized_ci_high",
    "vs_unquantized_significant",
    "weight_bytes_ratio_vs_unquantized",
]
# Rows of a quantization-aware draft (<variant>@<scheme>-qat) also compare it with the one-shot
# <variant>@<scheme>: the same quantization, steps and data, fine-tuned without seeing it.
QAT_COLUMNS = [
    "one_shot_mal",
    "one_shot_mal_ci_low",
    "one_shot_mal_ci_high",
    "mal_ratio_vs_one_shot",
    "vs_one_shot_ci_low",
    "vs_one_shot_ci_high",
    "vs_one_shot_significant",
]
COMPARISON_COLUMNS = (
    COMPARISON_KEYS + ["n_prompts"] + BASELINE_COLUMNS + LOSS_COLUMNS + QUANTIZATION_COLUMNS + QAT_COLUMNS
)


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
    """Paired comparisons with 95% bootstrap CIs, per target, draft, sparsity, eval set, temperature,
    estimator and reported k (the tvd_estimate has no per-prompt steps and is left out).

    Rows of sd2 with loss ce, the paper's comparisons:
    - mal_ratio_vs_layer_pruned = MAL(sd2) / MAL(layer_pruned at the same sparsity level, i.e.
      layers dropped to match that sparse draft's MACs); the paper reports 1.59.
    - macs_reduction_pct = 100 * (1 - MACs(sd2) / MACs(dense_sd)); the paper reports 43.87.
    - mal_change_pct = 100 * (MAL(sd2) / MAL(dense_sd) - 1); the paper reports -8.36.
    Rows of every other loss variant (a tuned method with a loss other than ce, direct_align included):
    - mal_ratio_vs_ce = MAL(variant) / MAL(ce_method with ce at the same sparsity), the same steps
      and data (the workflow fine-tunes every loss with the same settings on the same data).
    Rows of a quantized draft (<variant>@<scheme>):
    - mal_ratio_vs_unquantized = MAL(quantized) / MAL(<variant> as made);
    - a quantization-aware one (@<scheme>-qat) also mal_ratio_vs_one_shot = MAL(@<scheme>-qat) /
      MAL(@<scheme>): the same quantization, steps and data, fine-tuned seeing it or not.
    Every MAL comparison resamples the same prompts on both sides; *_significant says whether
    the 95% interval excludes no difference, and is False below MIN_PROMPTS_FOR_SIGNIFICANCE
    prompts: a bootstrap over a handful of prompts undercovers badly. Missing counterparts give NaN.
    """
    index = {}
    for record, ids, _ in read_records(record_paths):
        settings = (record.get("provenance") or {}).get("settings") or {}
        if record.get("estimator") == "tvd_estimate" or record["k"] not in settings.get("k", [record["k"]]):
            continue
        method, loss = methods.parse_variant(record["method"])
        scheme = methods.split_quantization(record["method"])[1]
        cell = tuple(record[c] for c in ("target", "draft", "sparsity", "eval_set", "temperature", "estimator", "k"))
        index[(method, loss, scheme, *cell)] = (record, ids)
    none = methods.NO_QUANTIZATION
    rows = []
    for (method, loss, scheme, *cell), (rec, ids) in index.items():
        if scheme != none:
            extra = _quantization_row(rec, ids, index.get((method, loss, none, *cell)))
            if methods.quantization_aware(scheme):
                extra.update(_one_shot_row(rec, ids, index.get((method, loss, methods.base_scheme(scheme), *cell))))
        elif method == "sd2" and loss == methods.DEFAULT_LOSS:
            others = {"sd2": (rec, ids)}
            for base, level in (("layer_pruned", cell[2]), ("dense_sd", 0)):
                found = index.get((base, methods.DEFAULT_LOSS, none, cell[0], cell[1], level, *cell[3:]))
                if found:
                    others[base] = found
            extra = _baseline_row(others)
        elif loss not in (None, methods.DEFAULT_LOSS) and methods.ce_counterpart(method):
            ce_method = methods.ce_counterpart(method)
            extra = _loss_row(rec, ids, ce_method, index.get((ce_method, methods.DEFAULT_LOSS, none, *cell)))
        else:
            continue
        rows.append(
            {
                **dict(zip(COMPARISON_KEYS, (cell[0], cell[1], method, loss, scheme, *cell[2:]))),
                "n_prompts": rec.get("n_prompts"),
                **extra,
            }
        )
    df = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    if not len(df):
        return df
    ranked, by = with_rank(df, COMPARISON_KEYS)
    return drop_ranks(ranked.sort_values(by, kind="mergesort"))


FAMILY_COLUMNS = [
    "target",
    "eval_set",
    "k",
    "method",
    "loss",
    "draft",
    "sparsity",
    "estimator",
    "n_prompts",
    "mal",
    "mal_ci_low",
    "mal_ci_high",
    "draft_macs_per_token",
    "improvement_factor",
    "improvement_factor_ci_low",
    "improvement_factor_ci_high",
    "checked_prompts",
    "reference_draft",
    "mal_ratio_vs_dense_sd",
    "vs_dense_sd_ci_low",
    "vs_dense_sd_ci_high",
    "vs_dense_sd_significant",
]


def family_comparisons(record_paths, reference: str = "dense_sd") -> pd.DataFrame:
    """Every drafter family side by side, greedy, at each reported k: one row per exact greedy record
    (the chains' teacher-forced walk, the heads' rollout walk; not trees, whose k is a node budget),
    with MAL(drafter) / MAL(`reference` (ce) draft) and its paired bootstrap CI over the same prompts.
    A chain draft is compared with the reference of its own size; a head, which has no draft size,
    with its target's first reference in file order (reference_draft names it).
    """
    exact = ("teacher_forced_walk", "rollout_walk")
    kept = []
    for record, ids, _ in read_records(record_paths):
        settings = (record.get("provenance") or {}).get("settings") or {}
        if record["temperature"] != 0 or record["estimator"] not in exact or record["k"] not in settings.get("k", []):
            continue
        kept.append((record, ids))
    refs = {}
    for record, ids in kept:
        method, loss = methods.parse_variant(record["method"])
        if method == reference and loss == methods.DEFAULT_LOSS:
            cell = (record["target"], record["eval_set"], record["k"])
            refs[(*cell, record["draft"])] = (record, ids)
            refs.setdefault(cell, (record, ids))
    rows = []
    for record, ids in kept:
        method, loss = methods.parse_variant(record["method"])
        cell = (record["target"], record["eval_set"], record["k"])
        head = methods.BY_NAME[method].kind == "head" if method in methods.BY_NAME else False
        ref = refs.get(cell) if head else refs.get((*cell, record["draft"]))
        ratio = _paired(record, ids, *ref) if ref else (float("nan"),) * 3
        rows.append(
            {
                **{c: record.get(c) for c in FAMILY_COLUMNS},
                "method": method,
                "loss": loss,
                "reference_draft": ref[0]["draft"] if ref else None,
                "mal_ratio_vs_dense_sd": ratio[0],
                "vs_dense_sd_ci_low": ratio[1],
                "vs_dense_sd_ci_high": ratio[2],
                "vs_dense_sd_significant": _enough(record) and excludes(ratio[1], ratio[2], 1.0),
            }
        )
    df = pd.DataFrame(rows, columns=FAMILY_COLUMNS)
    if not len(df):
        return df
    ranked, by = with_rank(df, ["target", "eval_set", "k", "method", "loss", "draft", "sparsity", "estimator"])
    return drop_ranks(ranked.sort_values(by, kind="mergesort"))


def _quantization_row(rec: dict, ids, unquantized) -> dict:
    """A quantized draft against the same draft unquantized, paired over the same prompts."""
    if unquantized is None:
        return {}
    base, base_ids = unquantized
    ratio = _paired(rec, ids, base, base_ids)
    own = {col: rec.get(col) for col in ("mal", "mal_ci_low", "mal_ci_high")}
    base_bytes, own_bytes = base.get("draft_weight_bytes_per_token"), rec.get("draft_weight_bytes_per_token")
    return {
        **own,
        "unquantized_mal": base.get("mal"),
        "unquantized_mal_ci_low": base.get("mal_ci_low"),
        "unquantized_mal_ci_high": base.get("mal_ci_high"),
        "mal_ratio_vs_unquantized": ratio[0],
        "vs_unquantized_ci_low": ratio[1],
        "vs_unquantized_ci_high": ratio[2],
        "vs_unquantized_significant": _enough(rec) and excludes(ratio[1], ratio[2], 1.0),
        "weight_bytes_ratio_vs_unquantized": own_bytes / base_bytes if own_bytes and base_bytes else float("nan"),
    }


def _one_shot_row(rec: dict, ids, one_shot) -> dict:
    """A quantization-aware draft against the same draft quantized one-shot, paired over the same prompts."""
    if one_shot is None:
        return {}
    base, base_ids = one_shot
    ratio = _paired(rec, ids, base, base_ids)
    return {
        "one_shot_mal": base.get("mal"),
        "one_shot_mal_ci_low": base.get("mal_ci_low"),
        "one_shot_mal_ci_high": base.get("mal_ci_high"),
        "mal_ratio_vs_one_shot": ratio[0],
        "vs_one_shot_ci_low": ratio[1],
        "vs_one_shot_ci_high": ratio[2],
        "vs_one_shot_significant": _enough(rec) and excludes(ratio[1], ratio[2], 1.0),
    }


def _enough(record: dict) -> bool:
    return (record.get("n_prompts") or 0) >= MIN_PROMPTS_FOR_SIGNIFICANCE


def _baseline_row(others: dict) -> dict:
    """sd2 (ce) against layer_pruned at its sparsity and dense_sd (ce), from {name: (record, prompt ids)}."""
    sd2, ids = others["sd2"]
    row = {}
    for name in ("sd2", "layer_pruned", "dense_sd"):
        rec = others.get(name, ({}, None))[0]
        for col in ("mal", "mal_ci_low", "mal_ci_high"):
            row[f"{name}_{col}"] = rec.get(col, float("nan"))
    row.update(mal=sd2.get("mal"), mal_ci_low=sd2.get("mal_ci_low"), mal_ci_high=sd2.get("mal_ci_high"))
    nan3 = (float("nan"),) * 3
    ratio = _paired(sd2, ids, *others["layer_pruned"]) if "layer_pruned" in others else nan3
    change = _paired(sd2, ids, *others["dense_sd"]) if "dense_sd" in others else nan3
    row.update(
        mal_ratio_vs_layer_pruned=ratio[0],
        ratio_ci_low=ratio[1],
        ratio_ci_high=ratio[2],
        ratio_significant=_enough(sd2) and excludes(ratio[1], ratio[2], 1.0),
    )
    dense_macs = others["dense_sd"][0]["draft_macs_per_token"] if "dense_sd" in others else float("nan")
    row["macs_reduction_pct"] = 100.0 * (1.0 - sd2["draft_macs_per_token"] / dense_macs)
    row.update(
        mal_change_pct=100.0 * (change[0] - 1),
        change_ci_low=100.0 * (change[1] - 1),
        change_ci_high=100.0 * (change[2] - 1),
        change_significant=_enough(sd2) and excludes(change[1], change[2], 1.0),
    )
    return row


def _loss_row(rec: dict, ids, ce_method: str, ce) -> dict:
    """A loss variant against `ce_method` with ce in the same cell (`ce`: its (record, prompt ids), or None)."""
    ce_rec = ce[0] if ce else {}
    ratio = _paired(rec, ids, *ce) if ce else (float("nan"),) * 3
    return {
        "ce_method": ce_method,
        **{col: rec.get(col) for col in ("mal", "mal_ci_low", "mal_ci_high")},
        **{f"ce_{col}": ce_rec.get(col, float("nan")) for col in ("mal", "mal_ci_low", "mal_ci_high")},
        "mal_ratio_vs_ce": ratio[0],
        "vs_ce_ci_low": ratio[1],
        "vs_ce_ci_high": ratio[2],
        "vs_ce_significant": _enough(rec) and excludes(ratio[1], ratio[2], 1.0),
    }


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


def ci_column(df: pd.DataFrame, value: str, low: str, high: str) -> list[str]:
    """with_ci of every row of df's columns value, low and high."""
    return [with_ci(*v) for v in zip(df[value], df[low], df[high])]


def summary_markdown(measurements: pd.DataFrame, compared: pd.DataFrame) -> str:
    """The README's result tables, as produced by the run: per-draft MAL with CIs, the paper's comparisons,
    and each loss variant against the ce variant of its method."""
    parts = []
    for temperature in sorted(measurements["temperature"].unique()):
        mode = "greedy" if temperature == 0 else f"sampling, T={temperature:g}"
        table = summary_table(measurements, temperature)
        evals = [c[len("mal_") :] for c in table.columns if c.startswith("mal_")]
        # The method's label names a loss other than its own ('sd2 (kl)'), and Direct Alignment as such.
        shown = table[["target", "draft", "method", "sparsity", "k", "estimator"]].copy()
        shown["method"] = [methods.label(m, loss) for m, loss in zip(table["method"], table["loss"])]
        for e in evals:
            shown[f"MAL {e} [95% CI]"] = ci_column(table, f"mal_{e}", f"ci_low_{e}", f"ci_high_{e}")
            shown[f"n {e}"] = table[f"n_{e}"].astype("Int64")
        for col in SUMMARY_MEANS:
            if col in table.columns:
                shown[col] = table[col]
        parts.append(f"### Per draft ({mode})\n\n{markdown_table(shown)}")
        cmp_t = baseline_comparisons(compared[compared["temperature"] == temperature])
        if len(cmp_t):
            view = cmp_t[["target", "draft", "sparsity", "eval_set", "k", "estimator", "n_prompts"]].copy()
            view["SD² / layer-pruned MAL [95% CI]"] = ci_column(
                cmp_t, "mal_ratio_vs_layer_pruned", "ratio_ci_low", "ratio_ci_high"
            )
            view["significant (ratio)"] = cmp_t["ratio_significant"].map({True: "yes", False: "no"})
            view["MACs change vs dense_sd %"] = -cmp_t["macs_reduction_pct"]
            view["MAL change vs dense_sd % [95% CI]"] = ci_column(
                cmp_t, "mal_change_pct", "change_ci_low", "change_ci_high"
            )
            view["significant (change)"] = cmp_t["change_significant"].map({True: "yes", False: "no"})
            parts.append(
                f"### SD² vs layer-pruned and dense_sd ({mode}; paired bootstrap over prompts)\n\n"
                f"{markdown_table(view)}"
            )
        by_loss = loss_comparisons(compared[compared["temperature"] == temperature])
        if len(by_loss):
            view = by_loss[["target", "draft"]].copy()
            view["draft variant"] = [methods.label(m, loss) for m, loss in zip(by_loss["method"], by_loss["loss"])]
            view["against"] = by_loss["ce_method"].map(lambda m: methods.label(m, methods.DEFAULT_LOSS) + " (ce)")
            view = view.join(by_loss[["sparsity", "eval_set", "k", "estimator", "n_prompts"]])
            view["MAL [95% CI]"] = ci_column(by_loss, "mal", "mal_ci_low", "mal_ci_high")
            view["MAL with ce [95% CI]"] = ci_column(by_loss, "ce_mal", "ce_mal_ci_low", "ce_mal_ci_high")
            view["ratio to ce [95% CI]"] = ci_column(by_loss, "mal_ratio_vs_ce", "vs_ce_ci_low", "vs_ce_ci_high")
            view["significant"] = by_loss["vs_ce_significant"].map({True: "yes", False: "no"})
            parts.append(
                f"### Loss variants vs cross-entropy ({mode}; same steps and data, paired bootstrap over prompts)"
                f"\n\n{markdown_table(view)}"
            )
    return "\n".join(parts)
