"""Rule target_outputs: the target's greedy continuation of every eval prompt, computed once.

Greedy speculative decoding is lossless, so what it commits is exactly this continuation
for every draft: each (target, eval set) generates it once, batched, and every
measurement job of the sweep reads it. The same job times the target alone, batch size
1, on the first prompts (the autoregressive side of the measured speed-up).
"""

import json
import time

import torch
from tqdm.auto import tqdm

from sd2 import chat
from sd2.checkpoint import write_json
from sd2.distill import generate_batch
from sd2.models import default_device, load_model, load_tokenizer
from sd2.provenance import provenance
from sd2.speculative import ar_generate, decoding_kwargs, load_prompts


def generate_all(
    model, tokenizer, prompts: list[dict], *, max_new_tokens: int, batch_size: int, chat_settings: dict | None = None
) -> list[dict]:
    """Greedy continuation of every prompt (formatted by sd2.chat) in left-padded batches of similar lengths."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]["prompt"]))
    items: list[dict | None] = [None] * len(prompts)
    for b in tqdm(range(0, len(order), batch_size), desc="target continuations", unit="batch", mininterval=5):
        idx = order[b : b + batch_size]
        rows = generate_batch(
            model,
            tokenizer,
            [prompts[i]["prompt"] for i in idx],
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            chat_settings=chat_settings,
        )
        for i, row in zip(idx, rows):
            if not row["prompt_ids"]:
                raise ValueError(f"prompt id {prompts[i]['id']!r} is empty after tokenization")
            items[i] = {
                "id": prompts[i]["id"],
                "prompt_ids": row["prompt_ids"],
                "continuation_ids": row["new_ids"],
                "text": row["response"],
                "ended_by_eos": row["finished"],
            }
    return items


def time_target_alone(
    model, tokenizer, items: list[dict], *, n_timed: int, warmup_prompts: int, max_new_tokens: int
) -> dict:
    """Target-alone greedy decoding, batch size 1, on the first n_timed prompts (the first warmup_prompts untimed).

    Also counts prompts whose batch-1 output differs from the batched one (left padding
    changes the kernels' shapes, so a near-tie can break differently).
    """
    gen_kwargs = decoding_kwargs(0.0, max_new_tokens, tokenizer.pad_token_id)
    seconds, tokens, differ = 0.0, 0, []
    for index, item in enumerate(items[:n_timed]):
        input_ids = torch.tensor([item["prompt_ids"]], device=model.device)
        start = time.perf_counter()
        new = ar_generate(model, input_ids, gen_kwargs)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        elapsed = time.perf_counter() - start
        if new.tolist() != item["continuation_ids"]:
            differ.append(item["id"])
        if index >= warmup_prompts:
            seconds, tokens = seconds + elapsed, tokens + new.numel()
    return {
        "timed_prompts": max(0, min(n_timed, len(items)) - warmup_prompts),
        "ar_tokens": tokens,
        "ar_seconds": round(seconds, 4),
        "ar_tokens_per_s": tokens / seconds if seconds else None,
        "batch1_differs": differ,
    }


def target_outputs(
    target_dir,
    eval_dir,
    out_path,
    *,
    settings: dict,
    seed: int,
    trust_remote_code: bool = False,
    dtype="auto",
    device_map=None,
) -> dict:
    """Write {items: [{id, prompt_ids, continuation_ids, text, ended_by_eos}], timing, provenance} as JSON.

    prompt_ids are the eval prompt as the target sees it (its chat template applied where
    settings["chat"] allows); every measurement of the sweep then uses these ids.
    """
    tokenizer = load_tokenizer(target_dir, trust_remote_code)
    model = load_model(target_dir, trust_remote_code, dtype=dtype, device=default_device(), device_map=device_map)
    torch.manual_seed(seed)
    prompts = load_prompts(eval_dir, settings["n_prompts"])
    start = time.time()
    chat_settings = chat.resolve(settings.get("chat"))
    items = generate_all(
        model,
        tokenizer,
        prompts,
        max_new_tokens=settings["max_new_tokens"],
        batch_size=settings["batch_size"],
        chat_settings=chat_settings,
    )
    seconds = time.time() - start
    timing = time_target_alone(
        model,
        tokenizer,
        items,
        n_timed=settings["n_check"],
        warmup_prompts=settings["warmup_prompts"],
        max_new_tokens=settings["max_new_tokens"],
    )
    new_tokens = sum(len(i["continuation_ids"]) for i in items)
    out = {
        "target": str(target_dir),
        "eval_set": str(eval_dir),
        "max_new_tokens": settings["max_new_tokens"],
        "stats": {
            "prompts": len(items),
            "new_tokens": new_tokens,
            "ended_by_eos": sum(i["ended_by_eos"] for i in items),
            "generation_seconds": round(seconds, 2),
            "batched_tokens_per_s": round(new_tokens / max(seconds, 1e-9), 1),
        },
        "timing": timing,
        "provenance": provenance(
            seed=seed,
            settings=settings,
            decoding="greedy",
            padding="left",
            chat=chat.describe(tokenizer, chat_settings),
        ),
        "items": items,
    }
    write_json(out_path, out, indent=None)
    print(
        json.dumps(
            {
                **out["stats"],
                **{k: v for k, v in timing.items() if k != "batch1_differs"},
                "batch1_differs": len(timing["batch1_differs"]),
            }
        )
    )
    return out


def load(path) -> dict:
    with open(path) as f:
        return json.load(f)
