"""A/B of the instruct stage: one model's greedy HumanEval completions before and after it.

Pretrains one model of the config exactly as the sweep does, then measures, on the same
prompts as the model report, the body rate, parse rate, distinct 4-gram share, end-of-text
rate and bits per byte; then runs the instruct stage (train.instruct) and measures again.
Needs the data and tokenizers of `make run` (work/data, work/tokenizers).

    python benchmarks/instruct_stage.py --model llama-draft-m --out results/tables/instruct_stage.csv
"""

import argparse
import copy
import tempfile

import pandas as pd
import torch
from datasets import load_from_disk

from sd2.config import load
from sd2.models import count_parameters, load_model, load_tokenizer
from sd2.pretrain import instruct, pretrain
from sd2.report.model_report import bits_per_byte, distinct_4gram_share, greedy_completions, parses, writes_body


def completion_metrics(model, tok, prompts: list[str], val_texts: list[str], seq_len: int, max_new_tokens: int) -> dict:
    out = greedy_completions(model, tok, prompts, max_new_tokens)
    texts = [t for t, _ in out]
    _, bpb = bits_per_byte(model, tok, val_texts, seq_len)
    n = len(out)
    return {
        "val_bits_per_byte": round(bpb, 4),
        "body_rate": round(sum(map(writes_body, texts)) / n, 4),
        "parse_rate": round(sum(parses(p, t, e) for p, (t, e) in zip(prompts, out)) / n, 4),
        "distinct_4gram_share": round(sum(map(distinct_4gram_share, texts)) / n, 4),
        "eos_rate": round(sum(e for _, e in out) / n, 4),
    }


def report_inputs(cfg: dict, workdir: str, n_prompts: int):
    """The corpus, the model report's prompts (first of the first eval set) and 40 held-out files for bits per byte."""
    corpus = load_from_disk(f"{workdir}/data/corpus")
    first_set = next(iter(cfg["data"]["eval_sets"]))
    prompts = load_from_disk(f"{workdir}/data/eval/{first_set}")["prompt"][:n_prompts]
    return corpus, prompts, corpus["validation"]["text"][:40]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--model", default="llama-draft-m", help="a from-scratch model of the config")
    parser.add_argument("--workdir", default="work")
    parser.add_argument("--prompts", type=int, default=64, help="first prompts of the first eval set")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="CSV of the two rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load(args.config)
    spec = copy.deepcopy(cfg["models"][args.model])
    train_cfg = spec["train"]
    tokenizer_dir = f"{args.workdir}/tokenizers/{spec['tokenizer']}"
    tok = load_tokenizer(tokenizer_dir)
    corpus, prompts, val_texts = report_inputs(cfg, args.workdir, args.prompts)

    # The sweep's own pretraining, instruct stage off, then its instruct stage on the loaded model.
    pretrained = {**spec, "train": {**train_cfg, "instruct": {**train_cfg["instruct"], "steps": 0}}}
    with tempfile.TemporaryDirectory() as tmp:
        pretrain(args.model, pretrained, tokenizer_dir, f"{args.workdir}/data/corpus", tmp, seed=cfg["seed"])
        model = load_model(tmp)
    seq = train_cfg["seq_len"]
    metrics = dict(completion_metrics(model, tok, prompts, val_texts, seq, args.max_new_tokens))
    rows = [
        {
            "model": args.model,
            "stage": "pretrained",
            "parameters": count_parameters(model),
            **metrics,
        }
    ]
    instruct(model, tok, corpus["train"], train_cfg, seed=cfg["seed"], desc=f"instruct {args.model}")
    model.eval()
    metrics = completion_metrics(model, tok, prompts, val_texts, seq, args.max_new_tokens)
    rows.append(
        {
            "model": args.model,
            "stage": "+ instruct",
            "parameters": rows[0]["parameters"],
            **metrics,
        }
    )
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    for column in ("body_rate", "parse_rate", "distinct_4gram_share", "eos_rate", "val_bits_per_byte"):
        print(f"{column}: {table[column].iloc[0]:.4f} -> {table[column].iloc[1]:.4f}")
    if args.out:
        table.to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
