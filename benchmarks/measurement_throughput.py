"""Measurement throughput: target tokens whose acceptance is measured per second, assisted generation vs the walk.

Both paths measure the same draft against the same target's greedy continuations
(a target_outputs file of `make run`), side by side in one run:
- assisted generation: transformers' assisted generation, batch size 1, at one k;
- walk: one teacher-forced pass of the draft over the continuations, then the walk for
  every k = 1..k_max (sd2.measure.acceptance), plus the continuations' own generation cost
  shared among the drafts of one target (the file records it).

    python benchmarks/measurement_throughput.py                       # the default run's files
    python benchmarks/measurement_throughput.py \\
        --draft work/drafts/llama-target/llama-draft-m/sd2-s50 --assisted-prompts 8
"""

import argparse
import time

import torch

from sd2.measure import acceptance, continuations
from sd2.measure.speculative import assisted_runs
from sd2.models import load_checkpoint


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="work/models/llama-target")
    parser.add_argument("--draft", default="work/models/llama-draft-m")
    parser.add_argument(
        "--outputs", default="work/target_outputs/llama-target/humaneval.json", help="target_outputs JSON of the target"
    )
    parser.add_argument("--k", type=int, default=5, help="draft tokens per step of the assisted-generation runs")
    parser.add_argument("--k-max", type=int, default=8, help="the walk covers k = 1..k_max")
    parser.add_argument("--assisted-prompts", type=int, default=4)
    parser.add_argument("--walk-prompts", type=int, default=None, help="default: every prompt of the file")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="sequences per teacher-forced pass (the config's measure.batch_size)"
    )
    parser.add_argument(
        "--drafts-per-target",
        type=int,
        default=20,
        help="drafts sharing one continuations file (the default sweep: 20)",
    )
    parser.add_argument("--threads", type=int, default=1, help="the measure rule runs 1-thread jobs")
    return parser.parse_args()


def time_assisted(target, draft, tok, items, args, max_new) -> tuple[int, float]:
    """(target tokens, seconds) of assisted generation at one k on the first prompts."""
    start = time.perf_counter()
    runs = assisted_runs(
        target,
        draft,
        tok,
        tok,
        [it["prompt_ids"] for it in items[: args.assisted_prompts]],
        k=args.k,
        temperature=0.0,
        max_new_tokens=max_new,
        seed=0,
    )
    return sum(len(r["tokens"]) for r in runs), time.perf_counter() - start


def time_walk(draft, tok, items, args, max_new) -> tuple[int, float]:
    """(target tokens, seconds) of the teacher-forced pass and the walk for every k = 1..k_max."""
    start = time.perf_counter()
    pairs = [(it["prompt_ids"], it["continuation_ids"]) for it in items]
    forced = acceptance.teacher_forced_matches(draft, pairs, pad_id=tok.pad_token_id, batch_size=args.batch_size)
    for k in range(1, args.k_max + 1):
        [acceptance.walk(f["matches"], k, max_new, it["ended_by_eos"]) for f, it in zip(forced, items)]
    return sum(len(it["continuation_ids"]) for it in items), time.perf_counter() - start


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    cached = continuations.load(args.outputs)
    items = cached["items"][: args.walk_prompts] if args.walk_prompts else cached["items"]
    target, tok = load_checkpoint(args.target)
    draft, _ = load_checkpoint(args.draft)
    max_new = cached["max_new_tokens"]
    assisted_tokens, assisted_s = time_assisted(target, draft, tok, items, args, max_new)
    walk_tokens, walk_s = time_walk(draft, tok, items, args, max_new)
    shared_s = cached["stats"]["generation_seconds"] * len(items) / len(cached["items"]) / args.drafts_per_target

    rate_assisted = assisted_tokens / assisted_s
    rate_walk = walk_tokens / walk_s
    rate_walk_shared = walk_tokens / (walk_s + shared_s)
    print(f"target {args.target}, draft {args.draft}, {args.threads} thread(s), {max_new} new tokens per prompt")
    print(
        f"  assisted generation, k={args.k}:       {assisted_tokens:7d} tokens in {assisted_s:7.1f} s "
        f"= {rate_assisted:9,.0f} tokens/s (one k)"
    )
    print(
        f"  walk, k=1..{args.k_max}:                   {walk_tokens:7d} tokens in {walk_s:7.1f} s "
        f"= {rate_walk:9,.0f} tokens/s (every k)"
    )
    print(
        f"  walk + 1/{args.drafts_per_target} of the continuations: {walk_tokens:7d} tokens "
        f"in {walk_s + shared_s:7.1f} s = {rate_walk_shared:9,.0f} tokens/s"
    )
    print(
        f"  walk / assisted throughput: {rate_walk / rate_assisted:.1f}x "
        f"(with the shared continuations: {rate_walk_shared / rate_assisted:.1f}x), "
        f"for {args.k_max} k values instead of 1"
    )


if __name__ == "__main__":
    main()
