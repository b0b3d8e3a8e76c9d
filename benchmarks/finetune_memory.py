"""Peak memory of one fine-tuning step: the plain loss against the chunked loss, and the chunked loss
with gradient checkpointing and micro-batches (finetune.loss_chunk_tokens, gradient_checkpointing,
micro_batch_size).

The model is a tiny random Llama with Llama 3's vocabulary (128,256 tokens) and a small hidden
size, so the output layer's logits dominate as they do for a 1B-3B draft at 2048 positions.
The batch is prompt/response-shaped: the first quarter of each sequence is prompt (label -100).
Each variant runs in a fresh subprocess: one step (forward, backward, AdamW) after the model
is built; on CUDA its peak is torch.cuda.max_memory_allocated above what was allocated before
the step, on CPU the process's peak resident set (getrusage) above its resident set before
the step. Prints the ratios to the plain loss; with --out, writes one row per variant.

    python benchmarks/finetune_memory.py --out results/tables/finetune_memory.csv
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    # name: (chunked loss, gradient checkpointing, micro-batches per step)
    "plain": (False, False, 1),
    "chunked": (True, False, 1),
    "chunked+checkpointing+micro-batches": (True, True, 4),
}


class Vocab:
    """What sd2.models.build_model reads from a tokenizer."""

    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def one_step(args) -> dict:
    """Build the model, run one training step of the variant, return its peak memory above the start."""
    from sd2.chunked_loss import chunked_causal_lm_loss, default_chunk_tokens
    from sd2.models import build_model
    from sd2.training import accumulate_gradients, causal_lm_loss

    chunked, checkpointing, n_micro = VARIANTS[args.variant]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = dict(
        arch="llama",
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        tie_word_embeddings=True,
    )
    model = build_model(spec, Vocab(args.vocab), seed=0).to(device).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(3, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, : args.seq_len // 4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    batch = {k: v.to(device) for k, v in batch.items()}
    chunk = default_chunk_tokens(args.vocab)
    loss_fn = (lambda m, b: chunked_causal_lm_loss(m, b, chunk)) if chunked else causal_lm_loss
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = rss_mb()
    tick = time.perf_counter()
    loss = accumulate_gradients(model, batch, loss_fn, args.batch // n_micro)
    optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "variant": args.variant,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "layers": args.layers,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "micro_batch_size": args.batch // n_micro,
        "gradient_checkpointing": checkpointing,
        "loss_chunk_tokens": chunk if chunked else None,
        "loss": round(loss.item(), 5),
        "step_peak_mb": round(peak - before, 1),
        "step_seconds": round(time.perf_counter() - tick, 2),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # one subprocess's variant
    parser.add_argument("--out", default=None, help="also write one row per variant as CSV")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.variant:
        print(json.dumps(one_step(args)))
        return
    rows = []
    for variant in VARIANTS:
        argv = [a for a in sys.argv[1:] if a != "--out" and a != args.out]
        # This checkout's sd2, not another one installed in the environment.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        out = subprocess.run(
            [sys.executable, __file__, *argv, "--variant", variant], check=True, capture_output=True, text=True, env=env
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    plain = rows[0]
    for row in rows:
        row["peak_over_plain"] = round(row["step_peak_mb"] / plain["step_peak_mb"], 3)
        print(
            f"{row['variant']:>36}: step peak {row['step_peak_mb']:8.1f} MB ({row['peak_over_plain']:.3f}x plain), "
            f"{row['step_seconds']:.2f} s, loss {row['loss']:.4f}"
        )
    if args.out:
        from sd2.report.collect import write_table

        table = pd.DataFrame(rows).astype({"loss_chunk_tokens": "Int64"})  # empty for the plain loss
        write_table(table, args.out)


if __name__ == "__main__":
    main()
