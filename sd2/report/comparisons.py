"""Rule `collect`: paired comparisons with bootstrap CIs over prompts -> comparisons.csv, and the
drafter families side by side (the README's families tables).

Every MAL comparison resamples the same prompts on both sides (sd2.measure.stats.paired_ratio_ci).
"""

import pandas as pd

from sd2 import methods, variants
from sd2.measure.stats import excludes, paired_ratio_ci
from sd2.report.collect import drop_ranks, read_records, unquantized, with_rank, with_variant_columns, write_table

# The exact greedy estimators of a chain draft: one shared tokenizer, then the two different-tokenizer rules.
EXACT_CHAINS = ("teacher_forced_walk", "uag_walk", "tli_walk")
# A record's cell in _reported_records' index, after its (method, loss, scheme).
RECORD_CELL = ("target", "draft", "sparsity", "eval_set", "temperature", "estimator", "k")
# Fewer prompts than this: no comparison is called significant, whatever its interval.
MIN_PROMPTS_FOR_SIGNIFICANCE = 20

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
    "layer_pruned_macs_vs_sd2_pct",
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


def _reported_records(record_paths) -> dict:
    """{(method, loss, scheme, target, draft, sparsity, eval set, temperature, estimator, k): (record, prompt ids)}
    for every record at a reported k, the tvd_estimate left out (it has no per-prompt steps)."""
    index = {}
    for record, ids, _ in read_records(record_paths):
        settings = (record.get("provenance") or {}).get("settings") or {}
        if record.get("estimator") == "tvd_estimate" or record["k"] not in settings.get("k", [record["k"]]):
            continue
        method, loss = variants.parse_variant(record["method"])
        scheme = variants.split_quantization(record["method"])[1]
        cell = tuple(record[c] for c in RECORD_CELL)
        index[(method, loss, scheme, *cell)] = (record, ids)
    return index


def _comparison_columns(index: dict, variant: tuple, cell: list, rec: dict, ids) -> dict | None:
    """The comparison columns of one record (`variant` = (method, loss, scheme) in `cell`) against its
    counterparts in `index`; None for a record that is compared with nothing."""
    method, loss, scheme = variant
    none = variants.NO_QUANTIZATION
    if scheme != none:
        extra = _quantization_row(rec, ids, index.get((method, loss, none, *cell)))
        if variants.quantization_aware(scheme):
            extra.update(_one_shot_row(rec, ids, index.get((method, loss, variants.base_scheme(scheme), *cell))))
        return extra
    if method == "sd2" and loss == methods.DEFAULT_LOSS:
        others = {"sd2": (rec, ids)}
        for base, level in (("layer_pruned", cell[2]), ("dense_sd", 0)):
            found = index.get((base, methods.DEFAULT_LOSS, none, cell[0], cell[1], level, *cell[3:]))
            if found:
                others[base] = found
        return _baseline_row(others)
    if loss in (None, methods.DEFAULT_LOSS) or not methods.ce_counterpart(method):
        return None
    ce_method = methods.ce_counterpart(method)
    counterpart = list(cell)
    if methods.LOSSES[loss].parallel:  # a parallel draft against the same draft drafting one token per pass
        counterpart[RECORD_CELL.index("estimator")] = "teacher_forced_walk"
    return _loss_row(rec, ids, ce_method, index.get((ce_method, methods.DEFAULT_LOSS, none, *counterpart)))


def comparisons(record_paths) -> pd.DataFrame:
    """Paired comparisons with 95% bootstrap CIs, per target, draft, sparsity, eval set, temperature,
    estimator and reported k (the tvd_estimate has no per-prompt steps and is left out).

    Rows of sd2 with loss ce, the paper's comparisons:
    - mal_ratio_vs_layer_pruned = MAL(sd2) / MAL(layer_pruned at the same sparsity level, i.e.
      layers dropped to match that sparse draft's MACs); the paper reports 1.59. Whole layers match
      those MACs only roughly: layer_pruned_macs_vs_sd2_pct = 100 * (MACs(layer_pruned) / MACs(sd2) - 1).
    - macs_reduction_pct = 100 * (1 - MACs(sd2) / MACs(dense_sd)); the paper reports 43.87.
    - mal_change_pct = 100 * (MAL(sd2) / MAL(dense_sd) - 1); the paper reports -8.36.
    Rows of every other loss variant (a tuned method with a loss other than ce, direct_align included):
    - mal_ratio_vs_ce = MAL(variant) / MAL(ce_method with ce at the same sparsity), the same steps
      and data (the workflow fine-tunes every loss with the same settings on the same data); a
      parallel draft (pard, parallel_walk) against the ce draft's teacher_forced_walk at the same k.
    Rows of a quantized draft (<variant>@<scheme>):
    - mal_ratio_vs_unquantized = MAL(quantized) / MAL(<variant> as made);
    - a quantization-aware one (@<scheme>-qat) also mal_ratio_vs_one_shot = MAL(@<scheme>-qat) /
      MAL(@<scheme>): the same quantization, steps and data, fine-tuned seeing it or not.
    Every MAL comparison resamples the same prompts on both sides; *_significant says whether
    the 95% interval excludes no difference, and is False below MIN_PROMPTS_FOR_SIGNIFICANCE
    prompts: a bootstrap over a handful of prompts undercovers badly. Missing counterparts give NaN.
    """
    index = _reported_records(record_paths)
    rows = []
    for (method, loss, scheme, *cell), (rec, ids) in index.items():
        extra = _comparison_columns(index, (method, loss, scheme), cell, rec, ids)
        if extra is None:
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
    exact = EXACT_CHAINS + ("rollout_walk",)
    kept = []
    for record, ids, _ in read_records(record_paths):
        settings = (record.get("provenance") or {}).get("settings") or {}
        if record["temperature"] != 0 or record["estimator"] not in exact or record["k"] not in settings.get("k", []):
            continue
        kept.append((record, ids))
    refs = {}
    for record, ids in kept:
        method, loss = variants.parse_variant(record["method"])
        if method == reference and loss == methods.DEFAULT_LOSS:
            cell = (record["target"], record["eval_set"], record["k"])
            refs[(*cell, record["draft"])] = (record, ids)
            refs.setdefault(cell, (record, ids))
    rows = []
    for record, ids in kept:
        method, loss = variants.parse_variant(record["method"])
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


def _quantization_row(rec: dict, ids, base_pair) -> dict:
    """A quantized draft against the same draft unquantized (`base_pair`: its (record, prompt ids), or None),
    paired over the same prompts."""
    if base_pair is None:
        return {}
    base, base_ids = base_pair
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
    # Whole layers cannot always match SD²'s MACs: every comparison with it carries the difference.
    pruned_macs = others["layer_pruned"][0]["draft_macs_per_token"] if "layer_pruned" in others else float("nan")
    row["layer_pruned_macs_vs_sd2_pct"] = 100.0 * (pruned_macs / sd2["draft_macs_per_token"] - 1.0)
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


def exact_greedy_cells(
    measurements: pd.DataFrame, names, estimator: str = "teacher_forced_walk", target: str | None = None
) -> pd.DataFrame:
    """Exact greedy rows of `estimator` at the reported k of the methods `names`, drafts as made (ce,
    unquantized), of `target` (default: the target with the most such rows), on one eval set: HumanEval, or
    the first by name where there is none."""
    df = with_variant_columns(measurements)
    df = df[
        (df["temperature"] == 0)
        & df["headline_k"].eq(True)
        & (df["estimator"] == estimator)
        & df["method"].isin(names)
        & (df["loss"].isna() | (df["loss"] == methods.DEFAULT_LOSS))
        & (df["quantization"] == variants.NO_QUANTIZATION)
    ]
    target = target or df["target"].value_counts().index[0]
    df = df[df["target"] == target]
    evals = sorted(set(df["eval_set"]))
    return df[(df["target"] == target) & (df["eval_set"] == ("humaneval" if "humaneval" in evals else evals[0]))]


def with_sd2_comparisons(rows: pd.DataFrame, compared: pd.DataFrame, columns: list[str], order) -> pd.DataFrame:
    """exact_greedy_cells' rows with the `columns` of SD²'s paired comparisons beside their cells, sorted by
    draft, then method in `order`, then sparsity."""
    keys = ["target", "draft", "method", "sparsity", "eval_set", "temperature", "estimator"]
    rows = rows.merge(baseline_comparisons(compared)[keys + columns], on=keys, how="left")
    return rows.assign(rank=rows["method"].map(list(order).index)).sort_values(["draft", "rank", "sparsity"])
