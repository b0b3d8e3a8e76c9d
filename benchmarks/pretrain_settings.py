"""Short pretraining A/B runs: validation loss after a fixed number of steps, and seconds taken.

Used to choose the default targets' width and learning rate (README, "Model quality").
Needs the data and tokenizers of `make run` (work/data/corpus, work/tokenizers/code).

    python benchmarks/pretrain_settings.py 256:704:0.003 256:704:0.01 192:512:0.003 192:512:0.01

Each argument is hidden:intermediate:lr of a 6-layer Llama (head size 32, 2 query heads per kv head).
"""

import argparse
import json
import time

import torch
from datasets import load_from_disk

from sd2 import training
from sd2.models import build_model, count_parameters, load_tokenizer
from sd2.pretrain import fixed_windows, random_windows, token_stream


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", metavar="HIDDEN:INTERMEDIATE:LR")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--corpus", default="work/data/corpus")
    parser.add_argument("--tokenizer", default="work/tokenizers/code")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.tokenizer)
    corpus = load_from_disk(args.corpus)
    train_stream = token_stream(corpus["train"]["text"][:600], tok)
    val = fixed_windows(token_stream(corpus["validation"]["text"][:60], tok), 32, 128, 4)
    for variant in args.variants:
        hidden, inter, lr = variant.split(":")
        hidden, inter, lr = int(hidden), int(inter), float(lr)
        spec = dict(
            arch="llama",
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=6,
            num_attention_heads=hidden // 32,
            num_key_value_heads=hidden // 64,
        )
        model = build_model(spec, tok, 0)
        start = time.time()
        history = training.train(
            model,
            random_windows(train_stream, 32, 128, 0),
            val,
            steps=args.steps,
            lr=lr,
            warmup_steps=20,
            weight_decay=0.1,
            eval_every=50,
            bf16="auto",
            micro_batch_size=None,
            desc=variant,
        )
        print(
            json.dumps(
                {
                    "hidden": hidden,
                    "params": count_parameters(model),
                    "lr": lr,
                    "seconds": round(time.time() - start),
                    "val_loss": [round(r["val_loss"], 3) for r in history],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
