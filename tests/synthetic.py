"""Synthetic sweep inputs for the tests: record files, training logs and the tables built from them.

Made up, but physical (every MAL within 1..k+1) and with a prompt effect shared by every
draft, so that paired comparisons have something to cancel. Written only under tmp_path.
"""

import json

import pandas as pd

from sd2.measure.stats import ratio_ci
from sd2.report.collect import collect_measurements, collect_training
from sd2.report.comparisons import collect_comparisons

K = 5
K_MAX = 6
N_PROMPTS = 40
STEPS_PER_PROMPT = 10
TARGET_MACS = 10_000_000
DENSE_DRAFT_MACS = 1_000_000
# target -> same tokenizer as the drafts?
TARGETS = {"t_llama": True, "t_qwen": False}
# (name, sparsity) as the workflow names records: a loss variant is <method>+<loss> (sd2.methods).
VARIANTS = [
    ("dense", 0),
    ("dense_sd", 0),
    ("direct_align", 0),
    ("sparse_oneshot", 50),
    ("sparse_sft", 50),
    ("layer_pruned", 50),
    ("layer_pruned", 70),
    ("sd2", 50),
    ("sd2", 70),
    ("sd2+kl", 50),
    ("sd2+kl", 70),
]
# Made up, but physical: every MAL stays within 1..k+1.
BASE_MAL = {
    "dense": 2.6,
    "dense_sd": 3.6,
    "direct_align": 3.8,
    "sparse_oneshot": 2.2,
    "sparse_sft": 2.8,
    "layer_pruned": 2.4,
    "sd2": 3.4,
    "sd2+kl": 3.5,
    "sd2@w4a16": 3.3,
    "sd2@w4a16-qat": 3.36,
}
EVAL_SETS = ("humaneval", "stdlib_heldout")
PROMPT_IDS = [f"p{i}" for i in range(N_PROMPTS)]


def synthetic_mal(target, method, sparsity, eval_set, temperature, k=K):
    return (
        BASE_MAL[method]
        - sparsity / 100
        - (0.3 if not TARGETS[target] else 0)
        - (0.2 if eval_set == "stdlib_heldout" else 0)
        - 0.2 * temperature
        - 0.1 * (K - k)
    )


def prompt_effect(i):
    """Easy and hard prompts, shared by every draft (what a paired comparison cancels)."""
    return 1.0 * ((i * 7) % 5 - 2) / 2


def synthetic_record(target, draft, method, sparsity, eval_set, temperature, estimator, k=K):
    mal = synthetic_mal(target, method, sparsity, eval_set, temperature, k)
    draft_macs = DENSE_DRAFT_MACS * (1 - 0.9 * sparsity / 100)
    scale = 1 / (1 + k * draft_macs / TARGET_MACS)
    record = {
        "target": target,
        "draft": draft,
        "method": method,
        "sparsity": sparsity,
        "eval_set": eval_set,
        "k": k,
        "temperature": temperature,
        "estimator": estimator,
        "best_k": k == K,
        "draft_macs_per_token": draft_macs,
        "target_macs_per_token": TARGET_MACS,
        "macs_ratio": draft_macs / TARGET_MACS,
        "same_tokenizer": TARGETS[target],
        "decoding_path": "assisted" if TARGETS[target] else "uag",
        "provenance": {
            "seed": 0,
            "versions": {"python": "3.11.9", "torch": "2.13.0", "wandb": None},
            "settings": {"max_new_tokens": 64, "k": [K], "bootstrap": 1000},
        },
    }
    if estimator == "tvd_estimate":
        return {
            **record,
            "n_prompts": N_PROMPTS,
            "mal": mal,
            "mal_ci_low": mal - 0.1,
            "mal_ci_high": mal + 0.1,
            "alpha": 0.5,
            "alpha_ci_low": 0.45,
            "alpha_ci_high": 0.55,
            "improvement_factor": mal * scale,
        }
    accepted = [round((mal + prompt_effect(i)) * STEPS_PER_PROMPT) for i in range(N_PROMPTS)]
    steps = [STEPS_PER_PROMPT] * N_PROMPTS
    n_steps, total = sum(steps), sum(accepted)
    _, low, high = ratio_ci(accepted, steps, n_boot=1000, seed=0)
    return {
        **record,
        "n_prompts": N_PROMPTS,
        "n_steps": n_steps,
        "truncated_steps": N_PROMPTS,
        "accepted_tokens": total,
        "drafted_tokens": k * n_steps,
        "accepted_draft_tokens": total - n_steps,
        "mal": total / n_steps,
        "mal_ci_low": low,
        "mal_ci_high": high,
        "acceptance_rate": (total / n_steps - 1) / k,
        "acceptance_by_position": [max(0.0, (mal - 1) / k * (1.2 - 0.1 * i)) for i in range(k)],
        "accepted_length_histogram": [10, 20, 30, 20, 10, 10][: k + 1],
        "improvement_factor": total / n_steps * scale,
        "improvement_factor_ci_low": low * scale,
        "improvement_factor_ci_high": high * scale,
        "ar_tokens_per_s": 50.0,
        "sd_tokens_per_s": 50.0 * mal / 2,
        "speedup": mal / 2,
        "checked_prompts": 4 if temperature == 0 else None,
        "checked_steps": 40 if temperature == 0 else None,
        "per_prompt": {"accepted_tokens": accepted, "steps": steps},
    }


def records_of(target, draft, method, sparsity, eval_set) -> list[dict]:
    """What sd2.measure.drafts writes: greedy, the walk for every k (same tokenizer) or the UAG walk at K and the
    token-intersection walk for every k (different tokenizers); sampled, assisted generation at K."""
    if TARGETS[target]:
        greedy = [
            synthetic_record(target, draft, method, sparsity, eval_set, 0.0, "teacher_forced_walk", k)
            for k in range(1, K_MAX + 1)
        ]
        sampled = [
            synthetic_record(target, draft, method, sparsity, eval_set, 1.0, "tvd_estimate", k)
            for k in range(1, K_MAX + 1)
        ]
    else:
        greedy = [synthetic_record(target, draft, method, sparsity, eval_set, 0.0, "uag_walk")]
        greedy += [
            synthetic_record(target, draft, method, sparsity, eval_set, 0.0, "tli_walk", k) for k in range(1, K_MAX + 1)
        ]
        sampled = []
    return greedy + [synthetic_record(target, draft, method, sparsity, eval_set, 1.0, "assisted_generation")] + sampled


def write_synthetic_records(
    root, targets=tuple(TARGETS), drafts=("d_small",), variants=VARIANTS, eval_sets=EVAL_SETS
) -> list:
    """One record file per (eval set, target, draft, method, sparsity)."""
    paths = []
    for eval_set in eval_sets:
        for target in targets:
            for draft in drafts:
                for method, sparsity in variants:
                    path = root / "records" / eval_set / target / draft / f"{method}-s{sparsity}.json"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    doc = {
                        "definitions": {"mal": "tokens per step incl. bonus"},
                        "prompt_ids": PROMPT_IDS,
                        "records": records_of(target, draft, method, sparsity, eval_set),
                    }
                    path.write_text(json.dumps(doc))
                    paths.append(path)
    return paths


def rows_per_file(target) -> int:
    # Same tokenizer: the walk and the TVD estimate per k, assisted generation sampled; different: the UAG walk,
    # the intersection walk per k, assisted generation sampled.
    return 2 * K_MAX + 1 if TARGETS[target] else K_MAX + 2


def write_training_log(path, n=4, start=5.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "step": 10 * i,
            "tokens": 1000 * i,
            "train_loss": start - 0.5 * i,
            "val_loss": start - 0.4 * i,
            "lr": 1e-3,
            "seconds": float(i),
            "train_seconds": 0.9 * i,
            "tokens_per_s": 1111.1 if i else float("nan"),
            "precision": "fp32",
        }
        for i in range(n)
    ]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def synthetic_curves(root) -> list[dict]:
    curves = [
        {"stage": "pretrain", "model": m, "path": write_training_log(root / "models" / m / "training.csv", start=s)}
        for m, s in (("t_llama", 6.0), ("d_small", 7.0))
    ]
    for method, sparsity in [("dense_sd", 0), ("sd2", 50), ("sd2+kl", 50), ("layer_pruned", 50)]:
        path = write_training_log(
            root / "drafts" / "t_llama" / "d_small" / f"{method}-s{sparsity}" / "training.csv",
            n=3,
            start=3.0 + sparsity / 100,
        )
        curves.append(
            {
                "stage": "finetune",
                "model": "d_small",
                "target": "t_llama",
                "draft": "d_small",
                "method": method,
                "sparsity": sparsity,
                "path": path,
            }
        )
    path = write_training_log(root / "drafts" / "original" / "d_small" / "sparse_sft-s50" / "training.csv", n=3)
    curves.append(
        {
            "stage": "finetune",
            "model": "d_small",
            "target": "original",
            "draft": "d_small",
            "method": "sparse_sft",
            "sparsity": 50,
            "path": path,
        }
    )
    return curves


def write_synthetic_tables(root) -> tuple:
    """root/tables/measurements.csv, comparisons.csv and training.csv from synthetic records and logs."""
    paths = write_synthetic_records(root)
    m = collect_measurements(paths, root / "tables" / "measurements.csv")
    collect_comparisons(paths, root / "tables" / "comparisons.csv")
    t = collect_training(synthetic_curves(root), root / "tables" / "training.csv")
    return m, t
