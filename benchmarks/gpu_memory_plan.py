"""The memory plan (sd2.memory) against what a GPU measures, for the paper's real model shapes.

Each model of config/paper.yaml that fits one GPU is built from its `shape` with random
weights (memory and speed do not depend on the values; nothing is downloaded) and run on
one CUDA device the way the paper's jobs run it:
- generate: a left-padded batch of greedy generation (self_distill, target_outputs) in the
  stored dtype, every row running to max_new_tokens;
- score: a teacher-forced pass over prompt + continuation with logits at every position
  (measure's walk);
- finetune: one optimizer step of the paper's fine-tuning settings (fp32 master weights,
  bf16 autocast, micro-batches with accumulation, gradient checkpointing, chunked loss).
For each it writes the peak of torch.cuda.max_memory_allocated, the plan's bytes for the same
batch and lengths (sd2.memory's inference_parts / training_parts), their ratio and tokens/s.

    python benchmarks/gpu_memory_plan.py --out results/tables/gpu_memory_plan.csv
"""

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from sd2.chunked_loss import chunked_causal_lm_loss, default_chunk_tokens
from sd2.memory import GB, inference_parts, training_parts
from sd2.shapes import model_shape
from sd2.training import accumulate_gradients

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def build(shape, dtype: torch.dtype, arch: str):
    cfg = AutoConfig.for_model(
        arch,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        vocab_size=shape.vocab_size,
        tie_word_embeddings=shape.tied,
    )
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - shape.params) / shape.params < 1e-3, f"built {n} parameters, the shape says {shape.params}"
    return model


def peak(fn) -> tuple[int, float]:
    """(peak bytes allocated while fn runs, seconds)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(), time.perf_counter() - start


def generate(model, batch: int, prompt: int, new: int, vocab: int):
    ids = torch.randint(10, vocab, (batch, prompt), device="cuda")
    config = GenerationConfig(
        do_sample=False, max_new_tokens=new, min_new_tokens=new, eos_token_id=None, pad_token_id=0
    )
    return lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)


def score(model, batch: int, seq: int, vocab: int):
    ids = torch.randint(10, vocab, (batch, seq), device="cuda")

    @torch.no_grad()
    def run():
        return model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)

    return run


def finetune_step(model, batch: int, micro: int, seq: int, vocab: int):
    ids = torch.randint(10, vocab, (batch, seq), device="cuda")
    labels = ids.clone()
    labels[:, : seq // 4] = -100  # prompt positions carry no loss
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    chunk = default_chunk_tokens(vocab)

    def step():
        accumulate_gradients(model, data, lambda m, b: chunked_causal_lm_loss(m, b, chunk), micro, bf16=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "config" / "paper.yaml"))
    p.add_argument("--out", default=None)
    p.add_argument("--gen-batch", type=int, default=64)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    a = p.parse_args(argv)
    config = yaml.safe_load(Path(a.config).read_text())
    ft, measure = config["finetune"], config["measure"]
    usable = torch.cuda.get_device_properties(0).total_memory * 0.9
    rows = []

    def add(model_name, kind, settings, planned: dict, measured: int, seconds: float, tokens: int):
        row = {
            "model": model_name,
            "run": kind,
            "settings": settings,
            "planned_gib": round(sum(planned.values()) / GIB, 2),
            "measured_peak_gib": round(measured / GIB, 2),
            "planned_over_measured": round(sum(planned.values()) / measured, 2),
            "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1),
            "device": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
        }
        rows.append(row)
        print(row, flush=True)

    for name, spec in config["models"].items():
        shape = model_shape(name, config)
        arch = "qwen2" if "qwen" in spec["hub"].lower() else "llama"
        if shape.params * 2 > usable:
            print(f"{name}: {shape.params * 2 / GB:.0f} GB of bf16 weights do not fit one GPU; skipped")
            continue
        model = build(shape, torch.bfloat16, arch).eval()
        b, pr, new = a.gen_batch, a.prompt, a.new
        measured, s = peak(generate(model, b, pr, new, shape.vocab_size))
        planned = inference_parts(shape, "bfloat16", b, pr, new, every_position=False)
        add(name, "generate", f"batch {b}, prompt {pr}, new {new}", planned, measured, s, b * new)
        b, seq = measure["batch_size"], pr + measure["max_new_tokens"]
        measured, s = peak(score(model, b, seq, shape.vocab_size))
        planned = inference_parts(shape, "bfloat16", b, pr, measure["max_new_tokens"], every_position=True)
        planned["kv_cache"] = 0  # a teacher-forced pass keeps no cache
        add(name, "score", f"batch {b}, {seq} positions", planned, measured, s, b * seq)
        del model
        torch.cuda.empty_cache()
        if name in config["drafts"]:
            model = build(shape, torch.float32, arch)
            micro, seq = ft["micro_batch_size"], ft["seq_len"]
            step = finetune_step(model, ft["batch_size"], micro, seq, shape.vocab_size)
            measured, s = peak(step)
            planned = training_parts(shape, micro * seq, fine_tuning=True)
            planned["masks"] = 0  # random dense weights: no mask is held
            settings = f"batch {ft['batch_size']} as {micro} x {seq}, checkpointing, chunked loss"
            add(name, "finetune", settings, planned, measured, s, ft["batch_size"] * seq)
            del model, step
            torch.cuda.empty_cache()

    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(a.out, index=False)


if __name__ == "__main__":
    main()
