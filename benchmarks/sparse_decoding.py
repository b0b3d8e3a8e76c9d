"""Speculative decoding on a CPU, end to end: a draft's sparse layers as CSR (sd2.sparse_kernel) against dense.

benchmarks/sparse_kernels.py found one place where a sparse kernel beats dense torch at batch 1:
fp32 layers of Llama-3.2-1B/3B size at 70% sparsity. It also found dense bf16 faster than dense
fp32 there (half the bytes), and the CSR kernel has no bf16. So this times three ways to run the
same draft, with the code path of rule measure's timed runs (transformers assisted generation,
greedy, k draft tokens per step, `sd2.sparse_kernel`'s layers):

- dense: fp32, zeros stored (how the sweep runs its drafts);
- csr: fp32, every decoder linear of at least 60% zeros as a CSR matrix (measure.draft_kernel: csr);
- bf16: the same draft cast to bf16, dense: what a user without a sparse kernel would run.

Cases:
- llama-3.2-1b-s70 -> llama-3.2-3b: a draft with Llama-3.2-1B's shapes, random weights, every
  decoder linear magnitude-pruned to 70% (sd2.masks.magnitude_mask), and a target with
  Llama-3.2-3B's shapes in bf16 (how a target is served; in fp32 the pair and the draft's copies
  do not fit 24 GiB). The published configs, vocabulary 128,256, tied embeddings.
- demo: the default run's llama-target with llama-draft-m sd2 at 70% (from --workdir), fp32, on
  its HumanEval prompts.

Random weights are enough for the ratios: with a constant schedule assisted generation drafts k
tokens every step whatever was accepted, so a step costs k draft forwards and one target forward
of k + 1 tokens at any acceptance; the target commits its own greedy tokens whichever draft runs
(`same_tokens` counts the prompts where all three agreed). MAL sets the absolute tokens/s, not
the ratios; it is reported (near 1 for random weights).

Per case and thread count, each prompt runs with every arm in turn (the order rotating from
prompt to prompt), then the draft alone generates `draft_tokens` tokens with every arm (the
kernel's effect without the target). The first prompt is a warm-up and is not counted. Ratios
are tokens/s of one arm over another, with a 95% bootstrap interval over prompts (paired).

    python benchmarks/sparse_decoding.py --out results/tables/sparse_decoding.csv
    python benchmarks/sparse_decoding.py --case demo --prompts 3     # seconds
"""

import argparse
import copy
import time
from pathlib import Path

import pandas as pd
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sd2.checkpoint import write_json
from sd2.generation import decoding_kwargs
from sd2.hub import LLAMA_3_2, LLAMA_3_2_VOCAB
from sd2.masks import magnitude_mask
from sd2.measure import continuations
from sd2.measure.speculative import pin_draft, sd_generate, step_stats
from sd2.measure.stats import paired_ratio_ci
from sd2.models import decoder_linears, load_checkpoint
from sd2.provenance import provenance
from sd2.report.collect import write_table
from sd2.sparse_kernel import kernel_modules, swap
from sd2.sweep_time import cpu_model

# Per case: timed prompts and new tokens each (the llama-3.2 pair takes seconds per step, the demo pair milliseconds).
CASES = {
    "llama-3.2": {"prompts": 6, "max_new_tokens": 8, "threads": [2]},
    "demo": {"prompts": 32, "max_new_tokens": 128, "threads": [1, 2]},
}


def random_llama(shape: str, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        **LLAMA_3_2[shape],
        vocab_size=LLAMA_3_2_VOCAB,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=None,  # random weights: nothing may end a generation early
        pad_token_id=128001,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    return model


def prune_decoders(model, sparsity: float) -> None:
    with torch.no_grad():
        for linear in decoder_linears(model).values():
            linear.weight.mul_(magnitude_mask(linear.weight, sparsity))


def llama_case(args, n_prompts: int) -> dict:
    target = random_llama("Llama-3.2-3B", args.seed + 1).to(torch.bfloat16)
    draft = random_llama("Llama-3.2-1B", args.seed)
    prune_decoders(draft, 0.7)
    generator = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(0, 128000, (n_prompts + 1, args.prompt_len), generator=generator).tolist()
    return {
        "case": "llama-3.2-1b-s70 -> llama-3.2-3b (bf16)",
        "target": target,
        "draft": draft,
        "prompts": prompts,
        "pad": 128001,
    }


def demo_case(args, n_prompts: int) -> dict:
    work = Path(args.workdir)
    paths = [
        work / "models/llama-target",
        work / "drafts/llama-target/llama-draft-m/sd2-s70",
        work / "target_outputs/llama-target/humaneval.json",
    ]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise SystemExit(f"the demo case needs the default run's {missing}: run `make run`, or pass --workdir")
    target, tok = load_checkpoint(paths[0], dtype="float32")
    draft, _ = load_checkpoint(paths[1], dtype="float32")
    items = continuations.load(paths[2])["items"]
    prompts = [it["prompt_ids"] for it in items[: n_prompts + 1]]
    return {
        "case": "demo llama-draft-m sd2-s70 -> llama-target",
        "target": target,
        "draft": draft,
        "prompts": prompts,
        "pad": tok.pad_token_id,
    }


def _timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def draft_alone(draft, input_ids, gen_kwargs: dict) -> torch.Tensor:
    with torch.no_grad():
        return draft.generate(input_ids, attention_mask=torch.ones_like(input_ids), **gen_kwargs)


ARMS = ("dense", "csr", "bf16")
# (numerator, denominator) arms of the reported ratios.
RATIOS = (("csr", "dense"), ("bf16", "dense"), ("csr", "bf16"))


def draft_arms(draft) -> dict:
    """arm -> a function that readies and returns the draft model that arm runs."""
    csr = kernel_modules(draft, "csr")
    dense = {name: draft.get_submodule(name) for name in csr}
    bf16 = copy.deepcopy(draft).to(torch.bfloat16)

    def with_modules(modules):
        def ready():
            swap(draft, modules)
            return draft

        return ready

    return {"dense": with_modules(dense), "csr": with_modules(csr), "bf16": lambda: bf16, "csr_layers": len(csr)}


def run_case(case: dict, threads: int, max_new_tokens: int, args) -> tuple[dict, list[dict]]:
    """One summary row and the per-prompt timings of one case at one thread count."""
    torch.set_num_threads(threads)
    target, draft = case["target"], case["draft"]
    pin_draft(draft, args.k)
    gen = decoding_kwargs(0.0, max_new_tokens, case["pad"])
    alone = decoding_kwargs(0.0, args.draft_tokens, case["pad"])
    arms = draft_arms(draft)
    per_prompt = []
    for index, prompt in enumerate(case["prompts"]):
        input_ids = torch.tensor([prompt])
        order = ARMS[index % len(ARMS) :] + ARMS[: index % len(ARMS)]
        row = {"prompt": index, "warmup": index == 0, "order": list(order)}
        for arm in order:
            (tokens, steps), seconds = _timed(sd_generate, target, arms[arm](), input_ids, gen)
            row |= {f"{arm}_tokens": tokens.tolist(), f"{arm}_steps": steps, f"{arm}_seconds": seconds}
            row[f"{arm}_new"] = tokens.numel()
        for arm in order:
            out, seconds = _timed(draft_alone, arms[arm](), input_ids, alone)
            row |= {f"{arm}_draft_new": out.shape[1] - input_ids.shape[1], f"{arm}_draft_seconds": seconds}
        arms["dense"]()  # the draft leaves as it came
        per_prompt.append(row)
        print(
            f"{case['case']} threads={threads} prompt {index}: "
            + ", ".join(f"{a} {row[f'{a}_seconds']:.2f}s (alone {row[f'{a}_draft_seconds']:.2f}s)" for a in ARMS),
            flush=True,
        )
    timed = [r for r in per_prompt if not r["warmup"]]

    def rate(arm: str, run: str) -> float:
        return sum(r[f"{arm}{run}_new"] for r in timed) / sum(r[f"{arm}{run}_seconds"] for r in timed)

    summary = {
        "case": case["case"],
        "threads": threads,
        "k": args.k,
        "prompts": len(timed),
        "max_new_tokens": max_new_tokens,
        "draft_tokens": args.draft_tokens,
        "csr_layers": arms["csr_layers"],
        "draft_params": sum(p.numel() for p in draft.parameters()),
        "target_params": sum(p.numel() for p in target.parameters()),
        "target_dtype": str(next(target.parameters()).dtype).removeprefix("torch."),
        "mal": step_stats([r["dense_steps"] for r in timed], args.k)["mal"],
        "same_tokens": sum(r["dense_tokens"] == r["csr_tokens"] == r["bf16_tokens"] for r in timed),
    }
    for run, name in (("", "speculative"), ("_draft", "draft_alone")):
        summary |= {f"{name}_tokens_per_s_{arm}": rate(arm, run) for arm in ARMS}
        for a, b in RATIOS:
            value, low, high = paired_ratio_ci(
                *[[r[f"{arm}{run}_{field}"] for r in timed] for arm in (a, b) for field in ("new", "seconds")],
                n_boot=args.bootstrap,
                seed=args.seed,
            )
            summary |= {f"{name}_{a}_over_{b}": value, f"{name}_{a}_over_{b}_ci_low": low}
            summary[f"{name}_{a}_over_{b}_ci_high"] = high
    summary |= {"cpu": cpu_model(), "torch_version": torch.__version__}
    return summary, per_prompt


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", choices=list(CASES), help="default: both")
    parser.add_argument("--threads", type=int, action="append", help="default: CASES")
    parser.add_argument("--prompts", type=int, help="timed prompts per case, plus one warm-up (default: CASES)")
    parser.add_argument("--prompt-len", type=int, default=32, help="random prompt length of the llama-3.2 case")
    parser.add_argument("--max-new-tokens", type=int, help="default: CASES")
    parser.add_argument("--draft-tokens", type=int, default=16, help="tokens of the draft-alone runs")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="work", help="the default run's work/ (demo case)")
    parser.add_argument("--out", default=None, help="summary CSV; the per-prompt timings go beside it as JSON")
    args = parser.parse_args()
    rows, prompts = [], []
    for name in args.case or list(CASES):
        n_prompts = args.prompts or CASES[name]["prompts"]
        max_new_tokens = args.max_new_tokens or CASES[name]["max_new_tokens"]
        case = (llama_case if name == "llama-3.2" else demo_case)(args, n_prompts)
        for threads in args.threads or CASES[name]["threads"]:
            summary, per_prompt = run_case(case, threads, max_new_tokens, args)
            rows.append(summary)
            prompts.append({"case": case["case"], "threads": threads, "prompts": per_prompt})
        del case
    table = pd.DataFrame(rows)
    print(table.drop(columns=["cpu", "torch_version"]).round(3).to_string(index=False))
    if args.out:
        write_table(table, args.out)
        settings = {key: value for key, value in vars(args).items() if key != "seed"}
        runs = {"provenance": provenance(seed=args.seed, **settings), "runs": prompts}
        write_json(args.out.removesuffix(".csv") + ".json", runs, indent=None)


if __name__ == "__main__":
    main()
