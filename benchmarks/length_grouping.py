"""Padding in the supervised stages' batches: random batches against length-grouped ones.

A batch is padded to its longest example and padded positions cost as much compute as real
tokens. For the instruct stage's real examples (the training split's functions, one
tokenizer of the config), prints the tokens one epoch of batches computes, and the share of
them that is padding, for several group sizes (`sd2.training.shuffled_batches(group=)`;
group 1 is plain random batches). Needs the data and tokenizers of `make run`.

    python benchmarks/length_grouping.py --tokenizer code --out results/tables/length_grouping.csv
"""

import argparse
from itertools import islice

import pandas as pd
from datasets import load_from_disk

from sd2.chat import encode_example
from sd2.config import load
from sd2.data import function_prompts
from sd2.models import load_tokenizer
from sd2.report.collect import write_table
from sd2.training import shuffled_batches


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--workdir", default="work")
    parser.add_argument("--tokenizer", default="code")
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--out", default=None, help="also write one row per group size as CSV")
    args = parser.parse_args()
    cfg = load(args.config)
    instruct = next(iter(cfg["models"].values()))["train"]["instruct"]
    tok = load_tokenizer(f"{args.workdir}/tokenizers/{args.tokenizer}")
    rows = function_prompts(load_from_disk(f"{args.workdir}/data/corpus")["train"], instruct["max_body_chars"])
    examples = [encode_example(tok, r["prompt"], r["response"], instruct["seq_len"]) for r in rows]
    real = sum(len(e["input_ids"]) for e in examples)
    bs = instruct["batch_size"]
    n_batches = -(-len(examples) // bs)
    print(f"{len(examples)} examples, batch {bs}, seq_len {instruct['seq_len']}: {real:,} real tokens per epoch")
    base, rows = None, []
    for group in args.groups:
        batches = islice(shuffled_batches(examples, bs, tok.pad_token_id, seed=0, group=group), n_batches)
        computed = sum(b["input_ids"].numel() for b in batches)
        base = base or computed
        print(
            f"  group {group:2d}: {computed:>10,} tokens computed, padding {1 - real / computed:5.1%}, "
            f"{computed / base:.2f}x of group {args.groups[0]}"
        )
        rows.append(
            {
                "tokenizer": args.tokenizer,
                "group": group,
                "real_tokens": real,
                "computed_tokens": computed,
                "padding_share": round(1 - real / computed, 3),
                f"computed_over_group_{args.groups[0]}": round(computed / base, 2),
            }
        )
    if args.out:
        write_table(pd.DataFrame(rows), args.out)


if __name__ == "__main__":
    main()
