"""Rule model_report: is each pretrained model good enough to measure drafts against?

Reports parameters, training tokens, validation loss, bits per byte (comparable across
tokenizers), and on greedy continuations of the first evaluation set's prompts (HumanEval in
the default run): the share of distinct word 4-grams (low = loops), how many completions
write the prompt's function body (an indented first line, not a new top-level statement),
and how many write a body and parse (a completion cut by the token limit is cut at its last
full line first).
"""

import ast
import json
import math
import re
from pathlib import Path

import pandas as pd
import torch
from datasets import load_from_disk

from sd2.checkpoint import atomic_path
from sd2.models import count_parameters, default_device, load_model, load_tokenizer

# Newlines count as words, so a completion of blank lines is a loop, not "no 4-grams".
WORD = re.compile(r"\w+|[^\w\s]|\n")


def distinct_4gram_share(text: str) -> float:
    """Distinct word 4-grams / all word 4-grams: 1.0 never repeats, near 0 is a loop."""
    words = WORD.findall(text)
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    return len(set(grams)) / len(grams) if grams else 1.0


def writes_body(completion: str) -> bool:
    """Is the completion's first non-blank line indented, i.e. the body of the prompt's function?"""
    first = next((line for line in completion.splitlines() if line.strip()), "")
    return first[:1] in (" ", "\t")


def parses(prompt: str, completion: str, ended: bool = False) -> bool:
    """Does the completion write a body, and does prompt + completion parse as Python?

    A completion the token limit cut (`ended` False) is cut at its last full line first.
    A blank or body-less completion does not count: prompt + nothing parses as a function
    whose body is its docstring.
    """
    if not ended:
        completion = completion[: completion.rfind("\n") + 1] if "\n" in completion else ""
    if not writes_body(completion):
        return False
    try:
        ast.parse(prompt + completion)
        return True
    except (SyntaxError, ValueError):
        return False


@torch.no_grad()
def greedy_completions(
    model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16
) -> list[tuple[str, bool]]:
    """(completion, ended by end-of-text) per prompt."""
    tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True).to(model.device)
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = gen[:, enc["input_ids"].shape[1] :]
        ended = (new == tokenizer.eos_token_id).any(-1).tolist()
        out += zip(tokenizer.batch_decode(new, skip_special_tokens=True), ended)
    return out


@torch.no_grad()
def bits_per_byte(model, tokenizer, texts: list[str], seq_len: int) -> tuple[float, float]:
    """(mean loss per token, bits per byte) over non-overlapping windows of the texts."""
    nll, tokens, n_bytes = 0.0, 0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        n_bytes += len(text.encode())
        for start in range(0, len(ids) - 1, seq_len):
            window = torch.tensor([ids[start : start + seq_len + 1]], device=model.device)
            if window.shape[1] < 2:
                continue
            logits = model(input_ids=window[:, :-1]).logits
            nll += torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
            tokens += window.shape[1] - 1
    return nll / tokens, nll / math.log(2) / n_bytes


def report(
    models: dict,
    roles: dict,
    corpus_dir,
    prompts_dir,
    table_path,
    examples_path,
    *,
    n_prompts=64,
    max_new_tokens=128,
    n_val_docs=40,
) -> pd.DataFrame:
    val_texts = load_from_disk(str(corpus_dir))["validation"]["text"][:n_val_docs]
    prompts = load_from_disk(str(prompts_dir))
    prompts = prompts.select(range(min(n_prompts, len(prompts))))
    rows, examples = [], [f"# Greedy continuations of {Path(prompts_dir).name} prompts\n"]
    for name, path in models.items():
        model, tok = load_model(path, device=default_device()), load_tokenizer(path)
        prov = json.loads((Path(path) / "provenance.json").read_text())
        seq_len = prov["settings"]["spec"]["train"]["seq_len"]
        loss, bpb = bits_per_byte(model, tok, val_texts, seq_len)
        completions, ended = zip(*greedy_completions(model, tok, prompts["prompt"], max_new_tokens))
        rows.append(
            {
                "model": name,
                "role": roles.get(name, ""),
                "arch": model.config.model_type,
                "parameters": count_parameters(model),
                "vocab_size": len(tok),
                "train_tokens": prov["final"]["tokens"],
                "instruct_tokens": (prov.get("instruct_final") or {}).get("tokens", 0),
                "train_seconds": round(prov["final"]["seconds"] + (prov.get("instruct_final") or {}).get("seconds", 0)),
                "precision": prov.get("precision", ""),
                "val_loss": round(loss, 4),
                "val_bits_per_byte": round(bpb, 4),
                "distinct_4gram_share": round(sum(map(distinct_4gram_share, completions)) / len(completions), 4),
                "body_rate": round(sum(map(writes_body, completions)) / len(completions), 4),
                "parse_rate": round(
                    sum(parses(p, c, e) for p, c, e in zip(prompts["prompt"], completions, ended)) / len(completions), 4
                ),
                "eos_rate": round(sum(ended) / len(completions), 4),
                "n_prompts": len(completions),
                "max_new_tokens": max_new_tokens,
            }
        )
        examples.append(f"\n## {name} ({roles.get(name, '')}, {rows[-1]['parameters'] / 1e6:.1f}M parameters)\n")
        for pid, prompt, completion in list(zip(prompts["id"], prompts["prompt"], completions))[:2]:
            examples.append(f"\n`{pid}`\n\n```python\n{prompt}{completion}\n```\n")
    table = pd.DataFrame(rows)
    with atomic_path(table_path) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(examples_path) as tmp:
        tmp.write_text("".join(examples))
    return table
