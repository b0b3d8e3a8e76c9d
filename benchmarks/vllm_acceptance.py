"""vLLM's mean acceptance length for one exported draft, beside the workflow's MAL on the same prompts.

UNTESTED ON HARDWARE: vLLM is not installed on the CPU-only machine this was written on; it has
not run unless the README reports its numbers. It needs a CUDA machine with vLLM (a version with the
`draft_model` speculative method, early 2026 or later) and the target in the hub cache. Example:

    python benchmarks/vllm_acceptance.py \\
        --export work-paper/export/llama-3.1-8b-instruct/llama-3.2-1b-instruct/sd2-s50 \\
        --target-outputs work-paper/target_outputs/llama-3.1-8b-instruct/humaneval.json \\
        --record results-paper/records/humaneval/llama-3.1-8b-instruct/llama-3.2-1b-instruct/sd2-s50.json

It runs vLLM's offline speculative decoding with the export's speculative config (sd2_draft.json)
at temperature 0 on the record's prompts, fed as the same token ids the workflow measured
(target_outputs' prompt_ids), with the same max_new_tokens, and reads vLLM's counters
(vllm/v1/spec_decode/metrics.py): mean acceptance length = 1 + num_accepted_tokens / num_drafts.

Why the two can differ, even though both count committed tokens per verification step, bonus included:
- vLLM's first token comes from the prefill, not from a verification step, so each prompt has one
  step less than in the workflow's walk; a step with nothing left to draft (the last token before
  max_new_tokens) is not a draft in vLLM either.
- Numerics: vLLM runs both models in the target's dtype with its own kernels; at a near-tie the
  greedy continuation can change (the output match count below shows how often).
- End of text: vLLM stops at every EOS id of the target's generation config.
- Different tokenizers: vLLM's use_heterogeneous_vocab drafts over the vocabularies' intersection
  (greedy only); the workflow's Universal Assisted Generation re-tokenizes text. Expect a gap there.
"""

import argparse
import json
import sys
from pathlib import Path


def counters(metrics) -> dict:
    """Totals of vLLM's spec-decode counters (summed over engines) and accepted tokens per draft position."""
    totals = {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0, "per_position": []}
    for metric in metrics:
        name = metric.name.removeprefix("vllm:spec_decode_")
        if name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
            totals[name] += metric.value
        elif name == "num_accepted_tokens_per_pos":
            per = totals["per_position"]
            per.extend([0] * (len(metric.values) - len(per)))
            totals["per_position"] = [a + b for a, b in zip(per, metric.values)]
    return totals


def workflow_mal(record_file, k: int) -> dict:
    """The workflow's greedy MAL at k: the exact walk where it ran, assisted generation otherwise."""
    records = json.loads(Path(record_file).read_text())["records"]
    for estimator in ("teacher_forced_walk", "assisted_generation"):
        for r in records:
            if r["temperature"] == 0 and r["k"] == k and r["estimator"] == estimator:
                return {key: r.get(key) for key in ("mal", "mal_ci_low", "mal_ci_high", "estimator", "n_prompts")}
    raise SystemExit(f"{record_file}: no greedy record at k={k} (measured k: {sorted({r['k'] for r in records})})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", required=True, help="an export directory (with sd2_draft.json)")
    parser.add_argument("--target-outputs", required=True, help="target_outputs JSON of the record's eval set")
    parser.add_argument("--record", required=True, help="the workflow's measurement record of this draft")
    parser.add_argument("--k", type=int, default=None, help="draft tokens per step (default: the export's best k)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the comparison here (JSON)")
    args = parser.parse_args()
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError as e:
        sys.exit(f"vllm_acceptance.py needs vLLM on a CUDA machine (pip install vllm); it cannot be imported: {e}")

    export = Path(args.export).absolute()
    meta = json.loads((export / "sd2_draft.json").read_text())
    k = args.k or meta["best_k"]["k"]
    spec = {**meta["vllm"]["speculative_config"], "model": str(export), "num_speculative_tokens": k}
    cached = json.loads(Path(args.target_outputs).read_text())
    by_id = {item["id"]: item for item in cached["items"]}
    items = [by_id[i] for i in json.loads(Path(args.record).read_text())["prompt_ids"]]

    llm = LLM(
        model=meta["target_model"],
        speculative_config=spec,
        tensor_parallel_size=args.tensor_parallel_size,
        disable_log_stats=False,  # the spec-decode counters are only kept with stats on
    )
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=item["prompt_ids"]) for item in items],
        SamplingParams(temperature=0.0, max_tokens=cached["max_new_tokens"]),
    )
    got = counters(llm.get_metrics())
    same = sum(list(o.outputs[0].token_ids) == item["continuation_ids"] for o, item in zip(outputs, items))
    result = {
        "export": str(export),
        "target": meta["target_model"],
        "k": k,
        "n_prompts": len(items),
        "vllm_mal": 1 + got["num_accepted_tokens"] / got["num_drafts"] if got["num_drafts"] else None,
        "vllm_counters": got,
        "vllm_outputs_equal_to_workflow_continuations": same,
        "workflow": workflow_mal(args.record, k),
        "speculative_config": spec,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
