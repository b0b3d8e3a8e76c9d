"""More instruct steps? A sweep's instruct-tuned model, measured, then tuned N more steps and measured again.

Loads a model the sweep made (work/models/<name>, after its instruct stage), measures on
the model report's prompts the bits per byte, body rate, parse rate, distinct 4-gram share
and end-of-text rate, runs `train.instruct` again for --steps more steps at --lr (a new
warm-up and decay, another seed for the batch order), and measures again. This is the A/B
that set the default run's instruct stage from 150 to 300 steps; it was run on the 150-step
models of the run before.

    python benchmarks/instruct_steps.py --model llama-target --steps 150 --lr 0.001 --out instruct_steps.csv
"""

import argparse
import copy

import pandas as pd
import torch
from instruct_stage import completion_metrics, report_inputs

from sd2.config import load
from sd2.models import load_model, load_tokenizer
from sd2.pretrain import instruct
from sd2.report.collect import write_table


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--workdir", default="work")
    parser.add_argument("--model", action="append", required=True, help="a from-scratch model of the config")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=None, help="default: the model's train.instruct.lr")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="CSV, two rows per model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load(args.config)
    corpus, prompts, val_texts = report_inputs(cfg, args.workdir, args.prompts)
    rows = []
    for name in args.model:
        spec = copy.deepcopy(cfg["models"][name])
        train_cfg = spec["train"]
        tok = load_tokenizer(f"{args.workdir}/tokenizers/{spec['tokenizer']}")
        model = load_model(f"{args.workdir}/models/{name}")
        row = {"model": name, "extra_instruct_steps": 0}
        row.update(completion_metrics(model, tok, prompts, val_texts, train_cfg["seq_len"], 128))
        rows.append(row)
        train_cfg["instruct"].update(steps=args.steps, lr=args.lr or train_cfg["instruct"]["lr"])
        instruct(model, tok, corpus["train"], train_cfg, seed=cfg["seed"] + 1, desc=f"more instruct {name}")
        row = {"model": name, "extra_instruct_steps": args.steps}
        row.update(completion_metrics(model, tok, prompts, val_texts, train_cfg["seq_len"], 128))
        rows.append(row)
        print(pd.DataFrame(rows[-2:]).to_string(index=False), flush=True)
    if args.out:
        write_table(pd.DataFrame(rows), args.out)


if __name__ == "__main__":
    main()
