"""fp32 against bf16 autocast: pretraining tokens/s of the default target on this machine.

Forward + backward + AdamW step on random tokens at the config's batch size and sequence
length; the two precisions alternate round by round, each after a warm-up step, so both see the same
machine load. Prints tokens/s of each and their ratio.

    python benchmarks/precision.py                      # first target of config/config.yaml
    python benchmarks/precision.py --model llama-draft-m --steps 10

Where bf16 is emulated (no AVX512-BF16 or AMX) a bf16 step of the default target takes
about 45 s on 2 cores, so the default run takes about 4 minutes there.
"""

import argparse
import statistics

import torch

from sd2 import config
from sd2.precision import native_bf16
from sd2.sweep_time import step_seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--model", default=None, help="a from-scratch model of the config (default: its first target)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per precision and round")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of fp32 and bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out",
        default=None,
        help="also write the result as a one-row CSV (the README's precision block reads results/tables/precision.csv)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = config.load(args.config)
    name = args.model or cfg["targets"][0]
    spec = cfg["models"][name]
    vocab = cfg["tokenizers"][spec["tokenizer"]]["vocab_size"]
    tokens = spec["train"]["batch_size"] * spec["train"]["seq_len"]
    print(
        f"{name}, batch {spec['train']['batch_size']}x{spec['train']['seq_len']}, {args.threads} threads, "
        f"native bf16 on this CPU: {native_bf16('cpu')}"
    )
    seconds = {"fp32": [], "bf16": []}
    for _ in range(args.rounds):
        for label, bf16 in (("fp32", False), ("bf16", True)):
            seconds[label].append(step_seconds(spec, vocab, bf16, steps=args.steps))
    speed = {label: tokens / statistics.median(s) for label, s in seconds.items()}
    for label, s in seconds.items():
        print(
            f"  {label}: {speed[label]:8,.0f} tokens/s (median of {args.rounds} rounds of {args.steps} steps; "
            f"s/step {min(s):.3f}-{max(s):.3f})"
        )
    print(f"  bf16 / fp32 throughput: {speed['bf16'] / speed['fp32']:.3f}")
    if args.out:
        import pandas as pd

        from sd2.report.collect import write_table
        from sd2.sweep_time import cpu_model

        write_table(
            pd.DataFrame(
                [
                    {
                        "model": name,
                        "cpu": cpu_model(),
                        "threads": args.threads,
                        "native_bf16": native_bf16("cpu"),
                        "batch": f"{spec['train']['batch_size']}x{spec['train']['seq_len']}",
                        "fp32_tokens_per_s": round(speed["fp32"], 1),
                        "bf16_tokens_per_s": round(speed["bf16"], 1),
                        "bf16_over_fp32": round(speed["bf16"] / speed["fp32"], 4),
                    }
                ]
            ),
            args.out,
        )


if __name__ == "__main__":
    main()
