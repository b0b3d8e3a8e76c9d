"""Wall-clock of speculative decoding vs the target alone, for one target and several drafts.

The target alone and the target + draft run on the same prompts interleaved per prompt,
so both see the same machine state. Example:

    python benchmarks/speculative_vs_autoregressive.py --target work/models/target \\
        --drafts work/models/draft work/drafts/target/draft/sd2-s50 --eval work/data/eval/humaneval
"""

import argparse
import json
import time

import torch

from sd2.generation import decoding_kwargs
from sd2.measure.speculative import ar_generate, assisted_runs, load_prompts, step_stats
from sd2.models import load_checkpoint


def run_setting(
    target, draft, target_tok, draft_tok, prompts, *, k, temperature, max_new_tokens, seed, warmup_prompts, desc
):
    """Target alone, then target + draft, prompt by prompt; tokens/s over the prompts after the warm-up ones."""
    gen_kwargs = decoding_kwargs(temperature, max_new_tokens, target_tok.pad_token_id)
    ar = {"seconds": 0.0, "tokens": 0}
    sd = {"seconds": 0.0, "tokens": 0}
    generations = []
    for index, row in enumerate(prompts):
        ids = target_tok(row["prompt"])["input_ids"]
        torch.manual_seed(seed + index)
        start = time.perf_counter()
        tokens = ar_generate(target, torch.tensor([ids], device=target.device), gen_kwargs)
        ar_seconds = time.perf_counter() - start
        (run,) = assisted_runs(
            target,
            draft,
            target_tok,
            draft_tok,
            [ids],
            k=k,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            seed=seed + index,
            desc=desc,
        )
        generations.append(run["steps"])
        if index >= warmup_prompts:
            ar["seconds"] += ar_seconds
            ar["tokens"] += tokens.numel()
            sd["seconds"] += run["seconds"]
            sd["tokens"] += len(run["tokens"])
    ar_rate = ar["tokens"] / ar["seconds"] if ar["seconds"] else None
    sd_rate = sd["tokens"] / sd["seconds"] if sd["seconds"] else None
    return {
        "mal": step_stats(generations, k)["mal"],
        "ar_tokens_per_s": ar_rate,
        "sd_tokens_per_s": sd_rate,
        "speedup": sd_rate / ar_rate if ar_rate and sd_rate else None,
        "ar_seconds": ar["seconds"],
        "sd_seconds": sd["seconds"],
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Defaults: the demo models that `make run` leaves under work/.
    parser.add_argument("--target", default="work/models/llama-target", help="target checkpoint dir or hub id")
    parser.add_argument(
        "--drafts",
        nargs="+",
        default=["work/models/llama-draft-s", "work/models/llama-draft-m"],
        help="draft checkpoint dirs or hub ids",
    )
    parser.add_argument(
        "--eval",
        default="work/data/eval/humaneval",
        help="eval set saved with datasets.save_to_disk (columns id, prompt)",
    )
    parser.add_argument("--k", type=int, default=5, help="draft tokens per verification step")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--n-prompts", type=int, default=10)
    parser.add_argument("--warmup-prompts", type=int, default=1, help="run but not timed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object per draft instead of a table")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    target, target_tok = load_checkpoint(args.target, device=args.device)
    prompts = load_prompts(args.eval, args.n_prompts)
    header = f"{'draft':<50} {'MAL':>6} {'AR tok/s':>9} {'SD tok/s':>9} {'speedup':>8} {'SD/AR wall':>10}"
    if not args.json:
        print(f"target {args.target}, {len(prompts)} prompts, k={args.k}, T={args.temperature}, device {target.device}")
        print(header)
    for draft_dir in args.drafts:
        draft, draft_tok = load_checkpoint(draft_dir, device=args.device)
        result = run_setting(
            target,
            draft,
            target_tok,
            draft_tok,
            prompts,
            k=args.k,
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            warmup_prompts=args.warmup_prompts,
            desc=str(draft_dir),
        )
        wall_ratio = result["sd_seconds"] / result["ar_seconds"] if result["ar_seconds"] else None
        if args.json:
            print(json.dumps({"draft": str(draft_dir), "sd_over_ar_wall_clock": wall_ratio, **result}))
        else:
            fmt = lambda x, spec: format(x, spec) if x is not None else "n/a"  # noqa: E731
            print(
                f"{str(draft_dir):<50} {fmt(result['mal'], '6.2f')} {fmt(result['ar_tokens_per_s'], '9.1f')} "
                f"{fmt(result['sd_tokens_per_s'], '9.1f')} {fmt(result['speedup'], '7.2f')}x {fmt(wall_ratio, '10.2f')}"
            )
        del draft


if __name__ == "__main__":
    main()
