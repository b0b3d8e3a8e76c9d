"""Rule pretrain: train a from-scratch model on the tokenized corpus with a causal-LM loss."""

import torch
from datasets import load_from_disk

from sd2 import training
from sd2.checkpoint import save_checkpoint
from sd2.models import build_model, count_parameters, load_tokenizer
from sd2.provenance import provenance


def token_stream(texts, tokenizer) -> torch.Tensor:
    """All texts tokenized and joined, each followed by end-of-text."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return torch.tensor([t for doc in ids for t in (*doc, eos)], dtype=torch.long)


def random_windows(stream: torch.Tensor, batch_size: int, seq_len: int, seed: int):
    """Endless batches of windows at random offsets (a fixed seed gives a fixed order)."""
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len)
    while True:
        starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=gen)
        ids = stream[starts[:, None] + offsets]
        yield {"input_ids": ids, "labels": ids}


def fixed_windows(stream: torch.Tensor, batch_size: int, seq_len: int, n_batches: int) -> list[dict]:
    """Evenly spaced validation windows, the same at every evaluation."""
    n = batch_size * n_batches
    stride = max(1, (len(stream) - seq_len) // n)
    ids = torch.stack([stream[i * stride : i * stride + seq_len] for i in range(n)])
    return [{"input_ids": b, "labels": b} for b in ids.split(batch_size)]


def pretrain(name: str, spec: dict, tokenizer_dir, corpus_dir, out_dir, *, seed: int, run=None) -> list[dict]:
    train_cfg = spec["train"]
    tokenizer = load_tokenizer(tokenizer_dir)
    corpus = load_from_disk(str(corpus_dir))
    train_stream = token_stream(corpus["train"]["text"], tokenizer)
    val_stream = token_stream(corpus["validation"]["text"], tokenizer)
    bs, seq = train_cfg["batch_size"], train_cfg["seq_len"]
    steps = max(1, train_cfg["tokens"] // (bs * seq))
    model = build_model(spec, tokenizer, seed)
    params = count_parameters(model)
    print(f"{name}: {params / 1e6:.2f}M parameters, {steps} steps of {bs}x{seq} tokens, corpus {len(train_stream):,} tokens")
    history = training.train(
        model,
        random_windows(train_stream, bs, seq, seed),
        fixed_windows(val_stream, bs, seq, train_cfg["eval_batches"]),
        steps=steps,
        lr=train_cfg["lr"],
        warmup_steps=train_cfg["warmup_steps"],
        weight_decay=train_cfg["weight_decay"],
        eval_every=train_cfg["eval_every"],
        bf16=train_cfg["bf16"],
        run=run,
        desc=f"pretrain {name}",
    )
    info = provenance(seed=seed, model=name, spec=spec, parameters=params, corpus_tokens=len(train_stream))
    info.update(final=history[-1], precision=history[-1]["precision"], tokens_per_s=training.throughput(history), threads=torch.get_num_threads())
    save_checkpoint(model, tokenizer, out_dir, info, extra_files={"training.csv": lambda p: training.write_csv(p, history)})
    return history
