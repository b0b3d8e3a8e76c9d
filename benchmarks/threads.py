"""Threads per job on a 2-core machine: one pretraining job on 2 threads against two on 1 thread each.

Snakemake runs jobs side by side when their threads fit the cores, so the question that
sets `resources.threads` is whether two 1-thread jobs together train more tokens per
second than one 2-thread job. Each arm times forward + backward + AdamW steps of the same
model on random tokens at its config batch; the arms alternate round by round, so both
see the same machine load. Prints tokens/s of each arm and their ratio.

    python benchmarks/threads.py                        # every from-scratch model of config/config.yaml
    python benchmarks/threads.py --model llama-target --steps 4
    python benchmarks/threads.py --out results/tables/threads.csv   # the README's threads block
"""

import argparse
import multiprocessing
import statistics

import pandas as pd
import torch

from sd2 import config
from sd2.report.collect import write_table
from sd2.sweep_time import cpu_model, step_seconds


def _seconds(spec: dict, vocab: int, threads: int, steps: int) -> float:
    torch.set_num_threads(threads)
    return step_seconds(spec, vocab, bf16=False, steps=steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--model", action="append", help="a from-scratch model of the config (default: all)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per arm and round")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two arms")
    parser.add_argument("--out", default=None, help="also write one row per model as CSV")
    args = parser.parse_args()
    cfg = config.load(args.config)
    names = args.model or [name for name, spec in cfg["models"].items() if "hub" not in spec]
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for name in names:
        spec = cfg["models"][name]
        vocab = cfg["tokenizers"][spec["tokenizer"]]["vocab_size"]
        tokens = spec["train"]["batch_size"] * spec["train"]["seq_len"]
        one_job, two_jobs = [], []
        with ctx.Pool(2) as pool:
            for _ in range(args.rounds):
                one_job.append(tokens / pool.apply(_seconds, (spec, vocab, 2, args.steps)))
                pair = pool.starmap(_seconds, [(spec, vocab, 1, args.steps)] * 2)
                two_jobs.append(sum(tokens / s for s in pair))
        one, two = statistics.median(one_job), statistics.median(two_jobs)
        print(
            f"{name}: one job x 2 threads {one:7,.0f} tokens/s; two jobs x 1 thread {two:7,.0f} tokens/s together; "
            f"ratio {two / one:.2f}"
        )
        rows.append(
            {
                "model": name,
                "cpu": cpu_model(),
                "batch": f"{spec['train']['batch_size']}x{spec['train']['seq_len']}",
                "one_job_2_threads_tokens_per_s": round(one),
                "two_jobs_1_thread_tokens_per_s": round(two),
                "two_jobs_over_one": round(two / one, 2),
            }
        )
    if args.out:
        write_table(pd.DataFrame(rows), args.out)


if __name__ == "__main__":
    main()
