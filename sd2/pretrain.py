"""Rule pretrain: train a from-scratch model on the tokenized corpus with a causal-LM loss,
then (train.instruct.steps > 0) instruct-tune it to answer a signature + docstring with a body.

The real targets and drafts are Instruct models, and SD² distils what the target answers;
a model that only continues files answers a docstring with the next top-level `def`. The
instruct stage trains on every function of the corpus's training split (loss on the body
and the end-of-text that closes it), never on an evaluation prompt: evaluation prompts come
from HumanEval and the held-out modules, and prepare_data drops training files that hold one.
"""

import torch
from datasets import load_from_disk

from sd2 import chat, training
from sd2.checkpoint import save_checkpoint
from sd2.data import function_prompts
from sd2.models import build_model, count_parameters, default_device, load_tokenizer
from sd2.provenance import provenance


def token_stream(texts, tokenizer) -> torch.Tensor:
    """All texts tokenized and joined, each followed by end-of-text."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return torch.tensor([t for doc in ids for t in (*doc, eos)], dtype=torch.long)


def random_windows(stream: torch.Tensor, batch_size: int, seq_len: int, seed: int, device="cpu"):
    """Endless batches of windows at random offsets (a fixed seed gives a fixed order), on `device`."""
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len)
    while True:
        starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=gen)
        ids = stream[starts[:, None] + offsets].to(device)
        yield {"input_ids": ids, "labels": ids}


def fixed_windows(stream: torch.Tensor, batch_size: int, seq_len: int, n_batches: int, device="cpu") -> list[dict]:
    """Evenly spaced validation windows, the same at every evaluation, on `device`."""
    n = batch_size * n_batches
    stride = max(1, (len(stream) - seq_len) // n)
    ids = torch.stack([stream[i * stride : i * stride + seq_len] for i in range(n)]).to(device)
    return [{"input_ids": b, "labels": b} for b in ids.split(batch_size)]


def pretrain(name: str, spec: dict, tokenizer_dir, corpus_dir, out_dir, *, seed: int, run=None) -> list[dict]:
    train_cfg = spec["train"]
    tokenizer = load_tokenizer(tokenizer_dir)
    corpus = load_from_disk(str(corpus_dir))
    train_stream = token_stream(corpus["train"]["text"], tokenizer)
    val_stream = token_stream(corpus["validation"]["text"], tokenizer)
    bs, seq = train_cfg["batch_size"], train_cfg["seq_len"]
    steps = max(1, train_cfg["tokens"] // (bs * seq))
    device = default_device()
    model = build_model(spec, tokenizer, seed).to(device)
    params = count_parameters(model)
    print(
        f"{name}: {params / 1e6:.2f}M parameters, {steps} steps of {bs}x{seq} tokens, "
        f"corpus {len(train_stream):,} tokens"
    )
    history = training.train(
        model,
        random_windows(train_stream, bs, seq, seed, device),
        fixed_windows(val_stream, bs, seq, train_cfg["eval_batches"], device),
        steps=steps,
        lr=train_cfg["lr"],
        warmup_steps=train_cfg["warmup_steps"],
        weight_decay=train_cfg["weight_decay"],
        eval_every=train_cfg["eval_every"],
        bf16=train_cfg["bf16"],
        micro_batch_size=None,  # pretraining batches are small enough to run whole
        run=run,
        desc=f"pretrain {name}",
    )
    history = [{**row, "stage": "pretrain"} for row in history]
    instruct_rows = instruct(
        model,
        tokenizer,
        corpus["train"],
        train_cfg,
        seed=seed,
        run=run,
        log_step_offset=steps + 1,
        desc=f"instruct {name}",
    )
    info = provenance(seed=seed, model=name, spec=spec, parameters=params, corpus_tokens=len(train_stream))
    info.update(
        final=history[-1],
        precision=history[-1]["precision"],
        tokens_per_s=training.throughput(history),
        threads=torch.get_num_threads(),
        instruct_final=instruct_rows[-1] if instruct_rows else None,
    )
    rows = history + instruct_rows
    save_checkpoint(
        model, tokenizer, out_dir, info, extra_files={"training.csv": lambda p: training.write_csv(p, rows)}
    )
    return rows


def instruct(
    model,
    tokenizer,
    corpus_train,
    train_cfg: dict,
    *,
    seed: int,
    run=None,
    log_step_offset: int = 0,
    desc: str = "instruct",
) -> list[dict]:
    """The instruct stage on the corpus's functions; [] when train.instruct.steps is 0."""
    cfg = train_cfg.get("instruct") or {}
    if not cfg.get("steps"):
        return []
    rows = function_prompts(corpus_train, cfg["max_body_chars"])
    examples = [chat.encode_example(tokenizer, r["prompt"], r["response"], cfg["seq_len"]) for r in rows]
    train_idx, val_idx = training.split(len(examples), cfg["validation_fraction"], seed)
    bs, pad = cfg["batch_size"], tokenizer.pad_token_id
    val_set = [examples[i] for i in val_idx][: bs * train_cfg["eval_batches"]]
    print(
        f"{desc}: {cfg['steps']} steps of {bs} functions, {len(train_idx)} train / {len(val_set)} validation functions",
        flush=True,
    )
    device = next(model.parameters()).device
    history = training.train(
        model,
        training.shuffled_batches([examples[i] for i in train_idx], bs, pad, seed, device),
        [
            {k: v.to(device) for k, v in training.collate(val_set[i : i + bs], pad).items()}
            for i in range(0, len(val_set), bs)
        ],
        steps=cfg["steps"],
        lr=cfg["lr"],
        warmup_steps=min(cfg["warmup_steps"], cfg["steps"] - 1),
        weight_decay=train_cfg["weight_decay"],
        eval_every=cfg["eval_every"],
        bf16=train_cfg["bf16"],
        micro_batch_size=None,  # pretraining batches are small enough to run whole
        run=run,
        log_step_offset=log_step_offset,
        desc=desc,
    )
    return [{**row, "stage": "instruct"} for row in history]
