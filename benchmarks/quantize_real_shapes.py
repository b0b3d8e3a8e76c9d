"""The quantize step on a real draft's shapes: time, peak memory, mask kept, bytes on disk.

The demo drafts are 1-2M parameters; the paper's drafts are Llama-3.2-1B and 3B. This builds a
draft with exactly Llama-3.2-1B's (or 3B's) architecture and random weights (no hub access),
prunes every decoder linear to `--sparsity` by magnitude, and runs sd2.drafts.quantize on it as
rule quantize does (GPTQ, the mask held, calibration on stdlib functions tokenized by a small BPE
trained here), once per scheme. Random weights say nothing about acceptance; they do exercise
the memory, the time and the checks at the real sizes. Writes one row per (model, scheme):

    python benchmarks/quantize_real_shapes.py --models llama-3.2-1b --schemes w4a16 w8a16 --out q.csv
"""

import argparse
import csv
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from sd2.data import stdlib_files
from sd2.drafts.quantize import quantize
from sd2.hub import LLAMA_3_2, LLAMA_3_2_VOCAB
from sd2.masks import magnitude_mask
from sd2.measure.weight_bytes import model_weight_bytes
from sd2.models import decoder_linears, load_model
from sd2.provenance import provenance
from sd2.tokenization import train_tokenizer

SHAPES = {
    "llama-3.2-1b": LLAMA_3_2["Llama-3.2-1B"],
    "llama-3.2-3b": LLAMA_3_2["Llama-3.2-3B"],
    # The same vocabulary and head size at a width a CPU quantizes in a minute: a check of the script.
    "smoke": dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2
    ),
}


def build(name: str, tokenizer_dir: Path, out: Path, sparsity: float, device: str) -> None:
    config = LlamaConfig(
        **SHAPES[name],
        vocab_size=LLAMA_3_2_VOCAB,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
    )
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        for linear in decoder_linears(model).values():
            linear.weight.mul_(magnitude_mask(linear.weight.float().cpu(), sparsity).to(device))
    model.save_pretrained(out)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["llama-3.2-1b"], choices=list(SHAPES))
    parser.add_argument("--schemes", nargs="+", default=["w4a16", "w8a16"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=64, help="calibration samples (the demo config's)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--work", default="/tmp/quantize_real_shapes")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(args.work)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files()[:200]]
    train_tokenizer("byte_bpe", 4096, texts, work / "tokenizer")
    rows = [{"prompt": t[:400], "response": t[400:2400]} for t in texts if len(t) > 2400]
    Dataset.from_list(rows).save_to_disk(str(work / "calibration"))
    settings = {"calibration_samples": args.samples, "calibration_seq_len": args.seq_len, "chat": None}
    fields = ["model", "scheme", "sparsity", "parameters", "seconds", "peak_gpu_gib", "mask_kept"]
    fields += ["zero_fraction_before", "zero_fraction_after", "disk_bytes", "weight_bytes_per_token", "device"]
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields + ["torch", "gpu"])
        writer.writeheader()
        for name in args.models:
            source = work / name
            build(name, work / "tokenizer", source, args.sparsity, device)
            for scheme in args.schemes:
                out = work / f"{name}-{scheme}"
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                start = time.monotonic()
                summary = quantize(
                    source,
                    out,
                    scheme=scheme,
                    method="gptq",
                    calibration=work / "calibration",
                    settings=settings,
                    seed=0,
                    dtype="bfloat16",
                )
                seconds = time.monotonic() - start
                model = load_model(out, dtype="bfloat16")
                row = {
                    "model": name,
                    "scheme": scheme,
                    "sparsity": args.sparsity,
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "seconds": round(seconds, 1),
                    "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else 0,
                    "mask_kept": summary["mask_kept"],
                    # The least sparse layer before and after: rounding adds zeros, a lost mask would remove them.
                    "zero_fraction_before": round(min(summary["zero_fraction_before"].values()), 4),
                    "zero_fraction_after": round(min(summary["zero_fraction_after"].values()), 4),
                    "disk_bytes": sum(p.stat().st_size for p in out.glob("*.safetensors")),
                    "weight_bytes_per_token": model_weight_bytes(model, scheme)["weight_bytes_per_token"],
                    "device": device,
                    "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if device == "cuda" else "",
                }
                writer.writerow(row)
                f.flush()
                print(row, flush=True)
                del model
    print(provenance(settings=vars(args)))


if __name__ == "__main__":
    main()
